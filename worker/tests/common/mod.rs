//! What the integration tests share: the binary under test, a small
//! generated corpus (tests commit no text), readers of the losses a run
//! records, and stage workers run on threads over loopback.

// Each test binary uses some of these helpers.
#![allow(dead_code)]

pub mod procs;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use pipewright::link::{RunId, RunKey};
use pipewright::pipeline::{
    loopback_layout, Auth, PipelineError, Route, Shard, StageWorker, WorkerStep,
};
use pipewright_spec::{Routing, TrainingRun};

/// The `pipewright` binary built for these tests.
pub fn pipewright() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipewright"))
}

/// `command` under an `RLIMIT_DATA` of `limit` bytes (the private writable
/// memory it may map), inherited by whatever it starts.
pub fn limited(mut command: Command, limit: u64) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches no state of the
    // parent.
    unsafe {
        command.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Runs `command` and returns its standard output, failing the test with
/// both outputs when it does not succeed.
pub fn succeed(command: &mut Command) -> String {
    let out = command.output().expect("run pipewright");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Writes `corpus.txt` into `dir`: 3,000 structured sentences.
pub fn write_corpus(dir: &Path) {
    let names = ["ada", "bo", "cy", "di", "ed"];
    let mut text = String::new();
    for i in 0..3000usize {
        let a = names[i % names.len()];
        let b = names[(i * 3 + 1) % names.len()];
        text.push_str(&format!("{a} waves at {b} {} times.\n", i % 7 + 1));
    }
    std::fs::write(dir.join("corpus.txt"), text).expect("write corpus");
}

/// The `losses` array of a JSON file (a run's summary or a checkpoint's
/// metadata).
pub fn losses_in(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// The per-step losses in the checkpoint of `step` under `root`.
pub fn checkpoint_losses(root: &Path, step: u64) -> Vec<f64> {
    losses_in(&root.join(format!("step-{step:08}/meta.json")))
}

/// Every worker's step outcomes and final stage parameters, by shard.
pub type Finished = Vec<(Shard, Vec<WorkerStep>, Vec<Vec<f32>>)>;

/// Runs every shard of `m` as a stage worker on a thread, linked over
/// loopback TCP, for the manifest's steps; with `route`, every step
/// follows it. One failure makes the neighbours fail too, so every
/// worker's error is printed.
pub fn run_stage_workers(m: &TrainingRun, route: Option<Route>) -> Result<Finished, PipelineError> {
    let p = &m.spec.pipeline;
    let layout = loopback_layout(
        p.stages,
        p.replicas,
        m.spec.model.tied_embeddings,
        p.routing == Routing::Throughput,
    )
    .expect("bind loopback listeners");
    let auth = Auth {
        run_id: RunId([3; 16]),
        key: RunKey([9; 32]),
    };
    let steps = m.spec.training.steps;
    let handles: Vec<_> = layout
        .into_iter()
        .map(|(shard, peers)| {
            let (m, auth, route) = (m.clone(), auth.clone(), route.clone());
            thread::spawn(move || -> Result<_, PipelineError> {
                let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(60))?;
                if let Some(r) = route {
                    w.set_route(r)?;
                }
                let done = w.run(steps)?;
                let params = w.stage().params().iter().map(|p| p.data.clone()).collect();
                w.finish()?;
                Ok((shard, done, params))
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("worker thread panicked"))
        .collect();
    for r in &results {
        if let Err(e) = r {
            eprintln!("worker failed: {e}");
        }
    }
    results.into_iter().collect()
}

/// Runs every shard of `m` (`m.spec.pipeline`'s stages × replicas, the
/// embedding tie linked when `tied`) as a stage worker on a thread, linked
/// over loopback TCP with `timeout`, and hands each worker to `each`;
/// returns what `each` gives, in the layout's shard order.
pub fn on_loopback_workers<T: Send + 'static>(
    m: &TrainingRun,
    tied: bool,
    timeout: Duration,
    each: impl Fn(StageWorker) -> T + Clone + Send + 'static,
) -> Vec<T> {
    let p = &m.spec.pipeline;
    let layout = loopback_layout(p.stages, p.replicas, tied, false).expect("bind");
    let auth = Auth {
        run_id: RunId([4; 16]),
        key: RunKey([2; 32]),
    };
    let handles: Vec<_> = layout
        .into_iter()
        .map(|(shard, peers)| {
            let (m, auth, each) = (m.clone(), auth.clone(), each.clone());
            thread::spawn(move || {
                each(StageWorker::new(&m, shard, peers, auth, timeout).expect("worker"))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .collect()
}
