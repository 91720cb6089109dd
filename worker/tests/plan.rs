//! The plan against real runs: the peak resident memory of a training
//! process (`VmHWM`, reported by `pipewright bench train`) is within 15% of
//! what `plan` says one process needs, for a model whose memory is mostly
//! parameters and one whose memory is mostly activations, and for the
//! latter with activation recomputation (`training.recompute`) on.

use std::path::Path;

mod common;

use common::{pipewright, succeed, write_corpus};
use pipewright::plan::{plan, vocab};

fn manifest(dir: &Path, model: &str, training: &str, pipeline: &str) -> std::path::PathBuf {
    let yaml = format!(
        r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: plan-test}}
spec:
  model: {{{model}}}
  data: {{sources: ["{}"]}}
  training: {{steps: 2, learningRate: 0.001, warmupSteps: 0, seed: 5, {training}}}
  pipeline: {{{pipeline}}}
"#,
        dir.join("corpus.txt").display()
    );
    let path = dir.join("run.yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// Peak RSS of a real two-step run of `path` in its own process, MiB,
/// beside the plan's figure for one process, MiB.
fn measured_and_planned(path: &Path) -> (f64, f64) {
    let out = succeed(pipewright().args(["bench", "train"]).arg(path).args([
        "--steps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "2",
    ]));
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("bench json");
    let measured = report["peak_rss_mib"].as_f64().expect("peak_rss_mib");
    let run = pipewright_spec::load_manifest(path).expect("manifest");
    let p = plan(&run, vocab(&run).expect("vocab"), None);
    (measured, p.single_process_bytes as f64 / (1 << 20) as f64)
}

fn assert_within_15_percent(case: &str, dir: &Path) {
    let (measured, planned) = measured_and_planned(dir);
    let error = (planned - measured) / measured;
    eprintln!(
        "{case}: planned {planned:.1} MiB, measured peak RSS {measured:.1} MiB ({:+.1}%)",
        error * 100.0
    );
    assert!(
        error.abs() <= 0.15,
        "{case}: planned {planned:.1} MiB, measured {measured:.1} MiB"
    );
}

#[test]
fn plan_matches_the_peak_memory_of_real_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    // Mostly parameters: 27M of them, about 440 MB of weights, gradients and
    // Adam moments, a few MB of activations.
    let params = manifest(
        dir.path(),
        "dim: 512, layers: 8, heads: 8, ffnDim: 1536, seqLen: 64",
        "microBatchSize: 2, microBatches: 2",
        "stages: 2",
    );
    assert_within_15_percent("parameters", &params);
    // Mostly activations: attention probabilities [B, H, T, T] of 67 MB per
    // layer, kept for the backward.
    let acts = manifest(
        dir.path(),
        "dim: 128, layers: 4, heads: 8, ffnDim: 384, seqLen: 512, tiedEmbeddings: true",
        "microBatchSize: 8, microBatches: 1",
        "stages: 1",
    );
    assert_within_15_percent("activations", &acts);
}

#[test]
fn plan_matches_the_peak_memory_of_runs_that_recompute() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    // The activation-heavy model again, 8 layers: without recomputation
    // every layer keeps its probabilities and MLP internals for the
    // backward; `full` keeps each block's input and holds one block's
    // intermediates at a time; `selective` keeps the attention's.
    let model = "dim: 128, layers: 8, heads: 8, ffnDim: 512, seqLen: 512, tiedEmbeddings: true";
    let mut planned = Vec::new();
    for recompute in ["none", "selective", "full"] {
        let path = manifest(
            dir.path(),
            model,
            &format!("microBatchSize: 8, microBatches: 1, recompute: {recompute}"),
            "stages: 1",
        );
        let (measured, plan_mib) = measured_and_planned(&path);
        let error = (plan_mib - measured) / measured;
        eprintln!(
            "recompute {recompute}: planned {plan_mib:.1} MiB, measured peak RSS {measured:.1} MiB ({:+.1}%)",
            error * 100.0
        );
        assert!(
            error.abs() <= 0.15,
            "recompute {recompute}: planned {plan_mib:.1} MiB, measured {measured:.1} MiB"
        );
        planned.push((plan_mib, measured));
    }
    // Recomputation must actually save memory, in the plan and for real.
    let (none, selective, full) = (planned[0], planned[1], planned[2]);
    assert!(full.0 < selective.0 && selective.0 < none.0, "{planned:?}");
    assert!(full.1 < 0.6 * none.1, "full recompute measured {planned:?}");
}
