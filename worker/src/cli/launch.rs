//! `pipewright train --processes`: the run as one OS process per shard
//! (stage × replica), wired over authenticated TCP links on loopback, the
//! same `stage-worker` processes a cluster runs.
//!
//! Wiring is static: every listener address is chosen here before the
//! workers start. A worker that dies ends the run with its shard named (the
//! coordinator that reassigns shards is not part of this launcher).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pipewright_spec::TrainingRun;

use super::stage_worker::RUN_KEY_ENV;

struct Worker {
    stage: usize,
    replica: usize,
    child: Child,
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("binding a loopback port")?;
    Ok(l.local_addr()?)
}

/// A fresh 32-byte run key as hex, from the OS's randomness.
fn run_key() -> String {
    let bytes: [u8; 32] = rand::random();
    crate::checkpoint::hex(&bytes)
}

/// Launch every shard of `manifest` as a process and wait for the run.
/// `file` is the manifest on disk (rewritten to a temporary copy when
/// `manifest` differs from it, e.g. with `--steps`).
pub fn run(manifest: &TrainingRun, file: &Path, threads: Option<usize>, quiet: bool) -> Result<()> {
    let p = &manifest.spec.pipeline;
    let (stages, replicas) = (p.stages, p.replicas);
    let tied = manifest.spec.model.tied_embeddings;
    let shards = stages * replicas;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads.unwrap_or((cores / shards).max(1));

    // Every worker reads the same manifest; write the effective one out.
    let dir = tempfile::Builder::new()
        .prefix("pipewright-launch-")
        .tempdir()
        .context("creating a temporary directory")?;
    let path: PathBuf = dir.path().join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;

    let idx = |s: usize, r: usize| s * replicas + r;
    let mut pipe = Vec::with_capacity(shards);
    let mut ring = Vec::with_capacity(shards);
    for s in 0..stages {
        for _ in 0..replicas {
            let needs = s > 0 || (tied && stages > 2);
            pipe.push(if needs { Some(free_port()?) } else { None });
            ring.push(if replicas > 1 {
                Some(free_port()?)
            } else {
                None
            });
        }
    }
    let key = run_key();
    let exe = std::env::current_exe().context("locating the pipewright binary")?;
    eprintln!(
        "launching {shards} stage-worker processes ({stages} stage(s) × {replicas} replica(s), {threads} kernel thread(s) each) for {}",
        file.display()
    );
    let mut workers: Vec<Worker> = Vec::with_capacity(shards);
    let (tx, rx) = mpsc::channel::<String>();
    for s in 0..stages {
        for r in 0..replicas {
            let mut cmd = Command::new(&exe);
            cmd.arg("stage-worker")
                .arg(&path)
                .args(["--stage", &s.to_string(), "--replica", &r.to_string()])
                .args(["--threads", &threads.to_string()])
                .env(RUN_KEY_ENV, &key)
                .stdin(Stdio::null());
            let mut addr = |flag: &str, a: Option<SocketAddr>| {
                if let Some(a) = a {
                    cmd.args([flag, &a.to_string()]);
                }
            };
            addr("--listen", pipe[idx(s, r)]);
            addr(
                "--next",
                if s + 1 < stages {
                    pipe[idx(s + 1, r)]
                } else {
                    None
                },
            );
            let tie = tied && stages > 2 && s + 1 == stages;
            addr("--tie", if tie { pipe[idx(0, r)] } else { None });
            addr("--ring-listen", ring[idx(s, r)]);
            addr("--ring-next", ring[idx(s, (r + 1) % replicas)]);
            let reports = s + 1 == stages && r == 0;
            cmd.stdout(if reports {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting stage {s} replica {r}"))?;
            if let Some(out) = child.stdout.take() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
            }
            workers.push(Worker {
                stage: s,
                replica: r,
                child,
            });
        }
    }
    drop(tx);
    let result = supervise(&mut workers, &rx, manifest.spec.training.steps, quiet);
    for w in &mut workers {
        // Already exited on success; on failure the survivors are stopped.
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    result
}

fn supervise(
    workers: &mut [Worker],
    rx: &mpsc::Receiver<String>,
    steps: u64,
    quiet: bool,
) -> Result<()> {
    let start = Instant::now();
    let mut last_loss = f64::NAN;
    let mut report = |line: String| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            return;
        };
        let step = v["step"].as_u64().unwrap_or(0);
        last_loss = v["loss"].as_f64().unwrap_or(f64::NAN);
        if !quiet || step % 10 == 0 || step + 1 == steps {
            eprintln!(
                "step {}/{steps} loss {last_loss:.4} ({:.1}s)",
                step + 1,
                start.elapsed().as_secs_f64()
            );
        }
    };
    loop {
        while let Ok(line) = rx.try_recv() {
            report(line);
        }
        let mut running = 0;
        for w in workers.iter_mut() {
            match w.child.try_wait()? {
                None => running += 1,
                Some(status) if status.success() => {}
                Some(status) => bail!(
                    "stage {} replica {} exited with {status}; the run stops (shard reassignment needs the coordinator)",
                    w.stage,
                    w.replica
                ),
            }
        }
        if running == 0 {
            // The reporter's pipe is closed now; take its last lines.
            for line in rx.iter() {
                report(line);
            }
            println!(
                "all {} workers finished {steps} steps in {:.1}s; final loss {last_loss:.4}",
                workers.len(),
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
