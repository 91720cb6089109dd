//! The Llama-family transformer: layers with explicit forward and backward.

pub mod param;

pub use param::Param;
