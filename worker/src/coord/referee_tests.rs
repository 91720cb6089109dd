//! The coordinator as the validator of stages with one training replica,
//! and the digest of the initial parameters at the first step, through the
//! state machine: a model of workers whose payloads, parameters and
//! recomputations are made-up bytes and hashes that chain stage to stage
//! as real ones do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::{CoordError, Coordinator, RefereeResult};
use crate::coord::api::{
    audit_message, AuditClaim, AuditOrder, AuditReport, AuditResult, AuditRole, Barrier,
    Commitment, MicroBatchCommit, StepDone,
};
use crate::coord::test_support::{hash, layout, seat_all, LEASE};
use crate::identity::{Identity, AUDIT_DOMAIN};
use crate::pipeline::Evidence;

const MAX: usize = 1 << 20;
const RUN_ID: &str = "00112233445566778899aabbccddeeff";

fn raw(h: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    hex::decode_to_slice(h, &mut b).expect("64 hex digits");
    b
}

/// The digest of stage `s`'s parameters after `step` steps (step 0: the
/// initial ones), as every honest worker holds them.
fn params(s: usize, step: u64) -> String {
    hash(format!("stage {s} parameters after {step}").as_bytes())
}

/// The digest of stage `s`'s optimizer moments after `step` steps.
fn moments(s: usize, step: u64) -> String {
    hash(format!("stage {s} moments after {step}").as_bytes())
}

/// The digest of the gradient stage `s`'s update of `step` applied.
fn applied(s: usize, step: u64) -> String {
    hash(format!("stage {s} gradient applied at {step}").as_bytes())
}

/// What the workers of a run do: honest, except those named.
#[derive(Clone, Default)]
struct World {
    stages: usize,
    /// Shard (stage, replica) whose forward output is junk (committed as
    /// sent).
    cheat: Option<(usize, usize)>,
    /// Worker ids that upload parameters other than those they committed
    /// to.
    bad_weights: Vec<u64>,
    /// Worker ids that never upload their parameters.
    no_weights: Vec<u64>,
    /// Worker ids that never upload their evidence.
    no_evidence: Vec<u64>,
    /// The coordinator cannot rebuild the stage (its recomputation fails).
    cannot_build: bool,
    /// Worker ids whose optimizer update, replayed, does not give the
    /// digests they committed to (a skipped or altered update).
    wrong_update: Vec<u64>,
    /// Worker ids whose reports commit to no update.
    no_update: Vec<u64>,
}

impl World {
    /// The bytes stage `s` sends forward for `m` (the loss's on the last).
    fn sent(&self, s: usize, m: u64) -> Vec<u8> {
        // Two micro-batches per replica, in lanes.
        if self.cheat == Some((s, (m / 2) as usize)) {
            return format!("junk of stage {s} for {m}").into_bytes();
        }
        self.honest_output(s, m, &self.input_hash(s, m))
    }

    fn honest_output(&self, s: usize, m: u64, input: &str) -> Vec<u8> {
        format!("output of stage {s} for {m} from {input}").into_bytes()
    }

    /// The hash of what stage `s` received for `m` (its tokens on stage 0).
    fn input_hash(&self, s: usize, m: u64) -> String {
        if s == 0 {
            hash(format!("tokens {m}").as_bytes())
        } else {
            hash(&self.sent(s - 1, m))
        }
    }

    /// The gradient stage `s` sends back for `m` from `input` (zeros on
    /// stage 0, which sends none).
    fn gradient(&self, s: usize, m: u64, input: &str) -> String {
        if s == 0 {
            "0".repeat(64)
        } else {
            hash(&self.gradient_bytes(s, m, input))
        }
    }

    fn gradient_bytes(&self, s: usize, m: u64, input: &str) -> Vec<u8> {
        format!("gradient of stage {s} for {m} from {input}").into_bytes()
    }

    /// An honest recomputation of (`s`, `m`) from the input hashing to
    /// `input`: input, output and gradient hashes.
    fn recompute(&self, s: usize, m: u64, input: &str) -> [String; 3] {
        [
            input.to_string(),
            hash(&self.honest_output(s, m, input)),
            self.gradient(s, m, input),
        ]
    }

    fn report(&self, c: &Coordinator, worker: u64, epoch: u64, step: u64) -> StepDone {
        let (_, (s, _)) = c.identity_of(worker).expect("a worker with a slot");
        let micro_batches = c
            .routed_to(worker)
            .into_iter()
            .map(|m| {
                let input = self.input_hash(s, m);
                MicroBatchCommit {
                    mb: m,
                    output: hash(&self.sent(s, m)),
                    gradient: self.gradient(s, m, &input),
                    input,
                }
            })
            .collect();
        StepDone {
            commitment: Some(Commitment {
                micro_batches,
                params: Some(params(s, step)),
                moments: (!self.no_update.contains(&worker)).then(|| moments(s, step)),
                applied: (!self.no_update.contains(&worker)).then(|| applied(s, step)),
                ..Commitment::default()
            }),
            suspects: Vec::new(),
            worker,
            epoch,
            completed: step,
            loss: (s + 1 == self.stages).then_some(2.0),
            grad_norm: 1.0,
            seconds: 0.1,
            busy_seconds: 0.08,
            update_seconds: 0.01,
            link_bytes: 0,
            rejected_frames: 0,
            micro_batches: 2,
        }
    }

    /// The evidence shard (`s`, any replica) holds of `m`.
    fn evidence(&self, s: usize, m: u64) -> Evidence {
        let last = s + 1 == self.stages;
        Evidence {
            input: (s > 0).then(|| self.sent(s - 1, m)),
            targets: (s > 0).then(|| format!("targets {m}").into_bytes()),
            gradient: (!last).then(|| {
                let down = hash(&self.sent(s, m));
                self.gradient_bytes(s + 1, m, &down)
            }),
        }
    }

    /// Carries out one order of `worker`; `false` when it does not (yet).
    fn carry_out(
        &self,
        c: &mut Coordinator,
        keys: &BTreeMap<u64, Identity>,
        worker: u64,
        epoch: u64,
        o: &AuditOrder,
        now: Instant,
    ) -> bool {
        let provided = AuditReport {
            worker,
            epoch,
            completed: o.step,
            audit: o.audit,
            result: AuditResult::Provided,
        };
        match &o.role {
            AuditRole::Provide => {
                if self.no_evidence.contains(&worker) {
                    return false;
                }
                // With the update replayed, the whole step's evidence.
                let bytes = match &o.contribution {
                    Some(scope) => {
                        let set: BTreeMap<u64, Evidence> = scope
                            .micro_batches
                            .iter()
                            .map(|&m| (m, self.evidence(o.stage, m)))
                            .collect();
                        Evidence::encode_set(&set).expect("encode")
                    }
                    None => self.evidence(o.stage, o.mb).encode().expect("encode"),
                };
                c.put_evidence(worker, o.audit, bytes, MAX, now)
                    .expect("matching evidence");
                let _ = c.audit_report(&provided, RUN_ID, now);
                true
            }
            AuditRole::Weights | AuditRole::Update => {
                if self.no_weights.contains(&worker) {
                    return false;
                }
                self.upload_weights(c, worker, o, now);
                let _ = c.audit_report(&provided, RUN_ID, now);
                true
            }
            AuditRole::Validate { audited_replica } => {
                let Some(bytes) = c.evidence_for(worker, o.audit).expect("a validator") else {
                    return false;
                };
                let ev = Evidence::decode(&bytes, MAX).expect("evidence");
                let input = match &ev.input {
                    Some(b) => hash(b),
                    None => hash(format!("tokens {}", o.mb).as_bytes()),
                };
                let [input, output, gradient] = self.recompute(o.stage, o.mb, &input);
                let message = audit_message(&AuditClaim {
                    run_id: RUN_ID,
                    audit: o.audit,
                    step: o.step,
                    stage: o.stage,
                    mb: o.mb,
                    audited_replica: *audited_replica,
                    input: &input,
                    output: &output,
                    gradient: &gradient,
                });
                let report = AuditReport {
                    worker,
                    epoch,
                    completed: o.step,
                    audit: o.audit,
                    result: AuditResult::Recomputed {
                        signature: keys[&worker].sign(AUDIT_DOMAIN, &message),
                        output,
                        gradient,
                        input,
                    },
                };
                let _ = c.audit_report(&report, RUN_ID, now);
                true
            }
        }
    }

    /// `worker` uploads its parameters of before step `o.step`, and the
    /// coordinator does what its server does with them: refuses those
    /// whose digest is not the agreed one, else recomputes honestly from
    /// the evidence it holds.
    fn upload_weights(&self, c: &mut Coordinator, worker: u64, o: &AuditOrder, now: Instant) {
        let Some(job) = c.referee_job(worker, o.audit).expect("an uploader") else {
            return;
        };
        assert_eq!((job.step, job.stage, job.mb), (o.step, o.stage, o.mb));
        let digest = if self.bad_weights.contains(&worker) {
            hash(b"parameters of another run")
        } else {
            params(o.stage, o.step - 1)
        };
        let result = if digest != hex::encode(job.digest) {
            RefereeResult::BadWeights(format!("they digest to {}", &digest[..16]))
        } else if self.cannot_build {
            RefereeResult::Failed("the corpus is unreadable here".into())
        } else {
            let ev = match &job.whole_step {
                Some(all) => {
                    assert!(job.update.is_some(), "the whole step with the update");
                    let mut set =
                        Evidence::decode_set(&job.evidence, MAX * all.micro_batches.len())
                            .expect("a set");
                    assert_eq!(set.keys().copied().collect::<Vec<_>>(), all.micro_batches);
                    set.remove(&job.mb).expect("the audited micro-batch")
                }
                None => Evidence::decode(&job.evidence, MAX).expect("evidence"),
            };
            let input = match &ev.input {
                Some(b) => hash(b),
                None => hash(format!("tokens {}", job.mb).as_bytes()),
            };
            let [i, out, g] = self.recompute(job.stage, job.mb, &input);
            let hashes = [raw(&i), raw(&out), raw(&g)];
            match &job.update {
                // The update the worker committed to, replayed.
                Some(u) => {
                    let (s, t) = (job.stage, job.step);
                    let before = (t > 1).then(|| raw(&moments(s, t - 1)));
                    assert_eq!(u.moments_before, before, "the moments of before the step");
                    assert_eq!(u.applied, raw(&applied(s, t)));
                    assert_eq!(u.params_after, raw(&params(s, t)));
                    assert_eq!(u.moments_after, raw(&moments(s, t)));
                    // The norm the other stage reported; alone, none.
                    let other = (self.stages > 1).then_some(1.0);
                    assert_eq!(u.grad_norm, other);
                    if self.wrong_update.contains(&worker) {
                        RefereeResult::WrongUpdate(
                            hashes,
                            "its parameters after the step digest to another value".into(),
                        )
                    } else {
                        RefereeResult::Hashes(hashes)
                    }
                }
                None => RefereeResult::Hashes(hashes),
            }
        };
        let _ = c.referee_done(worker, o.audit, result, 0.02, now);
    }
}

/// A coordinator of `stages` × `replicas` auditing every shard at every
/// step with itself as validator, every shard registered under a real
/// identity (ids stage major, and their keys); with `initial`, it knows the
/// digest of each stage's initial parameters, and counts how often it
/// computes one.
fn setup(
    stages: usize,
    replicas: usize,
    secret: [u8; 32],
    initial: Option<Arc<AtomicUsize>>,
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>) {
    let mut c = Coordinator::new("t", layout(stages, replicas), LEASE, None, None)
        .with_audit_rate(1.0)
        .with_audit_secret(secret)
        .with_coordinator_validator(true);
    if let Some(calls) = initial {
        c = c.with_initial_digests(Box::new(
            move |stage: usize, layers: std::ops::Range<usize>| {
                assert_eq!(layers, stage..stage + 1, "the stage's layers");
                calls.fetch_add(1, Ordering::SeqCst);
                Some(raw(&params(stage, 0)))
            },
        ));
    }
    let (ids, keys) = seat_all(&mut c, 40, now);
    (c, ids, keys)
}

/// Each worker's last answer, and every order carried out.
type Driven = (BTreeMap<u64, Option<Barrier>>, Vec<(u64, AuditOrder)>);

/// Every worker of `ids` reports `step`; then the orders the barrier gives
/// are carried out until no worker carries out a new one.
fn drive(
    c: &mut Coordinator,
    w: &World,
    ids: &[u64],
    keys: &BTreeMap<u64, Identity>,
    step: u64,
    now: Instant,
) -> Driven {
    let epoch = c.epoch();
    for &id in ids {
        let d = w.report(c, id, epoch, step);
        c.step_done(&d, now).expect("step report");
    }
    let mut all: Vec<(u64, AuditOrder)> = Vec::new();
    for _ in 0..20 {
        let mut answers = BTreeMap::new();
        let mut busy = false;
        for &id in ids {
            let b = c.barrier(id, epoch, step, now);
            for o in b.iter().flat_map(|b| &b.audits) {
                if all.iter().any(|(x, p)| *x == id && p == o) {
                    continue;
                }
                if w.carry_out(c, keys, id, epoch, o, now) {
                    busy = true;
                    all.push((id, o.clone()));
                }
            }
            answers.insert(id, b);
        }
        if !busy {
            return (answers, all);
        }
    }
    panic!("the audits never settled: {all:?}");
}

fn world(stages: usize) -> World {
    World {
        stages,
        ..World::default()
    }
}

fn roles(orders: &[(u64, AuditOrder)], role: &AuditRole) -> Vec<(u64, usize)> {
    orders
        .iter()
        .filter(|(_, o)| o.role == *role)
        .map(|(w, o)| (*w, o.stage))
        .collect()
}

fn proceeds(answers: &BTreeMap<u64, Option<Barrier>>) -> bool {
    answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed))
}

#[test]
fn stages_of_one_replica_are_audited_by_the_coordinator_and_honest_work_passes() {
    let now = Instant::now();
    let calls = Arc::new(AtomicUsize::new(0));
    let (mut c, ids, keys) = setup(2, 1, [21; 32], Some(calls.clone()), now);
    let w = world(2);
    for step in 1..=3 {
        let (answers, orders) = drive(&mut c, &w, &ids, &keys, step, now);
        assert!(proceeds(&answers), "step {step}: {orders:?}");
        assert_eq!(c.committed(), step);
        // Each worker provides its evidence and its parameters; nobody
        // else validates.
        assert_eq!(
            roles(&orders, &AuditRole::Provide),
            vec![(ids[0], 0), (ids[1], 1)]
        );
        // With its update, which the coordinator replays.
        assert_eq!(
            roles(&orders, &AuditRole::Update),
            vec![(ids[0], 0), (ids[1], 1)]
        );
        assert!(orders
            .iter()
            .all(|(_, o)| !matches!(o.role, AuditRole::Validate { .. })));
    }
    for stage in 0..2 {
        assert_eq!(c.audit_outcomes().get(&(stage, "passed")), Some(&3));
        assert_eq!(
            c.coordinator_recomputations().get(&(stage, "passed")),
            Some(&3)
        );
    }
    assert_eq!(c.coordinator_recompute_seconds().0, 6);
    assert!(c.convictions().is_empty() && c.refused().is_empty());
    // The initial digests were computed once per stage, for step 1.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn a_dishonest_sole_replica_is_convicted_by_the_coordinator_alone() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 1, [22; 32], Some(Arc::default()), now);
    let mut w = world(2);
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(proceeds(&answers));
    // From step 2 on, stage 0 sends junk it commits to; stage 1 receives
    // it and commits to it, so the chain holds.
    w.cheat = Some((0, 0));
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 2, now);
    assert!(answers[&ids[1]].as_ref().is_some_and(|b| !b.proceed));
    assert_eq!(c.committed(), 1, "the step is not booked");
    assert_eq!(c.audit_outcomes().get(&(0, "failed")), Some(&1));
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!((convictions[0].worker, convictions[0].step), (ids[0], 2));
    assert_eq!(convictions[0].reason, "failed_audit");
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["validator"], "coordinator", "{evidence}");
    assert_eq!(evidence["validators"], serde_json::json!([]), "{evidence}");
    assert_ne!(evidence["coordinator"], evidence["committed"], "{evidence}");
    assert!(matches!(
        c.heartbeat(ids[0], now),
        Err(CoordError::Quarantined(_))
    ));
    assert!(c.heartbeat(ids[1], now).is_ok(), "stage 1 keeps its slot");
}

#[test]
fn parameters_not_matching_the_workers_own_digest_are_refused_and_convict_at_the_deadline() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(1, 1, [23; 32], Some(Arc::default()), now);
    let mut w = world(1);
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(proceeds(&answers));
    w.bad_weights = vec![ids[0]];
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, 2, now);
    assert!(answers[&ids[0]].is_none(), "waiting for its parameters");
    // One upload, refused, counted, and not ordered again.
    assert_eq!(roles(&orders, &AuditRole::Update), vec![(ids[0], 0)]);
    assert_eq!(c.refused().get("bad_weights"), Some(&1));
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "refused_weights")),
        Some(&1)
    );
    assert!(c.convictions().is_empty(), "not before the deadline");
    let later = now + c.audit_deadline() + Duration::from_secs(1);
    assert!(matches!(
        c.barrier(ids[0], c.epoch(), 2, later),
        None | Some(Barrier { proceed: false, .. })
    ));
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].reason, "bad_weights");
    assert_eq!(c.committed(), 1);
}

#[test]
fn a_silent_sole_replica_is_convicted_at_the_deadline() {
    for silent in ["parameters", "evidence"] {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(2, 1, [24; 32], Some(Arc::default()), now);
        let mut w = world(2);
        match silent {
            "parameters" => w.no_weights = vec![ids[1]],
            _ => w.no_evidence = vec![ids[1]],
        }
        let (answers, _) = drive(&mut c, &w, &ids, &keys, 1, now);
        assert!(answers[&ids[0]].is_none(), "{silent}: the step waits");
        let e = c.epoch();
        let early = now + c.audit_deadline() / 2;
        assert!(c.barrier(ids[0], e, 1, early).is_none(), "{silent}");
        assert!(c.convictions().is_empty(), "{silent}");
        let later = now + c.audit_deadline() + Duration::from_secs(1);
        assert!(matches!(
            c.barrier(ids[0], e, 1, later),
            None | Some(Barrier { proceed: false, .. })
        ));
        let convictions = c.convictions();
        assert_eq!(convictions.len(), 1, "{silent}");
        assert_eq!(convictions[0].worker, ids[1], "{silent}");
        let reason = match silent {
            "parameters" => "bad_weights",
            _ => "bad_evidence",
        };
        assert_eq!(convictions[0].reason, reason);
        assert_eq!(c.committed(), 0, "{silent}");
        assert!(c.heartbeat(ids[0], later).is_ok(), "{silent}");
    }
}

#[test]
fn the_first_step_is_decided_with_the_digest_of_the_initial_parameters() {
    // One replica: the cheat of step 1 is convicted.
    let now = Instant::now();
    let calls = Arc::new(AtomicUsize::new(0));
    let (mut c, ids, keys) = setup(1, 1, [25; 32], Some(calls.clone()), now);
    let mut w = world(1);
    w.cheat = Some((0, 0));
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(
        answers[&ids[0]].as_ref().is_none_or(|b| !b.proceed),
        "the step is not booked: {answers:?}"
    );
    assert_eq!(c.committed(), 0);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(
        (convictions[0].step, convictions[0].reason.as_str()),
        (1, "failed_audit")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Two replicas: a dispute at step 1 is refereed, not unconfirmed.
    let (mut c, ids, keys) = setup(1, 2, [26; 32], Some(Arc::default()), now);
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_none_or(|b| !b.proceed)));
    assert!(
        !roles(&orders, &AuditRole::Weights).is_empty(),
        "{orders:?}"
    );
    assert_eq!(c.audit_outcomes().get(&(0, "unconfirmed")), None);
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    assert_eq!(c.convictions().len(), 1);

    // Without the initial digest, a one-replica stage is not audited at
    // step 1 (nothing to accept parameters against), and is from step 2 on.
    let (mut c, ids, keys) = setup(1, 1, [27; 32], None, now);
    let w = world(1);
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(proceeds(&answers) && orders.is_empty(), "{orders:?}");
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, 2, now);
    assert!(proceeds(&answers));
    assert_eq!(roles(&orders, &AuditRole::Update), vec![(ids[0], 0)]);
    assert_eq!(c.audit_outcomes().get(&(0, "passed")), Some(&1));
}

#[test]
fn a_sole_replica_whose_update_does_not_replay_is_convicted() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 1, [30; 32], Some(Arc::default()), now);
    let mut w = world(2);
    for step in 1..=2 {
        let (answers, _) = drive(&mut c, &w, &ids, &keys, step, now);
        assert!(proceeds(&answers), "step {step}");
    }
    // Stage 1's worker skips (or alters) its update of step 3: its
    // forward and backward are honest, its update does not replay.
    w.wrong_update = vec![ids[1]];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 3, now);
    assert!(answers[&ids[0]].as_ref().is_some_and(|b| !b.proceed));
    assert_eq!(c.committed(), 2, "the step is not booked");
    assert_eq!(c.audit_outcomes().get(&(1, "failed")), Some(&1));
    assert_eq!(c.audit_outcomes().get(&(0, "passed")), Some(&3));
    assert_eq!(
        c.coordinator_recomputations().get(&(1, "wrong_update")),
        Some(&1)
    );
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!((convictions[0].worker, convictions[0].step), (ids[1], 3));
    assert_eq!(convictions[0].reason, "wrong_update");
    assert_eq!(c.refused().get("wrong_update"), Some(&1));
    assert!(matches!(
        c.heartbeat(ids[1], now),
        Err(CoordError::Quarantined(_))
    ));
    assert!(c.heartbeat(ids[0], now).is_ok(), "stage 0 keeps its slot");
}

#[test]
fn a_sole_replica_must_commit_to_its_update() {
    let now = Instant::now();
    // One replica per stage, audited by the coordinator: a report without
    // its update's digests is refused.
    let (mut c, ids, _) = setup(2, 1, [31; 32], Some(Arc::default()), now);
    let w = World {
        no_update: vec![ids[0]],
        ..world(2)
    };
    let d = w.report(&c, ids[0], c.epoch(), 1);
    let e = c.step_done(&d, now).unwrap_err().to_string();
    assert!(e.contains("commitment.moments"), "{e}");
    assert_eq!(c.refused().get("malformed_digest"), Some(&1));
    // A digest that is not one is refused too.
    let mut d = world(2).report(&c, ids[0], c.epoch(), 1);
    if let Some(cm) = d.commitment.as_mut() {
        cm.applied = Some("xyz".into());
    }
    assert!(c.step_done(&d, now).is_err());
    assert_eq!(c.refused().get("malformed_digest"), Some(&2));
    // Two replicas compare digests instead: no update is asked for.
    let (mut c, ids, _) = setup(2, 2, [32; 32], Some(Arc::default()), now);
    let w = World {
        no_update: ids.clone(),
        ..world(2)
    };
    let d = w.report(&c, ids[0], c.epoch(), 1);
    c.step_done(&d, now).expect("accepted");
    // Nor without audits.
    let (c, ids, _) = setup(2, 1, [33; 32], Some(Arc::default()), now);
    let mut c = c.with_audit_rate(0.0);
    let w = World {
        no_update: ids.clone(),
        ..world(2)
    };
    let d = w.report(&c, ids[0], c.epoch(), 1);
    c.step_done(&d, now).expect("accepted");
}

#[test]
fn a_recomputation_the_coordinator_cannot_make_leaves_the_step_unchecked() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(1, 1, [28; 32], Some(Arc::default()), now);
    let mut w = world(1);
    w.cannot_build = true;
    let (answers, _) = drive(&mut c, &w, &ids, &keys, 1, now);
    assert!(proceeds(&answers), "nothing disputes the commitment");
    assert_eq!(c.committed(), 1);
    assert_eq!(c.coordinator_recomputations().get(&(0, "failed")), Some(&1));
    assert!(c.audit_outcomes().is_empty(), "{:?}", c.audit_outcomes());
    assert!(c.convictions().is_empty());
    assert!(c
        .history(now, 0.0)
        .events
        .iter()
        .any(|ev| ev.text.contains("unchecked")));
}

#[test]
fn without_the_coordinator_as_validator_one_replica_stages_are_not_audited() {
    let now = Instant::now();
    let (c, ids, keys) = setup(2, 1, [29; 32], Some(Arc::default()), now);
    let mut c = c.with_coordinator_validator(false);
    let (answers, orders) = drive(&mut c, &world(2), &ids, &keys, 1, now);
    assert!(proceeds(&answers) && orders.is_empty(), "{orders:?}");
}
