//! `pipewright train --processes`: the run as a coordinator (in this
//! process) and one `pipewright worker` process per shard (stage × replica),
//! talking over authenticated TCP on loopback — the same processes a
//! cluster runs. A worker process that dies is relaunched; the coordinator
//! rewires the run and training goes on. `--kill-workers N` kills N random
//! workers with SIGKILL during the run (a fault drill) and reports how long
//! each recovery took.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipewright_spec::TrainingRun;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use super::coordinator::{config, random_hex32};
use super::worker::TOKEN_ENV;
use crate::coord::Phase;

/// How the launcher runs.
pub struct LaunchOptions<'a> {
    /// Run directory (checkpoints, coordinator state, summary).
    pub root: &'a Path,
    /// Kernel threads per worker (default: cores / shards).
    pub threads: Option<usize>,
    /// No progress bar.
    pub quiet: bool,
    /// Workers to kill during the run.
    pub kills: usize,
    /// Seed of the kills' timing and victims.
    pub kill_seed: u64,
    /// Workers made slower: `(stage, replica, factor)`.
    pub slow: &'a [(usize, usize, f64)],
    /// Cap on what each worker sends per link, bytes per second.
    pub max_send_rate: Option<u64>,
    /// Where the coordinator listens.
    pub coordinator_listen: &'a str,
}

struct Worker {
    stage: usize,
    replica: usize,
    child: Child,
    done: bool,
}

struct Kill {
    at: Instant,
    step: u64,
    epoch: u64,
    recovered: Option<f64>,
}

/// Launch every shard of `manifest` as a process and wait for the run.
pub fn run(manifest: &TrainingRun, opts: &LaunchOptions<'_>) -> Result<()> {
    let p = &manifest.spec.pipeline;
    let (stages, replicas) = (p.stages, p.replicas);
    let shards = stages * replicas;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.unwrap_or((cores / shards).max(1));
    let token = random_hex32();
    let state_dir = opts.root.join("coordinator");
    // A fresh run: the previous coordinator's state would resume it.
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("clearing {}", state_dir.display()))?;
    }
    // ... and its ledger is kept aside, not booked into.
    crate::ledger::set_aside(&opts.root.join(crate::ledger::FILE))
        .context("setting the previous run's ledger aside")?;
    let cfg = config(
        manifest,
        token.clone(),
        random_hex32(),
        state_dir,
        opts.root.to_path_buf(),
        Duration::from_secs(2),
    )?;
    let coord = crate::coord::start(cfg, opts.coordinator_listen)?;
    let url = format!("http://{}", coord.addr());
    let exe = std::env::current_exe().context("locating the pipewright binary")?;
    let dir = tempfile::Builder::new()
        .prefix("pipewright-launch-")
        .tempdir()
        .context("creating a temporary directory")?;
    let manifest_path = dir.path().join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(manifest)?)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    eprintln!(
        "coordinator on {url}; launching {shards} worker processes ({stages} stage(s) × {replicas} replica(s), {threads} kernel thread(s) each)"
    );
    for &(s, r, _) in opts.slow {
        if s >= stages || r >= replicas {
            bail!("--slow-worker {s}/{r} is outside the {stages} × {replicas} layout");
        }
    }
    let spawn = |stage: usize, replica: usize| -> Result<Worker> {
        let slowdown = opts
            .slow
            .iter()
            .find(|&&(s, r, _)| (s, r) == (stage, replica))
            .map_or(1.0, |&(_, _, f)| f);
        let mut command = Command::new(&exe);
        command.arg("worker");
        if let Some(rate) = opts.max_send_rate {
            command.args(["--max-send-rate", &(rate as f64 / 1e6).to_string()]);
        }
        let child = command
            .arg(&manifest_path)
            .args(["--coordinator", &url])
            .args([
                "--stage",
                &stage.to_string(),
                "--replica",
                &replica.to_string(),
            ])
            .args(["--threads", &threads.to_string()])
            .args(["--slowdown", &slowdown.to_string()])
            // Each shard's process has an identity of its own, kept in the
            // run directory: a relaunched one keeps its account.
            .arg("--identity")
            .arg(
                opts.root
                    .join("identities")
                    .join(format!("stage-{stage}-replica-{replica}")),
            )
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting stage {stage} replica {replica}"))?;
        Ok(Worker {
            stage,
            replica,
            child,
            done: false,
        })
    };
    let mut workers = Vec::with_capacity(shards);
    for s in 0..stages {
        for r in 0..replicas {
            workers.push(spawn(s, r)?);
        }
    }
    let steps = manifest.spec.training.steps;
    let bar = ProgressBar::new(steps);
    if opts.quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30.cyan/blue} step {pos}/{len} {msg}  [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let start = Instant::now();
    // The drill's kills fall at seeded random steps, spread over the run,
    // each at whatever moment of that step the launcher gets to it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.kill_seed);
    let mut kill_steps: Vec<u64> = (0..opts.kills)
        .map(|_| rng.random_range(1..steps.saturating_sub(2).max(2)))
        .collect();
    kill_steps.sort_unstable();
    let mut kills: Vec<Kill> = Vec::new();
    let mut relaunches = 0usize;
    let mut last_log = Instant::now();
    let result = loop {
        std::thread::sleep(Duration::from_millis(20));
        let status = coord.status();
        bar.set_position(status.step);
        bar.set_message(format!(
            "{:?} loss {}  {:.0} tok/s  epoch {}",
            status.phase,
            status.loss.map_or("-".into(), |l| format!("{l:.4}")),
            status.tokens_per_second,
            status.epoch
        ));
        if opts.quiet && last_log.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "step {}/{steps} loss {} {:.0} tok/s",
                status.step,
                status.loss.map_or("-".into(), |l| format!("{l:.4}")),
                status.tokens_per_second
            );
            last_log = Instant::now();
        }
        for k in kills.iter_mut().filter(|k| k.recovered.is_none()) {
            if status.epoch > k.epoch && status.step > k.step {
                k.recovered = Some(k.at.elapsed().as_secs_f64());
            }
        }
        if status.phase == Phase::Failed {
            break Err(anyhow::anyhow!("the run failed: {}", status.reason));
        }
        // Processes that ended: on success they are done; otherwise the
        // coordinator forgets the worker at once and a new one starts.
        let ids = coord.workers();
        for w in workers.iter_mut().filter(|w| !w.done) {
            let Some(exit) = w.child.try_wait()? else {
                continue;
            };
            w.done = true;
            if exit.success() {
                continue;
            }
            if let Some((&id, _)) = ids.iter().find(|(_, &sh)| sh == (w.stage, w.replica)) {
                coord.lose(id);
            }
            if status.phase == Phase::Succeeded {
                continue;
            }
            relaunches += 1;
            if relaunches > 10 * shards + opts.kills {
                break;
            }
            bar.println(format!(
                "stage {} replica {} exited ({exit}); starting a new worker",
                w.stage, w.replica
            ));
            *w = spawn(w.stage, w.replica)?;
        }
        if relaunches > 10 * shards + opts.kills {
            break Err(anyhow::anyhow!(
                "workers keep dying ({relaunches} relaunches); giving up"
            ));
        }
        if workers.iter().all(|w| w.done) && status.phase == Phase::Succeeded {
            break Ok(status);
        }
        let quiet_now = kills.last().is_none_or(|k| k.recovered.is_some());
        if kills.len() < opts.kills
            && quiet_now
            && status.step >= kill_steps[kills.len()]
            && status.phase == Phase::Training
            && status.step + 1 < steps
        {
            let live: Vec<usize> = (0..workers.len()).filter(|&i| !workers[i].done).collect();
            if !live.is_empty() {
                let i = live[rng.random_range(0..live.len())];
                let w = &mut workers[i];
                bar.println(format!(
                    "fault drill: kill -9 stage {} replica {} at step {}",
                    w.stage, w.replica, status.step
                ));
                w.child.kill().context("killing a worker")?;
                kills.push(Kill {
                    at: Instant::now(),
                    step: status.step,
                    epoch: status.epoch,
                    recovered: None,
                });
            }
        }
    };
    bar.finish_and_clear();
    for w in &mut workers {
        if !w.done {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
    coord.shutdown();
    let status = result?;
    let elapsed = start.elapsed().as_secs_f64();
    let losses = coord.losses();
    let final_loss = losses.last().copied().unwrap_or(f32::NAN);
    let mut recoveries: Vec<f64> = kills.iter().filter_map(|k| k.recovered).collect();
    recoveries.sort_by(f64::total_cmp);
    let tokens_per_step = crate::coord::server::tokens_per_step(&manifest.spec);
    let tokens = tokens_per_step * steps;
    println!(
        "all {shards} workers finished {steps} steps in {elapsed:.1}s ({:.0} tokens/s); final loss {final_loss:.4}",
        tokens as f64 / elapsed.max(1e-9)
    );
    println!(
        "  shard reassignments {} (relaunched processes {relaunches})",
        status.reassignments
    );
    if !kills.is_empty() {
        let median = recoveries.get(recoveries.len() / 2).copied();
        println!(
            "  fault drill: {} kill(s), {} recovered, recovery to the next completed step: median {}, max {}",
            kills.len(),
            recoveries.len(),
            median.map_or("-".into(), |m| format!("{m:.2}s")),
            recoveries.last().map_or("-".into(), |m| format!("{m:.2}s")),
        );
    }
    let efficiency = pipeline_efficiency(manifest, &status);
    let link_bytes_per_token =
        status.shards.iter().map(|s| s.mean_link_bytes).sum::<f64>() / tokens_per_step as f64;
    println!(
        "  stage links                {link_bytes_per_token:.0} bytes per token ({:?} codec; all boundaries, both directions)",
        manifest.spec.pipeline.codec
    );
    if let Some((measured, bound)) = efficiency {
        println!(
            "  pipeline efficiency        {:.1}% of the {} bound ({:.1} ms per step measured, {:.1} ms from measured stage times)",
            100.0 * bound / measured,
            serde_json::to_value(manifest.spec.pipeline.schedule)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            measured * 1e3,
            bound * 1e3
        );
    }
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
    if replicas > 1 {
        println!(
            "  micro-batches per replica  {shares:?} by stage ({:?} routing)",
            manifest.spec.pipeline.routing
        );
    }
    // Score the final checkpoint the workers wrote, as a single-process run
    // scores its model.
    let mut loaded = crate::checkpoint::load(opts.root)
        .with_context(|| format!("loading the final checkpoint in {}", opts.root.display()))?;
    let corpus = crate::data::Corpus::load(&manifest.spec.data, &loaded.tokenizer)?;
    let eval = crate::train::evaluate(
        &mut loaded.stages,
        &corpus,
        manifest.spec.training.eval_batches,
        manifest.spec.training.micro_batch_size,
    )?;
    let unigram = corpus.unigram_bits_per_byte();
    super::print_evaluation(&eval, unigram);
    if let Some(step) = status.checkpoint_step {
        println!(
            "  checkpoint                 {}",
            crate::checkpoint::step_dir(opts.root, step).display()
        );
    }
    let summary = json!({
        "val_loss": eval.loss,
        "val_bits_per_byte": eval.bits_per_byte,
        "unigram_bits_per_byte": unigram,
        "processes": shards,
        "codec": manifest.spec.pipeline.codec,
        "link_bytes_per_token": link_bytes_per_token,
        "step_seconds_measured": efficiency.map(|e| e.0),
        "step_seconds_bound": efficiency.map(|e| e.1),
        "name": manifest.metadata.name,
        "steps": steps,
        "seconds": elapsed,
        "tokens_per_sec": tokens as f64 / elapsed.max(1e-9),
        "losses": losses,
        "final_loss": final_loss,
        "reassignments": status.reassignments,
        "kills": kills.len(),
        "routing": manifest.spec.pipeline.routing,
        "micro_batches_per_replica": shares,
        "recovery_seconds": recoveries,
    });
    let path = opts.root.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    if kills.iter().any(|k| k.recovered.is_none()) {
        bail!("a fault drill kill was never recovered from");
    }
    Ok(())
}

/// Mean step time measured against the schedule's theoretical bound from
/// the stages' measured compute times: each stage's forward and backward
/// time per micro-batch (split 1 : 1 : 1 between forward, input gradient
/// and weight gradient; only their sum matters for GPipe and 1F1B) and its
/// optimizer update. `None` before any step was timed.
fn pipeline_efficiency(
    manifest: &TrainingRun,
    status: &crate::coord::Status,
) -> Option<(f64, f64)> {
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
