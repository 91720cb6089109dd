//! The Pipewright Kubernetes operator: the `TrainingRun` custom resource
//! definition and the controller that runs one pod per shard.

pub mod children;
pub mod controller;
pub mod crd;
