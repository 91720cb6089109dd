//! Runs that lose processes: workers killed with SIGKILL, a coordinator
//! killed and restarted, a volunteer that joins. Each must finish with the
//! same per-step losses as an undisturbed run: recovery replays from a
//! state every survivor holds, and sampling is a pure function of the step.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pipewright::coord::{Client, Phase};

mod common;

use common::{checkpoint_losses, losses_in, pipewright, write_corpus};

/// Each of these tests runs five or more processes whose leases and
/// timings assume they get the CPU they need: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_inputs(dir: &Path, name: &str, stages: usize, replicas: usize, steps: u64) -> PathBuf {
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
fn routed(path: PathBuf) -> PathBuf {
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("replicas: 2}", "replicas: 2, routing: throughput}");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

fn summary_losses(root: &Path) -> Vec<f64> {
    losses_in(&root.join("summary.json"))
}

fn assert_same(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "step {i}: {x} vs {y}");
    }
}

fn train_processes(manifest: &Path, out: &Path, extra: &[&str]) -> String {
    let o = pipewright()
        .args(["train", "--processes", "--quiet", "--out"])
        .arg(out)
        .args(extra)
        .arg(manifest)
        .output()
        .expect("run pipewright");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

#[test]
fn killed_workers_are_replaced_and_the_run_trains_as_if_nothing_happened() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = write_inputs(dir.path(), "drill", 3, 2, 60);
    train_processes(&m, &dir.path().join("clean"), &[]);
    let out = train_processes(
        &m,
        &dir.path().join("drill"),
        &["--kill-workers", "4", "--kill-seed", "11"],
    );
    assert!(out.contains("fault drill: 4 kill(s), 4 recovered"), "{out}");
    assert!(out.contains("shard reassignments 4"), "{out}");
    assert_same(
        &summary_losses(&dir.path().join("clean")),
        &summary_losses(&dir.path().join("drill")),
    );
    // The checkpoints written between kills are whole and agree too.
    assert_same(
        &checkpoint_losses(&dir.path().join("clean"), 60),
        &checkpoint_losses(&dir.path().join("drill"), 60),
    );
}

#[test]
fn a_routed_run_survives_kills_and_ends_where_the_undisturbed_one_does() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = routed(write_inputs(dir.path(), "routed", 2, 2, 40));
    let slow = ["--slow-worker", "1/1=3"];
    train_processes(&m, &dir.path().join("clean"), &slow);
    let out = train_processes(
        &m,
        &dir.path().join("drill"),
        &["--kill-workers", "3", "--kill-seed", "5", slow[0], slow[1]],
    );
    assert!(out.contains("fault drill: 3 kill(s), 3 recovered"), "{out}");
    // Routes differ between the runs (the relaunched workers are measured
    // afresh), which reorders float sums: close, not identical.
    let (a, b) = (
        summary_losses(&dir.path().join("clean")),
        summary_losses(&dir.path().join("drill")),
    );
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-3 * x.abs(), "step {i}: {x} vs {y}");
    }
}

struct Procs(Vec<Child>);

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
fn free_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = std::process::id() as u64 ^ nanos;
    (0..200u64)
        .map(|i| 20000 + ((seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % 12000) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port")
}

fn coordinator(manifest: &Path, out: &Path, port: u16) -> Child {
    pipewright()
        .arg("coordinator")
        .arg(manifest)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--out"])
        .arg(out)
        .env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the coordinator")
}

/// Where the worker called `tag` keeps its identity: beside the manifest.
fn identity(manifest: &Path, tag: &str) -> PathBuf {
    manifest
        .parent()
        .expect("the manifest's directory")
        .join("identities")
        .join(tag)
}

fn worker(manifest: &Path, url: &str, shard: Option<(usize, usize)>) -> Child {
    let mut c = pipewright();
    c.arg("worker")
        .arg(manifest)
        .args(["--coordinator", url, "--threads", "1"]);
    if let Some((s, r)) = shard {
        c.args(["--stage", &s.to_string(), "--replica", &r.to_string()]);
        c.arg("--identity")
            .arg(identity(manifest, &format!("{s}-{r}")));
    }
    c.env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

/// A coordinator for `manifest` on a free port and one worker process per
/// shard of its 2 × 2 layout: the port, the coordinator's URL, a client
/// and the processes (coordinator first, then stage-major workers).
fn start_run(manifest: &Path, out: &Path) -> (u16, String, Client, Procs) {
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
fn volunteer(url: &str, identity: &Path) -> Child {
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

fn wait_for(client: &Client, what: &str, mut f: impl FnMut(&pipewright::coord::Status) -> bool) {
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

#[test]
fn a_restarted_coordinator_and_a_volunteer_keep_the_run_going() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = write_inputs(dir.path(), "restart", 2, 2, 120);
    train_processes(&m, &dir.path().join("clean"), &[]);

    let out = dir.path().join("run");
    let (port, url, client, mut procs) = start_run(&m, &out);
    wait_for(&client, "every shard", |s| {
        s.shards.iter().all(|x| x.worker.is_some())
    });
    // A volunteer with neither manifest nor shard waits as a standby.
    procs.0.push(volunteer(&url, &identity(&m, "volunteer")));
    wait_for(&client, "training with a standby", |s| {
        s.step >= 20 && s.standby == 1
    });

    // kill -9 the coordinator; a new one takes over from its state file.
    let coord = &mut procs.0[0];
    coord.kill().expect("kill the coordinator");
    coord.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(300));
    procs.0[0] = coordinator(&m, &out, port);
    wait_for(&client, "training after the restart", |s| {
        s.step >= 50 && s.phase == Phase::Training
    });

    // kill -9 a worker: the volunteer takes its shard.
    let before = client.status().expect("status");
    procs.0[3].kill().expect("kill a worker");
    wait_for(&client, "the volunteer to step in", |s| {
        s.reassignments > before.reassignments && s.standby == 0 && s.step > before.step + 5
    });
    wait_for(&client, "the end", |s| s.phase == Phase::Succeeded);
    assert_same(
        &checkpoint_losses(&dir.path().join("clean"), 120),
        &checkpoint_losses(&out, 120),
    );
}

#[test]
fn a_routed_run_trains_on_without_a_lost_lane_until_a_volunteer_fills_it() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = routed(write_inputs(dir.path(), "lanes", 2, 2, 300));
    let out = dir.path().join("run");
    let (_, url, client, mut procs) = start_run(&m, &out);
    wait_for(&client, "training", |s| s.step >= 10);
    // kill -9 stage 1 replica 1 and start nobody in its place: after a
    // lease, lane 0 trains on alone with the whole batch.
    procs.0[4].kill().expect("kill a worker");
    procs.0[4].wait().expect("reap");
    let lost = client.status().expect("status").step;
    wait_for(&client, "lane 0 training alone", |s| {
        s.step >= lost + 10
            && s.shards.iter().any(|x| x.state == "idle")
            && s.shards.iter().any(|x| x.state == "vacant")
    });
    let alone = client.status().expect("status");
    let lane0: Vec<usize> = alone
        .shards
        .iter()
        .filter(|x| x.replica == 0)
        .map(|x| x.micro_batches)
        .collect();
    assert_eq!(lane0, vec![8, 8], "lane 0 runs every micro-batch");
    // A volunteer takes the vacancy; both lanes train again.
    procs.0.push(volunteer(&url, &identity(&m, "volunteer")));
    wait_for(&client, "both lanes again", |s| {
        s.step > alone.step + 5 && s.shards.iter().all(|x| x.state == "live")
    });
    wait_for(&client, "the end", |s| s.phase == Phase::Succeeded);
    // The same batch every step, whoever ran it, so the run learns as the
    // undisturbed one does. The sums run in another order while lane 0 is
    // alone, and over 300 steps of a small model that far into fitting its
    // corpus those roundings grow to about a percent; that one lane
    // computes the same step is checked to 1e-4 in tests/pipeline.rs.
    train_processes(&m, &dir.path().join("clean"), &[]);
    let (a, b) = (
        checkpoint_losses(&dir.path().join("clean"), 300),
        checkpoint_losses(&out, 300),
    );
    let tail = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
    assert!(
        (tail(&a) - tail(&b)).abs() <= 0.03 * tail(&a),
        "last 20 steps: {} vs {}",
        tail(&a),
        tail(&b)
    );
}
