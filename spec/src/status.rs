//! The observed state of a `TrainingRun` on Kubernetes, written by the
//! operator into the custom resource's `status` subresource.
//!
//! Only compiled with the `kube` feature: local mode keeps its state in the
//! run directory and has no use for these types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator last observed of a run; every field is optional on the
/// wire so that a status written by an older operator still parses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRunStatus {
    /// Coarse lifecycle state shown by `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// Standard Kubernetes conditions (`Ready`, `Progressing`, `Degraded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes; lags behind while a
    /// spec change is being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Shards (stage × replica) whose pod is ready, summed over stages.
    #[serde(default)]
    pub ready_shards: u32,
    /// Shards the spec asks for (stages × replicas).
    #[serde(default)]
    pub desired_shards: u32,
    /// Per-stage health, one entry per pipeline stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// Where every shard currently runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Shards moved to a new pod after their pod or node failed, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reassignments: Vec<Reassignment>,
    /// Last optimizer step the coordinator reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Training loss at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Training throughput over the last reporting window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Shard reassignments over the whole run (the list above keeps only
    /// the latest); the run fails when this exceeds
    /// `spec.placement.maxReassignments`.
    #[serde(default)]
    pub total_reassignments: u32,
    /// Nodes on which a shard of this run failed; replacement pods are kept
    /// off them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_nodes: Vec<String>,
    /// Phase the coordinator last reported (`Initializing`, `Training`,
    /// `Checkpointing`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_phase: Option<String>,
    /// When the run reached `Succeeded` or `Failed`; the clock of
    /// `spec.ttlSecondsAfterFinished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The largest contributors of the reward window, from the run's
    /// ledger (`pipewright ledger` lists them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributions: Vec<ContributorStatus>,
    /// GPUs (`nvidia.com/gpu`) each shard pod requests, read from the shard
    /// pods (0: they run on CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_shard: Option<u32>,
}

/// One contributor in `status.contributions`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContributorStatus {
    /// Fingerprint of the worker's identity (its Ed25519 public key).
    pub identity: String,
    /// Pod (or host) it last registered from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Micro-batches booked in the reward window.
    pub micro_batches: u64,
    /// Verified TFLOPs booked in the reward window.
    pub teraflops: f64,
    /// Its share of the reward pool, in percent.
    pub share_percent: f64,
}

/// Lifecycle states of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RunPhase {
    /// Accepted; pods are being created or scheduled.
    Pending,
    /// Every shard has a ready pod and training is under way.
    Running,
    /// Training goes on with fewer ready shards than asked for, or while a
    /// failed shard is being reassigned.
    Degraded,
    /// All steps are done and the final checkpoint is written.
    Succeeded,
    /// The run stopped and will not resume without a spec change.
    Failed,
    /// `spec.suspend` is set: the run's pods are deleted, everything else is
    /// kept, and clearing it starts them again.
    Suspended,
}

/// Health of one pipeline stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// Index of the stage, from 0 at the embedding end.
    pub stage: u32,
    /// Replicas the spec asks for.
    pub desired_replicas: u32,
    /// Replicas whose pod is ready.
    pub ready_replicas: u32,
    /// Transformer blocks held by the stage, as `first-last` (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<String>,
}

/// Placement of one shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Pipeline stage of the shard.
    pub stage: u32,
    /// Data-parallel replica of the shard within its stage.
    pub replica: u32,
    /// Pod currently running the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Node that pod is scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How many times the shard has been moved to a new pod; names the pod
    /// (`<run>-s<stage>-r<replica>` for 0, with `-a<attempt>` after).
    #[serde(default)]
    pub attempt: u32,
}

/// One move of a shard to a new pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reassignment {
    /// Pipeline stage of the shard.
    pub stage: u32,
    /// Replica of the shard.
    pub replica: u32,
    /// Pod that lost the shard.
    pub from_pod: String,
    /// Node that pod ran on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
    /// Pod that took the shard over; absent when the move failed the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    /// Why the shard was moved (pod deleted, node lost, failed validation).
    pub reason: String,
    /// When the operator moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}
