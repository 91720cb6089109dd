//! The messages of complaints and rechecks (`coord::complaint`,
//! `shard::complaint`): what a worker reports after a step broke off,
//! the recheck orders a wiring carries, and a validator's signed verdict.

use serde::{Deserialize, Serialize};

use crate::link::sign::SignedHeader;

/// `POST /v1/broken`: after a step of `epoch` broke off, the signed
/// headers of every pipeline frame `worker` took in it, and the shards it
/// suspects of having made it break.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BrokenStep {
    /// The reporting worker.
    pub worker: u64,
    /// The epoch the step was trained in.
    pub epoch: u64,
    /// The step that broke off, 0-based (the steps completed before it).
    pub step: u64,
    /// `(stage, replica)` of each suspect: the author of a gradient
    /// contribution its ring refused, or, when its own output would have
    /// been refused, itself and the authors of what it received.
    #[serde(default)]
    pub suspects: Vec<(usize, usize)>,
    /// The headers, with their author signatures, of the frames it took.
    #[serde(default)]
    pub frames: Vec<SignedHeader>,
}

/// A recheck a validator carries out before it links in an epoch: the
/// forward of micro-batch `mb` of step `step` (0-based) as the first
/// stage's replica `replica` should have computed it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecheckOrder {
    /// The recheck's id.
    pub recheck: u64,
    /// The step, 0-based: the validator's state must be the one before it.
    pub step: u64,
    /// The stage (always 0: its input needs no evidence).
    pub stage: usize,
    /// The micro-batch.
    pub mb: u64,
    /// The replica whose signed frame is rechecked.
    pub replica: usize,
}

/// `POST /v1/recheck`: a validator's verdict on a recheck.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RecheckReport {
    /// The validator.
    pub worker: u64,
    /// The recheck.
    pub recheck: u64,
    /// BLAKE3 of the input it sampled (the tokens), 64 hex digits.
    pub input: String,
    /// BLAKE3 of its forward output as the run's codec encodes it.
    pub output: String,
    /// Its identity's signature (hex) of [`recheck_message`] in the domain
    /// `pipewright recheck v1`.
    pub signature: String,
    /// Why it could not recompute (it holds another step's weights); then
    /// `input` and `output` are empty, and signed so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a validator signs for a recheck:
/// `run=<run_id> recheck=<id> step=<0-based> stage=<s> mb=<mb> replica=<r> input=<hex> output=<hex>`.
pub fn recheck_message(run_id: &str, o: &RecheckOrder, input: &str, output: &str) -> Vec<u8> {
    format!(
        "run={run_id} recheck={} step={} stage={} mb={} replica={} input={input} output={output}",
        o.recheck, o.step, o.stage, o.mb, o.replica
    )
    .into_bytes()
}
