//! The `TrainingRun` manifest, defined once for the worker and the operator.
//!
//! [`load_manifest`] reads a YAML file, [`parse_manifest`] a string; both
//! return a [`TrainingRun`] that has passed [`validate`], or a [`SpecError`]
//! naming the offending field (for example `spec.model.heads`).
//!
//! [`sizing`] sizes a run from its manifest alone (the model's shapes, the
//! split into stages, the schedules' operation lists), for the workers and
//! the operator alike.

pub mod coordinator;
pub mod error;
pub mod load;
pub mod sizing;
pub mod types;
pub mod validate;

pub use error::{FieldError, SpecError};
pub use load::{load_manifest, parse_manifest};
pub use types::*;
pub use validate::validate;
