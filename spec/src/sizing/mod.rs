//! Sizing a run from the manifest alone, for the workers and the operator
//! alike: the model's shapes ([`ModelConfig`]), the split of its layers
//! into stages ([`partition`]), the schedules' operation lists
//! ([`schedule`]) and, from them, the plan below. Pure arithmetic over the
//! spec's types.
//!
//! What a run needs of a machine, from the manifest alone: per stage, its
//! parameters, the bytes of weights, gradients, AdamW moments and
//! activations at the schedule's peak, and its FLOPs.
//!
//! Every caller that sizes a run goes through [`plan`]: `pipewright plan`,
//! the refusal of `pipewright train` when the run cannot fit, a worker's
//! refusal of a shard it cannot hold ([`shard_fits`]), the smallest number
//! of stages for a node ([`min_stages`]), and the operator's memory request
//! for each shard pod. It is arithmetic
//! on the shapes, so it answers at once even for a model no machine holds,
//! and it allocates nothing the size of the model.
//!
//! The activation model follows what the layers keep for their backward
//! (one `f32` per element):
//!
//! ```text
//! per block and micro-batch, n = B·T rows:
//!   attention norm   x, rstd                 n·D + n
//!   attention        x, q, k, v, out         n·(D + 2·H·hd + 2·KV·hd)
//!                    probabilities           B·H·T·T   (CPU attention)
//!   MLP norm         x, rstd                 n·D + n
//!   MLP              x, gate, up, h          n·(D + 3·F)
//! LM head (last stage): norm x, rstd, x̂, logits   n·(2·D + 1 + V)
//! ```
//!
//! The backward of a micro-batch adds, for every block of the stage at once
//! (the input half runs over all blocks before the weight half), the
//! gradients the weight half reads: `n·(4·D + 2·F + H·hd + 2·KV·hd)`, plus
//! the logits' gradient and the running input gradient.
//!
//! Activation recomputation (`spec.training.recompute`) changes what a
//! block keeps per micro-batch, and its backward then runs one block at a
//! time (recompute, input half, weight half), so only one block's
//! intermediates and gradients exist at once:
//!
//! ```text
//!              kept per block and micro-batch           the backward adds
//! none         as above                                 every block's gradients
//! full         x                          n·D           one block's intermediates
//!                                                       and gradients
//! selective    x, h, q, k, v, out         n·(2·D + 2·H·hd + 2·KV·hd)
//!              probabilities              B·H·T·T       one block's norms and MLP,
//!                                                       and its gradients
//! ```

mod model;
mod partition;
pub mod schedule;

use std::ops::Range;

use serde::Serialize;

use crate::{Aggregation, Recompute, ScheduleKind, SnapshotPlace, TokenizerKind, TrainingRun};
pub use model::ModelConfig;
pub use partition::partition;

/// Bytes of one `f32`.
const F32: u64 = 4;

/// What a process needs besides the model: the binary, thread stacks, the
/// tokenizer, the corpus of a small run. Measured at 23 MiB for a model of
/// 27K parameters; kept a little above.
pub const PROCESS_OVERHEAD_BYTES: u64 = 32 << 20;

/// Resident memory a training process holds beyond its tensors, per
/// parameter: measured at 2.3–2.4 bytes on runs of 27M and 55M parameters
/// (allocator slack around the many parameter-sized buffers), rounded up.
pub const SLACK_BYTES_PER_PARAM: f64 = 2.5;

/// What one stage (one shard process) of a run needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePlan {
    /// Stage index.
    pub stage: usize,
    /// Blocks it holds.
    pub layers: Range<usize>,
    /// Trainable parameters (a tied LM head counted on the last stage too,
    /// since that stage keeps its own copy).
    pub params: u64,
    /// Bytes of the weights.
    pub weight_bytes: u64,
    /// Bytes of the accumulated gradients.
    pub gradient_bytes: u64,
    /// Bytes of AdamW's first and second moments.
    pub optimizer_bytes: u64,
    /// Bytes one micro-batch keeps from its forward until its backward.
    pub activation_bytes_per_micro_batch: u64,
    /// Most micro-batches in flight at once under the schedule.
    pub peak_in_flight: usize,
    /// Bytes of activations at that peak, plus one backward's gradients.
    pub activation_bytes: u64,
    /// Allocator slack that grows with the parameters
    /// ([`SLACK_BYTES_PER_PARAM`]).
    pub slack_bytes: u64,
    /// The weights and Adam moments one step back that a shard worker
    /// keeps in memory, so that any plan of the coordinator can roll it
    /// back; 0 when `spec.training.snapshot` keeps them on disk. (A
    /// checkpoint or a hand-over is streamed from the tensors or that
    /// file, so it adds no copy of the state.)
    pub snapshot_bytes: u64,
    /// What a shard keeps of its step's micro-batches for audits (their
    /// received input activations, targets and activation gradients, one
    /// step's worth at 4 bytes a value: no codec sends more): 0 with audits
    /// off (`spec.validation`; with one replica, with micro-batch audits
    /// off, whose validator is then the coordinator). Counted for the
    /// micro-batches of its own lane (`routing: lanes`); under
    /// `routing: throughput` a fast worker may run, and keep, more. With
    /// one replica and micro-batch audits on, also one copy of the
    /// gradients: the gradient its update applied, which the coordinator
    /// replays the update from.
    pub evidence_bytes: u64,
    /// What combining the stage's replicas' gradients at the end of a step
    /// holds besides the gradients themselves ([`aggregation_bytes`]): 0
    /// with one replica.
    pub aggregation_bytes: u64,
    /// Everything a shard process holds: weights, gradients, moments,
    /// activations, slack, snapshot, audit evidence and aggregation.
    pub total_bytes: u64,
    /// Forward + backward FLOPs per token through this stage.
    pub flops_per_token: f64,
    /// FLOPs of one optimizer step on one replica of this stage.
    pub flops_per_step: f64,
}

/// What a whole run needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// Vocabulary the model was sized with.
    pub vocab: usize,
    /// Trainable parameters of the model (tied head counted once).
    pub params: u64,
    /// Pipeline schedule whose peak sizes the activations.
    pub schedule: ScheduleKind,
    /// What each block keeps for its backward (`spec.training.recompute`).
    pub recompute: Recompute,
    /// Micro-batches per replica and step.
    pub micro_batches: usize,
    /// Tokens in one optimizer step on one replica.
    pub tokens_per_step: u64,
    /// Each stage, first first.
    pub stages: Vec<StagePlan>,
    /// Peak bytes of `pipewright train` without `--processes`: every stage
    /// in one process, one micro-batch in flight, plus the process itself.
    pub single_process_bytes: u64,
}

impl Plan {
    /// The stage needing the most memory (a shard process adds
    /// [`PROCESS_OVERHEAD_BYTES`]).
    pub fn largest_stage(&self) -> &StagePlan {
        self.stages
            .iter()
            .max_by_key(|s| s.total_bytes)
            .expect("a plan has at least one stage")
    }
}

/// Ids of the byte-level tokenizer.
pub const BYTE_VOCAB: usize = 256;

/// The vocabulary size the manifest alone fixes: [`BYTE_VOCAB`] for bytes,
/// `vocabSize` for a BPE tokenizer to be trained; `None` for a BPE
/// tokenizer read from a `tokenizer.json`, which only the file knows.
pub fn manifest_vocab(run: &TrainingRun) -> Option<usize> {
    let t = &run.spec.data.tokenizer;
    match t.kind {
        TokenizerKind::Byte => Some(BYTE_VOCAB),
        TokenizerKind::Bpe => t.vocab_size,
    }
}

/// The plan of `run` with `stages` pipeline stages (the manifest's own when
/// `None`) and a vocabulary of `vocab`.
pub fn plan(run: &TrainingRun, vocab: usize, stages: Option<usize>) -> Plan {
    let spec = &run.spec;
    let cfg = ModelConfig::from_spec(&spec.model, vocab);
    let n_stages = stages.unwrap_or(spec.pipeline.stages).clamp(1, cfg.layers);
    let t = &spec.training;
    let (batch, micro) = (t.micro_batch_size as u64, t.micro_batches);
    let rank = spec
        .pipeline
        .lowrank_rank(cfg.dim)
        .map(|r| r.clamp(1, cfg.dim));
    let ops = schedule::plan(spec.pipeline.schedule, n_stages, micro);
    let tokens_per_step = (micro as u64)
        .saturating_mul(batch)
        .saturating_mul(cfg.seq_len as u64);
    let mut single_activations = 0u64;
    let mut single_backward = 0u64;
    let stages: Vec<StagePlan> = partition(&cfg, n_stages, &[])
        .into_iter()
        .enumerate()
        .map(|(s, layers)| {
            let shape = StageShape {
                cfg: &cfg,
                layers: layers.len() as u64,
                first: s == 0,
                last: s + 1 == n_stages,
                up: rank.filter(|_| s > 0),
                down: rank.filter(|_| s + 1 < n_stages),
                recompute: t.recompute,
            };
            let params = shape.params();
            let kept = shape.kept(batch);
            let backward = shape.backward(batch);
            single_activations = single_activations.saturating_add(kept);
            single_backward = single_backward.max(backward);
            let in_flight = schedule::peak_in_flight(ops[s].iter().copied()).max(1);
            let activation_bytes = kept
                .saturating_mul(in_flight as u64)
                .saturating_add(backward);
            let weight_bytes = params.saturating_mul(F32);
            let slack_bytes = (params as f64 * SLACK_BYTES_PER_PARAM) as u64;
            let snapshot_bytes = match t.snapshot {
                SnapshotPlace::Memory => weight_bytes.saturating_mul(3),
                SnapshotPlace::Disk => 0,
            };
            // Micro-batch audits keep it with any number of replicas (a
            // stage of one has the coordinator as validator); contribution
            // audits need another replica.
            let audited = spec.validation.audit_rate > 0.0
                || (spec.pipeline.replicas > 1
                    && spec
                        .validation
                        .effective_contribution_audit_rate(spec.pipeline.aggregation)
                        > 0.0);
            let applied = if spec.pipeline.replicas == 1 && spec.validation.audit_rate > 0.0 {
                weight_bytes
            } else {
                0
            };
            let evidence_bytes = if audited {
                shape
                    .evidence(batch)
                    .saturating_mul(micro as u64)
                    .saturating_add(applied)
            } else {
                0
            };
            let aggregation_bytes = aggregation_bytes(
                spec.pipeline.replicas,
                spec.pipeline.aggregation,
                weight_bytes,
                shape.largest_bucket().saturating_mul(F32),
            );
            let flops_per_token = shape.flops_per_token();
            StagePlan {
                stage: s,
                layers,
                params,
                weight_bytes,
                gradient_bytes: weight_bytes,
                optimizer_bytes: weight_bytes.saturating_mul(2),
                activation_bytes_per_micro_batch: kept,
                peak_in_flight: in_flight,
                activation_bytes,
                slack_bytes,
                snapshot_bytes,
                evidence_bytes,
                aggregation_bytes,
                total_bytes: weight_bytes
                    .saturating_mul(4)
                    .saturating_add(snapshot_bytes)
                    .saturating_add(evidence_bytes)
                    .saturating_add(aggregation_bytes)
                    .saturating_add(activation_bytes)
                    .saturating_add(slack_bytes),
                flops_per_token,
                flops_per_step: flops_per_token * tokens_per_step as f64,
            }
        })
        .collect();
    let state: u64 = stages
        .iter()
        .map(|s| {
            s.weight_bytes
                .saturating_mul(4)
                .saturating_add(s.slack_bytes)
        })
        .fold(0, u64::saturating_add);
    Plan {
        vocab,
        params: cfg.total_params() as u64,
        schedule: spec.pipeline.schedule,
        recompute: t.recompute,
        micro_batches: micro,
        tokens_per_step,
        stages,
        single_process_bytes: state
            .saturating_add(single_activations)
            .saturating_add(single_backward)
            .saturating_add(PROCESS_OVERHEAD_BYTES),
    }
}

/// What one of `replicas` replicas of a stage holds, besides its own
/// gradients (`gradient_bytes`), to combine them with the other replicas'
/// at the end of a step under `aggregation`:
///
/// - alone: nothing;
/// - `mean`: the copies of its gradients handed to the ring's thread,
///   bucket by bucket, and the reduced buckets held until they replace the
///   gradients: counted as 2 × `gradient_bytes`;
/// - a robust rule: as much, and the two ring neighbours' contributions
///   every replica keeps for the step as proof of what it received
///   (`sync::receipt`: 2 × `gradient_bytes`), the combined result until it
///   replaces the gradients, and while a bucket is combined every replica's
///   copy of it (`replicas` × `bucket_bytes`, the largest group of
///   parameters the stage gathers at once): counted as 5 ×
///   `gradient_bytes` + `replicas` × `bucket_bytes`.
///
/// Measured (peak resident set of each shard process, one stage of 6.95M
/// parameters, 26.5 MiB of gradients, largest bucket 3.3 MiB, audits off)
/// over the same stage alone: `mean` +44 MiB with 3 and with 5 replicas
/// (1.7 × the gradients; counted 53 MiB), `median` +125 MiB with 3 and
/// +131 MiB with 5 (counted 142 and 149 MiB).
pub fn aggregation_bytes(
    replicas: usize,
    aggregation: Aggregation,
    gradient_bytes: u64,
    bucket_bytes: u64,
) -> u64 {
    match (replicas, aggregation) {
        (0 | 1, _) => 0,
        (_, Aggregation::Mean) => gradient_bytes.saturating_mul(2),
        (r, _) => gradient_bytes
            .saturating_mul(5)
            .saturating_add(bucket_bytes.saturating_mul(r as u64)),
    }
}

/// The smallest number of stages whose every shard fits in `node_bytes`
/// (the process overhead included), or `None` if even one layer per stage
/// does not fit.
pub fn min_stages(run: &TrainingRun, vocab: usize, node_bytes: u64) -> Option<usize> {
    (1..=run.spec.model.layers).find(|&s| {
        let p = plan(run, vocab, Some(s));
        p.largest_stage()
            .total_bytes
            .saturating_add(PROCESS_OVERHEAD_BYTES)
            <= node_bytes
    })
}

/// Whether a shard process of `stage` fits in `available` bytes (the
/// process overhead included); with no stage given, whether the smallest
/// stage does, since the coordinator may hand out any. The refusal names
/// the stage and what it needs.
pub fn shard_fits(p: &Plan, stage: Option<usize>, available: u64) -> Result<(), String> {
    let candidate = match stage {
        Some(s) => p.stages.get(s),
        None => p.stages.iter().min_by_key(|s| s.total_bytes),
    };
    let Some(s) = candidate else {
        return Ok(()); // a stage the run does not have: the coordinator refuses it
    };
    let needs = s.total_bytes.saturating_add(PROCESS_OVERHEAD_BYTES);
    if needs <= available {
        return Ok(());
    }
    Err(format!(
        "stage {} (layers {}..{}) needs {} ({} weights, {} gradients, {} Adam moments, \
         {} activations for {} micro-batch(es) in flight, {} snapshot one step back, \
         {} kept for audits, {} to combine the replicas' gradients), but this machine has {} \
         available; \
         the run needs more stages (spec.pipeline.stages) or machines with more memory",
        s.stage,
        s.layers.start,
        s.layers.end,
        human(needs),
        human(s.weight_bytes),
        human(s.gradient_bytes),
        human(s.optimizer_bytes),
        human(s.activation_bytes),
        s.peak_in_flight,
        human(s.snapshot_bytes),
        human(s.evidence_bytes),
        human(s.aggregation_bytes),
        human(available),
    ))
}

/// The shapes that size one stage.
struct StageShape<'a> {
    cfg: &'a ModelConfig,
    layers: u64,
    first: bool,
    last: bool,
    /// Rank of the bottleneck's up-projection before this stage.
    up: Option<usize>,
    /// Rank of the bottleneck's down-projection after this stage.
    down: Option<usize>,
    recompute: Recompute,
}

impl StageShape<'_> {
    /// Bytes of what one micro-batch of `batch` sequences received that a
    /// shard keeps for audits: the input activation and the targets (not
    /// on the first stage, which reads the corpus) and the activation
    /// gradient (not on the last), at 4 bytes a value.
    fn evidence(&self, batch: u64) -> u64 {
        let tokens = batch.saturating_mul(self.cfg.seq_len as u64);
        let d = self.cfg.dim as u64;
        let width_in = self.up.map_or(d, |r| r as u64);
        let width_out = self.down.map_or(d, |r| r as u64);
        let input = if self.first { 0 } else { width_in + 1 };
        let gradient = if self.last { 0 } else { width_out };
        tokens.saturating_mul(input + gradient).saturating_mul(F32)
    }

    /// Parameters of the groups the stage's gradients are combined by
    /// (`Stage::weight_groups`): the embedding with an up-projection
    /// (`front`, 0 where the stage has neither), one block (`block`, each of
    /// `layers`), the head with the final norm and a down-projection
    /// (`tail`, 0 where it has none of them).
    fn buckets(&self) -> Buckets {
        let c = self.cfg;
        let (d, v) = (c.dim as u64, c.vocab as u64);
        let projection = |r: Option<usize>| r.map_or(0, |r| r as u64 * d);
        Buckets {
            front: if self.first { v * d } else { 0 } + projection(self.up),
            block: c.block_params() as u64,
            tail: if self.last { v * d + d } else { 0 } + projection(self.down),
        }
    }

    /// Parameters of the largest group the stage's gradients are combined
    /// by: a block, the head group or the embedding group.
    fn largest_bucket(&self) -> u64 {
        let b = self.buckets();
        let block = if self.layers > 0 { b.block } else { 0 };
        block.max(b.front).max(b.tail)
    }

    fn params(&self) -> u64 {
        let b = self.buckets();
        self.layers
            .saturating_mul(b.block)
            .saturating_add(b.front)
            .saturating_add(b.tail)
    }

    /// Bytes one micro-batch of `batch` rows keeps between its forward and
    /// its backward.
    fn kept(&self, batch: u64) -> u64 {
        let c = self.cfg;
        let (t, d, v) = (c.seq_len as u64, c.dim as u64, c.vocab as u64);
        let n = batch.saturating_mul(t);
        let (q, kv) = (c.heads as u64 * c.head_dim() as u64, kv_width(c));
        let probs = self.probs(batch);
        let block = match self.recompute {
            Recompute::Off => self.block_intermediates(batch),
            Recompute::Full => n.saturating_mul(d),
            Recompute::Selective => n
                .saturating_mul(2 * d + 2 * q + 2 * kv)
                .saturating_add(probs),
        };
        let mut floats = block.saturating_mul(self.layers);
        if self.last {
            floats = floats.saturating_add(n.saturating_mul(2 * d + 1 + v));
        }
        if let Some(r) = self.up {
            floats = floats.saturating_add(n.saturating_mul(r as u64));
        }
        if let Some(_r) = self.down {
            floats = floats.saturating_add(n.saturating_mul(d));
        }
        // Token ids (first stage) or the received hidden states.
        floats = floats.saturating_add(n.saturating_mul(if self.first { 1 } else { d }));
        floats.saturating_mul(F32)
    }

    /// Floats of the attention's probabilities (`[B, H, T, T]`) for a
    /// micro-batch of `batch` rows.
    fn probs(&self, batch: u64) -> u64 {
        let t = self.cfg.seq_len as u64;
        batch
            .saturating_mul(self.cfg.heads as u64)
            .saturating_mul(t)
            .saturating_mul(t)
    }

    /// Floats one block keeps of a micro-batch of `batch` rows without
    /// recomputation: its every intermediate.
    fn block_intermediates(&self, batch: u64) -> u64 {
        let c = self.cfg;
        let (t, d, f) = (c.seq_len as u64, c.dim as u64, c.ffn_dim as u64);
        let n = batch.saturating_mul(t);
        let (q, kv) = (c.heads as u64 * c.head_dim() as u64, kv_width(c));
        let probs = self.probs(batch);
        let per_row = 4 * d + 2 * q + 2 * kv + 3 * f + 2;
        n.saturating_mul(per_row).saturating_add(probs)
    }

    /// Bytes the backward of one micro-batch adds while it runs.
    fn backward(&self, batch: u64) -> u64 {
        let c = self.cfg;
        let (t, d, f) = (c.seq_len as u64, c.dim as u64, c.ffn_dim as u64);
        let n = batch.saturating_mul(t);
        let q = c.heads as u64 * c.head_dim() as u64;
        let per_block = n.saturating_mul(4 * d + 2 * f + q + 2 * kv_width(c));
        let mut floats = match self.recompute {
            // The input half runs over every block before the weight half.
            Recompute::Off => per_block.saturating_mul(self.layers),
            // One block at a time: its recomputed intermediates (what the
            // micro-batch did not keep of it) and its gradients.
            Recompute::Full => per_block.saturating_add(self.block_intermediates(batch)),
            Recompute::Selective => per_block.saturating_add(n.saturating_mul(2 * d + 3 * f + 2)),
        };
        // The running input gradient and the layer's scratch.
        floats = floats.saturating_add(n.saturating_mul(2 * d + f));
        if self.last {
            floats = floats.saturating_add(n.saturating_mul(2 * d));
        }
        floats.saturating_mul(F32)
    }

    fn flops_per_token(&self) -> f64 {
        let mut f = self.cfg.block_flops_per_token() * self.layers as f64;
        if self.last {
            f += self.cfg.head_flops_per_token();
        }
        f
    }
}

/// Parameters of a stage's groups of gradients ([`StageShape::buckets`]).
struct Buckets {
    front: u64,
    block: u64,
    tail: u64,
}

/// Width of the key (or value) projection.
fn kv_width(c: &ModelConfig) -> u64 {
    c.kv_heads as u64 * c.head_dim() as u64
}

/// Parses a memory size: `80GiB`, `512MiB`, `24G`, `1.5TiB`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a size such as 80GiB, got {s:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        "T" | "TiB" | "TB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// `bytes` in GiB or MiB, for people.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests;
