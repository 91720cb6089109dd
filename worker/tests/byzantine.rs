//! Byzantine tolerance: robust aggregation among a stage's replicas, the
//! checks on tensors received from a peer, recomputation of another
//! replica's micro-batch (as audits do), and the attack drills. Stage
//! workers on threads over loopback here; real processes in
//! `byzantine_processes.rs`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use pipewright::link::{RejectReason, RunId, RunKey};
use pipewright::pipeline::{
    loopback_layout, Attack, Auth, Evidence, MicroBatchHashes, PipelineError, StageWorker,
};
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
    let steps = m.spec.training.steps;
    common::on_loopback_workers(m, false, Duration::from_secs(20), move |mut w| {
        let shard = w.shard();
        if let Some((at, a)) = attack {
            if at == (shard.stage, shard.replica) {
                w.set_attack(Some(a));
            }
        }
        let mut losses = Vec::new();
        let mut error = None;
        for _ in 0..steps {
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

/// One recomputation a worker made of another replica's micro-batch:
/// whose, which, on how many kernel threads, what that replica committed
/// and what the recomputation gave.
#[derive(Debug)]
struct Recomputation {
    stage: usize,
    audited: usize,
    step: u64,
    mb: u64,
    threads: usize,
    committed: MicroBatchHashes,
    recomputed: MicroBatchHashes,
}

/// What each worker ended with in [`audited_run`].
struct Audited {
    losses: Vec<f32>,
    params: Vec<Vec<f32>>,
    checks: Vec<Recomputation>,
}

type Published =
    HashMap<(u64, usize, usize), (BTreeMap<u64, MicroBatchHashes>, Vec<(u64, Evidence)>)>;

/// Every shard on a thread of a `stages × 2` layout. With `pools`, after
/// each step every worker recomputes each micro-batch its other replica
/// ran, from that replica's evidence, with its own snapshot, once per
/// rayon pool of the given thread counts; `tamper` may change the
/// evidence first. `attack` makes one shard dishonest.
fn audited_run(
    m: &TrainingRun,
    pools: &[usize],
    attack: Option<((usize, usize), Attack)>,
    tamper: fn(&mut Evidence),
) -> Vec<Audited> {
    let p = &m.spec.pipeline;
    assert_eq!(p.replicas, 2);
    let layout = loopback_layout(p.stages, p.replicas, false, false).expect("bind");
    let auth = Auth {
        run_id: RunId([5; 16]),
        key: RunKey([3; 32]),
    };
    let shared: Arc<Mutex<Published>> = Arc::default();
    let barrier = Arc::new(Barrier::new(layout.len()));
    let handles: Vec<_> = layout
        .into_iter()
        .map(|(shard, peers)| {
            let (m, auth, pools) = (m.clone(), auth.clone(), pools.to_vec());
            let (shared, barrier) = (shared.clone(), barrier.clone());
            thread::spawn(move || {
                let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(20))
                    .expect("worker");
                w.set_retain(!pools.is_empty());
                let mut judge = (!pools.is_empty()).then(|| {
                    StageWorker::prepare_layers(&m, shard, Duration::from_secs(1), None)
                        .expect("a stage built apart")
                });
                if let Some((at, a)) = attack {
                    if at == (shard.stage, shard.replica) {
                        w.set_attack(Some(a));
                    }
                }
                let (mut losses, mut checks) = (Vec::new(), Vec::new());
                for step in 0..m.spec.training.steps {
                    let mut before = w.state();
                    losses.extend(w.train_step().expect("step").loss);
                    if pools.is_empty() {
                        continue;
                    }
                    let mine = w.step_hashes().clone();
                    let evidence = mine
                        .keys()
                        .map(|&mb| (mb, w.evidence(mb).cloned().expect("evidence kept")))
                        .collect();
                    shared
                        .lock()
                        .unwrap()
                        .insert((step, shard.stage, shard.replica), (mine.clone(), evidence));
                    barrier.wait();
                    let other = 1 - shard.replica;
                    let (theirs, evidence) = shared
                        .lock()
                        .unwrap()
                        .get(&(step, shard.stage, other))
                        .cloned()
                        .expect("the other replica published");
                    let kept = before.clone();
                    let evidence: BTreeMap<u64, Evidence> = evidence
                        .into_iter()
                        .map(|(mb, mut e)| {
                            tamper(&mut e);
                            (mb, e)
                        })
                        .collect();
                    for (&mb, e) in &evidence {
                        for &threads in &pools {
                            let pool = rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .build()
                                .expect("pool");
                            let recomputed = pool
                                .install(|| w.recompute(&mut before, step, mb, e))
                                .expect("recompute");
                            checks.push(Recomputation {
                                stage: shard.stage,
                                audited: other,
                                step,
                                mb,
                                threads,
                                committed: theirs[&mb],
                                recomputed,
                            });
                        }
                    }
                    // A stage built apart, as the coordinator's is: one
                    // pass over the other replica's whole step gives each
                    // of its micro-batches' hashes too (`threads` 0).
                    if let Some(judge) = judge.as_mut() {
                        let mbs: Vec<u64> = evidence.keys().copied().collect();
                        let scale = 1.0 / m.spec.training.micro_batches as f32;
                        for &mb in &mbs {
                            let mut b = kept.clone();
                            let (recomputed, grads) = judge
                                .recompute_step_detached(
                                    &mut b, step, other, &mbs, &evidence, scale, mb,
                                )
                                .expect("one pass over the step");
                            assert_eq!(grads.len(), judge.stage().params().len());
                            assert!(b == kept, "the state lent is given back as it was");
                            checks.push(Recomputation {
                                stage: shard.stage,
                                audited: other,
                                step,
                                mb,
                                threads: 0,
                                committed: theirs[&mb],
                                recomputed,
                            });
                        }
                    }
                    // The audit left the worker's own commitments, evidence
                    // and snapshot as they were.
                    assert_eq!(w.step_hashes(), &mine);
                    assert!(before == kept, "the snapshot is unchanged");
                    barrier.wait();
                }
                let params = w.stage().params().iter().map(|p| p.data.clone()).collect();
                let _ = w.finish();
                Audited {
                    losses,
                    params,
                    checks,
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .collect()
}

fn audit_manifest(dir: &Path, dim: usize, seq: usize, rows: usize, steps: u64) -> TrainingRun {
    let mut m = manifest(dir, 2, 2, "mean");
    m.spec.model.dim = dim;
    m.spec.model.ffn_dim = 3 * dim;
    m.spec.model.seq_len = seq;
    m.spec.training.micro_batch_size = rows;
    m.spec.training.steps = steps;
    m
}

/// Every worker recomputes its other replica's micro-batches after every
/// step: the hashes equal that replica's commitment, and the audits change
/// nothing of the workers' own training (losses and final weights are a
/// run's without audits, bit for bit), with activations kept or
/// recomputed, and under ZB-H1.
#[test]
fn a_recomputed_micro_batch_gives_the_committed_hashes_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for recompute in [
        pipewright_spec::Recompute::Off,
        pipewright_spec::Recompute::Full,
    ] {
        let mut m = audit_manifest(dir.path(), 32, 32, 4, 4);
        m.spec.training.recompute = recompute;
        recomputes_as_committed_and_changes_nothing(&m);
    }
    // Under ZB-H1 the input half and the weight half of a backward are
    // separate operations; the pass over the step takes the watched
    // micro-batch's gradient from the input half.
    let mut m = audit_manifest(dir.path(), 32, 32, 4, 4);
    m.spec.pipeline.schedule = pipewright_spec::ScheduleKind::ZbH1;
    recomputes_as_committed_and_changes_nothing(&m);
}

/// [`a_recomputed_micro_batch_gives_the_committed_hashes_and_changes_nothing`]
/// under `m`'s activation recomputation policy (under `full` a block's
/// backward input half runs its weight half too).
fn recomputes_as_committed_and_changes_nothing(m: &TrainingRun) {
    let m = m.clone();
    let audited = audited_run(&m, &[1], None, |_| {});
    let plain = audited_run(&m, &[], None, |_| {});
    let checks: Vec<&Recomputation> = audited.iter().flat_map(|a| &a.checks).collect();
    // 4 steps × 2 stages × 2 replicas × 2 micro-batches, recomputed alone
    // and in one pass over the step on a stage built apart.
    assert_eq!(checks.len(), 64);
    for c in &checks {
        assert_eq!(c.recomputed, c.committed, "{c:?}");
        // Replica r runs micro-batches 2r and 2r + 1 of each step.
        assert_eq!(c.mb / 2, c.audited as u64, "{c:?}");
    }
    let mut seen: Vec<(u64, usize, u64)> = checks.iter().map(|c| (c.step, c.stage, c.mb)).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 32, "every micro-batch of every step, once");
    // Stage 0 reports the hash of the tokens it sampled itself, stage 1
    // a gradient of its own; the first stage's is zeros.
    assert!(checks
        .iter()
        .all(|c| (c.recomputed.gradient == [0; 32]) == (c.stage == 0)));
    for (a, p) in audited.iter().zip(&plain) {
        assert_eq!(a.losses, p.losses, "losses with and without audits");
        assert!(a.params == p.params, "weights with and without audits");
    }
}

/// Recomputation on rayon pools of 1, 2 and 3 threads, and one pass over
/// the step on a stage built apart, give the same bits as the step itself
/// (run on the default pool), on a model large enough that the matrix
/// products split their work over threads.
#[test]
fn recomputation_is_bitwise_the_same_on_any_thread_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = audit_manifest(dir.path(), 128, 64, 8, 1);
    let out = audited_run(&m, &[1, 2, 3], None, |_| {});
    let checks: Vec<&Recomputation> = out.iter().flat_map(|a| &a.checks).collect();
    assert_eq!(checks.len(), 2 * 2 * 2 * (3 + 1));
    for c in checks {
        assert_eq!(c.recomputed, c.committed, "{} threads: {c:?}", c.threads);
    }
}

/// Evidence that is not what arrived, or a worker that sent something
/// else than it computed (committing to what it sent), does not reproduce.
#[test]
fn corrupted_evidence_or_a_dishonest_output_does_not_reproduce() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = audit_manifest(dir.path(), 32, 32, 4, 1);
    // One byte of the input activation changed: the input's hash and the
    // output differ (stage 1; stage 0 samples its input itself).
    let flipped = audited_run(&m, &[1], None, |e| {
        if let Some(i) = e.input.as_mut() {
            // An exponent bit of the second value: four times larger or
            // smaller (a low mantissa bit may not move the loss's bits).
            i[7] ^= 1;
        }
    });
    for c in flipped.iter().flat_map(|a| &a.checks) {
        if c.stage == 1 {
            assert_ne!(c.recomputed.input, c.committed.input);
            assert_ne!(c.recomputed.output, c.committed.output);
        } else {
            assert_eq!(c.recomputed, c.committed);
        }
    }
    // Dishonest senders: what they sent is not what the weights give.
    for (at, attack, stage) in [
        ((0, 0), "act-noise", 0),
        ((0, 1), "lazy-zeros", 0),
        ((1, 0), "act-scale", 1),
        ((1, 1), "lazy-zeros", 1),
    ] {
        let a: Attack = attack.parse().expect("attack");
        let out = audited_run(&m, &[1], Some((at, a)), |_| {});
        let checks: Vec<&Recomputation> = out.iter().flat_map(|a| &a.checks).collect();
        for c in checks {
            let audited_attacker = (c.stage, c.audited) == at;
            let differs = if stage == 0 {
                c.recomputed.output != c.committed.output
            } else {
                // The last stage sends activation gradients.
                c.recomputed.gradient != c.committed.gradient
            };
            assert_eq!(differs, audited_attacker, "{attack}: {c:?}");
        }
    }
}

/// A validator whose snapshot lives on disk (`spec.training.snapshot:
/// disk`) lends an audit the same weights of before the step as one that
/// keeps it in memory: those the worker held before it trained the step.
#[test]
fn a_disk_snapshot_lends_an_audit_the_weights_of_before_the_step() {
    use pipewright::pipeline::Snapshot;
    use pipewright_spec::SnapshotPlace;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 1, 1, "mean");
    let (shard, peers) = loopback_layout(1, 1, false, false)
        .expect("bind")
        .into_iter()
        .next()
        .expect("one shard");
    let auth = Auth {
        run_id: RunId([6; 16]),
        key: RunKey([1; 32]),
    };
    let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(20)).expect("worker");
    w.train_step().expect("first step");
    let (mut memory, mut disk) = (
        Snapshot::new(SnapshotPlace::Memory),
        Snapshot::new(SnapshotPlace::Disk),
    );
    assert!(disk.before(&w).unwrap().is_none(), "nothing kept yet");
    memory.keep(&w).unwrap();
    disk.keep(&w).unwrap();
    let held: Vec<Vec<f32>> = w.stage().params().iter().map(|p| p.data.clone()).collect();
    w.train_step().expect("second step");
    let now: Vec<Vec<f32>> = w.stage().params().iter().map(|p| p.data.clone()).collect();
    assert_ne!(now, held, "the step moved the weights");
    for snap in [&mut memory, &mut disk] {
        let mut before = snap.before(&w).unwrap().expect("kept");
        assert_eq!(before.state().step, 1);
        assert_eq!(before.state().params, held);
    }
    let _ = w.finish();
}
