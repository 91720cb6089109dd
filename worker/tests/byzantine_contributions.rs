//! What replicas see of each other's contributions to a robust aggregation:
//! every replica's hash of a peer's contribution equals the hash that peer
//! sent, honest contributions are never suspect (the measured cosines and
//! norm ratios against the aggregate, printed, sit far inside the
//! thresholds), and sign-flipped or scaled ones are suspected by every
//! honest peer at every step of the attack. Stage workers on threads over
//! loopback.

mod common;

use std::path::Path;
use std::thread;
use std::time::Duration;

use pipewright::link::{RunId, RunKey};
use pipewright::pipeline::{loopback_layout, Attack, Auth, Evidence, StageWorker};
use pipewright::sync::contribution::{SUSPECT_COSINE, SUSPECT_NORM_RATIO};
use pipewright::sync::{ContributionReport, Suspicion};
use pipewright_spec::{parse_manifest, TrainingRun};

const STEPS: u64 = 10;

fn manifest(dir: &Path, stages: usize, aggregation: &str, tied: bool) -> TrainingRun {
    common::write_corpus(dir);
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: contributions-test}}
spec:
  model: {{dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: {tied}}}
  data: {{sources: ["{}"]}}
  training: {{steps: {STEPS}, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, seed: 5, threads: 1}}
  pipeline: {{stages: {stages}, replicas: 3, aggregation: {aggregation}}}
"#,
        dir.join("corpus.txt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

/// Per shard `(stage, replica)`, its report of each step.
type Reports = Vec<((usize, usize), Vec<ContributionReport>)>;

fn run(m: &TrainingRun, attack: Option<((usize, usize), Attack)>) -> Reports {
    let steps = m.spec.training.steps;
    common::on_loopback_workers(m, false, Duration::from_secs(20), move |mut w| {
        let shard = w.shard();
        if let Some((at, a)) = attack {
            if at == (shard.stage, shard.replica) {
                w.set_attack(Some(a));
            }
        }
        let mut reports = Vec::new();
        for step in 0..steps {
            w.train_step()
                .unwrap_or_else(|e| panic!("step {step}: {e}"));
            reports.push(
                w.contributions()
                    .cloned()
                    .expect("a robust rule reports contributions"),
            );
        }
        let _ = w.finish();
        ((shard.stage, shard.replica), reports)
    })
}

/// Every replica received from each peer the contribution that peer says
/// it sent.
fn assert_hashes_agree(reports: &Reports) {
    for ((stage, replica), steps) in reports {
        for (step, r) in steps.iter().enumerate() {
            for (peer, hash) in r.hashes.iter().enumerate() {
                let (_, theirs) = reports
                    .iter()
                    .find(|(at, _)| *at == (*stage, peer))
                    .expect("the peer's reports");
                assert_eq!(
                    hash,
                    &theirs[step].sent(),
                    "stage {stage}: replica {replica} received another contribution from \
                     {peer} than {peer} sent at step {step}"
                );
            }
        }
    }
}

#[test]
fn honest_contributions_are_never_suspect_and_hashes_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut min_cosine, mut min_ratio, mut max_ratio) = (f64::INFINITY, f64::INFINITY, 0f64);
    for (stages, rule, tied) in [
        (1, "median", false),
        (1, "trimmedMean", false),
        (1, "centeredClip", false),
        (2, "median", true),
        (2, "centeredClip", false),
    ] {
        let reports = run(&manifest(dir.path(), stages, rule, tied), None);
        assert_hashes_agree(&reports);
        let (mut c, mut lo, mut hi) = (f64::INFINITY, f64::INFINITY, 0f64);
        for ((stage, replica), steps) in &reports {
            for (step, r) in steps.iter().enumerate() {
                assert!(
                    r.suspects().is_empty(),
                    "{rule}, {stages} stages, tied {tied}: replica {replica} of stage {stage} \
                     suspects {:?} at step {step}: {:?}",
                    r.suspects(),
                    r.stats
                );
                for s in &r.stats {
                    c = c.min(s.cosine);
                    lo = lo.min(s.norm_ratio);
                    hi = hi.max(s.norm_ratio);
                }
            }
        }
        println!(
            "{rule}, {stages} stage(s), tied {tied}: cosine ≥ {c:.3}, norm ratio in \
             [{lo:.3}, {hi:.3}]"
        );
        min_cosine = min_cosine.min(c);
        min_ratio = min_ratio.min(lo);
        max_ratio = max_ratio.max(hi);
    }
    println!(
        "honest contributions: cosine ≥ {min_cosine:.3}, norm ratio in \
         [{min_ratio:.3}, {max_ratio:.3}]"
    );
    // Honest contributions point with the aggregate, though with micro-
    // batches this small their gradients are mostly noise: the margin to
    // the cosine threshold is what these manifests give (docs/byzantine.md).
    // The norm ratios leave a wide margin.
    assert!(min_cosine > SUSPECT_COSINE, "cosine {min_cosine}");
    assert!(max_ratio < SUSPECT_NORM_RATIO / 3.0, "ratio {max_ratio}");
    assert!(min_ratio > 3.0 / SUSPECT_NORM_RATIO, "ratio {min_ratio}");
}

#[test]
fn sign_flipped_and_scaled_contributions_are_suspected_by_every_honest_peer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let from = 3u64;
    for (stages, rule, at) in [(1, "median", (0, 1)), (2, "trimmedMean", (1, 2))] {
        let m = manifest(dir.path(), stages, rule, false);
        for (attack, why) in [
            ("sign-flip", Suspicion::Direction),
            ("scale", Suspicion::Norm),
        ] {
            let a: Attack = format!("{attack}@{from}").parse().expect("attack");
            let reports = run(&m, Some((at, a)));
            assert_hashes_agree(&reports);
            for ((stage, replica), steps) in &reports {
                for (step, r) in steps.iter().enumerate() {
                    let named = r.suspects();
                    let attacked = step as u64 + 1 >= from;
                    if *stage != at.0 || *replica == at.1 || !attacked {
                        assert!(
                            named.is_empty(),
                            "{attack}: ({stage}, {replica}) suspects {named:?} at step {step}"
                        );
                    } else {
                        assert_eq!(
                            named,
                            vec![(at.1, why)],
                            "{attack}: ({stage}, {replica}) at step {step}: {:?}",
                            r.stats
                        );
                    }
                }
            }
        }
    }
}

/// What one worker published after a step for the others to recompute:
/// its committed micro-batches' evidence, the hash of the contribution it
/// sent and the one it commits to.
type Published = (
    std::collections::BTreeMap<u64, Evidence>,
    [u8; 32],
    [u8; 32],
);

/// Every worker's [`Published`], by (step, stage, replica).
type Board =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(u64, usize, usize), Published>>>;

/// One recomputation of a replica's contribution by another replica of its
/// stage.
#[derive(Debug)]
struct Recomputed {
    stage: usize,
    validator: usize,
    audited: usize,
    step: u64,
    /// The validator's rayon threads (0: the default pool).
    threads: usize,
    /// The audited replica's own `contributions().sent()`.
    sent: [u8; 32],
    /// What the audited replica commits to in its step report.
    committed: [u8; 32],
    /// The hash of the audited replica's contribution as the validator
    /// received it in the gather.
    received: [u8; 32],
    recomputed: [u8; 32],
}

/// Per shard: the losses of its steps (last stage), its final weights and
/// the recomputations it made.
struct Audited {
    losses: Vec<f32>,
    params: Vec<Vec<f32>>,
    checks: Vec<Recomputed>,
}

/// Every shard of `m`'s layout on a thread. With `pools` (rayon thread
/// counts; 0: the default pool), after each step every worker recomputes
/// the contribution of each other replica of its stage from that
/// replica's evidence, with its own snapshot of the weights before the
/// step, once per pool, and checks that the recomputation left its own
/// state (weights, moments, gradients, commitments, evidence,
/// contributions) exactly as it was.
fn audited_run(
    m: &TrainingRun,
    pools: &[usize],
    attack: Option<((usize, usize), Attack)>,
) -> Vec<Audited> {
    use std::sync::{Arc, Barrier};
    let p = &m.spec.pipeline;
    let layout = loopback_layout(p.stages, p.replicas, false, false).expect("bind");
    let auth = Auth {
        run_id: RunId([7; 16]),
        key: RunKey([3; 32]),
    };
    let shared = Board::default();
    let barrier = Arc::new(Barrier::new(layout.len()));
    let handles: Vec<_> = layout
        .into_iter()
        .map(|(shard, peers)| {
            let (m, auth, pools) = (m.clone(), auth.clone(), pools.to_vec());
            let (shared, barrier) = (shared.clone(), barrier.clone());
            let audit = !pools.is_empty();
            thread::spawn(move || {
                let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(20))
                    .expect("worker");
                w.set_retain(audit);
                if let Some((at, a)) = attack {
                    if at == (shard.stage, shard.replica) {
                        w.set_attack(Some(a));
                    }
                }
                let (mut losses, mut checks) = (Vec::new(), Vec::new());
                for step in 0..m.spec.training.steps {
                    let mut before = w.state();
                    losses.extend(w.train_step().expect("step").loss);
                    if !audit {
                        continue;
                    }
                    let report = w.contributions().cloned().expect("a robust rule reports");
                    let hashes = w.step_hashes().clone();
                    let evidence: std::collections::BTreeMap<u64, Evidence> = hashes
                        .keys()
                        .map(|&mb| (mb, w.evidence(mb).cloned().expect("evidence kept")))
                        .collect();
                    shared.lock().unwrap().insert(
                        (step, shard.stage, shard.replica),
                        (
                            evidence.clone(),
                            report.sent(),
                            w.committed_contribution().expect("committed"),
                        ),
                    );
                    barrier.wait();
                    let (state, kept) = (w.state(), before.clone());
                    for audited in (0..m.spec.pipeline.replicas).filter(|&r| r != shard.replica) {
                        let (theirs, sent, committed) = shared
                            .lock()
                            .unwrap()
                            .get(&(step, shard.stage, audited))
                            .cloned()
                            .expect("published");
                        let scope: Vec<u64> = theirs.keys().copied().collect();
                        let rank = (0..m.spec.pipeline.replicas)
                            .find(|&k| w.replica_of_rank(k) == Some(audited))
                            .expect("rank");
                        for &threads in &pools {
                            let mut again = || {
                                w.recompute_contribution(
                                    &mut before,
                                    step,
                                    audited,
                                    &scope,
                                    &theirs,
                                )
                            };
                            let recomputed = match threads {
                                0 => again(),
                                n => rayon::ThreadPoolBuilder::new()
                                    .num_threads(n)
                                    .build()
                                    .expect("pool")
                                    .install(again),
                            }
                            .expect("recompute the contribution");
                            checks.push(Recomputed {
                                stage: shard.stage,
                                validator: shard.replica,
                                audited,
                                step,
                                threads,
                                sent,
                                committed,
                                received: report.hashes[rank],
                                recomputed,
                            });
                        }
                    }
                    // Nothing of the validator's own state moved.
                    assert!(w.state() == state, "weights, moments and step unchanged");
                    assert!(before == kept, "the snapshot is unchanged");
                    assert!(
                        w.stage()
                            .params()
                            .iter()
                            .all(|p| p.grad.iter().all(|&g| g == 0.0)),
                        "gradients zero, as the step left them"
                    );
                    assert_eq!(w.stage().in_flight(), 0);
                    assert_eq!(w.step_hashes(), &hashes);
                    for (mb, e) in &evidence {
                        assert_eq!(w.evidence(*mb), Some(e));
                    }
                    assert_eq!(w.contributions(), Some(&report));
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

/// A 2-stage × 3-replica manifest with several micro-batches per replica.
fn audit_manifest(
    dir: &Path,
    rule: &str,
    schedule: pipewright_spec::ScheduleKind,
    recompute: pipewright_spec::Recompute,
) -> TrainingRun {
    let mut m = manifest(dir, 2, rule, false);
    m.spec.training.steps = 3;
    m.spec.training.micro_batches = 3;
    m.spec.pipeline.schedule = schedule;
    m.spec.training.recompute = recompute;
    m
}

/// Every replica recomputes every other replica's whole contribution at
/// every step, from its evidence and with its own snapshot: the hash is
/// the one that replica sent, bit for bit, under each schedule with
/// activations kept or recomputed; and the audits change nothing of the
/// validators' training (losses and final weights are a run's without
/// audits, bit for bit).
#[test]
fn a_recomputed_contribution_is_the_one_an_honest_replica_sent_and_changes_nothing() {
    use pipewright_spec::{Recompute, ScheduleKind};
    let dir = tempfile::tempdir().expect("tempdir");
    for (rule, schedule, recompute) in [
        ("median", ScheduleKind::OneFOneB, Recompute::Off),
        ("median", ScheduleKind::ZbH1, Recompute::Off),
        ("centeredClip", ScheduleKind::Gpipe, Recompute::Full),
        ("trimmedMean", ScheduleKind::ZbH1, Recompute::Full),
    ] {
        let m = audit_manifest(dir.path(), rule, schedule, recompute);
        let audited = audited_run(&m, &[0], None);
        let plain = audited_run(&m, &[], None);
        let checks: Vec<&Recomputed> = audited.iter().flat_map(|a| &a.checks).collect();
        // 3 steps × 2 stages × 3 validators × 2 audited replicas.
        assert_eq!(checks.len(), 36, "{rule} {schedule:?} {recompute:?}");
        for c in &checks {
            assert_ne!(c.validator, c.audited, "{c:?}");
            assert_eq!(
                c.recomputed, c.sent,
                "{rule} {schedule:?} {recompute:?}: {c:?}"
            );
            assert_eq!(c.received, c.sent, "{c:?}");
            assert_eq!(c.committed, c.sent, "{c:?}");
        }
        for (a, p) in audited.iter().zip(&plain) {
            assert_eq!(a.losses, p.losses, "losses with and without audits");
            assert!(a.params == p.params, "weights with and without audits");
        }
    }
}

/// A replica that sign-flips or scales its contribution (and commits to
/// what it sent) is not what its evidence recomputes to, from the first
/// attacked step on; every honest replica still recomputes to what it sent.
/// A `contribution-lie` replica commits to the honest contribution, which
/// its evidence recomputes to, but its peers received another.
#[test]
fn a_sign_flipped_or_scaled_contribution_does_not_recompute() {
    use pipewright_spec::{Recompute, ScheduleKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let m = audit_manifest(dir.path(), "median", ScheduleKind::OneFOneB, Recompute::Off);
    for (attack, at) in [
        ("sign-flip", (1, 2)),
        ("scale", (0, 0)),
        ("contribution-lie", (0, 1)),
    ] {
        let a: Attack = format!("{attack}@2").parse().expect("attack");
        let out = audited_run(&m, &[0], Some((at, a)));
        let checks: Vec<&Recomputed> = out.iter().flat_map(|a| &a.checks).collect();
        assert_eq!(checks.len(), 36);
        for c in checks {
            // Every peer received what the audited replica sent.
            assert_eq!(c.received, c.sent, "{attack}: {c:?}");
            let lies = (c.stage, c.audited) == at && c.step >= 1;
            assert_eq!(c.recomputed != c.sent, lies, "{attack}: {c:?}");
            if attack == "contribution-lie" {
                // It signs the honest contribution and sends another.
                assert_eq!(c.recomputed, c.committed, "{attack}: {c:?}");
                assert_eq!(c.committed != c.sent, lies, "{attack}: {c:?}");
            } else {
                assert_eq!(c.committed, c.sent, "{attack}: {c:?}");
            }
        }
    }
}

/// A contribution recomputed on rayon pools of 1, 2 and 3 threads has the
/// same bits as the one the replica computed in its step (on the default
/// pool), on a model large enough that the matrix products, the weight
/// gradients' included, split their work over threads.
#[test]
fn a_recomputed_contribution_is_bitwise_the_same_on_any_thread_count() {
    use pipewright_spec::{Recompute, ScheduleKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = audit_manifest(dir.path(), "median", ScheduleKind::ZbH1, Recompute::Off);
    m.spec.model.dim = 128;
    m.spec.model.ffn_dim = 384;
    m.spec.model.seq_len = 64;
    m.spec.training.micro_batch_size = 8;
    m.spec.training.micro_batches = 2;
    m.spec.training.steps = 1;
    let out = audited_run(&m, &[1, 2, 3], None);
    let checks: Vec<&Recomputed> = out.iter().flat_map(|a| &a.checks).collect();
    // 2 stages × 3 validators × 2 audited replicas × 3 pools.
    assert_eq!(checks.len(), 36);
    for c in checks {
        assert_eq!(c.recomputed, c.sent, "{} threads: {c:?}", c.threads);
    }
}

/// A recomputation that cannot be right is refused, naming why, and
/// leaves the validator as it was: a micro-batch the audited replica does
/// not run or one listed twice, evidence of other micro-batches, a replica
/// outside the stage, a step this worker did not just complete, and any
/// contribution under `mean`.
#[test]
fn impossible_contribution_recomputations_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = manifest(dir.path(), 1, "median", false);
    m.spec.training.steps = 1;
    let mut mean = m.clone();
    mean.spec.pipeline.aggregation = pipewright_spec::Aggregation::Mean;
    for m in [m, mean] {
        let robust = m.spec.pipeline.aggregation != pipewright_spec::Aggregation::Mean;
        let layout = loopback_layout(1, 3, false, false).expect("bind");
        let auth = Auth {
            run_id: RunId([8; 16]),
            key: RunKey([3; 32]),
        };
        let handles: Vec<_> = layout
            .into_iter()
            .map(|(shard, peers)| {
                let (m, auth) = (m.clone(), auth.clone());
                thread::spawn(move || {
                    let mut w = StageWorker::new(&m, shard, peers, auth, Duration::from_secs(20))
                        .expect("worker");
                    w.set_retain(true);
                    let mut before = w.state();
                    w.train_step().expect("step");
                    let state = w.state();
                    // Replica 1 runs micro-batches 2 and 3 of the step (2 each).
                    let evidence = |mbs: &[u64]| {
                        mbs.iter()
                            .map(|&mb| (mb, Evidence::default()))
                            .collect::<std::collections::BTreeMap<_, _>>()
                    };
                    let mut refusal = |replica, step, scope: &[u64], held: &[u64]| {
                        w.recompute_contribution(&mut before, step, replica, scope, &evidence(held))
                            .expect_err("refused")
                            .to_string()
                    };
                    let cases = [
                        (1, 0, vec![2, 4], vec![2, 4], "runs no micro-batch 4"),
                        (1, 0, vec![2, 2], vec![2], "listed twice"),
                        (1, 0, vec![2, 3], vec![2], "not the audited ones"),
                        (1, 0, vec![2], vec![2, 3], "not the audited ones"),
                        (3, 0, vec![2], vec![2], "outside the stage"),
                        (1, 1, vec![2, 3], vec![2, 3], "cannot recompute step 2"),
                    ];
                    let mut said = Vec::new();
                    for (replica, step, scope, held, why) in cases {
                        let e = refusal(replica, step, &scope, &held);
                        said.push((e, if robust { why } else { "mean" }));
                    }
                    let ok =
                        w.recompute_contribution(&mut before, 0, 1, &[2, 3], &evidence(&[2, 3]));
                    assert_eq!(ok.is_ok(), robust, "{ok:?}");
                    assert!(w.state() == state, "nothing moved");
                    let _ = w.finish();
                    said
                })
            })
            .collect();
        for h in handles {
            for (e, why) in h.join().expect("worker thread") {
                assert!(e.contains(why), "{e} (expected {why:?})");
            }
        }
    }
}
