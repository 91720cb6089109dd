//! What a shard worker keeps beside its pipeline step: its own metrics
//! (`metrics`), served by [`crate::exposition`].

pub mod metrics;
