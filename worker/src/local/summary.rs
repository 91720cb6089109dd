//! What a local run prints when it ends, and `summary.json` in its run
//! directory: time and throughput, reassignments and relaunches, the fault
//! drill's recoveries, the shards whose worker was quarantined and
//! replaced, bytes on the stage links per token, the pipeline's
//! efficiency against its schedule's bound, each replica's micro-batches,
//! and the final checkpoint's validation loss.

use std::path::Path;

use anyhow::{Context, Result};
use pipewright_spec::TrainingRun;
use serde_json::json;

use super::drill::Drill;
use crate::coord::Status;
use crate::train::EvalReport;

/// A run that ended well, as the launcher saw it.
pub(super) struct Finished<'a> {
    pub(super) manifest: &'a TrainingRun,
    /// The run directory.
    pub(super) root: &'a Path,
    /// The coordinator's last status.
    pub(super) status: Status,
    /// Seconds from the launch of the workers to the end.
    pub(super) seconds: f64,
    /// The loss of every step.
    pub(super) losses: Vec<f32>,
    /// Worker processes started again after they died.
    pub(super) relaunches: usize,
    pub(super) drill: &'a Drill,
    /// Workers quarantined and replaced, in order.
    pub(super) quarantined: &'a [Replaced],
}

/// A worker whose identity was quarantined, and the fresh one that took
/// its shard.
#[derive(Debug, Clone)]
pub(super) struct Replaced {
    pub(super) stage: usize,
    pub(super) replica: usize,
    /// The step it was convicted at.
    pub(super) step: u64,
    /// Why (`failed_audit`, `bad_evidence`, `digest_mismatch`).
    pub(super) reason: String,
    /// Its identity file (kept: the identity stays barred).
    pub(super) identity: std::path::PathBuf,
    /// The replacement's identity file.
    pub(super) replacement: std::path::PathBuf,
}

/// The figures both the printed lines and `summary.json` show.
struct Figures {
    tokens_per_second: f64,
    final_loss: f32,
    recoveries: Vec<f64>,
    link_bytes_per_token: f64,
    /// Measured and bound step seconds.
    efficiency: Option<(f64, f64)>,
    /// Each replica's micro-batches of the last step, stage by stage.
    shares: Vec<Vec<usize>>,
}

/// Prints the summary, scores the final checkpoint and writes
/// `summary.json`.
pub(super) fn report(run: &Finished<'_>) -> Result<()> {
    let figures = figures(run);
    print_run(run, &figures);
    let scored = match too_large_to_score(run.manifest) {
        Some(why) => {
            println!("  final evaluation           skipped: {why}");
            None
        }
        None => {
            let (eval, unigram) = score(run)?;
            crate::cli::print_evaluation(&eval, unigram);
            Some((eval, unigram))
        }
    };
    if let Some(step) = run.status.checkpoint_step {
        println!(
            "  checkpoint                 {}",
            crate::checkpoint::step_dir(run.root, step).display()
        );
    }
    write_summary(run, &figures, scored.as_ref())
}

/// Why this process cannot score the final checkpoint, if it cannot: the
/// evaluation loads the whole model here, so a model that only trains when
/// split over processes (its single-process plan exceeds the memory this
/// process has, `RLIMIT_DATA` and `RLIMIT_AS` included) is not scored.
fn too_large_to_score(manifest: &TrainingRun) -> Option<String> {
    use crate::plan::{available_memory, human, plan, vocab};
    let available = available_memory()?;
    let vocab = vocab(manifest).ok()?;
    let needs = plan(manifest, vocab, None).single_process_bytes;
    (needs > available).then(|| {
        format!(
            "the whole model needs {} in one process and this one has {} available; \
             score the checkpoint with `pipewright eval` where it fits",
            human(needs),
            human(available)
        )
    })
}

fn figures(run: &Finished<'_>) -> Figures {
    let spec = &run.manifest.spec;
    let (stages, replicas) = (spec.pipeline.stages, spec.pipeline.replicas);
    let tokens_per_step = crate::coord::server::tokens_per_step(spec);
    let tokens = tokens_per_step * spec.training.steps;
    let status = &run.status;
    let link_bytes_per_token =
        status.shards.iter().map(|s| s.mean_link_bytes).sum::<f64>() / tokens_per_step as f64;
    // Each replica's share of the last step, stage by stage.
    let shares: Vec<Vec<usize>> = (0..stages)
        .map(|s| {
            (0..replicas)
                .map(|r| {
                    status
                        .shards
                        .iter()
                        .find(|x| (x.stage, x.replica) == (s, r))
                        .map_or(0, |x| x.micro_batches)
                })
                .collect()
        })
        .collect();
    Figures {
        tokens_per_second: tokens as f64 / run.seconds.max(1e-9),
        final_loss: run.losses.last().copied().unwrap_or(f32::NAN),
        recoveries: run.drill.recoveries(),
        link_bytes_per_token,
        efficiency: pipeline_efficiency(run.manifest, status),
        shares,
    }
}

fn print_run(run: &Finished<'_>, f: &Figures) {
    let spec = &run.manifest.spec;
    let shards = spec.pipeline.stages * spec.pipeline.replicas;
    println!(
        "all {shards} workers finished {} steps in {:.1}s ({:.0} tokens/s); final loss {:.4}",
        spec.training.steps, run.seconds, f.tokens_per_second, f.final_loss
    );
    println!(
        "  shard reassignments {} (relaunched processes {})",
        run.status.reassignments, run.relaunches
    );
    for q in run.quarantined {
        println!(
            "  quarantined                stage {} replica {} at step {} for {} ({}), replaced by a fresh worker ({})",
            q.stage,
            q.replica,
            q.step,
            q.reason,
            q.identity.display(),
            q.replacement.display()
        );
    }
    if run.drill.kills() > 0 {
        let median = f.recoveries.get(f.recoveries.len() / 2).copied();
        println!(
            "  fault drill: {} kill(s), {} recovered, recovery to the next completed step: median {}, max {}",
            run.drill.kills(),
            f.recoveries.len(),
            median.map_or("-".into(), |m| format!("{m:.2}s")),
            f.recoveries.last().map_or("-".into(), |m| format!("{m:.2}s")),
        );
    }
    println!(
        "  stage links                {:.0} bytes per token ({:?} codec; all boundaries, both directions)",
        f.link_bytes_per_token, spec.pipeline.codec
    );
    if let Some((measured, bound)) = f.efficiency {
        println!(
            "  pipeline efficiency        {:.1}% of the {} bound ({:.1} ms per step measured, {:.1} ms from measured stage times)",
            100.0 * bound / measured,
            serde_json::to_value(spec.pipeline.schedule)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            measured * 1e3,
            bound * 1e3
        );
    }
    if spec.pipeline.replicas > 1 {
        println!(
            "  micro-batches per replica  {:?} by stage ({:?} routing)",
            f.shares, spec.pipeline.routing
        );
    }
}

/// Scores the final checkpoint the workers wrote, as a single-process run
/// scores its model; with the corpus's order-0 entropy in bits per byte.
fn score(run: &Finished<'_>) -> Result<(EvalReport, f64)> {
    let spec = &run.manifest.spec;
    let mut loaded = crate::checkpoint::load(run.root)
        .with_context(|| format!("loading the final checkpoint in {}", run.root.display()))?;
    let corpus = crate::data::Corpus::load(&spec.data, &loaded.tokenizer)?;
    let eval = crate::train::evaluate(
        &mut loaded.stages,
        &corpus,
        spec.training.eval_batches,
        spec.training.micro_batch_size,
    )?;
    Ok((eval, corpus.unigram_bits_per_byte()))
}

fn write_summary(
    run: &Finished<'_>,
    f: &Figures,
    scored: Option<&(EvalReport, f64)>,
) -> Result<()> {
    let m = run.manifest;
    let spec = &m.spec;
    let summary = json!({
        "val_loss": scored.map(|(e, _)| e.loss),
        "val_bits_per_byte": scored.map(|(e, _)| e.bits_per_byte),
        "unigram_bits_per_byte": scored.map(|(_, u)| *u),
        "processes": spec.pipeline.stages * spec.pipeline.replicas,
        "codec": spec.pipeline.codec,
        "link_bytes_per_token": f.link_bytes_per_token,
        "step_seconds_measured": f.efficiency.map(|e| e.0),
        "step_seconds_bound": f.efficiency.map(|e| e.1),
        "name": m.metadata.name,
        "steps": spec.training.steps,
        "seconds": run.seconds,
        "tokens_per_sec": f.tokens_per_second,
        "losses": run.losses,
        "final_loss": f.final_loss,
        "reassignments": run.status.reassignments,
        "kills": run.drill.kills(),
        "routing": spec.pipeline.routing,
        "micro_batches_per_replica": f.shares,
        "recovery_seconds": f.recoveries,
        "quarantined": run
            .quarantined
            .iter()
            .map(|q| json!({
                "stage": q.stage,
                "replica": q.replica,
                "step": q.step,
                "reason": q.reason,
                "identity": q.identity,
                "replacement": q.replacement,
            }))
            .collect::<Vec<_>>(),
    });
    let path = run.root.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Mean step time measured against the schedule's theoretical bound from
/// the stages' measured compute times: each stage's forward and backward
/// time per micro-batch (split 1 : 1 : 1 between forward, input gradient
/// and weight gradient; only their sum matters for GPipe and 1F1B) and its
/// optimizer update. `None` before any step was timed.
fn pipeline_efficiency(manifest: &TrainingRun, status: &Status) -> Option<(f64, f64)> {
    use crate::schedule::{theoretical_bound, OpCosts, StageCosts};
    let m = manifest.spec.training.micro_batches;
    let mut stages = Vec::new();
    let mut update = 0.0f64;
    let mut measured = 0.0f64;
    for st in 0..status.stages.len() {
        let shards: Vec<&crate::coord::state::ShardStatus> =
            status.shards.iter().filter(|s| s.stage == st).collect();
        let busy = shards.iter().map(|s| s.mean_seconds[1]).fold(0.0, f64::max);
        update = shards
            .iter()
            .map(|s| s.mean_seconds[2])
            .fold(update, f64::max);
        measured = shards
            .iter()
            .map(|s| s.mean_seconds[0])
            .fold(measured, f64::max);
        let t = busy / m as f64 / 3.0;
        stages.push(OpCosts {
            forward: t,
            backward_input: t,
            backward_weight: t,
        });
    }
    if measured <= 0.0 {
        return None;
    }
    let costs = StageCosts {
        stages,
        link_latency: 0.0,
    };
    let bound = theoretical_bound(manifest.spec.pipeline.schedule, m, &costs) + update;
    Some((measured, bound))
}
