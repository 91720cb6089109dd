//! The `TrainingRun` manifest (`apiVersion: pipewright.dev/v1alpha1`).
//!
//! These types are the single definition of the spec: the worker reads them
//! from YAML in local mode, and the operator serves them as the CRD schema.
//! Field names are camelCase on the wire, as Kubernetes conventions ask.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The status the operator writes; a sibling file so that local mode, which
// builds without the feature, never sees it.
#[cfg(feature = "kube")]
#[path = "status.rs"]
mod status;
#[cfg(feature = "kube")]
pub use status::{Reassignment, RunPhase, ShardStatus, StageStatus, TrainingRunStatus};

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
}

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
}

impl Default for PipelineSpec {
    fn default() -> Self {
        Self {
            stages: 1,
            replicas: 1,
            schedule: ScheduleKind::default(),
            codec: Codec::default(),
            partition: PartitionKind::default(),
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
