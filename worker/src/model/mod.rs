//! The Llama-family transformer: each layer is a pair of plain functions,
//! forward and backward side by side, with the backward split into an input
//! half and a weight half (zero-bubble schedules run them apart).
//!
//! A [`Stage`] holds a contiguous range of blocks; a list of stages run one
//! after the other is the whole model.

pub mod attention;
pub mod block;
pub mod bottleneck;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod embedding;
#[cfg(test)]
mod gradcheck;
pub mod head;
pub mod init;
pub mod linear;
pub mod mlp;
pub mod param;
pub mod partition;
pub mod rmsnorm;
pub mod stage;

pub use block::Recompute;
pub use config::ModelConfig;
pub use param::Param;
pub use partition::partition;
pub use stage::{Stage, StageError, StageInput, StageOutput};
