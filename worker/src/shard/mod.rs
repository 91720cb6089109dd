//! One shard (stage × replica) of a run, as `pipewright worker` and
//! `pipewright join` serve it, wired by the run's coordinator.
//!
//! - `session`: what the worker needs before training (identity, manifest,
//!   memory check, listeners, measured speed) and registration, the
//!   wiring of each epoch, the heartbeat.
//! - `epoch`: the epoch loop: the wiring, the stage built or kept, its
//!   state brought to the plan's step, the links of the epoch.
//! - `step`: the steps of an epoch through the coordinator's barrier: train,
//!   snapshot, signed commitment, the barrier's answer.
//! - `state`: restoring the stage's state from where the plan says, handing
//!   it to a new replica, and delivering checkpoints.
//! - `audit`: the audit orders a barrier's answer carries (upload the
//!   evidence, or recompute another replica's micro-batch and sign the
//!   hashes), and the end of a quarantined worker.
//! - `complaint`: frames signed with the worker's identity and checked
//!   against the neighbours' keys, and the complaint about a refused
//!   signed frame.
//! - `metrics`: the worker's own Prometheus metrics, served by
//!   [`crate::exposition`].
//!
//! The worker keeps a snapshot of its state one step back, so any plan can
//! roll it back; when a peer is lost or the coordinator restarts it drops
//! the links and asks for the next wiring.

mod audit;
mod complaint;
mod epoch;
pub mod metrics;
mod session;
mod state;
mod step;

pub use audit::{Quarantined, TERMINATION_LOG_ENV};
pub use session::{Config, Session};
