//! Assignment of contiguous layer ranges to stages.
//!
//! [`partition`] is defined in the spec crate's sizing, so that the operator
//! sizes each stage from the same split the workers run.

pub use pipewright_spec::sizing::partition;
