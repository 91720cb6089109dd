//! What the coordinator's `GET /status` answers: the run's phase and
//! progress, per stage and per shard. Declared here, beside the manifest,
//! because both sides use it: the coordinator (in the worker crate) writes
//! it and the operator reads it, so a renamed field fails to compile on the
//! side that was not changed.
//!
//! Not to be confused with [`crate::TrainingRunStatus`], which the operator
//! writes into the custom resource.

use serde::{Deserialize, Serialize};

/// Run phases, as reported in the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for workers to register.
    Pending,
    /// Every slot filled; workers are restoring state and linking.
    Initializing,
    /// Steps are being completed.
    Training,
    /// A checkpoint is being written.
    Checkpointing,
    /// Every step done and the final checkpoint committed.
    Succeeded,
    /// Given up; `reason` says why.
    Failed,
}

impl Phase {
    /// Every phase, in the order a run goes through them.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Initializing,
        Phase::Training,
        Phase::Checkpointing,
        Phase::Succeeded,
        Phase::Failed,
    ];

    /// The phase's name, as it appears on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Initializing => "Initializing",
            Phase::Training => "Training",
            Phase::Checkpointing => "Checkpointing",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// One shard's line in the status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardStatus {
    /// Stage.
    pub stage: usize,
    /// Replica.
    pub replica: usize,
    /// Worker id, when the slot is filled.
    pub worker: Option<u64>,
    /// Worker's name.
    pub name: Option<String>,
    /// Its pipeline address.
    pub address: Option<String>,
    /// `live` or `vacant`.
    pub state: String,
    /// Steps it has completed.
    pub completed: u64,
    /// Seconds since it was last heard from.
    pub seconds_since_heartbeat: Option<f64>,
    /// Its last step's wall time.
    pub step_seconds: f64,
    /// Of that, time spent computing.
    pub busy_seconds: f64,
    /// Mean over its steps (the first left out) of: wall time, time in
    /// forwards and backwards, time in the optimizer update.
    pub mean_seconds: [f64; 3],
    /// Mean bytes per step it sent to neighbouring stages.
    pub mean_link_bytes: f64,
    /// Frames its links refused in the current epoch.
    pub rejected_frames: u64,
    /// Micro-batches it ran in its last step (its share of the route).
    #[serde(default)]
    pub micro_batches: usize,
    /// Smoothed compute seconds per micro-batch, which the route weighs.
    #[serde(default)]
    pub seconds_per_micro_batch: Option<f64>,
    /// Fingerprint of the worker's identity (its public key's short form).
    #[serde(default)]
    pub identity: Option<String>,
}

/// One contributor's standing in the ledger, as `/status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Contribution {
    /// Fingerprint of its identity.
    pub identity: String,
    /// The name it last registered under (a pod or host name).
    pub name: String,
    /// Verified FLOPs booked in the reward window.
    pub flops: f64,
    /// Micro-batches booked in the window.
    pub micro_batches: u64,
    /// Its share of the reward pool, 0..=1.
    pub share: f64,
}

/// One stage's line in the status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageStatus {
    /// Stage.
    pub stage: usize,
    /// Layer range `[start, end)`.
    pub layers: [usize; 2],
    /// Replicas wanted.
    pub desired: usize,
    /// Replicas with a live worker.
    pub ready: usize,
    /// Fraction of the last step its workers waited (the bubble).
    pub bubble: f64,
}

/// `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Run name.
    pub run: String,
    /// Phase.
    pub phase: Phase,
    /// Why the run failed or what it waits for.
    pub reason: String,
    /// Steps completed by every worker.
    pub step: u64,
    /// Steps of the run.
    pub steps: u64,
    /// Loss of the last committed step.
    pub loss: Option<f32>,
    /// Training tokens per second over the last steps.
    pub tokens_per_second: f64,
    /// Wiring generation.
    pub epoch: u64,
    /// Shards given to a new worker after theirs was lost.
    pub reassignments: u64,
    /// Last committed checkpoint step.
    pub checkpoint_step: Option<u64>,
    /// Volunteers waiting for a vacancy.
    pub standby: usize,
    /// Per stage.
    pub stages: Vec<StageStatus>,
    /// Per shard.
    pub shards: Vec<ShardStatus>,
    /// Contributors by share, largest first (from the ledger's reward
    /// window).
    #[serde(default)]
    pub contributions: Vec<Contribution>,
    /// Reports refused (forged, replayed, unrouted work), all kinds.
    #[serde(default)]
    pub refused_reports: u64,
    /// Recoveries from a lost shard finished so far. One starts when the
    /// run leaves training because a shard was lost and ends when the
    /// first step of the new epoch is committed.
    #[serde(default)]
    pub recoveries: u64,
    /// Seconds those recoveries took, all together.
    #[serde(default)]
    pub recovery_seconds_total: f64,
    /// Seconds the last recovery took.
    #[serde(default)]
    pub last_recovery_seconds: Option<f64>,
    /// Identities convicted of dishonest work and barred from the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<QuarantinedStatus>,
}

/// One quarantined identity in the status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuarantinedStatus {
    /// Fingerprint of its public key.
    pub identity: String,
    /// The stage it served.
    pub stage: usize,
    /// The replica it served.
    pub replica: usize,
    /// The step it was convicted at (never booked).
    pub step: u64,
    /// `failed_audit`, `bad_evidence` or `digest_mismatch`.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_the_wire_names() {
        for p in Phase::ALL {
            assert_eq!(
                serde_json::to_string(&p).expect("json"),
                format!("\"{}\"", p.name())
            );
        }
    }
}
