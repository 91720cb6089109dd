//! Model hyper-parameters resolved from the manifest and the tokenizer.
//!
//! [`ModelConfig`] is defined in the spec crate's sizing, so that the
//! operator sizes a run from the same shapes the workers build.

pub use pipewright_spec::sizing::ModelConfig;
