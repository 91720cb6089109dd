//! The contribution ledger as a contributor audits it: what each identity
//! is booked for equals what the routes gave it, a slow worker's share is
//! the fraction of the work it did, a relaunched worker keeps its account,
//! and a coordinator killed at random moments books every step once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use pipewright::coord::Phase;
use pipewright::identity::Identity;
use pipewright::ledger::Ledger;

mod common;

use common::pipewright;
use common::procs::{
    coordinator, identity, routed, serial, start_run, train_processes, wait_for, worker,
    write_inputs,
};

/// Micro-batches per replica per step and tokens per micro-batch in
/// `write_inputs` (`microBatches` counts each replica's share).
const MICRO_BATCHES: u64 = 4;
const TOKENS_PER_MB: u64 = 4 * 32;

/// One row of `pipewright ledger --json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct Row {
    identity: String,
    stages: Vec<usize>,
    micro_batches: u64,
    tokens: u64,
    flops: f64,
    share: f64,
    eligible: bool,
}

fn ledger_cmd(args: &[&str], dir: &Path) -> Output {
    pipewright()
        .arg("ledger")
        .args(args)
        .arg(dir)
        .output()
        .expect("run pipewright ledger")
}

fn rows(dir: &Path, extra: &[&str]) -> Vec<Row> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = ledger_cmd(&args, dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ledger json");
    serde_json::from_value(v["shares"].clone()).expect("rows")
}

/// The public key (hex) of the identity kept at `path`.
fn key_at(path: &Path) -> String {
    Identity::load_or_create(path)
        .expect("an identity the run created")
        .public_hex()
}

/// Rows keyed by shard, for the identities `train --processes` gave out.
fn by_shard(root: &Path, rows: &[Row], stages: usize) -> BTreeMap<(usize, usize), Row> {
    let mut out = BTreeMap::new();
    for s in 0..stages {
        for r in 0..2 {
            let key = key_at(
                &root
                    .join("identities")
                    .join(format!("stage-{s}-replica-{r}")),
            );
            let row = rows
                .iter()
                .find(|x| x.identity == key)
                .unwrap_or_else(|| panic!("no row for stage {s} replica {r}: {rows:?}"));
            out.insert((s, r), row.clone());
        }
    }
    out
}

fn verify(dir: &Path) -> Output {
    pipewright()
        .args(["ledger", "verify"])
        .arg(dir)
        .output()
        .expect("run pipewright ledger verify")
}

#[test]
fn each_identity_is_booked_exactly_the_micro_batches_its_route_gave_it() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = 30;
    let m = unaudited(write_inputs(dir.path(), "books", 2, 2, steps));
    let run = dir.path().join("run");
    train_processes(&m, &run, &[]);

    let all = rows(&run, &[]);
    assert_eq!(all.len(), 4, "{all:?}");
    let shards = by_shard(&run, &all, 2);
    for ((s, _), row) in &shards {
        // Without routing each replica computes its own micro-batches.
        assert_eq!(row.stages, vec![*s]);
        assert_eq!(row.micro_batches, steps * MICRO_BATCHES, "{row:?}");
        assert_eq!(row.tokens, row.micro_batches * TOKENS_PER_MB);
        assert!(row.eligible);
    }
    // Replicas of a stage did the same work; across stages, shares follow
    // the FLOPs the model's shape gives each stage.
    assert_eq!(shards[&(0, 0)].share, shards[&(0, 1)].share);
    assert_eq!(shards[&(1, 0)].share, shards[&(1, 1)].share);
    let (a, b) = (&shards[&(0, 0)], &shards[&(1, 0)]);
    assert!(a.flops > 0.0 && b.flops > 0.0 && a.flops != b.flops);
    assert!((a.share / b.share - a.flops / b.flops).abs() < 1e-9);
    let total: f64 = all.iter().map(|r| r.share).sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");

    // A window counts only its steps.
    let window = rows(&run, &["--window", "11..20"]);
    for row in &window {
        assert_eq!(row.micro_batches, 10 * MICRO_BATCHES, "{row:?}");
    }

    // The table and the CSV name the same four contributors.
    let table = ledger_cmd(&[], &run);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("steps 1..{steps} ({steps} booked)")),
        "{text}"
    );
    let csv = String::from_utf8_lossy(&ledger_cmd(&["--csv"], &run).stdout).into_owned();
    assert_eq!(csv.lines().count(), 5, "{csv}");

    // verify recomputes every share and checks every signature ...
    let ok = verify(&run);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains(&format!("{steps} steps, {} entries", steps * 4)),
        "{out}"
    );

    // ... so an entry edited after the fact (here: claiming the other
    // replica's micro-batches) no longer matches its signature, and verify
    // says which.
    let db = rusqlite::Connection::open(run.join("ledger.sqlite")).expect("open");
    db.execute(
        "UPDATE entries SET micro_batches = '4,5,6,7' WHERE step = 7 AND stage = 1 AND replica = 0",
        [],
    )
    .expect("tamper");
    // FLOPs are not signed, but they are recomputed from the entry's
    // layers and micro-batches under the run's cost model.
    db.execute(
        "UPDATE entries SET forward_flops = forward_flops * 2 WHERE step = 9 AND stage = 0 AND replica = 1",
        [],
    )
    .expect("tamper");
    drop(db);
    let bad = verify(&run);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("step 7 stage 1 replica 0: the signature"),
        "{err}"
    );
    assert!(err.contains("step 9 stage 0 replica 1: FLOPs"), "{err}");
    assert!(err.contains("the ledger has 2 problem(s)"), "{err}");
}

#[test]
fn a_slow_workers_share_falls_to_the_fraction_of_micro_batches_it_computed() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = 40;
    let m = routed(unaudited(write_inputs(dir.path(), "slow", 2, 2, steps)));
    let run = dir.path().join("run");
    train_processes(&m, &run, &["--slow-worker", "1/1=3"]);

    let shards = by_shard(&run, &rows(&run, &[]), 2);
    // Every micro-batch of every step is booked once per stage.
    for s in 0..2 {
        let sum = shards[&(s, 0)].micro_batches + shards[&(s, 1)].micro_batches;
        assert_eq!(sum, 2 * steps * MICRO_BATCHES, "stage {s}");
    }
    let (fast, slow) = (&shards[&(1, 0)], &shards[&(1, 1)]);
    assert!(
        slow.micro_batches < fast.micro_batches,
        "routing moved work off the slow worker: {slow:?} vs {fast:?}"
    );
    // Within its stage, its share is exactly its fraction of the work.
    let fraction = slow.micro_batches as f64 / (2 * steps * MICRO_BATCHES) as f64;
    let of_stage = slow.share / (slow.share + fast.share);
    assert!(
        (of_stage - fraction).abs() < 1e-9,
        "{of_stage} vs {fraction}"
    );
    let ok = verify(&run);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// The manifest at `path` with audits off: these tests compare shares to
/// the work routed alone, and across runs, while audits credit validators
/// with a draw each run keys afresh.
fn unaudited(path: std::path::PathBuf) -> std::path::PathBuf {
    let yaml = std::fs::read_to_string(&path).expect("manifest");
    std::fs::write(&path, format!("{yaml}  validation: {{auditRate: 0}}\n"))
        .expect("write manifest");
    path
}

/// A small deterministic generator for the kill moments.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Every step `1..=last` has exactly one entry per shard.
fn assert_booked_once(ledger: &Ledger, last: u64, shards: usize) {
    let entries = ledger.entries(1, last).expect("entries");
    let mut per_step = BTreeMap::<u64, usize>::new();
    for e in &entries {
        *per_step.entry(e.step).or_default() += 1;
    }
    for step in 1..=last {
        assert_eq!(
            per_step.get(&step),
            Some(&shards),
            "step {step}: {per_step:?}"
        );
    }
    assert_eq!(entries.len(), shards * last as usize);
}

#[test]
fn a_coordinator_killed_at_twenty_random_moments_books_every_step_once() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = 160;
    let m = unaudited(write_inputs(dir.path(), "kills", 2, 2, steps));
    let out = dir.path().join("run");
    let (port, url, client, mut procs) = start_run(&m, &out);
    let ledger_path = out.join("ledger.sqlite");

    let mut rng = Lcg(20261206);
    let mut moments: Vec<u64> = (0..20).map(|_| 3 + rng.below(steps - 20)).collect();
    moments.sort_unstable();
    for (i, at) in moments.iter().enumerate() {
        wait_for(&client, "the next moment", |s| {
            s.step >= *at && s.phase == Phase::Training
        });
        // Somewhere inside a step, not on its edge.
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        let acknowledged = client.status().map_or(0, |s| s.step);
        let coord = &mut procs.0[0];
        coord.kill().expect("kill -9 the coordinator");
        coord.wait().expect("reap");
        // What the workers were told to proceed past is in the ledger,
        // once.
        let ledger = Ledger::open_read(&ledger_path).expect("the ledger");
        let booked = ledger.last_step().expect("last step");
        assert!(
            booked >= acknowledged,
            "kill {i}: step {acknowledged} acknowledged, {booked} booked"
        );
        assert_booked_once(&ledger, booked, 4);
        drop(ledger);
        procs.0[0] = coordinator(&m, &out, port);
        if i == 9 {
            // Halfway, kill -9 a worker and relaunch it with its key: it
            // keeps its account rather than opening a second one.
            procs.0[3].kill().expect("kill a worker");
            procs.0[3].wait().expect("reap");
            procs.0[3] = worker(&m, &url, Some((1, 0)));
        }
    }
    wait_for(&client, "the end", |s| s.phase == Phase::Succeeded);
    drop(procs);
    let ledger = Ledger::open_read(&ledger_path).expect("the ledger");
    assert_eq!(ledger.last_step().expect("last"), steps);
    assert_booked_once(&ledger, steps, 4);
    drop(ledger);
    let ok = verify(&out);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The same run without kills: the same shares, shard for shard.
    let clean = dir.path().join("clean");
    train_processes(&m, &clean, &[]);
    let killed = rows(&out, &[]);
    assert_eq!(killed.len(), 4, "one account per key: {killed:?}");
    let clean = by_shard(&clean, &rows(&clean, &[]), 2);
    for ((s, r), c) in &clean {
        let key = key_at(&identity(&m, &format!("{s}-{r}")));
        let k = killed
            .iter()
            .find(|x| x.identity == key)
            .expect("an account per shard");
        assert_eq!(k.micro_batches, c.micro_batches, "stage {s} replica {r}");
        assert!((k.share - c.share).abs() < 1e-12, "{k:?} vs {c:?}");
    }
}
