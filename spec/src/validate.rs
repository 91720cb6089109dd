//! The semantic rules a well-formed manifest must also satisfy.
//!
//! Every rule lives in the one table [`RULES`], each with the field it is
//! reported against and its requirement in words. On Kubernetes the same
//! table is meant to be emitted as CEL `x-kubernetes-validations` on the CRD,
//! so the API server and local mode refuse the same manifests; adding a rule
//! anywhere but in this table would let the two drift apart.

use crate::error::FieldError;
use crate::types::{
    Aggregation, Codec, DataFormat, Routing, TaintEffect, TokenizerKind, Toleration,
    TolerationOperator, TrainingRun, API_VERSION, DEFAULT_LOWRANK_DIVISOR, KIND,
};

/// Smallest BPE vocabulary: the 256 byte tokens plus at least one merge.
pub const MIN_BPE_VOCAB: usize = 257;
/// Largest BPE vocabulary accepted; beyond this the embedding dwarfs any model
/// this runtime trains, and the number is far more likely a typo.
pub const MAX_BPE_VOCAB: usize = 1_000_000;
/// Longest name a DNS-1123 label (and so a Kubernetes object name used in pod
/// and service names) may have.
pub const MAX_NAME_LEN: usize = 63;

// Upper bounds of the size fields. Each is far beyond any model or batch
// this runtime can hold, yet small enough that products of sizes stay well
// inside 64-bit counts: a number past one of them is a typo, refused at
// once instead of ending in a failed allocation or an endless start-up.
/// Largest `spec.model.dim`.
pub const MAX_DIM: usize = 65_536;
/// Largest `spec.model.layers`.
pub const MAX_LAYERS: usize = 1_024;
/// Largest `spec.model.heads`.
pub const MAX_HEADS: usize = 1_024;
/// Largest `spec.model.ffnDim`.
pub const MAX_FFN_DIM: usize = 262_144;
/// Largest `spec.model.seqLen`.
pub const MAX_SEQ_LEN: usize = 131_072;
/// Largest `spec.training.microBatchSize`.
pub const MAX_MICRO_BATCH_SIZE: usize = 4_096;
/// Largest `spec.training.microBatches`.
pub const MAX_MICRO_BATCHES: usize = 4_096;
/// Largest `spec.training.evalBatches`.
pub const MAX_EVAL_BATCHES: usize = 100_000;
/// Largest `spec.pipeline.replicas`.
pub const MAX_REPLICAS: usize = 4_096;
/// Largest weight in `spec.rewards.weights`: credit per unit of work stays
/// a modest multiple of a FLOP, so sums over a window cannot overflow to
/// infinity.
pub const MAX_REWARD_WEIGHT: f64 = 1e6;
/// Largest `spec.rewards.windowSteps`.
pub const MAX_REWARD_WINDOW_STEPS: u64 = 1_000_000_000;

/// One rule of the manifest.
pub struct Rule {
    /// Dotted path of the field a violation is reported against.
    pub field: &'static str,
    /// The requirement in words, as it would appear in a CEL rule's message.
    pub requirement: &'static str,
    /// Returns a description of the violation (with the offending values)
    /// when `run` breaks the rule. Rules whose inputs are themselves invalid
    /// (a zero divisor, say) stay silent: another rule already reports that.
    check: fn(&TrainingRun) -> Option<String>,
}

impl Rule {
    /// The violation of this rule by `run`, if any.
    pub fn check(&self, run: &TrainingRun) -> Option<FieldError> {
        (self.check)(run).map(|message| FieldError::new(self.field, message))
    }
}

/// Checks `run` against every rule in [`RULES`].
///
/// # Errors
/// Every violated rule, in table order (which follows the order of fields in
/// a manifest), so a user fixes the whole file in one pass.
pub fn validate(run: &TrainingRun) -> Result<(), Vec<FieldError>> {
    let errors: Vec<FieldError> = RULES.iter().filter_map(|rule| rule.check(run)).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// All rules, in the order of the fields in a manifest.
pub static RULES: &[Rule] = &[
    Rule {
        field: "apiVersion",
        requirement: "must be pipewright.dev/v1alpha1",
        check: |r| {
            (r.api_version != API_VERSION)
                .then(|| format!("must be {API_VERSION}, got {:?}", r.api_version))
        },
    },
    Rule {
        field: "kind",
        requirement: "must be TrainingRun",
        check: |r| (r.kind != KIND).then(|| format!("must be {KIND}, got {:?}", r.kind)),
    },
    Rule {
        field: "metadata.name",
        requirement: "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', \
                      starting and ending with a letter or digit",
        check: |r| dns_label_problem(&r.metadata.name),
    },
    // --- spec.model
    Rule {
        field: "spec.model.dim",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.model.dim as u64),
    },
    Rule {
        field: "spec.model.dim",
        requirement: "must be at most 65536",
        check: |r| at_most(r.spec.model.dim as u64, MAX_DIM as u64),
    },
    Rule {
        field: "spec.model.layers",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.model.layers as u64),
    },
    Rule {
        field: "spec.model.layers",
        requirement: "must be at most 1024",
        check: |r| at_most(r.spec.model.layers as u64, MAX_LAYERS as u64),
    },
    Rule {
        field: "spec.model.heads",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.model.heads as u64),
    },
    Rule {
        field: "spec.model.heads",
        requirement: "must be at most 1024",
        check: |r| at_most(r.spec.model.heads as u64, MAX_HEADS as u64),
    },
    Rule {
        field: "spec.model.heads",
        requirement: "must divide spec.model.dim",
        check: |r| {
            let m = &r.spec.model;
            (m.heads > 0 && m.dim % m.heads != 0)
                .then(|| format!("{} does not divide spec.model.dim ({})", m.heads, m.dim))
        },
    },
    Rule {
        field: "spec.model.heads",
        requirement: "must leave an even head dimension (spec.model.dim / spec.model.heads), \
                      since rotary position embedding rotates pairs of dimensions",
        check: |r| {
            let m = &r.spec.model;
            let divides = m.heads > 0 && m.dim % m.heads == 0;
            (divides && m.head_dim() % 2 != 0).then(|| {
                format!(
                    "head dimension {} (spec.model.dim {} / {} heads) is odd; \
                     rotary position embedding needs pairs of dimensions",
                    m.head_dim(),
                    m.dim,
                    m.heads
                )
            })
        },
    },
    Rule {
        field: "spec.model.kvHeads",
        requirement: "must be at least 1 when set",
        check: |r| r.spec.model.kv_heads.and_then(|kv| at_least_one(kv as u64)),
    },
    Rule {
        field: "spec.model.kvHeads",
        requirement: "must divide spec.model.heads",
        check: |r| {
            let m = &r.spec.model;
            let kv = m.kv_heads?;
            (kv > 0 && m.heads > 0 && m.heads % kv != 0)
                .then(|| format!("{kv} does not divide spec.model.heads ({})", m.heads))
        },
    },
    Rule {
        field: "spec.model.ffnDim",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.model.ffn_dim as u64),
    },
    Rule {
        field: "spec.model.ffnDim",
        requirement: "must be at most 262144",
        check: |r| at_most(r.spec.model.ffn_dim as u64, MAX_FFN_DIM as u64),
    },
    Rule {
        field: "spec.model.seqLen",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.model.seq_len as u64),
    },
    Rule {
        field: "spec.model.seqLen",
        requirement: "must be at most 131072",
        check: |r| at_most(r.spec.model.seq_len as u64, MAX_SEQ_LEN as u64),
    },
    Rule {
        field: "spec.model.ropeTheta",
        requirement: "must be a finite number > 0",
        check: |r| above_zero(r.spec.model.rope_theta),
    },
    Rule {
        field: "spec.model.normEps",
        requirement: "must be a finite number > 0",
        check: |r| above_zero(r.spec.model.norm_eps),
    },
    Rule {
        field: "spec.model.initStd",
        requirement: "must be a finite number > 0",
        check: |r| above_zero(r.spec.model.init_std),
    },
    // --- spec.data
    Rule {
        field: "spec.data.sources",
        requirement: "must list at least one file, directory or glob",
        check: |r| {
            r.spec
                .data
                .sources
                .is_empty()
                .then(|| "is empty; list at least one file, directory or glob".to_owned())
        },
    },
    Rule {
        field: "spec.data.sources",
        requirement: "must not contain empty entries",
        check: |r| {
            let blank: Vec<String> = r
                .spec
                .data
                .sources
                .iter()
                .enumerate()
                .filter(|(_, s)| s.trim().is_empty())
                .map(|(i, _)| format!("[{i}]"))
                .collect();
            let (noun, verb) = if blank.len() == 1 {
                ("entry", "is")
            } else {
                ("entries", "are")
            };
            (!blank.is_empty()).then(|| {
                format!(
                    "{noun} {} {verb} empty; each source must name a file, directory or glob",
                    blank.join(", ")
                )
            })
        },
    },
    Rule {
        field: "spec.data.validationFraction",
        requirement: "must be in (0, 0.5]",
        check: |r| {
            let v = r.spec.data.validation_fraction;
            (!(v > 0.0 && v <= 0.5)).then(|| format!("must be in (0, 0.5], got {v}"))
        },
    },
    Rule {
        field: "spec.data.textField",
        requirement: "must not be empty when set",
        check: |r| {
            let field = r.spec.data.text_field.as_deref()?;
            field
                .trim()
                .is_empty()
                .then(|| "is empty; name the JSON field or Parquet column holding the text, or leave textField out".to_owned())
        },
    },
    Rule {
        field: "spec.data.textField",
        requirement: "does not apply to format text",
        check: |r| {
            let d = &r.spec.data;
            (d.format == Some(DataFormat::Text) && d.text_field.is_some()).then(|| {
                "must not be set with format text, whose files are documents as they are (only jsonl and parquet have fields)".to_owned()
            })
        },
    },
    Rule {
        field: "spec.data.cacheDir",
        requirement: "must not be empty when set",
        check: |r| {
            let dir = r.spec.data.cache_dir.as_deref()?;
            dir.trim()
                .is_empty()
                .then(|| "is empty; name a directory or leave cacheDir out".to_owned())
        },
    },
    Rule {
        field: "spec.data.tokenizer",
        requirement: "kind bpe needs path or vocabSize",
        check: |r| {
            let t = &r.spec.data.tokenizer;
            (t.kind == TokenizerKind::Bpe && t.path.is_none() && t.vocab_size.is_none()).then(
                || {
                    "kind bpe needs either path (a tokenizer.json to load) \
                     or vocabSize (to train one on the corpus)"
                        .to_owned()
                },
            )
        },
    },
    Rule {
        field: "spec.data.tokenizer.path",
        requirement: "must not be empty when set",
        check: |r| {
            let path = r.spec.data.tokenizer.path.as_deref()?;
            path.trim()
                .is_empty()
                .then(|| "is empty; name a tokenizer.json or leave path out".to_owned())
        },
    },
    Rule {
        field: "spec.data.tokenizer.path",
        requirement: "only applies to kind bpe",
        check: |r| {
            let t = &r.spec.data.tokenizer;
            (t.kind == TokenizerKind::Byte && t.path.is_some())
                .then(|| "must not be set for the byte tokenizer (only for kind bpe)".to_owned())
        },
    },
    Rule {
        field: "spec.data.tokenizer.vocabSize",
        requirement: "only applies to kind bpe",
        check: |r| {
            let t = &r.spec.data.tokenizer;
            (t.kind == TokenizerKind::Byte && t.vocab_size.is_some()).then(|| {
                "must not be set for the byte tokenizer, whose vocabulary is always 256".to_owned()
            })
        },
    },
    Rule {
        field: "spec.data.tokenizer.vocabSize",
        requirement: "cannot be set together with path",
        check: |r| {
            let t = &r.spec.data.tokenizer;
            (t.kind == TokenizerKind::Bpe && t.path.is_some() && t.vocab_size.is_some()).then(
                || {
                    "must not be set together with path: a loaded tokenizer.json \
                     brings its own vocabulary, and vocabSize would be ignored"
                        .to_owned()
                },
            )
        },
    },
    Rule {
        field: "spec.data.tokenizer.vocabSize",
        requirement: "must be in [257, 1000000] for kind bpe",
        check: |r| {
            let t = &r.spec.data.tokenizer;
            let size = t.vocab_size.filter(|_| t.kind == TokenizerKind::Bpe)?;
            (!(MIN_BPE_VOCAB..=MAX_BPE_VOCAB).contains(&size)).then(|| {
                format!(
                    "must be in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB}] \
                     (256 byte tokens plus at least one merge), got {size}"
                )
            })
        },
    },
    // --- spec.training
    Rule {
        field: "spec.training.steps",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.training.steps),
    },
    Rule {
        field: "spec.training.microBatchSize",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.training.micro_batch_size as u64),
    },
    Rule {
        field: "spec.training.microBatchSize",
        requirement: "must be at most 4096",
        check: |r| {
            at_most(
                r.spec.training.micro_batch_size as u64,
                MAX_MICRO_BATCH_SIZE as u64,
            )
        },
    },
    Rule {
        field: "spec.training.microBatches",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.training.micro_batches as u64),
    },
    Rule {
        field: "spec.training.microBatches",
        requirement: "must be at most 4096",
        check: |r| {
            at_most(
                r.spec.training.micro_batches as u64,
                MAX_MICRO_BATCHES as u64,
            )
        },
    },
    Rule {
        field: "spec.training.learningRate",
        requirement: "must be a finite number > 0",
        check: |r| above_zero(r.spec.training.learning_rate),
    },
    Rule {
        field: "spec.training.warmupSteps",
        requirement: "must not exceed spec.training.steps",
        check: |r| {
            let t = &r.spec.training;
            (t.warmup_steps > t.steps).then(|| {
                format!(
                    "{} exceeds spec.training.steps ({})",
                    t.warmup_steps, t.steps
                )
            })
        },
    },
    Rule {
        field: "spec.training.minLrRatio",
        requirement: "must be in [0, 1]",
        check: |r| {
            let v = r.spec.training.min_lr_ratio;
            (!(0.0..=1.0).contains(&v)).then(|| format!("must be in [0, 1], got {v}"))
        },
    },
    Rule {
        field: "spec.training.weightDecay",
        requirement: "must be a finite number >= 0",
        check: |r| zero_or_above(r.spec.training.weight_decay),
    },
    Rule {
        field: "spec.training.beta1",
        requirement: "must be in [0, 1)",
        check: |r| adam_beta(r.spec.training.beta1),
    },
    Rule {
        field: "spec.training.beta2",
        requirement: "must be in [0, 1)",
        check: |r| adam_beta(r.spec.training.beta2),
    },
    Rule {
        field: "spec.training.eps",
        requirement: "must be a finite number > 0",
        check: |r| above_zero(r.spec.training.eps),
    },
    Rule {
        field: "spec.training.gradClip",
        requirement: "must be a finite number >= 0 (0 disables clipping)",
        check: |r| zero_or_above(r.spec.training.grad_clip),
    },
    Rule {
        field: "spec.training.evalBatches",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.training.eval_batches as u64),
    },
    Rule {
        field: "spec.training.evalBatches",
        requirement: "must be at most 100000",
        check: |r| at_most(r.spec.training.eval_batches as u64, MAX_EVAL_BATCHES as u64),
    },
    // --- spec.pipeline
    Rule {
        field: "spec.pipeline.stages",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.pipeline.stages as u64),
    },
    Rule {
        field: "spec.pipeline.stages",
        requirement: "must not exceed spec.model.layers",
        check: |r| {
            let (stages, layers) = (r.spec.pipeline.stages, r.spec.model.layers);
            (layers > 0 && stages > layers).then(|| {
                format!(
                    "{stages} stages exceeds spec.model.layers ({layers}); \
                     every stage needs at least one layer"
                )
            })
        },
    },
    Rule {
        field: "spec.pipeline.replicas",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.pipeline.replicas as u64),
    },
    Rule {
        field: "spec.pipeline.replicas",
        requirement: "must be at most 4096",
        check: |r| at_most(r.spec.pipeline.replicas as u64, MAX_REPLICAS as u64),
    },
    Rule {
        field: "spec.pipeline.aggregation",
        requirement: "median, trimmedMean and centeredClip need spec.pipeline.replicas >= 3",
        check: |r| {
            let p = &r.spec.pipeline;
            let min = p.aggregation.min_replicas();
            (p.replicas >= 1 && p.replicas < min).then(|| {
                format!(
                    "{} needs at least {min} replicas to outvote a dishonest one, \
                     got spec.pipeline.replicas = {} (use aggregation: mean, or add replicas)",
                    p.aggregation.name(),
                    p.replicas
                )
            })
        },
    },
    Rule {
        field: "spec.pipeline.aggregation",
        requirement: "median, trimmedMean and centeredClip need routing: lanes",
        check: |r| {
            let p = &r.spec.pipeline;
            (p.aggregation != Aggregation::Mean && p.routing == Routing::Throughput).then(|| {
                format!(
                    "{} compares the replicas' gradients element by element, which needs \
                     each replica to have computed an equal share: use routing: lanes \
                     (routing: throughput gives faster replicas more micro-batches)",
                    p.aggregation.name()
                )
            })
        },
    },
    Rule {
        field: "spec.pipeline.codec",
        requirement: "lowrank needs spec.pipeline.stages >= 2",
        check: |r| {
            let p = &r.spec.pipeline;
            (p.codec == Codec::Lowrank && p.stages < 2).then(|| {
                format!(
                    "lowrank applies only at stage boundaries and needs \
                     spec.pipeline.stages >= 2, got {}",
                    p.stages
                )
            })
        },
    },
    Rule {
        field: "spec.pipeline.lowrank",
        requirement: "only applies to codec lowrank",
        check: |r| {
            let p = &r.spec.pipeline;
            (p.lowrank.is_some() && p.codec != Codec::Lowrank).then(|| {
                format!(
                    "is set but spec.pipeline.codec is {}; the bottleneck exists only \
                     under codec lowrank (set codec: lowrank or remove lowrank)",
                    format!("{:?}", p.codec).to_lowercase()
                )
            })
        },
    },
    Rule {
        field: "spec.pipeline.lowrank.rank",
        requirement: "must be at least 1",
        check: |r| {
            r.spec
                .pipeline
                .lowrank
                .as_ref()
                .and_then(|l| at_least_one(l.rank as u64))
        },
    },
    Rule {
        field: "spec.pipeline.lowrank.rank",
        requirement: "must be less than spec.model.dim (default: spec.model.dim / 8)",
        check: |r| {
            let dim = r.spec.model.dim;
            let rank = r.spec.pipeline.lowrank_rank(dim)?;
            let given = r.spec.pipeline.lowrank.is_some();
            (dim > 0 && rank > 0 && rank >= dim).then(|| {
                if given {
                    format!(
                        "{rank} is not less than spec.model.dim ({dim}); a bottleneck \
                         as wide as the model saves nothing (try {})",
                        (dim / DEFAULT_LOWRANK_DIVISOR).max(1)
                    )
                } else {
                    format!(
                        "the default rank {rank} (spec.model.dim / {DEFAULT_LOWRANK_DIVISOR}, \
                         at least 1) is not less than spec.model.dim ({dim}); the model \
                         is too narrow for a bottleneck"
                    )
                }
            })
        },
    },
    Rule {
        field: "spec.pipeline.maxSendMegabytesPerSecond",
        requirement: "must be at least 1 when set",
        check: |r| {
            r.spec
                .pipeline
                .max_send_megabytes_per_second
                .and_then(at_least_one)
        },
    },
    // --- spec.checkpoint
    Rule {
        field: "spec.checkpoint.dir",
        requirement: "must not be empty when set",
        check: |r| {
            let dir = r.spec.checkpoint.dir.as_deref()?;
            dir.trim()
                .is_empty()
                .then(|| "is empty; name a directory or leave dir out".to_owned())
        },
    },
    Rule {
        field: "spec.checkpoint.every",
        requirement: "must not exceed spec.training.steps (0: only at the end)",
        check: |r| {
            let (every, steps) = (r.spec.checkpoint.every, r.spec.training.steps);
            (every > steps).then(|| {
                format!(
                    "{every} exceeds spec.training.steps ({steps}), so no checkpoint \
                     would be written before the end; use 0 for only at the end"
                )
            })
        },
    },
    // --- spec.placement (Kubernetes only)
    Rule {
        field: "spec.placement.memoryPerWorker",
        requirement: "must be a quantity of bytes such as 24Gi, 512Mi or 1G",
        check: |r| {
            let memory = r.spec.placement.memory_per_worker.as_deref()?;
            (!is_byte_quantity(memory)).then(|| {
                format!(
                    "{memory:?} is not a quantity of bytes; write digits with an optional \
                     suffix Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E (e.g. 24Gi)"
                )
            })
        },
    },
    Rule {
        field: "spec.placement.cpuPerWorker",
        requirement: "must be a CPU quantity such as 4, 0.5 or 500m",
        check: |r| {
            let cpu = r.spec.placement.cpu_per_worker.as_deref()?;
            (!is_cpu_quantity(cpu)).then(|| {
                format!(
                    "{cpu:?} is not a CPU quantity above 0; write whole or decimal cores \
                     (4, 0.5, at most 3 decimals) or millicores (500m)"
                )
            })
        },
    },
    Rule {
        field: "spec.placement.topologyKey",
        requirement: "must not be empty",
        check: |r| {
            r.spec.placement.topology_key.trim().is_empty().then(|| {
                "is empty; name a node label such as topology.kubernetes.io/zone".to_owned()
            })
        },
    },
    Rule {
        field: "spec.placement.minReplicas",
        requirement: "must be at least 1 when set",
        check: |r| {
            r.spec
                .placement
                .min_replicas
                .and_then(|m| at_least_one(m as u64))
        },
    },
    Rule {
        field: "spec.placement.minReplicas",
        requirement: "must not exceed spec.pipeline.replicas",
        check: |r| {
            let min = r.spec.placement.min_replicas?;
            let replicas = r.spec.pipeline.replicas;
            (min > replicas).then(|| format!("{min} exceeds spec.pipeline.replicas ({replicas})"))
        },
    },
    Rule {
        field: "spec.placement.scheduleTimeoutSeconds",
        requirement: "must be at least 1",
        check: |r| at_least_one(r.spec.placement.schedule_timeout_seconds),
    },
    Rule {
        field: "spec.placement.tolerations",
        requirement: "an entry with operator Exists must not set value",
        check: |r| {
            tolerations_where(&r.spec.placement.tolerations, |t| {
                t.operator == TolerationOperator::Exists && t.value.is_some()
            })
            .map(|at| format!("{at}: operator Exists matches any value; leave value out"))
        },
    },
    Rule {
        field: "spec.placement.tolerations",
        requirement: "an entry without key must use operator Exists",
        check: |r| {
            tolerations_where(&r.spec.placement.tolerations, |t| {
                t.key.as_deref().unwrap_or_default().is_empty()
                    && t.operator != TolerationOperator::Exists
            })
            .map(|at| {
                format!("{at}: without a key only operator Exists (match every taint) makes sense")
            })
        },
    },
    Rule {
        field: "spec.placement.tolerations",
        requirement: "tolerationSeconds needs effect NoExecute",
        check: |r| {
            tolerations_where(&r.spec.placement.tolerations, |t| {
                t.toleration_seconds.is_some() && t.effect != Some(TaintEffect::NoExecute)
            })
            .map(|at| format!("{at}: tolerationSeconds applies only to effect NoExecute"))
        },
    },
    // --- spec.storage (Kubernetes only)
    Rule {
        field: "spec.storage.size",
        requirement: "must be a quantity of bytes such as 10Gi, 500Mi or 1T",
        check: |r| {
            let size = &r.spec.storage.as_ref()?.size;
            (!is_byte_quantity(size)).then(|| {
                format!(
                    "{size:?} is not a quantity of bytes; write digits with an optional \
                     suffix Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E (e.g. 10Gi)"
                )
            })
        },
    },
    Rule {
        field: "spec.storage.storageClassName",
        requirement: "must not be empty when set",
        check: |r| {
            let class = r.spec.storage.as_ref()?.storage_class_name.as_deref()?;
            class.trim().is_empty().then(|| {
                "is empty; name a StorageClass or leave it out for the default class".to_owned()
            })
        },
    },
    // --- spec.rewards
    Rule {
        field: "spec.rewards.windowSteps",
        requirement: "must be at most 1000000000",
        check: |r| at_most(r.spec.rewards.window_steps, MAX_REWARD_WINDOW_STEPS),
    },
    Rule {
        field: "spec.rewards.weights",
        requirement: "at least one of forward, inputGradient, weightGradient and validation \
                      must be > 0",
        check: |r| {
            let w = &r.spec.rewards.weights;
            let work = [w.forward, w.input_gradient, w.weight_gradient, w.validation];
            (!work.iter().any(|&v| v > 0.0)).then(|| {
                "forward, inputGradient, weightGradient and validation are all 0, \
                 so no work earns credit and no share can be computed; \
                 give at least one a weight > 0"
                    .to_owned()
            })
        },
    },
    Rule {
        field: "spec.rewards.weights.forward",
        requirement: "must be a finite number in [0, 1000000]",
        check: |r| reward_weight(r.spec.rewards.weights.forward),
    },
    Rule {
        field: "spec.rewards.weights.inputGradient",
        requirement: "must be a finite number in [0, 1000000]",
        check: |r| reward_weight(r.spec.rewards.weights.input_gradient),
    },
    Rule {
        field: "spec.rewards.weights.weightGradient",
        requirement: "must be a finite number in [0, 1000000]",
        check: |r| reward_weight(r.spec.rewards.weights.weight_gradient),
    },
    Rule {
        field: "spec.rewards.weights.validation",
        requirement: "must be a finite number in [0, 1000000]",
        check: |r| reward_weight(r.spec.rewards.weights.validation),
    },
    Rule {
        field: "spec.rewards.weights.allReducePerByte",
        requirement: "must be a finite number in [0, 1000000]",
        check: |r| reward_weight(r.spec.rewards.weights.all_reduce_per_byte),
    },
    Rule {
        field: "spec.rewards.minParticipation",
        requirement: "must be a finite number in [0, 1]",
        check: |r| {
            let v = r.spec.rewards.min_participation;
            (!(0.0..=1.0).contains(&v))
                .then(|| format!("must be a finite number in [0, 1], got {v}"))
        },
    },
    // --- spec.validation
    Rule {
        field: "spec.validation.auditRate",
        requirement: "must be a finite number in [0, 1]",
        check: |r| {
            let v = r.spec.validation.audit_rate;
            (!(0.0..=1.0).contains(&v))
                .then(|| format!("must be a finite number in [0, 1], got {v}"))
        },
    },
    Rule {
        field: "spec.validation.contributionAuditRate",
        requirement: "must be a finite number in [0, 1]",
        check: |r| {
            let v = r.spec.validation.contribution_audit_rate?;
            (!(0.0..=1.0).contains(&v))
                .then(|| format!("must be a finite number in [0, 1], got {v}"))
        },
    },
    Rule {
        field: "spec.validation.contributionAuditRate",
        requirement: "must be 0 or unset when spec.pipeline.aggregation is mean (the ring mixes contributions, none can be attributed)",
        check: |r| {
            let v = r.spec.validation.contribution_audit_rate?;
            (v > 0.0 && r.spec.pipeline.aggregation == Aggregation::Mean).then(|| {
                format!(
                    "is {v} but spec.pipeline.aggregation is mean: the ring all-reduce mixes \
                     the replicas' contributions on the way, so no replica's contribution can \
                     be attributed or audited (use median, trimmedMean or centeredClip, or \
                     leave contributionAuditRate unset)"
                )
            })
        },
    },
];

/// Suffixes of a Kubernetes quantity of bytes accepted in
/// `spec.storage.size`, longest first.
pub const BYTE_SUFFIXES: [&str; 12] = [
    "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
];

/// Whether `size` is a whole positive number of bytes with an optional
/// binary or decimal suffix (`10Gi`, `500M`, `1073741824`): the subset of
/// Kubernetes quantities that makes sense for a volume.
pub fn is_byte_quantity(size: &str) -> bool {
    let digits = BYTE_SUFFIXES
        .iter()
        .find_map(|suffix| size.strip_suffix(suffix))
        .unwrap_or(size);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

/// Whether `cpu` is a positive number of cores (`4`, `0.5`, at most three
/// decimals) or of millicores (`500m`): the subset of Kubernetes quantities
/// that makes sense for a CPU request.
pub fn is_cpu_quantity(cpu: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let shape = match cpu.strip_suffix('m') {
        Some(milli) => digits(milli),
        None => match cpu.split_once('.') {
            Some((whole, fraction)) => digits(whole) && digits(fraction) && fraction.len() <= 3,
            None => digits(cpu),
        },
    };
    shape && cpu.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

/// `entry [i], [j]` naming the tolerations that match `bad`, if any.
fn tolerations_where(list: &[Toleration], bad: impl Fn(&Toleration) -> bool) -> Option<String> {
    let at: Vec<String> = list
        .iter()
        .enumerate()
        .filter(|(_, t)| bad(t))
        .map(|(i, _)| format!("[{i}]"))
        .collect();
    match at.len() {
        0 => None,
        1 => Some(format!("entry {}", at[0])),
        _ => Some(format!("entries {}", at.join(", "))),
    }
}

fn at_least_one(value: u64) -> Option<String> {
    (value == 0).then(|| "must be at least 1, got 0".to_owned())
}

fn at_most(value: u64, max: u64) -> Option<String> {
    (value > max).then(|| format!("must be at most {max}, got {value}"))
}

// The comparisons are written so that NaN fails them.
fn above_zero(value: f64) -> Option<String> {
    (!(value > 0.0 && value.is_finite()))
        .then(|| format!("must be a finite number > 0, got {value}"))
}

fn zero_or_above(value: f64) -> Option<String> {
    (!(value >= 0.0 && value.is_finite()))
        .then(|| format!("must be a finite number >= 0, got {value}"))
}

fn reward_weight(value: f64) -> Option<String> {
    (!(0.0..=MAX_REWARD_WEIGHT).contains(&value))
        .then(|| format!("must be a finite number in [0, {MAX_REWARD_WEIGHT}], got {value}"))
}

fn adam_beta(value: f64) -> Option<String> {
    (!(0.0..1.0).contains(&value)).then(|| format!("must be in [0, 1), got {value}"))
}

/// Why `name` is not a DNS-1123 label, if it is not one.
fn dns_label_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "is {} characters long; a DNS-1123 label has at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let well_formed = name.chars().all(allowed) && name.starts_with(alnum) && name.ends_with(alnum);
    (!well_formed).then(|| {
        format!(
            "{name:?} is not a DNS-1123 label: use lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["quickstart", "a", "run-2", "0run", &"a".repeat(63)] {
            assert_eq!(dns_label_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "Quickstart",
            "-run",
            "run-",
            "run_2",
            "run.2",
            &"a".repeat(64),
        ] {
            assert!(dns_label_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cpu_quantities() {
        for good in ["1", "4", "0.5", "1.25", "500m", "0010", "0.001"] {
            assert!(is_cpu_quantity(good), "{good:?} refused");
        }
        for bad in [
            "", "0", "0m", "0.000", "m", ".5", "1.", "1.2345", "1e3", "2Gi", "-1", " 1",
        ] {
            assert!(!is_cpu_quantity(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn float_checks_refuse_nan_and_infinity() {
        assert!(above_zero(f64::NAN).is_some());
        assert!(above_zero(f64::INFINITY).is_some());
        assert!(zero_or_above(f64::NAN).is_some());
        assert!(adam_beta(f64::NAN).is_some());
        assert_eq!(zero_or_above(0.0), None);
        assert!(adam_beta(1.0).is_some());
        assert_eq!(adam_beta(0.0), None);
        assert!(reward_weight(f64::NAN).is_some());
        assert!(reward_weight(f64::INFINITY).is_some());
        assert!(reward_weight(-0.5).is_some());
        assert!(reward_weight(1.000_001e6).is_some());
        assert_eq!(reward_weight(0.0), None);
        assert_eq!(reward_weight(MAX_REWARD_WEIGHT), None);
    }
}
