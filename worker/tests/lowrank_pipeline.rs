//! The learned low-rank bottleneck (codec `lowrank`) across processes:
//! stage workers on threads, linked over loopback TCP, train exactly like the
//! single-process trainer with the same bottleneck, and only `rank` values
//! per token cross each boundary.

mod common;

use std::path::Path;

use common::{run_stage_workers, Finished};
use pipewright::train::Trainer;
use pipewright_spec::{parse_manifest, TrainingRun};

const STEPS: u64 = 12;
const DIM: usize = 32;
const ROWS: usize = 4;
const SEQ: usize = 32;
const MICRO_BATCHES: usize = 4;

fn write_corpus(dir: &Path) {
    let names = ["the potter", "a weaver", "our cooper", "the tanner"];
    let verbs = ["shapes", "trades", "mends", "stacks"];
    let things = ["jugs", "cloth", "casks", "hides", "ropes"];
    let mut text = String::new();
    for i in 0..3000usize {
        text.push_str(&format!(
            "{} {} {} {} before noon {}.\n",
            names[i % names.len()],
            verbs[(i / 3) % verbs.len()],
            i % 7 + 2,
            things[(i * 3 + 1) % things.len()],
            i % 13
        ));
    }
    std::fs::write(dir.join("corpus.txt"), text).expect("write corpus");
}

/// `pipeline` is the manifest's whole `spec.pipeline` mapping.
fn manifest(dir: &Path, pipeline: &str) -> TrainingRun {
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: lowrank-test}}
spec:
  model: {{dim: {DIM}, layers: 4, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: {SEQ}}}
  data: {{sources: ["{}"]}}
  training: {{steps: {STEPS}, microBatchSize: {ROWS}, microBatches: {MICRO_BATCHES}, learningRate: 0.01, warmupSteps: 2, weightDecay: 0.1, seed: 11}}
  pipeline: {pipeline}
  checkpoint: {{dir: "{}", keep: 0}}
"#,
        dir.join("corpus.txt").display(),
        dir.join("ckpt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

fn trainer(m: &TrainingRun) -> Trainer {
    let mut t = Trainer::new(m.clone()).expect("trainer");
    while !t.finished() {
        t.train_step().expect("step");
    }
    t
}

fn losses(done: &Finished) -> Vec<f32> {
    let last = done.iter().map(|(s, _, _)| s.stage).max().expect("stages");
    let (_, steps, _) = done
        .iter()
        .find(|(s, _, _)| s.stage == last && s.replica == 0)
        .expect("last stage");
    steps.iter().map(|s| s.loss.expect("loss")).collect()
}

#[test]
fn lowrank_pipeline_matches_the_trainer_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    for schedule in ["1f1b", "zb-h1"] {
        let m = manifest(
            dir.path(),
            &format!("{{stages: 3, schedule: {schedule}, codec: lowrank, lowrank: {{rank: 4}}}}"),
        );
        let want = trainer(&m);
        let done = run_stage_workers(&m, None).expect("pipeline run");
        assert_eq!(losses(&done), want.losses, "{schedule}");
        assert!(want.losses[STEPS as usize - 1] < want.losses[0] - 0.5);
        for (shard, _, params) in &done {
            let names: Vec<String> = want.stages[shard.stage]
                .params()
                .iter()
                .map(|p| p.name.clone())
                .collect();
            assert!(names.iter().any(|n| n.starts_with("boundary.")));
            for ((p, q), name) in params
                .iter()
                .zip(want.stages[shard.stage].params())
                .zip(&names)
            {
                assert_eq!(p, &q.data, "{schedule} {shard:?}: {name} differs");
            }
        }
    }
}

#[test]
fn lowrank_pipeline_with_replicas_matches_the_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let m = manifest(
        dir.path(),
        "{stages: 2, replicas: 2, codec: lowrank, lowrank: {rank: 8}}",
    );
    let want = trainer(&m);
    let done = run_stage_workers(&m, None).expect("pipeline run");
    for (i, (g, w)) in losses(&done).iter().zip(&want.losses).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs(), "step {i}: {g} vs {w}");
    }
}

#[test]
fn only_rank_values_per_token_cross_a_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let stages = 3;
    let sent = |pipeline: &str| -> u64 {
        let done = run_stage_workers(&manifest(dir.path(), pipeline), None).expect("pipeline run");
        done.iter()
            .flat_map(|(_, steps, _)| steps.iter().map(|s| s.link_bytes))
            .sum()
    };
    let full = sent("{stages: 3, codec: f32}");
    // Activations forward and their gradients back, at every boundary of
    // every micro-batch of every step, per value of width saved.
    let per_width = 2 * (stages - 1) * MICRO_BATCHES * STEPS as usize * ROWS * SEQ;
    for (wire, bytes) in [("f32", 4), ("f16", 2), ("bf16", 2)] {
        for rank in [DIM / 8, DIM / 32] {
            let low = sent(&format!(
                "{{stages: 3, codec: lowrank, lowrank: {{rank: {rank}, wire: {wire}}}}}"
            ));
            let saved = (per_width * (DIM * 4 - rank * bytes)) as u64;
            // Each run's count may miss the small control frames (signed
            // norms, a few hundred bytes each) still in their senders'
            // queues when it ends, more of them on a loaded machine. The
            // slack stays far below what one value of width more or less
            // per row would change (`per_width * 2` bytes, 48 KiB here).
            let diff = full as i64 - low as i64;
            let slack = 8 << 10;
            assert!(slack < per_width * 2);
            assert!(
                diff.abs_diff(saved as i64) <= slack as u64,
                "rank {rank} on {wire}: {diff} bytes saved, expected {saved}"
            );
            eprintln!(
                "rank {rank}, {wire}: {low} link bytes vs {full} under f32 ({:.1}x fewer)",
                full as f64 / low as f64
            );
        }
    }
}
