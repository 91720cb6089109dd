//! Stage workers on threads, linked over loopback TCP, must train exactly
//! like the single-process trainer: same per-step loss, same weights.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::run_stage_workers;
use pipewright::link::{RunId, RunKey};
use pipewright::pipeline::route::interleave;
use pipewright::pipeline::{
    loopback_layout, Auth, PipelineError, Route, Shard, StageWorker, WorkerStep,
};
use pipewright::train::Trainer;
use pipewright_spec::{parse_manifest, Routing, TrainingRun};

/// The issue-level check: 50 steps of every layout against the trainer.
const STEPS: u64 = 50;

/// Structured sentences generated here (tests commit no corpus).
fn write_corpus(dir: &Path) {
    let subjects = [
        "the miller",
        "a sailor",
        "the baker",
        "my aunt",
        "our smith",
    ];
    let verbs = ["mends", "sells", "paints", "carries", "counts"];
    let objects = ["nets", "loaves", "boats", "bells", "barrels", "lamps"];
    let mut text = String::new();
    for i in 0..3000usize {
        let s = subjects[i % subjects.len()];
        let v = verbs[(i / 2) % verbs.len()];
        let o = objects[(i * 5 + 1) % objects.len()];
        text.push_str(&format!("{s} {v} {} {o} on day {}.\n", i % 9 + 2, i % 31));
    }
    std::fs::write(dir.join("corpus.txt"), text).expect("write corpus");
}

fn manifest(dir: &Path, stages: usize, replicas: usize, tied: bool, schedule: &str) -> TrainingRun {
    manifest_with_codec(dir, stages, replicas, tied, schedule, "f32")
}

fn manifest_with_codec(
    dir: &Path,
    stages: usize,
    replicas: usize,
    tied: bool,
    schedule: &str,
    codec: &str,
) -> TrainingRun {
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: pipeline-test}}
spec:
  model: {{dim: 32, layers: 4, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: {tied}}}
  data: {{sources: ["{}"]}}
  training: {{steps: {STEPS}, microBatchSize: 4, microBatches: 4, learningRate: 0.01, warmupSteps: 2, seed: 7}}
  pipeline: {{stages: {stages}, replicas: {replicas}, schedule: "{schedule}", codec: {codec}}}
  checkpoint: {{dir: "{}", keep: 0}}
"#,
        dir.join("corpus.txt").display(),
        dir.join("ckpt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

fn reference(m: &TrainingRun) -> (Vec<f32>, Vec<Vec<Vec<f32>>>, f64) {
    let mut t = Trainer::new(m.clone()).expect("trainer");
    let start = Instant::now();
    while !t.finished() {
        t.train_step().expect("step");
    }
    let secs = start.elapsed().as_secs_f64() / STEPS as f64;
    let params = t
        .stages
        .iter()
        .map(|s| s.params().iter().map(|p| p.data.clone()).collect())
        .collect();
    (t.losses.clone(), params, secs)
}

fn check_layout(stages: usize, replicas: usize, tied: bool, schedule: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let m = manifest(dir.path(), stages, replicas, tied, schedule);
    check_run(&m, None);
}

fn check_run(m: &TrainingRun, route: Option<Route>) {
    let (stages, replicas) = (m.spec.pipeline.stages, m.spec.pipeline.replicas);
    let (tied, schedule) = (m.spec.model.tied_embeddings, m.spec.pipeline.schedule);
    let (want, want_params, ref_secs) = reference(m);
    let done = run_stage_workers(m, route.clone()).expect("pipeline run");
    // A step lasts as long as its slowest worker; step 0 includes warm-up.
    let step_secs: Vec<f64> = (1..STEPS as usize)
        .map(|i| {
            done.iter()
                .map(|(_, steps, _)| steps[i].seconds)
                .fold(0.0, f64::max)
        })
        .collect();
    let secs = step_secs.iter().sum::<f64>() / step_secs.len() as f64;
    eprintln!(
        "S={stages} R={replicas} tied={tied} {schedule:?}: pipeline {:.2} ms/step, trainer {:.2} ms/step",
        secs * 1e3,
        ref_secs * 1e3
    );
    let mut last_stages = 0;
    for (shard, steps, params) in &done {
        assert_eq!(steps.len(), STEPS as usize);
        // Each worker ran its share of every step.
        let share = route.as_ref().map_or(m.spec.training.micro_batches, |r| {
            r.counts(shard.stage, replicas)[shard.replica]
        });
        assert!(steps.iter().all(|s| s.micro_batches == share), "{shard:?}");
        // Every worker clips with the same global norm.
        let norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).collect();
        let (_, first_steps, _) = done
            .iter()
            .find(|(s, _, _)| s.stage == 0 && s.replica == shard.replica)
            .expect("first stage of the replica");
        let first_norms: Vec<f64> = first_steps.iter().map(|s| s.grad_norm).collect();
        assert_eq!(norms, first_norms, "{shard:?} clipped with another norm");
        if shard.stage + 1 == stages {
            last_stages += 1;
            for (i, (s, w)) in steps.iter().zip(&want).enumerate() {
                let got = s.loss.expect("last stage reports the loss");
                assert!(
                    (got - w).abs() <= 1e-4 * w.abs(),
                    "{shard:?} step {i}: pipeline loss {got} vs trainer {w}"
                );
                if replicas == 1 {
                    // Same operations in the same order: the same bits.
                    assert_eq!(got, *w, "{shard:?} step {i}");
                }
            }
        } else {
            assert!(steps.iter().all(|s| s.loss.is_none()));
        }
        // Weights after training match the trainer's stage.
        for (j, (p, q)) in params.iter().zip(&want_params[shard.stage]).enumerate() {
            let worst = p
                .iter()
                .zip(q)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-3, "{shard:?} parameter {j} differs by {worst}");
        }
    }
    assert_eq!(last_stages, replicas);
    // Replicas of a stage hold identical weights.
    for (shard, _, params) in &done {
        let (_, _, base) = done
            .iter()
            .find(|(s, _, _)| s.stage == shard.stage && s.replica == 0)
            .expect("replica 0");
        assert_eq!(params, base, "{shard:?} drifted from replica 0");
    }
}

#[test]
fn two_stages_tied_match_the_trainer_bit_for_bit() {
    check_layout(2, 1, true, "1f1b");
}

#[test]
fn four_stages_match_the_trainer_bit_for_bit_under_every_schedule() {
    for schedule in ["gpipe", "1f1b", "zb-h1"] {
        check_layout(4, 1, false, schedule);
    }
}

#[test]
fn four_stages_two_replicas_tied_match_the_trainer() {
    check_layout(4, 2, true, "1f1b");
}

#[test]
fn four_stages_two_replicas_match_the_trainer() {
    check_layout(4, 2, false, "zb-h1");
}

#[test]
fn micro_batches_routed_across_replicas_match_the_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    for (schedule, tied) in [("1f1b", true), ("zb-h1", false), ("gpipe", false)] {
        let mut m = manifest(dir.path(), 3, 2, tied, schedule);
        m.spec.pipeline.routing = Routing::Throughput;
        // Uneven shares, different at every stage: a micro-batch crosses
        // between replicas at each boundary.
        let route = Route {
            assign: vec![
                interleave(&[5, 3]),
                interleave(&[2, 6]),
                interleave(&[7, 1]),
            ],
        };
        check_run(&m, Some(route));
    }
}

#[test]
fn one_lane_of_two_trains_the_whole_batch_like_the_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let mut m = manifest(dir.path(), 2, 2, true, "1f1b");
    m.spec.pipeline.routing = Routing::Throughput;
    let (want, _, _) = reference(&m);
    // Lane 1 is gone: lane 0's two workers run all 8 micro-batches.
    let route = Route {
        assign: vec![vec![0; 8], vec![0; 8]],
    };
    let auth = Auth {
        run_id: RunId([3; 16]),
        key: RunKey([9; 32]),
    };
    let layout = loopback_layout(2, 2, true, true).expect("bind");
    let handles: Vec<_> = layout
        .into_iter()
        .filter(|(shard, _)| shard.replica == 0)
        .map(|(shard, mut peers)| {
            peers.next.retain(|(r, _)| *r == 0);
            peers.ring = None;
            let (m, auth, route) = (m.clone(), auth.clone(), route.clone());
            thread::spawn(move || -> Result<Vec<WorkerStep>, PipelineError> {
                let mut w = StageWorker::prepare(&m, shard, Duration::from_secs(60))?;
                w.set_lanes(vec![0])?;
                w.set_route(route)?;
                w.link(peers, &auth)?;
                let steps = w.run(STEPS)?;
                w.finish()?;
                Ok(steps)
            })
        })
        .collect();
    let done: Vec<Vec<WorkerStep>> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("lane 0"))
        .collect();
    assert!(done
        .iter()
        .all(|steps| steps.iter().all(|s| s.micro_batches == 8)));
    for (i, (s, w)) in done[1].iter().zip(&want).enumerate() {
        let got = s.loss.expect("last stage");
        assert!(
            (got - w).abs() <= 1e-4 * w.abs(),
            "step {i}: one lane {got} vs trainer {w}"
        );
    }
}

#[test]
fn a_lanes_run_refuses_a_route_across_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let m = manifest(dir.path(), 2, 2, false, "1f1b");
    let mut w = StageWorker::prepare(
        &m,
        Shard {
            stage: 0,
            replica: 0,
        },
        Duration::from_secs(1),
    )
    .expect("prepare");
    let skewed = Route {
        assign: vec![interleave(&[5, 3]), interleave(&[4, 4])],
    };
    let e = w.set_route(skewed).expect_err("lanes only");
    assert!(e.to_string().contains("routing: throughput"), "{e}");
    let short = Route {
        assign: vec![vec![0; 8]],
    };
    assert!(w.set_route(short).is_err());
    assert!(w.route().is_lanes(4));
}

#[test]
fn a_lossy_activation_codec_still_trains_like_the_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let m = manifest_with_codec(dir.path(), 3, 1, false, "1f1b", "bf16");
    let (want, _, _) = reference(&m);
    let done = run_stage_workers(&m, None).expect("pipeline run");
    let (_, steps, _) = done
        .iter()
        .find(|(s, _, _)| s.stage == 2)
        .expect("last stage");
    let got: Vec<f32> = steps.iter().map(|s| s.loss.expect("loss")).collect();
    // Rounding perturbs the trajectory a little at every step: the first
    // steps stay within 1%, and the run ends where the exact one does.
    for (i, (g, w)) in got.iter().zip(&want).take(4).enumerate() {
        assert!(
            (g - w).abs() <= 1e-2 * w,
            "step {i}: bf16 pipeline {g} vs trainer {w}"
        );
    }
    let tail = |v: &[f32]| v[v.len() - 10..].iter().sum::<f32>() / 10.0;
    let (g, w) = (tail(&got), tail(&want));
    assert!(
        (g - w).abs() <= 3e-2 * w,
        "last 10 steps: bf16 pipeline {g} vs trainer {w}"
    );
    // The codec really is on the wire: rounding shows in the losses.
    assert_ne!(got, want);
    assert!(
        got[got.len() - 1] < got[0] - 0.5,
        "bf16 pipeline did not learn: {got:?}"
    );
}

#[test]
fn a_worker_with_the_wrong_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_corpus(dir.path());
    let m = manifest(dir.path(), 2, 1, false, "1f1b");
    let mut layout = loopback_layout(2, 1, false, false)
        .expect("bind")
        .into_iter();
    let (s0, p0) = layout.next().expect("stage 0");
    let (s1, p1) = layout.next().expect("stage 1");
    let good = Auth {
        run_id: RunId([3; 16]),
        key: RunKey([9; 32]),
    };
    let bad = Auth {
        key: RunKey([8; 32]),
        ..good.clone()
    };
    let m1 = m.clone();
    let h = thread::spawn(move || {
        StageWorker::new(&m1, s1, p1, good, Duration::from_secs(5)).map(|_| ())
    });
    let first = StageWorker::new(&m, s0, p0, bad, Duration::from_secs(5));
    assert!(
        matches!(first, Err(PipelineError::Link { .. })),
        "{first:?}"
    );
    assert!(h.join().expect("thread").is_err());
}
