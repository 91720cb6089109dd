//! The Pipewright Kubernetes operator: the `TrainingRun` custom resource
//! definition and the controller that runs one pod per shard.

pub mod children;
pub mod controller;
pub mod coordinator;
pub mod crd;
pub mod fixtures;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod telemetry;
