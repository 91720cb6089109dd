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
        let root = dir.path().join(format!("ckpt-{stages}"));
        let (straight, saved) =
            straight_and_saved_after_3(manifest(dir.path(), stages, tied, 8), &root);
        let mut resumed = Trainer::resume(&root, None).expect("resume");
        assert_eq!(resumed.step, 3, "resumed from {}", saved.display());
        run_to_end(&mut resumed);
        assert_eq!(resumed.losses.len(), straight.losses.len());
        for (i, (a, b)) in resumed.losses.iter().zip(&straight.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "step {i}: resumed {a} vs straight {b}"
            );
        }
        assert_same_params(&resumed, &straight);
    }
}

#[test]
fn training_learns_the_corpus_and_splits_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let mut runs = Vec::new();
    for stages in [1, 3] {
        let mut t = Trainer::new(manifest(dir.path(), stages, false, 40)).expect("trainer");
        train_and_check_it_learned(&mut t, &format!("{stages} stages"));
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

/// `manifest` with the learned low-rank bottleneck of width `rank` at every
/// stage boundary.
fn lowrank_manifest(dir: &Path, stages: usize, rank: usize, steps: u64) -> TrainingRun {
    let mut m = manifest(dir, stages, false, steps);
    m.spec.pipeline.codec = pipewright_spec::Codec::Lowrank;
    m.spec.pipeline.lowrank = Some(pipewright_spec::LowrankSpec {
        rank,
        wire: pipewright_spec::LowrankWire::F32,
    });
    pipewright_spec::validate(&m).expect("lowrank test manifest is valid");
    m
}

#[test]
fn lowrank_bottleneck_trains_and_its_projections_learn() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    // dim 32 through an 8-wide bottleneck at each of two boundaries.
    let mut t = Trainer::new(lowrank_manifest(dir.path(), 3, 8, 40)).expect("trainer");
    let shapes: Vec<(String, Vec<usize>)> = t
        .stages
        .iter()
        .flat_map(|s| s.params())
        .filter(|p| crate::model::bottleneck::is_bottleneck(&p.name))
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("boundary.0.down.weight".to_owned(), vec![8, 32]),
            ("boundary.0.up.weight".to_owned(), vec![32, 8]),
            ("boundary.1.down.weight".to_owned(), vec![8, 32]),
            ("boundary.1.up.weight".to_owned(), vec![32, 8]),
        ]
    );
    assert_eq!(
        (
            t.stages[1].boundary_width_in(),
            t.stages[1].boundary_width_out()
        ),
        (8, 8)
    );
    let start: Vec<f32> = t.stages[0].params().last().expect("down").data.clone();
    train_and_check_it_learned(&mut t, "lowrank");
    let end = &t.stages[0].params().last().expect("down").data;
    assert_ne!(&start, end, "the down-projection took no optimizer step");
}

#[test]
fn lowrank_resume_continues_exactly_and_export_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let root = dir.path().join("ckpt-lowrank");
    let (straight, saved) =
        straight_and_saved_after_3(lowrank_manifest(dir.path(), 3, 4, 8), &root);
    // The projections and their Adam moments are in the stage files.
    let bytes = std::fs::read(saved.join("stage-1.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    for name in [
        "boundary.0.up.weight",
        "boundary.1.down.weight",
        "optimizer.m.boundary.0.up.weight",
        "optimizer.v.boundary.1.down.weight",
    ] {
        assert!(st.tensor(name).is_ok(), "{name} missing from stage 1");
    }
    let mut resumed = Trainer::resume(&root, None).expect("resume");
    assert_eq!(resumed.step, 3);
    run_to_end(&mut resumed);
    assert_eq!(resumed.losses, straight.losses);
    assert_same_params(&resumed, &straight);

    let out = dir.path().join("hf");
    let err = crate::checkpoint::export::export(&root, &out)
        .expect_err("a lowrank checkpoint has no Llama equivalent");
    let text = err.to_string();
    for words in [
        "cannot export",
        "low-rank bottleneck",
        "rank 4",
        "LlamaForCausalLM",
    ] {
        assert!(text.contains(words), "{words:?} not in: {text}");
    }
    assert!(!out.join("model.safetensors").exists());
}

/// Trains `t` to its last step and checks it learned: validation bits per
/// byte fell below 0.6 of the untrained model's and below the corpus's
/// unigram entropy.
fn train_and_check_it_learned(t: &mut Trainer, label: &str) {
    let before = t.evaluate(4).expect("eval");
    run_to_end(t);
    let after = t.evaluate(4).expect("eval");
    assert!(
        after.bits_per_byte < 0.6 * before.bits_per_byte,
        "{label}: {:.3} -> {:.3} bits/byte",
        before.bits_per_byte,
        after.bits_per_byte
    );
    assert!(after.bits_per_byte < t.corpus.unigram_bits_per_byte());
}

/// Trains `t` to its last step.
fn run_to_end(t: &mut Trainer) {
    while !t.finished() {
        t.train_step().expect("step");
    }
}

/// Trains `m` straight to its end, and a second time for 3 steps that are
/// checkpointed under `root`: the straight trainer and the checkpoint.
fn straight_and_saved_after_3(m: TrainingRun, root: &Path) -> (Trainer, PathBuf) {
    let mut straight = Trainer::new(m.clone()).expect("trainer");
    run_to_end(&mut straight);
    let mut first = Trainer::new(m).expect("trainer");
    for _ in 0..3 {
        first.train_step().expect("step");
    }
    let saved = first.save_checkpoint(root).expect("save");
    (straight, saved)
}

/// Every parameter of `a` equals `b`'s, bit for bit.
fn assert_same_params(a: &Trainer, b: &Trainer) {
    for (x, y) in a.stages.iter().zip(&b.stages) {
        for (p, q) in x.params().iter().zip(y.params()) {
            assert_eq!(p.data, q.data, "{} differs after resume", p.name);
        }
    }
}

/// Activation recomputation changes memory and time, never a bit: a few
/// steps with `recompute: none`, `full` and `selective` give the same loss
/// bits and the same parameter bits, on one stage and on three (with a
/// tied head, whose gradient crosses the stages).
#[test]
fn recompute_gives_the_same_losses_and_parameters_bit_for_bit() {
    use crate::model::Recompute;
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    for (stages, tied) in [(1, false), (3, true)] {
        let run = |policy: Recompute| {
            let mut m = manifest(dir.path(), stages, tied, 4);
            m.spec.training.recompute = policy;
            let mut t = Trainer::new(m).expect("trainer");
            assert!(t.stages.iter().all(|s| s.recompute() == policy));
            run_to_end(&mut t);
            t
        };
        let off = run(Recompute::Off);
        assert_eq!(off.losses.len(), 4);
        for policy in [Recompute::Full, Recompute::Selective] {
            let on = run(policy);
            let bits = |t: &Trainer| t.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&on), bits(&off), "{stages} stages, {policy:?}: losses");
            for (x, y) in on.stages.iter().zip(&off.stages) {
                for (p, q) in x.params().iter().zip(y.params()) {
                    let (a, b): (Vec<u32>, Vec<u32>) = (
                        p.data.iter().map(|v| v.to_bits()).collect(),
                        q.data.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert!(a == b, "{stages} stages, {policy:?}: {} differs", p.name);
                }
            }
        }
    }
}
