//! Byzantine tolerance: robust aggregation among a stage's replicas, the
//! checks on tensors received from a peer, and the attack drills. Stage
//! workers on threads over loopback here; real processes in
//! `byzantine_processes.rs`.

mod common;

use std::path::Path;
use std::thread;
use std::time::Duration;

use pipewright::link::{RejectReason, RunId, RunKey};
use pipewright::pipeline::{loopback_layout, Attack, Auth, PipelineError, StageWorker};
use pipewright_spec::{parse_manifest, TrainingRun};

const STEPS: u64 = 12;

fn manifest(dir: &Path, stages: usize, replicas: usize, aggregation: &str) -> TrainingRun {
    common::write_corpus(dir);
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: byzantine-test}}
spec:
  model: {{dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: false}}
  data: {{sources: ["{}"]}}
  training: {{steps: {STEPS}, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, seed: 11, threads: 1}}
  pipeline: {{stages: {stages}, replicas: {replicas}, aggregation: {aggregation}}}
"#,
        dir.join("corpus.txt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

/// What each worker ended with: its losses (last stage), its parameters,
/// and the refusals its links counted by reason.
struct Outcome {
    stage: usize,
    losses: Vec<f32>,
    params: Vec<Vec<f32>>,
    refused: Vec<u64>,
    error: Option<PipelineError>,
}

/// Runs every shard on a thread; `attack` makes one shard dishonest.
fn run(m: &TrainingRun, attack: Option<((usize, usize), Attack)>) -> Vec<Outcome> {
    let p = &m.spec.pipeline;
    let layout = loopback_layout(p.stages, p.replicas, false, false).expect("bind");
    let auth = Auth {
        run_id: RunId([4; 16]),
        key: RunKey([2; 32]),
    };
    let handles: Vec<_> = layout
        .into_iter()
        .map(|(shard, peers)| {
            let (m, auth) = (m.clone(), auth.clone());
            thread::spawn(move || {
                let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(20))
                    .expect("worker");
                if let Some((at, a)) = attack {
                    if at == (shard.stage, shard.replica) {
                        w.set_attack(Some(a));
                    }
                }
                let mut losses = Vec::new();
                let mut error = None;
                for _ in 0..m.spec.training.steps {
                    match w.train_step() {
                        Ok(s) => losses.extend(s.loss),
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                let (pipe, ring) = w.traffic();
                let refused = RejectReason::ALL
                    .iter()
                    .map(|&r| pipe.rejected[r as usize] + ring.rejected[r as usize])
                    .collect();
                let params = w.stage().params().iter().map(|p| p.data.clone()).collect();
                if error.is_none() {
                    let _ = w.finish();
                }
                Outcome {
                    stage: shard.stage,
                    losses,
                    params,
                    refused,
                    error,
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .collect()
}

fn final_loss(out: &[Outcome]) -> f32 {
    let last = out.iter().map(|o| o.stage).max().unwrap_or(0);
    *out.iter()
        .find(|o| o.stage == last)
        .and_then(|o| o.losses.last())
        .expect("a loss")
}

fn assert_replicas_identical(out: &[Outcome]) {
    for o in out {
        assert!(o.error.is_none(), "{:?}", o.error);
        let first = out.iter().find(|x| x.stage == o.stage).expect("a replica");
        assert!(
            first.params == o.params,
            "replicas of stage {} differ",
            o.stage
        );
    }
}

/// AdamW and gradient clipping absorb a replica that merely negates or
/// scales its gradient under `mean` (the step's direction stays a descent
/// direction); one that sends −100 times its gradient turns the mean
/// uphill. The robust rules keep it out, and keep out the others too.
#[test]
fn robust_aggregation_keeps_replicas_identical_and_an_attacker_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reverse: Attack = "scale:-100".parse().expect("attack");
    let flip: Attack = "sign-flip".parse().expect("attack");
    let mean = manifest(dir.path(), 1, 3, "mean");
    let clean_mean = run(&mean, None);
    assert_replicas_identical(&clean_mean);
    let start = clean_mean[0].losses[0];
    let clean = final_loss(&clean_mean);
    assert!(
        clean < start - 1.0,
        "the clean run learns: {start} → {clean}"
    );
    let damaged = final_loss(&run(&mean, Some(((0, 1), reverse))));
    assert!(
        damaged > start,
        "mean under scale:-100 goes uphill: {start} → {damaged}"
    );
    for rule in ["median", "trimmedMean", "centeredClip"] {
        let m = manifest(dir.path(), 1, 3, rule);
        let honest = run(&m, None);
        assert_replicas_identical(&honest);
        let h = final_loss(&honest);
        assert!(
            (h - clean).abs() < 0.25,
            "{rule} without attacker: {h} vs mean {clean}"
        );
        for attack in [reverse, flip] {
            let attacked = run(&m, Some(((0, 1), attack)));
            // The dishonest replica applies the same aggregate: all three
            // hold the same bits.
            assert_replicas_identical(&attacked);
            let a = final_loss(&attacked);
            assert!(
                (a - clean).abs() < 0.25,
                "{rule} under {attack}: {a} vs clean {clean}"
            );
        }
    }
}

#[test]
fn nan_activations_are_refused_counted_and_never_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest(dir.path(), 2, 1, "mean");
    let out = run(&m, Some(((0, 0), "nan@3".parse().expect("attack"))));
    let receiver = out.iter().find(|o| o.stage == 1).expect("stage 1");
    assert!(
        matches!(
            receiver.error,
            Some(PipelineError::Refused {
                reason: "non_finite",
                ..
            })
        ),
        "{:?}",
        receiver.error
    );
    assert_eq!(receiver.refused[RejectReason::NonFinite as usize], 1);
    // Two clean steps, then the refusal: no loss was computed from NaN.
    assert_eq!(receiver.losses.len(), 2);
    assert!(receiver.losses.iter().all(|l| l.is_finite()));
    assert!(receiver
        .params
        .iter()
        .all(|p| p.iter().all(|x| x.is_finite())));
}

#[test]
fn robust_aggregation_refuses_routed_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = manifest(dir.path(), 1, 3, "median");
    m.spec.pipeline.routing = pipewright_spec::Routing::Throughput;
    let shard = pipewright::pipeline::Shard {
        stage: 0,
        replica: 0,
    };
    let err = StageWorker::prepare(&m, shard, Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("routing: lanes"), "{err}");
}
