//! Pipewright training runtime.
//!
//! `model` holds the transformer and its explicit forward/backward,
//! `kernels` the numeric primitives they call, `optim` AdamW and the
//! learning-rate schedule, `data` the corpus, tokenizer and sampler,
//! `checkpoint` safetensors checkpoints and Hugging Face export, `train` the
//! training loop, `link` the binary frames between stages, `sync` the
//! data-parallel gradient all-reduce, `identity` a worker's signing key,
//! `ledger` the contribution ledger and reward shares, `plan` what a run needs of a machine,
//! `shard` the runtime of a shard worker (registration, the epoch loop, the
//! steps through the coordinator's barrier, its state and metrics),
//! `local` a run's coordinator and worker processes on one machine,
//! `exposition` the `/metrics` listener, `cli` the `pipewright` commands.

pub mod checkpoint;
pub mod cli;
pub mod coord;
pub mod data;
pub mod exposition;
pub mod identity;
pub mod kernels;
pub mod ledger;
pub mod link;
pub mod local;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod plan;
pub mod schedule;
pub mod shard;
pub mod sync;
pub mod telemetry;
pub mod train;

/// The exit status of a worker whose identity the run's coordinator
/// quarantined (convicted by an audit, of bad evidence, or outvoted on its
/// parameters' digest): the operator reads it as the reassignment reason
/// `FailedValidation`, the local launcher starts a fresh worker under a new
/// identity.
pub const EXIT_QUARANTINED: i32 = 3;
