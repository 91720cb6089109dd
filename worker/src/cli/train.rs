//! `pipewright train`: a whole run in this process, with a progress bar,
//! periodic evaluation and checkpoints, and a summary at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::checkpoint;
use crate::train::{run_dir, Trainer};

/// Arguments of `pipewright train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TrainingRun manifest (YAML).
    pub manifest: PathBuf,
    /// Override `spec.training.steps`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop (with a checkpoint) after this step, as if interrupted.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Resume from the latest checkpoint in the run's directory.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start afresh even if the run directory already holds checkpoints
    /// (they are replaced as the new run writes its own).
    #[arg(long)]
    pub overwrite: bool,
    /// Run directory for checkpoints (default: `checkpoint.dir`, else `runs/<name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Kernel threads (default: `training.threads`, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run a coordinator and every shard (stage × replica) as its own
    /// `pipewright worker` process, linked over TCP on loopback, instead of
    /// all stages in this process.
    #[arg(long, conflicts_with_all = ["resume", "stop_after"])]
    pub processes: bool,
    /// With `--processes`: kill -9 this many random workers during the run
    /// (a fault drill) and report each recovery.
    #[arg(long, default_value_t = 0, requires = "processes")]
    pub kill_workers: usize,
    /// Seed of the fault drill's timing and victims.
    #[arg(long, default_value_t = 1)]
    pub kill_seed: u64,
    /// With `--processes`: make one worker slower, `STAGE/REPLICA=FACTOR`
    /// (every forward and backward takes FACTOR times as long); repeatable.
    /// A drill for `routing: throughput`.
    #[arg(long, requires = "processes", value_parser = parse_slow_worker)]
    pub slow_worker: Vec<(usize, usize, f64)>,
    /// With `--processes`: make one worker dishonest,
    /// `STAGE/REPLICA=ATTACK[@STEP]`, from step STEP on; repeatable. On its
    /// gradient contribution: `sign-flip`, `scale` (×100), `scale:F`,
    /// `noise`, `contribution-lie` (sends it negated, commits to the honest
    /// one); on what it sends other stages: `nan`, `act-noise`
    /// (Gaussian noise as large as the tensor), `act-scale` (×100),
    /// `lazy-zeros` (zeros in place of its outputs), `lazy-replay` (the
    /// previous step's outputs again); on its own step: `stale` (skips its
    /// optimizer update), `forge` (signs its reports with a key not its
    /// identity's), `lie` (as an auditor, reports hashes it did not
    /// compute). A drill for `spec.pipeline.aggregation`, the replicas'
    /// digest check and audits (`spec.validation.auditRate`); see
    /// docs/byzantine.md.
    #[arg(long, requires = "processes", value_parser = crate::pipeline::attack::parse_shard_attack)]
    pub byzantine: Vec<(usize, usize, crate::pipeline::Attack)>,
    /// With `--processes`: most megabytes per second each worker sends on
    /// each link (kernel pacing), emulating a slower network.
    #[arg(long, requires = "processes", value_parser = super::worker::parse_rate)]
    pub max_send_rate: Option<u64>,
    /// With `--processes`: address of the coordinator's HTTP API.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub coordinator_listen: String,
    /// No progress bar (log lines instead).
    #[arg(long)]
    pub quiet: bool,
    /// Where a single-process run computes: `cuda` (one GPU holds every
    /// stage; an error if none can be used), `cpu`, or `auto` (the GPU when
    /// one is usable, else the CPU, saying why).
    #[arg(long, value_enum, default_value_t = Device::Auto, conflicts_with = "processes")]
    pub device: Device,
}

/// Choice of `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// A GPU if one is usable, else the CPU.
    Auto,
    /// The CPU kernels.
    Cpu,
    /// A CUDA GPU (device 0).
    Cuda,
}

/// Whether `choice` may put the run on a GPU, whose memory (not this
/// machine's) then bounds it.
fn may_use_gpu(choice: Device) -> bool {
    match choice {
        Device::Cpu => false,
        Device::Cuda => true,
        #[cfg(feature = "cuda")]
        Device::Auto => crate::kernels::cuda::driver_present(),
        #[cfg(not(feature = "cuda"))]
        Device::Auto => false,
    }
}

/// Move `trainer` to the device `choice` asks for.
fn select_device(trainer: &mut Trainer, choice: Device) -> Result<()> {
    if choice == Device::Cpu {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        use crate::kernels::cuda::{driver_present, Gpu};
        if choice == Device::Auto && !driver_present() {
            eprintln!("device: no CUDA driver here (libcuda does not load); training on the CPU");
            return Ok(());
        }
        let mut open = || -> Result<String> {
            let gpu = Gpu::open(0)?;
            let name = gpu.name().to_string();
            trainer.use_device(gpu)?;
            Ok(name)
        };
        let opened = open();
        match opened {
            Ok(name) => {
                eprintln!("device: {name} (CUDA), every stage on one GPU");
                Ok(())
            }
            Err(e) if choice == Device::Auto => {
                eprintln!("device: CUDA not usable ({e:#}); training on the CPU");
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("--device cuda: {e:#}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        if choice == Device::Cuda {
            anyhow::bail!(
                "--device cuda: this pipewright was built without CUDA support (build with `cargo build --release --features cuda`)"
            );
        }
        let _ = trainer;
        Ok(())
    }
}

/// Refuses, before anything the size of the model is allocated, a run that
/// needs more memory in this process than the machine has available.
fn check_memory(manifest: &pipewright_spec::TrainingRun, path: &std::path::Path) -> Result<()> {
    use crate::plan::{available_memory, human, min_stages, plan, vocab};
    let Some(available) = available_memory() else {
        return Ok(()); // nothing to compare with (not Linux)
    };
    let vocab = vocab(manifest).context("reading the tokenizer's vocabulary")?;
    let p = plan(manifest, vocab, None);
    if p.single_process_bytes <= available {
        return Ok(());
    }
    // The stage to name: the first that alone does not fit, else the largest.
    let stage = p
        .stages
        .iter()
        .find(|s| s.total_bytes > available)
        .unwrap_or_else(|| p.largest_stage());
    let alone = if stage.total_bytes > available {
        "alone needs"
    } else {
        "is the largest, with"
    };
    let split = match min_stages(manifest, vocab, available) {
        Some(n) => format!(
            "Split the model over at least {n} stages (spec.pipeline.stages; \
             `pipewright plan {} --node-memory SIZE` shows what each needs)",
            path.display()
        ),
        None => format!(
            "Even one layer per stage needs more than this machine has: split the model \
             over more stages on machines with more memory (`pipewright plan {} \
             --node-memory SIZE` shows what each needs)",
            path.display()
        ),
    };
    anyhow::bail!(
        "this run needs {} in one process, but this machine has {} available: stage {} \
         (layers {}..{}) {alone} {} ({} weights, {} gradients, {} Adam moments, {} activations). \
         {split}, and run them as separate processes on several machines \
         (`pipewright train --processes`, or `pipewright worker` / `pipewright join` on each).",
        human(p.single_process_bytes),
        human(available),
        stage.stage,
        stage.layers.start,
        stage.layers.end,
        human(stage.total_bytes),
        human(stage.weight_bytes),
        human(stage.gradient_bytes),
        human(stage.optimizer_bytes),
        human(stage.activation_bytes),
    )
}

/// Parses `STAGE/REPLICA=FACTOR`.
fn parse_slow_worker(s: &str) -> Result<(usize, usize, f64), String> {
    let bad = || format!("expected STAGE/REPLICA=FACTOR (e.g. 1/0=3), got {s:?}");
    let (shard, factor) = s.split_once('=').ok_or_else(bad)?;
    let (stage, replica) = shard.split_once('/').ok_or_else(bad)?;
    let stage = stage.trim().parse().map_err(|_| bad())?;
    let replica = replica.trim().parse().map_err(|_| bad())?;
    let factor: f64 = factor.trim().parse().map_err(|_| bad())?;
    if !(factor.is_finite() && factor >= 1.0) {
        return Err(format!(
            "the slowdown factor must be at least 1, got {factor}"
        ));
    }
    Ok((stage, replica, factor))
}

/// Run `pipewright train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut manifest = pipewright_spec::load_manifest(&args.manifest)
        .with_context(|| format!("{} is not a valid TrainingRun", args.manifest.display()))?;
    if let Some(steps) = args.steps {
        // A shorter run keeps the manifest valid: warm-up and checkpoint
        // period cannot exceed it.
        let t = &mut manifest.spec.training;
        t.steps = steps;
        t.warmup_steps = t.warmup_steps.min(steps);
        let ck = &mut manifest.spec.checkpoint;
        if ck.every > steps {
            ck.every = 0;
        }
        if t.eval_every > steps {
            t.eval_every = 0;
        }
    }
    let root = args.out.clone().unwrap_or_else(|| run_dir(&manifest));
    if args.processes {
        if !args.overwrite {
            if let Ok(latest) = checkpoint::resolve(&root) {
                anyhow::bail!(
                    "{} already holds checkpoints (latest: {}); pass --overwrite to start over, or --out DIR to train elsewhere",
                    root.display(),
                    latest.display()
                );
            }
        }
        return crate::local::run(
            &manifest,
            &crate::local::LaunchOptions {
                root: &root,
                threads: args.threads,
                quiet: args.quiet,
                kills: args.kill_workers,
                kill_seed: args.kill_seed,
                slow: &args.slow_worker,
                byzantine: &args.byzantine,
                max_send_rate: args.max_send_rate,
                coordinator_listen: &args.coordinator_listen,
            },
        );
    }
    if !args.resume && !may_use_gpu(args.device) {
        check_memory(&manifest, &args.manifest)?;
    }
    crate::kernels::init_threads(args.threads.unwrap_or(manifest.spec.training.threads));
    if !args.resume && !args.overwrite {
        if let Ok(latest) = checkpoint::resolve(&root) {
            anyhow::bail!(
                "{} already holds checkpoints (latest: {}); pass --resume to continue that run, \
                 --overwrite to start over, or --out DIR to train elsewhere",
                root.display(),
                latest.display()
            );
        }
    }
    let setup = Instant::now();
    let mut trainer = if args.resume {
        Trainer::resume(&root, Some(manifest.spec.training.steps))
            .with_context(|| format!("resuming from {}", root.display()))?
    } else {
        Trainer::new(manifest).context("preparing the run")?
    };
    select_device(&mut trainer, args.device)?;
    let spec = trainer.manifest.spec.clone();
    let corpus = &trainer.corpus;
    eprintln!(
        "run {}: {:.1}M parameters in {} stage(s) × {} replica(s); corpus {} files, {:.2} MB train / {:.2} MB validation, {} tokens ({:.1}s to prepare)",
        trainer.manifest.metadata.name,
        trainer.model.total_params() as f64 / 1e6,
        spec.pipeline.stages,
        spec.pipeline.replicas,
        corpus.files().len(),
        corpus.train_bytes() as f64 / 1e6,
        corpus.val_bytes() as f64 / 1e6,
        corpus.train_tokens().len(),
        setup.elapsed().as_secs_f64(),
    );
    for (s, stage) in trainer.stages.iter().enumerate() {
        eprintln!("  stage {s}: layers {:?}", stage.layers);
    }

    let total = spec.training.steps;
    let stop = args.stop_after.unwrap_or(total).min(total);
    let plain = args.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = progress_bar(total, trainer.step, plain);
    // A hidden bar prints nothing, so plain mode writes its lines itself.
    let say = |line: String| {
        if plain {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let start = Instant::now();
    let first_step = trainer.step;
    let mut tokens = 0usize;
    let mut recent: Vec<f32> = Vec::new();
    let mut last_log = Instant::now();
    while trainer.step < stop {
        let r = trainer.train_step()?;
        tokens += r.tokens;
        recent.push(r.loss);
        let tps = tokens as f64 / start.elapsed().as_secs_f64();
        bar.set_position(trainer.step);
        bar.set_message(format!(
            "loss {:.4}  {:.0} tok/s  lr {:.2e}",
            r.loss, tps, r.lr
        ));
        // Without a terminal (CI logs, `| tee`) the bar is not drawn: a
        // plain line every few seconds instead.
        if plain && last_log.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "step {}/{total} loss {:.4} {:.0} tok/s",
                trainer.step, r.loss, tps
            );
            last_log = Instant::now();
        }
        let every = spec.training.eval_every;
        if every > 0 && trainer.step % every == 0 && trainer.step < total {
            let e = trainer.evaluate(spec.training.eval_batches)?;
            say(format!(
                "step {}: val loss {:.4}, {:.3} bits/byte",
                trainer.step, e.loss, e.bits_per_byte
            ));
        }
        let ck = spec.checkpoint.every;
        if ck > 0 && trainer.step % ck == 0 && trainer.step < stop {
            let dir = trainer.save_checkpoint(&root)?;
            say(format!(
                "step {}: checkpoint {}",
                trainer.step,
                dir.display()
            ));
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let dir = trainer.save_checkpoint(&root)?;
    let eval = trainer.evaluate(spec.training.eval_batches)?;
    let unigram = trainer.corpus.unigram_bits_per_byte();
    let tail = &recent[recent.len().saturating_sub(10)..];
    let train_loss = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    let steps_run = trainer.step - first_step;
    let tps = tokens as f64 / elapsed.max(1e-9);
    let finished = trainer.finished();

    println!();
    println!(
        "{} {}: {steps_run} steps, {tokens} tokens in {elapsed:.1}s ({tps:.0} tokens/s)",
        trainer.manifest.metadata.name,
        if finished { "finished" } else { "stopped" },
    );
    println!(
        "  train loss (last {:>2} steps) {train_loss:.4} nats/token",
        tail.len()
    );
    super::print_evaluation(&eval, unigram);
    println!("  checkpoint                 {}", dir.display());
    let summary = json!({
        "name": trainer.manifest.metadata.name,
        "step": trainer.step,
        "finished": finished,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_sec": tps,
        "train_loss": train_loss,
        "val_loss": eval.loss,
        "val_bits_per_byte": eval.bits_per_byte,
        "unigram_bits_per_byte": unigram,
        "checkpoint": dir,
    });
    let path = root.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn progress_bar(total: u64, done: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template(
        "{bar:30.cyan/blue} step {pos}/{len} {msg}  [{elapsed_precise} < {eta_precise}]",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_position(done);
    bar
}
