//! Runs made of real processes: a manifest for a small 2-stage model,
//! `pipewright train --processes`, and a coordinator with one worker
//! process per shard started by hand, so a test can kill any of them.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pipewright::coord::{Client, Phase, Status};

use super::{pipewright, succeed, write_corpus};

/// Each of these tests runs five or more processes whose leases and
/// timings assume they get the CPU they need: they run one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn write_inputs(dir: &Path, name: &str, stages: usize, replicas: usize, steps: u64) -> PathBuf {
    write_corpus(dir);
    let yaml = format!(
        r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: {name}}}
spec:
  model: {{dim: 32, layers: 3, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: true}}
  data: {{sources: ["{}"]}}
  training: {{steps: {steps}, microBatchSize: 4, microBatches: 4, learningRate: 0.01, warmupSteps: 2, seed: 5, threads: 1}}
  pipeline: {{stages: {stages}, replicas: {replicas}}}
  checkpoint: {{every: 25}}
"#,
        dir.join("corpus.txt").display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// The manifest at `path`, switched to `routing: throughput`.
pub fn routed(path: PathBuf) -> PathBuf {
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("replicas: 2}", "replicas: 2, routing: throughput}");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

pub fn assert_same(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "step {i}: {x} vs {y}");
    }
}

pub fn train_processes(manifest: &Path, out: &Path, extra: &[&str]) -> String {
    succeed(
        pipewright()
            .args(["train", "--processes", "--quiet", "--out"])
            .arg(out)
            .args(extra)
            .arg(manifest),
    )
}

pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port below the kernel's ephemeral range (where outgoing connections
/// and port-0 listeners land), so nothing else grabs it between this check
/// and the coordinator's two binds.
pub fn free_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = std::process::id() as u64 ^ nanos;
    (0..200u64)
        .map(|i| 20000 + ((seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % 12000) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port")
}

/// Where a process's standard error goes: appended to `<dir>/<name>.log`
/// when `PIPEWRIGHT_TEST_LOGS=dir` is set (to see why a run stalled),
/// nowhere otherwise.
fn log(name: &str) -> Stdio {
    let Some(dir) = std::env::var_os("PIPEWRIGHT_TEST_LOGS") else {
        return Stdio::null();
    };
    let path = Path::new(&dir).join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

pub fn coordinator(manifest: &Path, out: &Path, port: u16) -> Child {
    pipewright()
        .arg("coordinator")
        .arg(manifest)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--out"])
        .arg(out)
        .env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
        .stdin(Stdio::null())
        .stderr(log("coordinator"))
        .spawn()
        .expect("start the coordinator")
}

/// Where the worker called `tag` keeps its identity: beside the manifest.
pub fn identity(manifest: &Path, tag: &str) -> PathBuf {
    manifest
        .parent()
        .expect("the manifest's directory")
        .join("identities")
        .join(tag)
}

pub fn worker(manifest: &Path, url: &str, shard: Option<(usize, usize)>) -> Child {
    let mut c = pipewright();
    c.arg("worker")
        .arg(manifest)
        .args(["--coordinator", url, "--threads", "1"]);
    let mut name = "worker".to_string();
    if let Some((s, r)) = shard {
        c.args(["--stage", &s.to_string(), "--replica", &r.to_string()]);
        c.arg("--identity")
            .arg(identity(manifest, &format!("{s}-{r}")));
        name = format!("worker-{s}-{r}");
    }
    c.env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
        .stdin(Stdio::null())
        .stderr(log(&name))
        .spawn()
        .expect("start a worker")
}

/// A coordinator for `manifest` on a free port and one worker process per
/// shard of its 2 × 2 layout: the port, the coordinator's URL, a client
/// and the processes (coordinator first, then stage-major workers).
pub fn start_run(manifest: &Path, out: &Path) -> (u16, String, Client, Procs) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::new(&url, "t0ken", Duration::from_secs(30));
    let mut procs = Procs(vec![coordinator(manifest, out, port)]);
    for s in 0..2 {
        for r in 0..2 {
            procs.0.push(worker(manifest, &url, Some((s, r))));
        }
    }
    (port, url, client, procs)
}

/// `pipewright join`: a volunteer with neither manifest nor shard, its
/// identity in `identity`.
pub fn volunteer(url: &str, identity: &Path) -> Child {
    pipewright()
        .args([
            "join",
            "--coordinator",
            url,
            "--token",
            "t0ken",
            "--identity",
        ])
        .arg(identity)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("join")
}

pub fn wait_for(client: &Client, what: &str, mut f: impl FnMut(&Status) -> bool) {
    // Generous: these runs compete for 2 cores with other tests.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = client.status() {
            if f(&s) {
                return;
            }
            assert_ne!(s.phase, Phase::Failed, "{}", s.reason);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            client.status().map(|s| (s.phase, s.step, s.epoch))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
