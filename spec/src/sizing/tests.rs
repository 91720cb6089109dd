use crate::{parse_manifest, TrainingRun};

use super::*;

fn run(model: &str, pipeline: &str, micro_batches: usize) -> TrainingRun {
    parse_manifest(&format!(
        r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: plan}}
spec:
  model: {{{model}}}
  data: {{sources: ["corpus.txt"]}}
  training: {{steps: 10, microBatchSize: 4, microBatches: {micro_batches}, learningRate: 0.001}}
  pipeline: {{{pipeline}}}
"#
    ))
    .expect("manifest")
}

const SMALL: &str = "dim: 64, layers: 8, heads: 4, ffnDim: 128, seqLen: 32";

#[test]
fn stage_parameters_add_up_to_the_model_plus_the_head_copy() {
    for tied in [false, true] {
        let r = run(&format!("{SMALL}, tiedEmbeddings: {tied}"), "stages: 3", 4);
        let p = plan(&r, 256, None);
        let sum: u64 = p.stages.iter().map(|s| s.params).sum();
        let copy = if tied { 256 * 64 } else { 0 };
        assert_eq!(sum, p.params + copy, "tied {tied}");
        for s in &p.stages {
            assert_eq!(s.gradient_bytes, s.weight_bytes);
            assert_eq!(s.optimizer_bytes, 2 * s.weight_bytes);
        }
    }
}

#[test]
fn in_flight_follows_the_schedule() {
    let (stages, m) = (4, 8);
    let peaks = |schedule: &str| -> Vec<usize> {
        let r = run(SMALL, &format!("stages: {stages}, schedule: {schedule}"), m);
        plan(&r, 256, None)
            .stages
            .iter()
            .map(|s| s.peak_in_flight)
            .collect()
    };
    assert_eq!(peaks("1f1b"), vec![4, 3, 2, 1]);
    assert_eq!(peaks("gpipe"), vec![m; stages]);
    assert!(
        peaks("zb-h1").iter().all(|&p| p <= stages),
        "{:?}",
        peaks("zb-h1")
    );
}

#[test]
fn flops_per_step_are_flops_per_token_times_tokens() {
    let r = run(SMALL, "stages: 2", 3);
    let p = plan(&r, 256, None);
    assert_eq!(p.tokens_per_step, 3 * 4 * 32);
    let cfg = ModelConfig::from_spec(&r.spec.model, 256);
    let total: f64 = p.stages.iter().map(|s| s.flops_per_token).sum();
    let expected = 8.0 * cfg.block_flops_per_token() + cfg.head_flops_per_token();
    assert!((total - expected).abs() < 1e-6 * expected);
    for s in &p.stages {
        assert_eq!(s.flops_per_step, s.flops_per_token * 384.0);
    }
}

#[test]
fn more_stages_need_less_per_stage_and_min_stages_finds_the_fit() {
    let r = run(
        "dim: 512, layers: 16, heads: 8, ffnDim: 1408, seqLen: 256",
        "stages: 1",
        4,
    );
    let one = plan(&r, 32_000, Some(1)).largest_stage().total_bytes;
    let four = plan(&r, 32_000, Some(4)).largest_stage().total_bytes;
    // Not a quarter: 1F1B's first stage holds four micro-batches.
    assert!(four < one, "{four} vs {one}");
    let node = four + PROCESS_OVERHEAD_BYTES;
    let s = min_stages(&r, 32_000, node).expect("fits");
    assert!(s <= 4);
    let p = plan(&r, 32_000, Some(s)).largest_stage().total_bytes;
    assert!(p + PROCESS_OVERHEAD_BYTES <= node);
    assert_eq!(min_stages(&r, 32_000, 1 << 20), None);
}

#[test]
fn the_largest_sizes_the_spec_allows_do_not_overflow() {
    let r = run(
        "dim: 65536, layers: 1024, heads: 1024, ffnDim: 262144, seqLen: 131072",
        "stages: 2",
        4096,
    );
    let p = plan(&r, 1_000_000, None);
    assert!(p.single_process_bytes > 1 << 50);
    assert!(p.stages.iter().all(|s| s.total_bytes > 1 << 40));
}

#[test]
fn sizes_parse_with_binary_units() {
    assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
    assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
    assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
    assert_eq!(parse_bytes("4096"), Ok(4096));
    for bad in ["", "GiB", "-1GiB", "0", "10 parsecs"] {
        assert!(parse_bytes(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_shard_that_does_not_fit_is_refused_naming_its_stage() {
    let r = run(SMALL, "stages: 4", 4);
    let p = plan(&r, 256, None);
    let need = |s: usize| p.stages[s].total_bytes + PROCESS_OVERHEAD_BYTES;
    assert_eq!(shard_fits(&p, Some(0), need(0)), Ok(()));
    let err = shard_fits(&p, Some(0), need(0) - 1).unwrap_err();
    assert!(err.starts_with("stage 0 (layers 0..2) needs"), "{err}");
    // Any stage: the smallest one decides.
    let smallest = (0..4).map(need).min().expect("stages");
    assert_eq!(shard_fits(&p, None, smallest), Ok(()));
    assert!(shard_fits(&p, None, smallest - 1).is_err());
}

#[test]
fn recompute_shrinks_what_a_micro_batch_keeps() {
    let model = "dim: 64, layers: 8, heads: 4, ffnDim: 192, seqLen: 128";
    let at = |recompute: &str| {
        let mut r = run(model, "stages: 2", 4);
        r.spec.training.recompute = match recompute {
            "full" => crate::Recompute::Full,
            "selective" => crate::Recompute::Selective,
            _ => crate::Recompute::Off,
        };
        plan(&r, 256, None)
    };
    let (none, selective, full) = (at("none"), at("selective"), at("full"));
    assert_eq!(full.recompute, crate::Recompute::Full);
    for s in 0..2 {
        let kept = |p: &Plan| p.stages[s].activation_bytes_per_micro_batch;
        assert!(kept(&full) < kept(&selective) && kept(&selective) < kept(&none));
        // Weights and their companions do not change.
        assert_eq!(full.stages[s].weight_bytes, none.stages[s].weight_bytes);
        assert!(full.stages[s].total_bytes < none.stages[s].total_bytes);
    }
    // Stage 0 (no head) under full recomputation keeps only each block's
    // input and the received token ids: n·(4·D + 1) floats for 4 blocks.
    let n = 4 * 128;
    assert_eq!(
        full.stages[0].activation_bytes_per_micro_batch,
        4 * n * (4 * 64 + 1)
    );
    assert!(full.single_process_bytes < none.single_process_bytes);
}

#[test]
fn the_manifest_fixes_the_vocabulary_unless_a_file_does() {
    let mut r = run(SMALL, "stages: 1", 1);
    assert_eq!(manifest_vocab(&r), Some(BYTE_VOCAB));
    r.spec.data.tokenizer.kind = TokenizerKind::Bpe;
    r.spec.data.tokenizer.vocab_size = Some(4096);
    assert_eq!(manifest_vocab(&r), Some(4096));
    r.spec.data.tokenizer.vocab_size = None;
    r.spec.data.tokenizer.path = Some("tokenizer.json".into());
    assert_eq!(manifest_vocab(&r), None);
}

#[test]
fn a_snapshot_on_disk_takes_three_times_the_weights_off_every_stage() {
    let mut r = run(SMALL, "stages: 2", 4);
    let memory = plan(&r, 256, None);
    r.spec.training.snapshot = SnapshotPlace::Disk;
    let disk = plan(&r, 256, None);
    for (m, d) in memory.stages.iter().zip(&disk.stages) {
        assert_eq!(m.snapshot_bytes, 3 * m.weight_bytes);
        assert_eq!(d.snapshot_bytes, 0);
        assert_eq!(m.total_bytes - d.total_bytes, 3 * m.weight_bytes);
        // Weights, gradients and both moments stay in memory either way.
        assert!(d.total_bytes >= 4 * d.weight_bytes + d.activation_bytes);
    }
    // One process keeps no snapshot: its figure does not change.
    assert_eq!(memory.single_process_bytes, disk.single_process_bytes);
}

#[test]
fn audited_replicas_keep_one_step_of_what_they_received() {
    // Three stages of 64 wide, 4 micro-batches of 4 × 32 tokens per lane.
    let tokens = 4 * 32;
    let r = run(SMALL, "stages: 3, replicas: 2", 4);
    let audited = plan(&r, 256, None);
    let e: Vec<u64> = audited.stages.iter().map(|s| s.evidence_bytes).collect();
    // The first stage keeps the gradients it received, the last the
    // activations and targets, the middle both.
    assert_eq!(e[0], 4 * tokens * 64 * 4);
    assert_eq!(e[2], 4 * tokens * (64 + 1) * 4);
    assert_eq!(e[1], 4 * tokens * (64 + 1 + 64) * 4);

    let mut off = r.clone();
    off.spec.validation.audit_rate = 0.0;
    for (s, a) in plan(&off, 256, None).stages.iter().zip(&audited.stages) {
        assert_eq!(s.evidence_bytes, 0);
        assert_eq!(a.total_bytes - s.total_bytes, a.evidence_bytes);
    }
    // A stage of one replica keeps as much (the coordinator audits it)
    // and one copy of its gradients (the coordinator replays its update
    // from the gradient it applied), unless audits are off.
    let mut single = run(SMALL, "stages: 3, replicas: 1", 4);
    let single_plan = plan(&single, 256, None);
    let kept: Vec<u64> = single_plan
        .stages
        .iter()
        .zip(&e)
        .map(|(s, e)| s.evidence_bytes - e)
        .collect();
    let gradients: Vec<u64> = single_plan
        .stages
        .iter()
        .map(|s| s.gradient_bytes)
        .collect();
    assert_eq!(kept, gradients);
    single.spec.validation.audit_rate = 0.0;
    assert!(plan(&single, 256, None)
        .stages
        .iter()
        .all(|s| s.evidence_bytes == 0));
}

#[test]
fn replicas_hold_what_combining_their_gradients_needs() {
    let plan_of = |pipeline: &str, vocab: usize| plan(&run(SMALL, pipeline, 4), vocab, None);
    let alone = plan_of("stages: 2, replicas: 1", 256);
    assert!(alone.stages.iter().all(|s| s.aggregation_bytes == 0));
    let robust = "aggregation: median, routing: lanes";
    let mean = plan_of("stages: 2, replicas: 3", 256);
    let median = plan_of(&format!("stages: 2, replicas: 3, {robust}"), 256);
    let median5 = plan_of(&format!("stages: 2, replicas: 5, {robust}"), 256);
    // SMALL: 64 wide, 4 heads (no grouped keys), a 128 wide MLP. With a
    // vocabulary of 256 a block (4 × 64 × 64 + 3 × 64 × 128 + 2 × 64) is
    // the largest bucket of both stages.
    let block = (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) * 4;
    for (k, s) in mean.stages.iter().enumerate() {
        assert_eq!(s.aggregation_bytes, 2 * s.gradient_bytes);
        let m = &median.stages[k];
        assert_eq!(m.aggregation_bytes, 5 * m.gradient_bytes + 3 * block);
        let m5 = &median5.stages[k];
        assert_eq!(m5.aggregation_bytes - m.aggregation_bytes, 2 * block);
        // Counted in the total, over the stage alone (whose evidence holds
        // a copy of its applied gradient for the coordinator's replay).
        let a = &alone.stages[k];
        let rest = |x: &StagePlan| x.total_bytes - x.evidence_bytes;
        assert_eq!(rest(s) - rest(a), s.aggregation_bytes);
        assert_eq!(rest(m) - rest(a), m.aggregation_bytes);
    }
    // With a vocabulary of 4096 the first stage's largest bucket is its
    // embedding (4096 × 64), the last's its head and final norm.
    let wide = plan_of(&format!("stages: 2, replicas: 3, {robust}"), 4096);
    for (s, bucket) in wide.stages.iter().zip([4096 * 64, 4096 * 64 + 64]) {
        assert_eq!(s.aggregation_bytes, 5 * s.gradient_bytes + 3 * bucket * 4);
    }
    // A refusal names it.
    let s = &median.stages[0];
    let why = shard_fits(&median, Some(0), s.total_bytes / 2).unwrap_err();
    assert!(why.contains("to combine the replicas' gradients"), "{why}");
}
