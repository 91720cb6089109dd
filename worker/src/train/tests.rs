use super::*;
use pipewright_spec::parse_manifest;

/// Text with learnable structure, generated here (tests commit no corpus).
fn write_corpus(dir: &Path) {
    let animals = ["cat", "dog", "owl", "fox", "elk", "yak"];
    let verbs = ["sees", "follows", "greets", "ignores"];
    let mut text = String::new();
    for i in 0..4000usize {
        let a = animals[i % animals.len()];
        let b = animals[(i * 7 + 3) % animals.len()];
        let v = verbs[(i / 3) % verbs.len()];
        text.push_str(&format!("The {a} {v} the {b} number {}.\n", i % 97));
    }
    std::fs::write(dir.join("corpus.txt"), text).expect("write corpus");
}

fn manifest(dir: &Path, stages: usize, tied: bool, steps: u64) -> TrainingRun {
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: test}}
spec:
  model: {{dim: 32, layers: 4, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: {tied}}}
  data: {{sources: ["{}"]}}
  training: {{steps: {steps}, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, weightDecay: 0.1, seed: 7}}
  pipeline: {{stages: {stages}}}
  checkpoint: {{dir: "{}", keep: 0}}
"#,
        dir.join("corpus.txt").display(),
        dir.join("ckpt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

#[test]
fn resume_continues_exactly_where_the_run_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    for (stages, tied) in [(1, false), (2, true)] {
        let m = manifest(dir.path(), stages, tied, 8);
        let mut straight = Trainer::new(m.clone()).expect("trainer");
        while !straight.finished() {
            straight.train_step().expect("step");
        }

        let mut first = Trainer::new(m).expect("trainer");
        for _ in 0..3 {
            first.train_step().expect("step");
        }
        let root = dir.path().join(format!("ckpt-{stages}"));
        let saved = first.save_checkpoint(&root).expect("save");
        drop(first);
        let mut resumed = Trainer::resume(&root, None).expect("resume");
        assert_eq!(resumed.step, 3, "resumed from {}", saved.display());
        while !resumed.finished() {
            resumed.train_step().expect("step");
        }
        assert_eq!(resumed.losses.len(), straight.losses.len());
        for (i, (a, b)) in resumed.losses.iter().zip(&straight.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "step {i}: resumed {a} vs straight {b}"
            );
        }
        for (a, b) in resumed.stages.iter().zip(&straight.stages) {
            for (p, q) in a.params().iter().zip(b.params()) {
                assert_eq!(p.data, q.data, "{} differs after resume", p.name);
            }
        }
    }
}

#[test]
fn training_learns_the_corpus_and_splits_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let mut runs = Vec::new();
    for stages in [1, 3] {
        let mut t = Trainer::new(manifest(dir.path(), stages, false, 40)).expect("trainer");
        let before = t.evaluate(4).expect("eval");
        while !t.finished() {
            t.train_step().expect("step");
        }
        let after = t.evaluate(4).expect("eval");
        assert!(
            after.bits_per_byte < 0.6 * before.bits_per_byte,
            "{stages} stages: {:.3} -> {:.3} bits/byte",
            before.bits_per_byte,
            after.bits_per_byte
        );
        assert!(after.bits_per_byte < t.corpus.unigram_bits_per_byte());
        runs.push(t.losses);
    }
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "1 vs 3 stages: {a} vs {b}");
    }
}

#[test]
fn a_checkpoint_for_another_model_is_refused_without_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let mut t = Trainer::new(manifest(dir.path(), 2, false, 4)).expect("trainer");
    t.train_step().expect("step");
    let root = dir.path().join("ckpt-a");
    let saved = t.save_checkpoint(&root).expect("save");
    // Truncate one stage file: loading must fail with the file named.
    let part = saved.join("stage-1.safetensors");
    let bytes = std::fs::read(&part).expect("read");
    std::fs::write(&part, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = Trainer::resume(&root, None)
        .err()
        .expect("corrupt checkpoint refused");
    assert!(err.to_string().contains("stage-1.safetensors"), "{err}");
    // The other stage's file is untouched.
    assert!(saved.join("stage-0.safetensors").is_file());
}
