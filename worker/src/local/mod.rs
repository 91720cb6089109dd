//! A run on one machine as separate processes (`pipewright train
//! --processes`): the coordinator in this process and one `pipewright
//! worker` process per shard (stage × replica), talking over authenticated
//! TCP on loopback — the same processes a cluster runs.
//!
//! - `mod.rs`: the supervisor: starts the coordinator and the workers,
//!   shows progress, relaunches a worker process that dies (the coordinator
//!   rewires the run and training goes on), replaces one whose identity was
//!   quarantined (it exits with [`crate::EXIT_QUARANTINED`]) by a fresh
//!   process under a new identity, gives up when they keep dying.
//! - `process`: how a shard's worker process is started.
//! - `drill`: the `--kill-workers N` fault drill: N random workers killed
//!   with SIGKILL during the run, and how long each recovery took.
//! - `summary`: what the run prints when it ends, and `summary.json`.

mod drill;
mod process;
mod summary;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipewright_spec::TrainingRun;

use crate::coord::{Handle, Phase, Status};
use drill::Drill;
use process::{Spawner, Worker};

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
    /// Dishonest workers (a drill): `(stage, replica, attack)`.
    pub byzantine: &'a [(usize, usize, crate::pipeline::Attack)],
    /// Cap on what each worker sends per link, bytes per second.
    pub max_send_rate: Option<u64>,
    /// Where the coordinator listens.
    pub coordinator_listen: &'a str,
}

/// Launch every shard of `manifest` as a process and wait for the run.
pub fn run(manifest: &TrainingRun, opts: &LaunchOptions<'_>) -> Result<()> {
    let p = &manifest.spec.pipeline;
    let (stages, replicas) = (p.stages, p.replicas);
    let shards = stages * replicas;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.unwrap_or((cores / shards).max(1));
    let token = crate::coord::setup::random_hex32();
    let coord = start_coordinator(manifest, opts, token.clone())?;
    let url = format!("http://{}", coord.addr());
    // The workers read the manifest from a file that lives as long as the run.
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
    check_drills(opts, stages, replicas)?;
    let spawner = Spawner {
        exe: std::env::current_exe().context("locating the pipewright binary")?,
        manifest: manifest_path,
        url,
        token,
        threads,
        opts,
    };
    let mut workers = Vec::with_capacity(shards);
    for s in 0..stages {
        for r in 0..replicas {
            workers.push(spawner.spawn(s, r, 1, 1)?);
        }
    }
    let steps = manifest.spec.training.steps;
    let start = Instant::now();
    let mut supervisor = Supervisor {
        coord: &coord,
        spawner: &spawner,
        workers,
        bar: progress_bar(steps, opts.quiet),
        quiet: opts.quiet,
        drill: Drill::new(opts.kills, opts.kill_seed, steps),
        steps,
        relaunches: 0,
        most_relaunches: 10 * shards + opts.kills,
        quarantined: Vec::new(),
    };
    let result = supervisor.watch();
    supervisor.stop();
    coord.shutdown();
    let status = result?;
    summary::report(&summary::Finished {
        manifest,
        root: opts.root,
        status,
        seconds: start.elapsed().as_secs_f64(),
        losses: coord.losses(),
        relaunches: supervisor.relaunches,
        drill: &supervisor.drill,
        quarantined: &supervisor.quarantined,
    })?;
    if supervisor.drill.unrecovered() {
        bail!("a fault drill kill was never recovered from");
    }
    Ok(())
}

/// Refuses a `--slow-worker` or `--byzantine` drill on a shard outside the
/// `stages` × `replicas` layout, or an activation attack in a pipeline of
/// one stage; announces each attack.
fn check_drills(opts: &LaunchOptions<'_>, stages: usize, replicas: usize) -> Result<()> {
    for &(s, r, _) in opts.slow {
        if s >= stages || r >= replicas {
            bail!("--slow-worker {s}/{r} is outside the {stages} × {replicas} layout");
        }
    }
    for &(s, r, a) in opts.byzantine {
        if s >= stages || r >= replicas {
            bail!("--byzantine {s}/{r} is outside the {stages} × {replicas} layout");
        }
        if a.kind.on_pipeline() && stages < 2 {
            bail!("--byzantine {s}/{r}={a}: a pipeline of one stage sends no activations");
        }
        if a.kind.relays_targets() && !(1..stages.saturating_sub(1)).contains(&s) {
            bail!("--byzantine {s}/{r}={a}: only a middle stage relays targets");
        }
        eprintln!("drill: stage {s} replica {r} attacks with {a}");
    }
    Ok(())
}

/// Starts the run's coordinator on a fresh state: the previous
/// coordinator's state would resume the old run, and its ledger is set
/// aside rather than booked into.
fn start_coordinator(
    manifest: &TrainingRun,
    opts: &LaunchOptions<'_>,
    token: String,
) -> Result<Handle> {
    let state_dir = opts.root.join("coordinator");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("clearing {}", state_dir.display()))?;
    }
    crate::ledger::set_aside(&opts.root.join(crate::ledger::FILE))
        .context("setting the previous run's ledger aside")?;
    let cfg = crate::coord::setup::config(
        manifest,
        token,
        crate::coord::setup::random_hex32(),
        state_dir,
        opts.root.to_path_buf(),
        Duration::from_secs(2),
    )?;
    crate::coord::start(cfg, opts.coordinator_listen)
}

/// A line above the progress bar `bar`, or on standard error when `quiet`
/// (a hidden bar prints nothing).
fn say(bar: &ProgressBar, quiet: bool, line: String) {
    if quiet {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The progress bar of a run of `steps` steps (hidden when `quiet`).
fn progress_bar(steps: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30.cyan/blue} step {pos}/{len} {msg}  [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Watches the run and its worker processes.
struct Supervisor<'a> {
    coord: &'a Handle,
    spawner: &'a Spawner<'a>,
    workers: Vec<Worker>,
    bar: ProgressBar,
    /// No progress bar: a line every 10 s instead.
    quiet: bool,
    drill: Drill,
    /// The run's steps.
    steps: u64,
    relaunches: usize,
    /// Relaunches after which the launcher gives up.
    most_relaunches: usize,
    /// Workers that exited quarantined, in order, each replaced.
    quarantined: Vec<summary::Replaced>,
}

impl Supervisor<'_> {
    /// Every 20 ms until the run ends: progress, the drill's recoveries,
    /// processes that ended, the drill's next kill. The last status when
    /// the run succeeded and every worker exited.
    fn watch(&mut self) -> Result<Status> {
        let mut last_log = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let status = self.coord.status();
            self.show(&status, &mut last_log);
            self.drill.note(&status);
            if status.phase == Phase::Failed {
                bail!("the run failed: {}", status.reason);
            }
            self.reap(&status)?;
            if self.relaunches > self.most_relaunches {
                bail!(
                    "workers keep dying ({} relaunches); giving up",
                    self.relaunches
                );
            }
            if self.workers.iter().all(|w| w.done) && status.phase == Phase::Succeeded {
                return Ok(status);
            }
            self.drill
                .strike(&mut self.workers, &status, self.steps, &self.bar)?;
        }
    }

    /// The progress bar; with `--quiet`, a line every 10 s instead.
    fn show(&self, status: &Status, last_log: &mut Instant) {
        let loss = status.loss.map_or("-".into(), |l| format!("{l:.4}"));
        self.bar.set_position(status.step);
        self.bar.set_message(format!(
            "{:?} loss {loss}  {:.0} tok/s  epoch {}",
            status.phase, status.tokens_per_second, status.epoch
        ));
        if self.quiet && last_log.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "step {}/{} loss {loss} {:.0} tok/s",
                status.step, self.steps, status.tokens_per_second
            );
            *last_log = Instant::now();
        }
    }

    /// Processes that ended: on success they are done; otherwise the
    /// coordinator forgets the worker at once and a new one starts (until
    /// there were too many relaunches): under the same identity, or under
    /// a new one when the old one was quarantined.
    fn reap(&mut self, status: &Status) -> Result<()> {
        let ids = self.coord.workers();
        for w in self.workers.iter_mut().filter(|w| !w.done) {
            let Some(exit) = w.child.try_wait()? else {
                continue;
            };
            w.done = true;
            if exit.success() {
                continue;
            }
            if let Some((&id, _)) = ids.iter().find(|(_, &sh)| sh == (w.stage, w.replica)) {
                self.coord.lose(id);
            }
            if status.phase == Phase::Succeeded {
                continue;
            }
            self.relaunches += 1;
            if self.relaunches > self.most_relaunches {
                break;
            }
            if exit.code() == Some(crate::EXIT_QUARANTINED) {
                let root = self.spawner.opts.root;
                let old = process::identity_file(root, w.stage, w.replica, w.generation);
                let new = process::identity_file(root, w.stage, w.replica, w.generation + 1);
                // The coordinator's record of the conviction, when its
                // status already shows it.
                let (step, reason) = self
                    .coord
                    .status()
                    .quarantined
                    .into_iter()
                    .filter(|q| (q.stage, q.replica) == (w.stage, w.replica))
                    .max_by_key(|q| q.step)
                    .map_or((status.step + 1, "unknown".to_string()), |q| {
                        (q.step, q.reason)
                    });
                say(&self.bar, self.quiet, format!(
                    "stage {} replica {} was quarantined at step {step} for {reason} (identity {}); starting a fresh worker under {}",
                    w.stage,
                    w.replica,
                    old.display(),
                    new.display()
                ));
                self.quarantined.push(summary::Replaced {
                    stage: w.stage,
                    replica: w.replica,
                    step,
                    reason,
                    identity: old,
                    replacement: new,
                });
                *w = self
                    .spawner
                    .spawn(w.stage, w.replica, w.generation + 1, 1)?;
                continue;
            }
            say(
                &self.bar,
                self.quiet,
                format!(
                    "stage {} replica {} exited ({exit}); starting a new worker",
                    w.stage, w.replica
                ),
            );
            // The step it was in is trained again: a drill attacks only
            // the steps after it.
            *w = self
                .spawner
                .spawn(w.stage, w.replica, w.generation, status.step + 2)?;
        }
        Ok(())
    }

    /// Clears the progress bar and ends every worker process still running.
    fn stop(&mut self) {
        self.bar.finish_and_clear();
        for w in &mut self.workers {
            if !w.done {
                let _ = w.child.kill();
            }
            let _ = w.child.wait();
        }
    }
}
