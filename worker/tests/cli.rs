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
