//! The `TrainingRun` manifest (`apiVersion: pipewright.dev/v1alpha1`).
//!
//! These types are the single definition of the spec: the worker reads them
//! from YAML in local mode, and the operator serves them as the CRD schema.
//! Field names are camelCase on the wire, as Kubernetes conventions ask.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The status the operator writes; a sibling file so that local mode, which
// builds without the feature, never sees it.
#[cfg(feature = "kube")]
#[path = "status.rs"]
mod status;
#[cfg(feature = "kube")]
pub use status::{
    ContributorStatus, Reassignment, RunPhase, ShardStatus, StageStatus, TrainingRunStatus,
};

/// API group and version of the manifest.
pub const API_VERSION: &str = "pipewright.dev/v1alpha1";
/// Kind of the manifest.
pub const KIND: &str = "TrainingRun";

/// A whole manifest as written in a YAML file for local mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingRun {
    /// Must be `pipewright.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `TrainingRun`.
    pub kind: String,
    /// Name (and optional labels) of the run.
    pub metadata: Metadata,
    /// What to train and how.
    pub spec: TrainingRunSpec,
}

/// The subset of Kubernetes object metadata that local mode reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// Name of the run; names its output directory in local mode.
    pub name: String,
    /// Free-form labels (kept, not interpreted locally).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Free-form annotations (kept, not interpreted locally).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

// With the `kube` feature this also derives the Kubernetes custom resource.
// Its Rust type is `TrainingRunResource` (`root`) because the name
// `TrainingRun` already belongs to the local-mode manifest above; the
// Kubernetes kind is `TrainingRun` either way, so both read the same YAML.
// (A plain comment, not a doc comment: doc text becomes the CRD's
// description, which `kubectl explain` shows to users.)
/// What to train, on what data, split how, for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
// The printer columns repeat `type_ = ...` pairs, which clippy mistakes for
// duplicated attributes.
#[cfg_attr(feature = "kube", allow(clippy::duplicated_attributes))]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "pipewright.dev",
        version = "v1alpha1",
        kind = "TrainingRun",
        root = "TrainingRunResource",
        plural = "trainingruns",
        shortname = "tr",
        category = "pipewright",
        namespaced,
        status = "TrainingRunStatus",
        derive = "PartialEq",
        doc = "A pipeline-parallel training run: one pod per shard (stage x replica).",
        printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
        printcolumn(
            name = "Stages",
            type_ = "integer",
            json_path = ".spec.pipeline.stages"
        ),
        printcolumn(
            name = "Replicas",
            type_ = "integer",
            json_path = ".spec.pipeline.replicas"
        ),
        printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyShards"),
        printcolumn(name = "Step", type_ = "integer", json_path = ".status.step"),
        printcolumn(name = "Loss", type_ = "number", json_path = ".status.loss"),
        printcolumn(
            name = "Tokens/s",
            type_ = "number",
            json_path = ".status.tokensPerSecond"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingRunSpec {
    /// Shape of the transformer.
    pub model: ModelSpec,
    /// Text to train on and how it is tokenized.
    pub data: DataSpec,
    /// Optimisation hyper-parameters and length of the run.
    pub training: TrainingSpec,
    /// How the layers are split into stages and replicated.
    #[serde(default)]
    pub pipeline: PipelineSpec,
    /// Where and how often checkpoints are written.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Kubernetes only: where the operator places the run's pods and how
    /// much failure it absorbs. Local mode ignores it.
    #[serde(default, skip_serializing_if = "PlacementSpec::is_default")]
    pub placement: PlacementSpec,
    /// Kubernetes only: while true the operator deletes the run's pods and
    /// keeps everything else (manifest, key, services, status); setting it
    /// back to false starts the pods again. Local mode ignores it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
    /// Kubernetes only: seconds after the run succeeded or failed at which
    /// the operator deletes it (and so all its children). Absent: kept until
    /// deleted by hand. Local mode ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
    /// Kubernetes only: a persistent volume for the coordinator's state and
    /// the run directory (checkpoints), so that a replaced coordinator pod
    /// resumes the run. Absent: an `emptyDir`, lost with the pod, so a
    /// replaced coordinator starts the run over. Local mode ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// How the run's reward pool is split among contributors, from the
    /// ledger. Absent: every default (all booked steps, FLOPs of every kind
    /// of work weighed alike, all-reduce bytes not credited, no minimum
    /// participation).
    #[serde(default, skip_serializing_if = "RewardsSpec::is_default")]
    pub rewards: RewardsSpec,
    /// How committed work is checked by recomputation on other replicas.
    /// Absent: every default (audits at rate 0.25).
    #[serde(default, skip_serializing_if = "ValidationSpec::is_default")]
    pub validation: ValidationSpec,
}

/// Audits by recomputation: at each step, each shard that ran a
/// micro-batch is audited with probability `auditRate`: one of its
/// micro-batches, drawn by the coordinator, is recomputed by another replica
/// of the same stage and the hashes compared with the shard's signed
/// commitment. A stage with a single training replica has the coordinator
/// as validator: it recomputes the micro-batch itself from the worker's
/// evidence and uploaded parameters (`docs/byzantine.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValidationSpec {
    /// Probability (0..=1) that a shard is audited at a step; 0 turns audits
    /// off.
    #[serde(default = "default_audit_rate")]
    pub audit_rate: f64,
    /// Probability (0..=1) that a training shard's whole contribution to a
    /// step's robust aggregation is audited at random: a neighbour in the
    /// replicas' ring recomputes the shard's whole step and compares the
    /// contribution with the one the shard signed and the one it received.
    /// Unset: 0.05 under a robust `pipeline.aggregation` (median,
    /// trimmedMean, centeredClip), 0 under `mean`, where the ring mixes the
    /// contributions and none can be attributed (a rate above 0 is then
    /// refused). While the rate is above 0, a replica that another replica
    /// reports as suspect is also audited in that step; 0 turns contribution
    /// audits off altogether.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contribution_audit_rate: Option<f64>,
}

/// Default of `spec.validation.auditRate`.
pub const DEFAULT_AUDIT_RATE: f64 = 0.25;

fn default_audit_rate() -> f64 {
    DEFAULT_AUDIT_RATE
}

/// `spec.validation.contributionAuditRate` when unset under a robust
/// aggregation.
pub const DEFAULT_CONTRIBUTION_AUDIT_RATE: f64 = 0.05;

impl Default for ValidationSpec {
    fn default() -> Self {
        Self {
            audit_rate: DEFAULT_AUDIT_RATE,
            contribution_audit_rate: None,
        }
    }
}

impl ValidationSpec {
    /// Whether every field has its default (the section is then left out
    /// when a manifest is written).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The probability a shard's contribution is audited at random under
    /// `aggregation`: the manifest's rate when set, else
    /// [`DEFAULT_CONTRIBUTION_AUDIT_RATE`] under a robust rule; always 0
    /// under `mean` (nothing to attribute).
    pub fn effective_contribution_audit_rate(&self, aggregation: Aggregation) -> f64 {
        if aggregation == Aggregation::Mean {
            return 0.0;
        }
        self.contribution_audit_rate
            .unwrap_or(DEFAULT_CONTRIBUTION_AUDIT_RATE)
    }
}

/// The coordinator's persistent volume on Kubernetes: a
/// PersistentVolumeClaim the operator makes for the run (and that goes with
/// it), mounted at `/var/lib/pipewright` in the coordinator pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageSpec {
    /// Capacity the claim requests, as a Kubernetes quantity (`10Gi`,
    /// `500Mi`, `1T`); it holds every kept checkpoint of the whole model.
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// StorageClass of the claim; absent: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Default of `spec.storage.size`.
pub const DEFAULT_STORAGE_SIZE: &str = "10Gi";

fn default_storage_size() -> String {
    DEFAULT_STORAGE_SIZE.to_owned()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Where a run's pods go on Kubernetes and how many failures it absorbs.
/// Every field has a default; local mode reads none of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementSpec {
    /// GPUs (`nvidia.com/gpu`) each shard pod requests; 0 runs shards on CPU.
    /// Absent: the operator's `--gpus-per-shard` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_worker: Option<u32>,
    /// Memory each shard pod requests, as a Kubernetes quantity of bytes
    /// (`24Gi`, `512Mi`). Absent: the operator derives it per stage from the
    /// memory plan (the stage's weights, gradients, Adam moments and
    /// activations at the schedule's peak, plus the process itself), which
    /// it cannot do for a BPE tokenizer read from a file (no request then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_per_worker: Option<String>,
    /// CPU each shard pod requests, as a Kubernetes quantity (`4`, `500m`).
    /// Absent: `spec.training.threads` cores, or 1 when that is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_per_worker: Option<String>,
    /// Node labels every pod of the run (coordinator and shards) requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the run's pods tolerate, in addition to the `nvidia.com/gpu`
    /// taint that shard pods requesting GPUs always tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node label whose value names a topology domain: the shards of
    /// adjacent stages prefer to run in one domain, since their links carry
    /// every activation. Replicas of one stage always run on distinct nodes.
    #[serde(default = "default_topology_key")]
    pub topology_key: String,
    /// Replicas of every stage that must be running before the run counts as
    /// scheduled (gang start) and below which a stage stalls the pipeline.
    /// Absent: `spec.pipeline.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<usize>,
    /// Seconds the run may wait for its gang to be running before the
    /// operator reports why pods do not schedule (condition `Scheduled`,
    /// reason `Unschedulable` or `ScheduleTimeout`).
    #[serde(default = "default_schedule_timeout")]
    pub schedule_timeout_seconds: u64,
    /// Shard reassignments (a shard moved to a new pod after its pod failed,
    /// was evicted or deleted, or its node stopped being ready) the run
    /// absorbs; one more fails the run. 0: the first lost shard fails it.
    #[serde(default = "default_max_reassignments")]
    pub max_reassignments: u32,
}

/// Default of `spec.placement.topologyKey`.
pub const DEFAULT_TOPOLOGY_KEY: &str = "topology.kubernetes.io/zone";

fn default_topology_key() -> String {
    DEFAULT_TOPOLOGY_KEY.to_owned()
}
fn default_schedule_timeout() -> u64 {
    600
}
fn default_max_reassignments() -> u32 {
    10
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            gpus_per_worker: None,
            memory_per_worker: None,
            cpu_per_worker: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            topology_key: default_topology_key(),
            min_replicas: None,
            schedule_timeout_seconds: default_schedule_timeout(),
            max_reassignments: default_max_reassignments(),
        }
    }
}

impl PlacementSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How the run's reward pool is split among contributors, from the ledger.
/// Its default: every booked step, every kind of work weighed alike, no
/// minimum participation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewardsSpec {
    /// Steps in the window shares are computed over, counting back from the
    /// last booked step (0: every booked step).
    #[serde(default)]
    pub window_steps: u64,
    /// Credit per kind of work.
    #[serde(default)]
    pub weights: RewardWeights,
    /// Fraction (0..=1) of the window's steps an identity must have booked
    /// work in to earn a share; below it its share is 0 and the others are
    /// renormalised.
    #[serde(default)]
    pub min_participation: f64,
}

impl RewardsSpec {
    /// Whether every field has its default (the section is then left out
    /// when a manifest is written).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Credit per unit of each kind of work booked in the ledger; a share is
/// the credit of one identity over the credit of all eligible identities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewardWeights {
    /// Credit per forward FLOP.
    #[serde(default = "default_reward_weight")]
    pub forward: f64,
    /// Credit per input-gradient FLOP.
    #[serde(default = "default_reward_weight")]
    pub input_gradient: f64,
    /// Credit per weight-gradient FLOP.
    #[serde(default = "default_reward_weight")]
    pub weight_gradient: f64,
    /// Credit per FLOP recomputed to validate another worker.
    #[serde(default = "default_reward_weight")]
    pub validation: f64,
    /// FLOP-equivalents credited per byte sent in the replicas' all-reduce.
    #[serde(default)]
    pub all_reduce_per_byte: f64,
}

/// Default of every `spec.rewards.weights` field but `allReducePerByte`.
pub const DEFAULT_REWARD_WEIGHT: f64 = 1.0;

fn default_reward_weight() -> f64 {
    DEFAULT_REWARD_WEIGHT
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            forward: DEFAULT_REWARD_WEIGHT,
            input_gradient: DEFAULT_REWARD_WEIGHT,
            weight_gradient: DEFAULT_REWARD_WEIGHT,
            validation: DEFAULT_REWARD_WEIGHT,
            all_reduce_per_byte: 0.0,
        }
    }
}

/// A taint the run's pods tolerate (the fields of a Kubernetes toleration).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    /// Taint key; absent (with operator `Exists`) matches every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Equal` (the default) matches the taint's value; `Exists` any value.
    #[serde(default)]
    pub operator: TolerationOperator,
    /// Taint value, for operator `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Taint effect to match; absent matches every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// For effect `NoExecute`: seconds the pod stays bound after the taint
    /// appears; absent: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

/// How a toleration matches a taint's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TolerationOperator {
    /// Key and value must match.
    #[default]
    Equal,
    /// Key must match; any value.
    Exists,
}

impl TolerationOperator {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equal => "Equal",
            Self::Exists => "Exists",
        }
    }
}

/// Taint effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// New pods are not scheduled onto the node.
    NoSchedule,
    /// The scheduler avoids the node when it can.
    PreferNoSchedule,
    /// Running pods are evicted too.
    NoExecute,
}

impl TaintEffect {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// Shape of a Llama-family decoder-only transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// Width of the residual stream (hidden size).
    pub dim: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Number of attention (query) heads; must divide `dim`.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention); must divide `heads`.
    /// Defaults to `heads` (plain multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    /// Inner width of the SwiGLU MLP.
    pub ffn_dim: usize,
    /// Context length in tokens.
    pub seq_len: usize,
    /// Whether the LM head shares the token-embedding matrix.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Base of the rotary position embedding.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Epsilon inside RMSNorm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Standard deviation of the initial weights.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}

/// Training text and tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataSpec {
    /// Files, directories (read recursively) or glob patterns of UTF-8 text.
    pub sources: Vec<String>,
    /// Glob patterns of files to leave out (matched against the full path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Fraction of the corpus held out for validation, in (0, 0.5].
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// How text becomes token ids.
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// How every file is read: `text` (each file one document), `jsonl`
    /// (one JSON object per line, each a document) or `parquet` (each row
    /// a document). Absent: chosen per file by its extension (`.jsonl` and
    /// `.parquet`; anything else is text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// The JSON Lines field or Parquet column that holds the text.
    /// Absent: `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
    /// Directory where the tokenized corpus (token shards) and a tokenizer
    /// trained on it are kept and reused. Absent: `.pipewright-cache`
    /// beside the data (inside the first source when it is a directory,
    /// else beside its first file), or the system's temporary directory
    /// where that cannot be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
}

/// Formats of corpus files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// UTF-8 text; each file is one document.
    Text,
    /// JSON Lines: one JSON object per line; the text is in `textField`.
    Jsonl,
    /// Apache Parquet: the text is the string column `textField`.
    Parquet,
}

/// Default of `spec.data.textField`.
pub const DEFAULT_TEXT_FIELD: &str = "text";

fn default_validation_fraction() -> f64 {
    0.05
}

/// Which tokenizer to use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenizerSpec {
    /// `byte` (256 ids, the default) or `bpe`.
    #[serde(default)]
    pub kind: TokenizerKind,
    /// For `bpe`: a `tokenizer.json` to load. When absent, a BPE tokenizer of
    /// `vocabSize` is trained on the corpus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For a BPE tokenizer trained on the corpus: its vocabulary size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

/// Tokenizer kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte; vocabulary of 256.
    #[default]
    Byte,
    /// Byte-level BPE through the `tokenizers` library.
    Bpe,
}

/// Optimiser, schedule and batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingSpec {
    /// Number of optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per step and replica (gradient accumulation).
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up steps before the cosine decay.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of the peak.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Decoupled (AdamW) weight decay, applied to matrices only.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam beta1.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Adam beta2.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adam epsilon.
    #[serde(default = "default_adam_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Seed of initialisation and data order.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate validation loss every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Validation micro-batches per evaluation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Worker threads for kernels in local mode (0: all cores).
    #[serde(default)]
    pub threads: usize,
    /// Activation recomputation: what a stage keeps of each block between
    /// its forward and backward passes. `none` keeps every intermediate;
    /// `full` keeps only each block's input and recomputes the block in the
    /// backward pass; `selective` also keeps the attention output, so only
    /// the cheap elementwise and MLP internals are recomputed. The losses
    /// are the same bits either way; only memory and time change.
    #[serde(default, skip_serializing_if = "Recompute::is_off")]
    pub recompute: Recompute,
    /// Where a shard worker keeps its weights and Adam moments one step
    /// back, so that any plan can roll its stage back a step: `memory` (the
    /// default) or `disk`, a file in the worker's temporary directory
    /// (`TMPDIR`), which takes 12 bytes per parameter off the process at
    /// the cost of writing them every step and reading them back on a
    /// roll-back.
    #[serde(default, skip_serializing_if = "SnapshotPlace::is_memory")]
    pub snapshot: SnapshotPlace,
}

/// Where a shard worker keeps its state one step back
/// (`spec.training.snapshot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotPlace {
    /// In the process's memory.
    #[default]
    Memory,
    /// In a file of the worker's temporary directory.
    Disk,
}

impl SnapshotPlace {
    fn is_memory(&self) -> bool {
        *self == SnapshotPlace::Memory
    }
}

/// Activation recomputation policies (`spec.training.recompute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every intermediate of the forward pass for the backward.
    #[default]
    #[serde(rename = "none")]
    Off,
    /// Keep each block's input only; recompute the whole block.
    Full,
    /// Keep each block's input and attention output; recompute the rest.
    Selective,
}

impl Recompute {
    fn is_off(&self) -> bool {
        *self == Recompute::Off
    }
}

fn one() -> usize {
    1
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_eval_batches() -> usize {
    8
}

/// Pipeline and data-parallel layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// Number of pipeline stages; each holds a contiguous range of layers.
    #[serde(default = "one")]
    pub stages: usize,
    /// Data-parallel replicas of every stage.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Micro-batch schedule.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Encoding of tensors on the links between stages.
    #[serde(default)]
    pub codec: Codec,
    /// How layers are assigned to stages.
    #[serde(default)]
    pub partition: PartitionKind,
    /// How the replicas of a stage combine their gradients each step.
    /// `mean` is the plain average; the others bound what a minority of
    /// dishonest replicas can do to it, and need at least 3 replicas.
    #[serde(default, skip_serializing_if = "Aggregation::is_mean")]
    pub aggregation: Aggregation,
    /// Which replica of the next stage each micro-batch goes to.
    #[serde(default)]
    pub routing: Routing,
    /// For codec `lowrank`: the width of the learned bottleneck and the
    /// element type of its bytes on the wire. Absent: rank
    /// `spec.model.dim / 8` (at least 1), f32 on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowrank: Option<LowrankSpec>,
    /// Most megabytes (10^6 bytes) per second each worker sends on each of
    /// its links, paced by the kernel: leaves room on a shared network.
    /// Absent: no cap. A worker's `--max-send-rate` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_send_megabytes_per_second: Option<u64>,
}

/// The learned low-rank bottleneck at every stage boundary (codec
/// `lowrank`): the sending stage ends with a projection from
/// `spec.model.dim` down to `rank`, the receiving stage begins with one back
/// up, and only `rank` values per token cross the link. Both projections are
/// trained with the model, so the bottleneck is part of its architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LowrankSpec {
    /// Width of the bottleneck: values per token sent between stages; at
    /// least 1 and below `spec.model.dim`.
    pub rank: usize,
    /// Element type of the projected tensor on the wire.
    #[serde(default)]
    pub wire: LowrankWire,
}

/// Element type of the low-rank bottleneck's tensor on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LowrankWire {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// IEEE half precision, 2 bytes per value.
    F16,
    /// bfloat16, 2 bytes per value.
    Bf16,
}

/// `spec.model.dim` is divided by this to give the bottleneck's default rank.
pub const DEFAULT_LOWRANK_DIVISOR: usize = 8;

impl Default for PipelineSpec {
    fn default() -> Self {
        Self {
            stages: 1,
            replicas: 1,
            schedule: ScheduleKind::default(),
            codec: Codec::default(),
            partition: PartitionKind::default(),
            aggregation: Aggregation::default(),
            routing: Routing::default(),
            lowrank: None,
            max_send_megabytes_per_second: None,
        }
    }
}

/// Pipeline schedules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// All forwards, then all backwards.
    Gpipe,
    /// One forward, one backward in steady state.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Zero-bubble ZB-H1: backward split into input and weight halves.
    #[serde(rename = "zb-h1")]
    ZbH1,
}

/// Tensor encodings on stage links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Raw little-endian f32.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// int8 with one f32 scale per row.
    Int8,
    /// Learned low-rank bottleneck at the stage boundary.
    Lowrank,
}

/// Layer-to-stage assignment policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionKind {
    /// Balance the modelled compute cost of each stage.
    #[default]
    Balanced,
    /// Balance by each worker's measured speed.
    Measured,
}

/// How a stage's replicas combine their gradients (`spec.pipeline.aggregation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Aggregation {
    /// The arithmetic mean, element by element.
    #[default]
    Mean,
    /// The element-wise median of the replicas' gradients.
    Median,
    /// The element-wise mean after dropping the largest and the smallest
    /// value.
    TrimmedMean,
    /// Centered clipping: the mean of the replicas' gradients, each moved
    /// no farther than a radius from a robust centre.
    CenteredClip,
}

impl Aggregation {
    fn is_mean(&self) -> bool {
        *self == Aggregation::Mean
    }

    /// The name a manifest gives it.
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Mean => "mean",
            Aggregation::Median => "median",
            Aggregation::TrimmedMean => "trimmedMean",
            Aggregation::CenteredClip => "centeredClip",
        }
    }

    /// Fewest replicas this aggregation is defined for.
    pub fn min_replicas(self) -> usize {
        match self {
            Aggregation::Mean => 1,
            Aggregation::Median | Aggregation::TrimmedMean | Aggregation::CenteredClip => 3,
        }
    }
}

/// How micro-batches travel between the replicas of consecutive stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Replica `r` of every stage talks only to replica `r` of its
    /// neighbours: each replica is a pipeline of its own.
    #[default]
    Lanes,
    /// Every micro-batch may go to any replica of the next stage; each
    /// replica gets a share of the step in proportion to its measured
    /// speed, so a slow machine holds back only its own share.
    Throughput,
}

/// Checkpointing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Directory for checkpoints in local mode (default `runs/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Write a checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub every: u64,
    /// How many checkpoints to keep (older ones are deleted); 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    3
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: None,
            every: 0,
            keep: default_keep(),
        }
    }
}

impl ModelSpec {
    /// Key/value heads, defaulting to the query heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

impl PipelineSpec {
    /// Width of the learned bottleneck at the stage boundaries of a model of
    /// width `dim`: `Some(rank)` under codec `lowrank` (the rank given, else
    /// `dim / 8`, at least 1), `None` under every other codec.
    pub fn lowrank_rank(&self, dim: usize) -> Option<usize> {
        (self.codec == Codec::Lowrank).then(|| match &self.lowrank {
            Some(l) => l.rank,
            None => (dim / DEFAULT_LOWRANK_DIVISOR).max(1),
        })
    }

    /// Element type of the bottleneck on the wire (f32 unless set).
    pub fn lowrank_wire(&self) -> LowrankWire {
        self.lowrank.as_ref().map(|l| l.wire).unwrap_or_default()
    }
}

impl TrainingRunSpec {
    /// Replicas of every stage needed for the run to count as scheduled:
    /// `spec.placement.minReplicas`, else every replica.
    pub fn min_replicas(&self) -> usize {
        self.placement
            .min_replicas
            .unwrap_or(self.pipeline.replicas)
    }
}
