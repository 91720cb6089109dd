//! Sizing a run from the manifest alone: the model's shapes
//! ([`ModelConfig`]), the split of its layers into stages ([`partition`])
//! and the pipeline schedules' operation lists ([`schedule`]). Pure
//! arithmetic over the spec's types, so that the workers and the operator
//! size a run with the same functions.

mod model;
mod partition;
pub mod schedule;

pub use model::ModelConfig;
pub use partition::partition;
