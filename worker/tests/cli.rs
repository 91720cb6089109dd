//! The `pipewright` command as a user runs it: a bad manifest is refused
//! with the field named; `train --processes` launches one process per shard
//! and trains exactly like the single-process run.

use std::path::Path;

mod common;

use common::{checkpoint_losses, pipewright, succeed, write_corpus};

/// The generated corpus and a manifest that trains on it.
fn write_inputs(dir: &Path, stages: usize, replicas: usize, heads: usize) -> std::path::PathBuf {
    write_corpus(dir);
    let yaml = format!(
        r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: cli-test}}
spec:
  model: {{dim: 32, layers: 4, heads: {heads}, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: true}}
  data: {{sources: ["{}"]}}
  training: {{steps: 6, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, seed: 3, threads: 1}}
  pipeline: {{stages: {stages}, replicas: {replicas}}}
"#,
        dir.join("corpus.txt").display()
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// The final loss a run prints ("final loss X" or "train loss ... X").
fn final_loss(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("final loss"))
        .unwrap_or_else(|| panic!("no final loss in {stdout}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

/// Per-step losses equal to those of the single-process run within 1e-4.
fn assert_close(got: &[f64], local: &[f64]) {
    assert_eq!(got.len(), local.len());
    for (l, m) in local.iter().zip(got) {
        assert!(
            (l - m).abs() <= 1e-4 * l.abs(),
            "{got:?} vs single-process {local:?}"
        );
    }
}

#[test]
fn a_malformed_manifest_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_inputs(dir.path(), 2, 1, 6);
    let out = pipewright()
        .arg("train")
        .arg(&path)
        .output()
        .expect("run pipewright");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.model.heads: 6 does not divide spec.model.dim (32)"),
        "{err}"
    );
}

#[test]
fn processes_train_like_the_single_process_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_inputs(dir.path(), 3, 2, 4);
    // Every link capped by the manifest: a cap moves timing, not math.
    let yaml = std::fs::read_to_string(&path).expect("manifest").replace(
        "replicas: 2}",
        "replicas: 2, maxSendMegabytesPerSecond: 40}",
    );
    std::fs::write(&path, yaml).expect("write manifest");
    let stdout = succeed(
        pipewright()
            .args(["train", "--processes", "--quiet", "--out"])
            .arg(dir.path().join("multi"))
            .arg(&path),
    );
    let multi_loss = final_loss(&stdout);

    // The same run in one process, reading its per-step losses back from
    // the checkpoint it writes.
    succeed(
        pipewright()
            .args(["train", "--quiet", "--out"])
            .arg(dir.path().join("local"))
            .arg(&path),
    );
    let losses = |run: &str| checkpoint_losses(&dir.path().join(run), 6);
    let (local, multi) = (losses("local"), losses("multi"));
    assert_eq!(local.len(), 6);
    assert_eq!(multi.len(), 6);
    assert_close(&multi, &local);
    assert!(
        (multi_loss - multi[5]).abs() < 1e-3,
        "{multi_loss} vs {multi:?}"
    );
    // The checkpoint the workers wrote is a whole one: `eval` reads it.
    let eval = succeed(
        pipewright()
            .arg("eval")
            .arg(dir.path().join("multi"))
            .args(["--batches", "2"]),
    );
    assert!(eval.contains("val bits/byte"), "{eval}");
}

#[test]
fn throughput_routing_moves_work_off_a_slow_worker_and_trains_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_inputs(dir.path(), 2, 2, 4);
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("steps: 6,", "steps: 12,")
        .replace("microBatches: 2,", "microBatches: 4,")
        .replace("replicas: 2}", "replicas: 2, routing: throughput}");
    std::fs::write(&path, yaml).expect("write manifest");
    succeed(
        pipewright()
            .args([
                "train",
                "--processes",
                "--quiet",
                "--slow-worker",
                "1/1=4",
                // Every link paced too: a cap moves timing, not math.
                "--max-send-rate",
                "40",
                "--out",
            ])
            .arg(dir.path().join("routed"))
            .arg(&path),
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("routed/summary.json")).expect("summary"),
    )
    .expect("json");
    let shares = &summary["micro_batches_per_replica"];
    let share = |s: usize, r: usize| shares[s][r].as_u64().expect("a count");
    // Stage 1's slow replica gave most of its work to the other one; every
    // step still trained all 8 micro-batches.
    assert!(share(1, 1) < share(1, 0), "{shares}");
    assert_eq!(share(1, 0) + share(1, 1), 8, "{shares}");
    assert_eq!(share(0, 0) + share(0, 1), 8, "{shares}");
    // Routing moves work, not math: the losses are the single-process run's.
    succeed(
        pipewright()
            .args(["train", "--quiet", "--out"])
            .arg(dir.path().join("local"))
            .arg(&path),
    );
    let losses = |run: &str| checkpoint_losses(&dir.path().join(run), 12);
    let (local, routed) = (losses("local"), losses("routed"));
    assert_eq!(routed.len(), 12);
    assert_close(&routed, &local);
}

#[test]
fn a_bad_slow_worker_drill_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_inputs(dir.path(), 2, 1, 4);
    let out = pipewright()
        .args(["train", "--processes", "--slow-worker", "1/0=0.5"])
        .arg(&path)
        .output()
        .expect("run pipewright");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 1"), "{err}");
}

/// A manifest of a model of about 70B parameters: every size is within the
/// spec's bounds, but its weights, gradients and Adam moments alone need
/// about a terabyte. The corpus does not exist: the refusal must come first.
fn write_huge(dir: &Path) -> std::path::PathBuf {
    let yaml = r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: huge}
spec:
  model: {dim: 8192, layers: 80, heads: 64, kvHeads: 8, ffnDim: 28672, seqLen: 4096}
  data: {sources: ["/no/such/corpus.txt"]}
  training: {steps: 10, microBatchSize: 1, microBatches: 8, learningRate: 0.0001}
  pipeline: {stages: 4}
"#;
    let path = dir.join("huge.yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

#[test]
fn a_run_too_large_for_this_machine_is_refused_naming_the_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_huge(dir.path());
    let start = std::time::Instant::now();
    let out = pipewright()
        .args(["train", "--quiet", "--out"])
        .arg(dir.path().join("run"))
        .arg(&path)
        .output()
        .expect("run pipewright");
    let took = start.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "available",
        "stage 0 (layers 0..",
        "more stages",
        "--processes",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    // Refused from the plan, before the corpus is read or a tensor allocated.
    assert!(!err.contains("corpus"), "{err}");
    assert!(took.as_secs_f64() < 10.0, "took {took:?}");
}

#[test]
fn absurd_sizes_are_refused_at_once_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_huge(dir.path());
    for (from, to, field) in [
        ("dim: 8192", "dim: 1073741824", "spec.model.dim"),
        ("layers: 80", "layers: 50000000", "spec.model.layers"),
        ("seqLen: 4096", "seqLen: 100000000", "spec.model.seqLen"),
    ] {
        let yaml = std::fs::read_to_string(&path)
            .expect("manifest")
            .replace(from, to);
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, yaml).expect("write manifest");
        let start = std::time::Instant::now();
        let out = pipewright()
            .arg("train")
            .arg(&bad)
            .output()
            .expect("run pipewright");
        let took = start.elapsed();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{field}: must be at most")), "{err}");
        eprintln!("{field}: refused in {took:?}");
        // A process start included; a loaded machine gets some slack.
        assert!(took.as_secs_f64() < 3.0, "{field}: took {took:?}");
    }
}

#[test]
fn plan_reports_every_stage_and_the_stages_a_node_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_huge(dir.path());
    let out = succeed(
        pipewright()
            .args(["plan", "--json", "--node-memory", "160GiB"])
            .arg(&path),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let stages = v["plan"]["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 4);
    // 1F1B: stage s holds S - s micro-batches at its peak.
    let in_flight: Vec<u64> = stages
        .iter()
        .map(|s| s["peak_in_flight"].as_u64().expect("in flight"))
        .collect();
    assert_eq!(in_flight, [4, 3, 2, 1]);
    for s in stages {
        for key in [
            "params",
            "weight_bytes",
            "gradient_bytes",
            "optimizer_bytes",
            "activation_bytes",
            "flops_per_token",
            "flops_per_step",
        ] {
            assert!(s[key].as_f64().expect(key) > 0.0, "{key}: {s}");
        }
    }
    // About 69B parameters; a shard process holds ~41 bytes of each
    // (weights, gradients, moments, a snapshot, a checkpoint) and, in
    // 1F1B, 8 micro-batches of 4,096 tokens per block on the first stage:
    // a 160 GiB node holds one block there, so dozens of stages.
    let min = v["min_stages"].as_u64().expect("min_stages");
    assert!((14..=80).contains(&min), "{min}");
    let table = succeed(
        pipewright()
            .args(["plan", "--node-memory", "160GiB"])
            .arg(&path),
    );
    assert!(
        table.contains(&format!(
            "smallest number of stages for a node of 160.00 GiB: {min}"
        )),
        "{table}"
    );
}

#[test]
fn a_worker_refuses_a_shard_that_does_not_fit_before_registering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_huge(dir.path());
    // No coordinator listens there: the refusal must come first.
    let out = pipewright()
        .args([
            "worker",
            "--coordinator",
            "http://127.0.0.1:9",
            "--stage",
            "1",
            "--replica",
            "0",
        ])
        .arg(&path)
        .env("PIPEWRIGHT_JOIN_TOKEN", "t")
        .output()
        .expect("run pipewright");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "cannot serve the run",
        "stage 1 (layers 20..40) needs",
        "available",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}
