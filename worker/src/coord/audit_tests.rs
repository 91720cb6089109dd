//! Audits through the state machine, with a model of what honest and
//! dishonest workers compute and commit to: hashes of made-up payloads
//! that chain stage to stage as real activations do.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::super::{CoordError, Coordinator, RefereeResult};
use crate::coord::api::{
    audit_message, AuditClaim, AuditOrder, AuditReport, AuditResult, AuditRole, Barrier,
    Commitment, MicroBatchCommit, StepDone,
};
use crate::coord::test_support::{hash, layout, register, seat_all, LEASE};
use crate::identity::{Identity, AUDIT_DOMAIN};
use crate::pipeline::Evidence;

const MAX: usize = 1 << 20;
const RUN_ID: &str = "0123456789abcdef0123456789abcdef";

fn zeros() -> String {
    "0".repeat(64)
}

/// What the workers of a run do: honest, except a shard that sends junk
/// forward (and commits to it, as it went on the wire), a validator that
/// lies, and a provider that uploads other bytes.
#[derive(Clone, Default)]
struct World {
    stages: usize,
    /// (stage, replica) whose forward outputs are junk.
    cheat: Option<(usize, usize)>,
    /// Worker ids that report made-up verdicts.
    liars: Vec<u64>,
    /// Worker ids that upload evidence not matching their commitment.
    forgers: Vec<u64>,
    /// Worker ids that never carry out a validation order.
    silent: Vec<u64>,
    /// Worker ids whose committed input differs from what was sent them.
    misreport_input: Vec<u64>,
    /// (stage, replica) whose gradient contribution is corrupted (as a
    /// sign flip is) and committed as sent.
    flip: Option<(usize, usize)>,
    /// (stage, replica) that commits its honest contribution and sends a
    /// corrupted one.
    send_lie: Option<(usize, usize)>,
    /// Worker ids that, as contribution validators, say they received a
    /// contribution other than the one sent them, with no proof.
    receipt_liars: Vec<u64>,
    /// Suspicions reported: (reporting worker, suspected replica, reason).
    suspects: Vec<(u64, usize, &'static str)>,
    /// Worker ids that upload an evidence set lacking a micro-batch.
    short_sets: Vec<u64>,
    /// Reports commit to a digest of the stage's parameters after the
    /// step (the same on every replica).
    params: bool,
    /// Worker ids that upload parameters other than the agreed ones when
    /// the coordinator recomputes a disputed micro-batch.
    bad_weights: Vec<u64>,
}

impl World {
    fn replica_of(&self, c: &Coordinator, stage: usize, mb: u64) -> usize {
        c.current_route().replica(stage, mb)
    }

    /// The bytes stage `s` sends forward for micro-batch `m` (the loss's
    /// on the last stage).
    fn sent(&self, c: &Coordinator, s: usize, m: u64) -> Vec<u8> {
        if self.cheat == Some((s, self.replica_of(c, s, m))) {
            return format!("junk {s} {m}").into_bytes();
        }
        self.honest_output(s, m, &self.input_hash(c, s, m))
    }

    /// The hash of what stage `s` received for `m` (its tokens on stage 0).
    fn input_hash(&self, c: &Coordinator, s: usize, m: u64) -> String {
        if s == 0 {
            hash(format!("tokens {m}").as_bytes())
        } else {
            hash(&self.sent(c, s - 1, m))
        }
    }

    fn honest_output(&self, s: usize, m: u64, input: &str) -> Vec<u8> {
        if s + 1 == self.stages {
            format!("loss {m} of {input}").into_bytes()
        } else {
            format!("act {s} {m} of {input}").into_bytes()
        }
    }

    /// The bytes stage `s` sends back for `m` (none on stage 0).
    fn gradient(&self, s: usize, m: u64, input: &str) -> Option<Vec<u8>> {
        (s > 0).then(|| format!("grad {s} {m} of {input}").into_bytes())
    }

    /// What an honest recomputation of (`s`, `m`) from `input` gives.
    fn recompute(&self, s: usize, m: u64, input: &str) -> (String, String, String) {
        let output = hash(&self.honest_output(s, m, input));
        let gradient = self.gradient(s, m, input).map_or_else(zeros, |g| hash(&g));
        (input.to_string(), output, gradient)
    }

    fn commit(&self, c: &Coordinator, worker: u64, s: usize, m: u64) -> MicroBatchCommit {
        let input = self.input_hash(c, s, m);
        let gradient = self.gradient(s, m, &input).map_or_else(zeros, |g| hash(&g));
        MicroBatchCommit {
            mb: m,
            input: if self.misreport_input.contains(&worker) {
                hash(b"something else")
            } else {
                input.clone()
            },
            output: hash(&self.sent(c, s, m)),
            gradient,
        }
    }

    /// The contribution a replica of stage `s` computes from `inputs`, the
    /// hashes of its micro-batches' inputs in its commitment's order.
    fn honest_contribution(&self, s: usize, inputs: &[String]) -> String {
        hash(format!("contribution {s} of {}", inputs.join(",")).as_bytes())
    }

    /// What shard (`s`, `r`) commits as its contribution, and what it
    /// sends its ring neighbours.
    fn contribution(&self, c: &Coordinator, s: usize, r: usize, mbs: &[u64]) -> (String, String) {
        let inputs: Vec<String> = mbs.iter().map(|&m| self.input_hash(c, s, m)).collect();
        let honest = self.honest_contribution(s, &inputs);
        let corrupted = hex::encode(crate::sync::contribution::contribution_hash([
            corrupted_contribution(s, r).as_slice(),
        ]));
        if self.flip == Some((s, r)) {
            (corrupted.clone(), corrupted)
        } else if self.send_lie == Some((s, r)) {
            (honest, corrupted)
        } else {
            (honest.clone(), honest)
        }
    }

    fn report(&self, c: &Coordinator, worker: u64, epoch: u64, step: u64) -> StepDone {
        let (_, (s, r)) = c.identity_of(worker).expect("a worker with a slot");
        let mbs = c.routed_to(worker);
        let commitment = Commitment {
            micro_batches: mbs.iter().map(|&m| self.commit(c, worker, s, m)).collect(),
            signature: String::new(),
            params: self
                .params
                .then(|| hash(format!("params of stage {s} after step {step}").as_bytes())),
            contribution: Some(self.contribution(c, s, r, &mbs).0),
            moments: None,
            applied: None,
        };
        StepDone {
            commitment: Some(commitment),
            suspects: self
                .suspects
                .iter()
                .filter(|x| x.0 == worker)
                .map(|&(_, replica, reason)| crate::coord::api::SuspectReport {
                    replica,
                    reason: reason.into(),
                })
                .collect(),
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

    /// The evidence the provider of (`s`, `m`) holds.
    fn evidence(&self, c: &Coordinator, s: usize, m: u64) -> Evidence {
        let last = s + 1 == self.stages;
        Evidence {
            input: (s > 0).then(|| self.sent(c, s - 1, m)),
            targets: (s > 0).then(|| format!("targets {m}").into_bytes()),
            gradient: (!last)
                .then(|| {
                    let down = hash(&self.sent(c, s, m));
                    self.gradient(s + 1, m, &down)
                })
                .flatten(),
        }
    }

    /// Carries out one order of `worker`; `false` when it cannot yet (the
    /// evidence to recompute from is not there: a worker would poll).
    fn carry_out(
        &self,
        c: &mut Coordinator,
        keys: &BTreeMap<u64, Identity>,
        worker: u64,
        epoch: u64,
        o: &AuditOrder,
        now: Instant,
    ) -> bool {
        let parameters = matches!(o.role, AuditRole::Weights | AuditRole::Update);
        if let (Some(scope), false) = (&o.contribution, parameters) {
            return self.carry_out_contribution(
                c,
                keys,
                worker,
                epoch,
                o,
                &scope.micro_batches,
                now,
            );
        }
        match &o.role {
            AuditRole::Provide => {
                let bytes = if self.forgers.contains(&worker) {
                    Evidence {
                        input: Some(b"forged".to_vec()),
                        targets: Some(b"forged".to_vec()),
                        gradient: Some(b"forged".to_vec()),
                    }
                    .encode()
                    .expect("encode")
                } else {
                    self.evidence(c, o.stage, o.mb).encode().expect("encode")
                };
                let _ = c.put_evidence(worker, o.audit, bytes, MAX, now);
                let _ = c.audit_report(
                    &AuditReport {
                        worker,
                        epoch,
                        completed: o.step,
                        audit: o.audit,
                        result: AuditResult::Provided,
                    },
                    RUN_ID,
                    now,
                );
                true
            }
            AuditRole::Validate { audited_replica } => {
                if self.silent.contains(&worker) {
                    return true;
                }
                let Some(bytes) = c
                    .evidence_for(worker, o.audit)
                    .expect("a validator may read")
                else {
                    return false;
                };
                let ev = Evidence::decode(&bytes, MAX).expect("evidence");
                let input = match &ev.input {
                    Some(b) => hash(b),
                    None => hash(format!("tokens {}", o.mb).as_bytes()),
                };
                let (input, mut output, gradient) = self.recompute(o.stage, o.mb, &input);
                if self.liars.contains(&worker) {
                    output = hash(b"a lie");
                }
                let report = signed(
                    &keys[&worker],
                    worker,
                    epoch,
                    o,
                    *audited_replica,
                    [&input, &output, &gradient],
                );
                let _ = c.audit_report(&report, RUN_ID, now);
                true
            }
            AuditRole::Weights | AuditRole::Update => {
                self.upload_weights(c, worker, o, now);
                let _ = c.audit_report(
                    &AuditReport {
                        worker,
                        epoch,
                        completed: o.step,
                        audit: o.audit,
                        result: AuditResult::Provided,
                    },
                    RUN_ID,
                    now,
                );
                true
            }
        }
    }

    /// `worker` uploads its parameters of before step `o.step`, and the
    /// coordinator does what its server does with them: refuses those whose
    /// digest is not the one the replicas committed, else recomputes the
    /// micro-batch honestly from the evidence it holds.
    fn upload_weights(&self, c: &mut Coordinator, worker: u64, o: &AuditOrder, now: Instant) {
        let Some(job) = c.referee_job(worker, o.audit).expect("an uploader") else {
            return;
        };
        assert_eq!(job.step, o.step);
        let digest = if self.bad_weights.contains(&worker) {
            hash(b"other parameters")
        } else {
            hash(format!("params of stage {} after step {}", o.stage, o.step - 1).as_bytes())
        };
        let raw = |h: &str| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h, &mut b).expect("hex");
            b
        };
        let result = if digest != hex::encode(job.digest) {
            RefereeResult::BadWeights(format!("they digest to {}", &digest[..16]))
        } else if let Some(cj) = &job.contribution {
            let set = Evidence::decode_set(&job.evidence, MAX * cj.micro_batches.len())
                .expect("evidence set");
            let inputs: Vec<String> = cj
                .micro_batches
                .iter()
                .map(|m| match &set[m].input {
                    Some(b) => hash(b),
                    None => hash(format!("tokens {m}").as_bytes()),
                })
                .collect();
            RefereeResult::Contribution(raw(&self.honest_contribution(job.stage, &inputs)))
        } else {
            let ev = Evidence::decode(&job.evidence, MAX).expect("evidence");
            let input = match &ev.input {
                Some(b) => hash(b),
                None => hash(format!("tokens {}", job.mb).as_bytes()),
            };
            let (i, out, g) = self.recompute(job.stage, job.mb, &input);
            RefereeResult::Hashes([raw(&i), raw(&out), raw(&g)])
        };
        let _ = c.referee_done(worker, o.audit, result, 0.01, now);
    }
}

impl World {
    /// Carries out one contribution audit order of `worker` covering
    /// `mbs`; `false` when it cannot yet.
    #[allow(clippy::too_many_arguments)]
    fn carry_out_contribution(
        &self,
        c: &mut Coordinator,
        keys: &BTreeMap<u64, Identity>,
        worker: u64,
        epoch: u64,
        o: &AuditOrder,
        mbs: &[u64],
        now: Instant,
    ) -> bool {
        match &o.role {
            AuditRole::Provide => {
                let mut set: BTreeMap<u64, Evidence> = mbs
                    .iter()
                    .map(|&m| (m, self.evidence(c, o.stage, m)))
                    .collect();
                if self.forgers.contains(&worker) {
                    if let Some(e) = set.values_mut().next() {
                        e.input = Some(b"forged".to_vec());
                    }
                }
                if self.short_sets.contains(&worker) {
                    let first = *set.keys().next().expect("a micro-batch");
                    set.remove(&first);
                }
                let bytes = Evidence::encode_set(&set).expect("encode");
                let _ = c.put_evidence(worker, o.audit, bytes, MAX, now);
                let _ = c.audit_report(
                    &AuditReport {
                        worker,
                        epoch,
                        completed: o.step,
                        audit: o.audit,
                        result: AuditResult::Provided,
                    },
                    RUN_ID,
                    now,
                );
                true
            }
            AuditRole::Validate { audited_replica } => {
                if self.silent.contains(&worker) {
                    return true;
                }
                let Some(bytes) = c
                    .evidence_for(worker, o.audit)
                    .expect("a validator may read")
                else {
                    return false;
                };
                let set = Evidence::decode_set(&bytes, MAX * mbs.len()).expect("evidence set");
                let inputs: Vec<String> = mbs
                    .iter()
                    .map(|m| match &set[m].input {
                        Some(b) => hash(b),
                        None => hash(format!("tokens {m}").as_bytes()),
                    })
                    .collect();
                let mut recomputed = self.honest_contribution(o.stage, &inputs);
                if self.liars.contains(&worker) {
                    recomputed = hash(b"a lie");
                }
                let (route_mbs, mut received) = {
                    let mine = c.current_route().mine(o.stage, *audited_replica);
                    let sent = self.contribution(c, o.stage, *audited_replica, &mine).1;
                    (mine, sent)
                };
                assert_eq!(route_mbs, mbs, "the scope is the audited replica's route");
                let committed = self.contribution(c, o.stage, *audited_replica, mbs).0;
                if self.receipt_liars.contains(&worker) {
                    received = hash(b"a receipt it cannot prove");
                } else if received != committed {
                    // Proved with the frames the audited replica signed.
                    let audited = keys
                        .keys()
                        .copied()
                        .find(|&id| {
                            c.identity_of(id).map(|x| x.1) == Some((o.stage, *audited_replica))
                        })
                        .expect("the audited worker");
                    let proof = crate::sync::receipt::signed_proof(
                        &keys[&audited],
                        crate::link::sign::epoch_run_id(&run_id(), epoch),
                        o.step - 1,
                        (o.stage as u32, *audited_replica as u32),
                        &[corrupted_contribution(o.stage, *audited_replica).as_slice()],
                        1024,
                    );
                    let signature = receipt_signature(&keys[&worker], worker, o.audit, &proof);
                    c.put_receipt(worker, o.audit, &proof, &signature, &run_id(), now)
                        .expect("a proof of what was sent");
                }
                let report = signed_contribution(
                    &keys[&worker],
                    worker,
                    epoch,
                    o,
                    *audited_replica,
                    &recomputed,
                    &received,
                );
                let _ = c.audit_report(&report, RUN_ID, now);
                true
            }
            AuditRole::Weights | AuditRole::Update => {
                unreachable!("carried out as any audit's parameters")
            }
        }
    }
}

/// The contribution a `flip` or `send_lie` replica (`s`, `r`) sends: a
/// real one, so a neighbour can prove receiving it.
fn corrupted_contribution(s: usize, r: usize) -> Vec<f32> {
    (0..1500)
        .map(|i| (i + 7 * s + 3 * r) as f32 * -0.25)
        .collect()
}

/// `worker`'s signature, with `key`, of its proof of receipt `proof` for
/// audit `audit`.
fn receipt_signature(key: &Identity, worker: u64, audit: u64, proof: &[u8]) -> String {
    let message = crate::coord::api::receipt_message(
        RUN_ID,
        audit,
        worker,
        &hex::encode(blake3::hash(proof).as_bytes()),
    );
    key.sign(AUDIT_DOMAIN, &message)
}

/// [`RUN_ID`] as bytes.
fn run_id() -> crate::link::RunId {
    let mut id = [0u8; 16];
    hex::decode_to_slice(RUN_ID, &mut id).expect("hex");
    crate::link::RunId(id)
}

/// A validator's contribution verdict for `o`, signed by `key`.
fn signed_contribution(
    key: &Identity,
    worker: u64,
    epoch: u64,
    o: &AuditOrder,
    audited_replica: usize,
    recomputed: &str,
    received: &str,
) -> AuditReport {
    let message = crate::coord::api::contribution_message(&crate::coord::api::ContributionClaim {
        run_id: RUN_ID,
        audit: o.audit,
        step: o.step,
        stage: o.stage,
        audited_replica,
        recomputed,
        received,
    });
    AuditReport {
        worker,
        epoch,
        completed: o.step,
        audit: o.audit,
        result: AuditResult::Contribution {
            recomputed: recomputed.into(),
            received: received.into(),
            signature: key.sign(AUDIT_DOMAIN, &message),
        },
    }
}

/// A validator's report of `hashes` (input, output, gradient) for `o`,
/// signed by `key`.
fn signed(
    key: &Identity,
    worker: u64,
    epoch: u64,
    o: &AuditOrder,
    audited_replica: usize,
    hashes: [&str; 3],
) -> AuditReport {
    let [input, output, gradient] = hashes;
    let message = audit_message(&AuditClaim {
        run_id: RUN_ID,
        audit: o.audit,
        step: o.step,
        stage: o.stage,
        mb: o.mb,
        audited_replica,
        input,
        output,
        gradient,
    });
    AuditReport {
        worker,
        epoch,
        completed: o.step,
        audit: o.audit,
        result: AuditResult::Recomputed {
            output: output.into(),
            gradient: gradient.into(),
            input: input.into(),
            signature: key.sign(AUDIT_DOMAIN, &message),
        },
    }
}

/// A coordinator of `stages` × `replicas` with every shard registered
/// under a real identity; ids stage major and their keys.
fn setup(
    stages: usize,
    replicas: usize,
    rate: f64,
    secret: [u8; 32],
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>) {
    let mut c = Coordinator::new("t", layout(stages, replicas), LEASE, None, None)
        .with_audit_rate(rate)
        .with_audit_secret(secret);
    let (ids, keys) = seat_all(&mut c, 1, now);
    (c, ids, keys)
}

/// Each worker's final answer, and every order carried out.
type Driven = (BTreeMap<u64, Option<Barrier>>, Vec<(u64, AuditOrder)>);

/// Every worker of `ids` still seated reports `step`; then the orders the
/// barrier gives are carried out until it answers without orders. Returns
/// each worker's final answer and every order handed out.
fn drive(
    c: &mut Coordinator,
    w: &World,
    ids: &[u64],
    keys: &BTreeMap<u64, Identity>,
    epoch: u64,
    step: u64,
    now: Instant,
) -> Driven {
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
            if let Some(b) = &b {
                // An order given again (not carried out, or carried out
                // badly) is not done twice.
                for o in &b.audits {
                    if all.iter().any(|(x, p)| *x == id && p == o) {
                        continue;
                    }
                    if w.carry_out(c, keys, id, epoch, o, now) {
                        busy = true;
                        all.push((id, o.clone()));
                    }
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

/// After every report of step 1 of a one-stage run is in: the worker
/// ordered to validate `replica`'s audit first.
fn first_validator_of(
    c: &mut Coordinator,
    w: &World,
    ids: &[u64],
    epoch: u64,
    replica: usize,
    now: Instant,
) -> u64 {
    let (step, stage) = (1, 0);
    for &id in ids {
        c.step_done(&w.report(c, id, epoch, step), now)
            .expect("report");
    }
    ids.iter()
        .copied()
        .find(|&id| {
            c.barrier(id, epoch, step, now).is_some_and(|b| {
                b.audits.iter().any(|o| {
                    o.stage == stage
                        && o.role
                            == (AuditRole::Validate {
                                audited_replica: replica,
                            })
                })
            })
        })
        .expect("the replica has a validator")
}

fn world(stages: usize) -> World {
    World {
        stages,
        ..World::default()
    }
}

#[test]
fn honest_work_passes_its_audits_and_the_step_commits() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 3, 1.0, [7; 32], now);
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &world(2), &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1);
    // At rate 1 every shard is audited once, by another replica.
    let provided: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Provide)
        .map(|(w, _)| *w)
        .collect();
    assert_eq!(provided.len(), 6, "{orders:?}");
    for (w, o) in &orders {
        if let AuditRole::Validate { audited_replica } = o.role {
            let (_, (s, r)) = c.identity_of(*w).expect("seated");
            assert_eq!(s, o.stage);
            assert_ne!(r, audited_replica, "a replica never validates itself");
        }
    }
    let passed: u64 = c
        .audit_outcomes()
        .iter()
        .filter(|((_, o), _)| *o == "passed")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(passed, 6);
    assert_eq!(c.audit_seconds().0, 6);
    assert!(c.refused().is_empty(), "{:?}", c.refused());
    // The next step goes on as usual.
    let (answers, _) = drive(&mut c, &world(2), &ids, &keys, e, 2, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 2);
}

#[test]
fn while_audits_are_open_only_the_orders_are_answered() {
    let now = Instant::now();
    let (mut c, ids, _) = setup(1, 3, 1.0, [3; 32], now);
    let e = c.epoch();
    let w = world(1);
    for &id in &ids {
        c.step_done(&w.report(&c, id, e, 1), now).expect("report");
    }
    for &id in &ids {
        let b = c.barrier(id, e, 1, now).expect("orders");
        assert!(!b.audits.is_empty());
        // Evidence to provide comes before recomputations.
        assert_eq!(b.audits[0].role, AuditRole::Provide);
    }
    assert_eq!(c.committed(), 0, "not committed while audits are open");
}

#[test]
fn a_failure_confirmed_by_a_second_validator_convicts_and_quarantines() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 3, 1.0, [9; 32], now);
    let e = c.epoch();
    let mut w = world(2);
    // Stage 0 replica 1 sends junk forward; the chain still holds, since
    // stage 1 commits to what it received.
    w.cheat = Some((0, 1));
    let cheat = ids[1];
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers[&ids[0]].as_ref().is_some_and(|b| !b.proceed));
    assert_eq!(c.committed(), 0, "the step is not booked");
    assert!(c.epoch() > e);
    // Two validators recomputed the cheater's micro-batch.
    let validators: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.stage == 0 && o.role == (AuditRole::Validate { audited_replica: 1 }))
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(validators.len(), 2, "{orders:?}");
    assert_ne!(validators[0], validators[1]);
    assert_eq!(c.refused().get("failed_audit"), Some(&1));
    assert_eq!(c.audit_outcomes().get(&(0, "failed")), Some(&1));
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].worker, cheat);
    assert_eq!((convictions[0].stage, convictions[0].replica), (0, 1));
    assert_eq!(convictions[0].reason, "failed_audit");
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["validators"].as_array().map(Vec::len), Some(2));
    // Its slot is vacated; every request of it is answered "quarantined".
    let status = c.status(now);
    assert_eq!(status.shards[1].worker, None);
    assert_eq!(status.quarantined.len(), 1);
    assert_eq!(status.quarantined[0].reason, "failed_audit");
    for e in [
        c.heartbeat(cheat, now).unwrap_err(),
        c.wiring(cheat, 0).unwrap_err(),
        c.register(register(Some(0), Some(1), &keys[&cheat]), now)
            .unwrap_err(),
        c.register(register(None, None, &keys[&cheat]), now)
            .unwrap_err(),
    ] {
        let CoordError::Quarantined(text) = e else {
            panic!("not barred: {e:?}");
        };
        assert!(text.starts_with("quarantined:"), "{text}");
        assert!(
            text.contains("step 1") && text.contains("failed_audit"),
            "{text}"
        );
    }
    // A fresh identity takes the slot and the step is trained again.
    let fresh = Identity::from_secret([99; 32]);
    let (id, shard) = c
        .register(register(Some(0), Some(1), &fresh), now)
        .expect("a new identity is welcome");
    assert_eq!(shard, Some((0, 1)));
    let mut seated = ids.clone();
    seated[1] = id;
    let mut keys = keys;
    keys.insert(id, fresh);
    for &x in &seated {
        let wiring = c.wiring(x, e).expect("ok").expect("plan");
        assert_eq!(wiring.step, 0);
    }
    let e2 = c.epoch();
    let (answers, _) = drive(&mut c, &world(2), &seated, &keys, e2, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1);
}

#[test]
fn a_lying_first_validator_is_overturned_and_the_audit_passes() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(1, 3, 1.0, [5; 32], now);
    let e = c.epoch();
    // Whoever validates replica 0 first lies.
    let first = first_validator_of(&mut c, &world(1), &ids, e, 0, now);
    let mut w = world(1);
    w.liars = vec![first];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1, "the audit passes");
    // It lied in every verdict it gave as a first validator.
    let overturned = c.audit_outcomes().get(&(0, "overturned")).copied();
    assert!(overturned.is_some_and(|n| n >= 1));
    assert_eq!(c.refused().get("overturned_verdict").copied(), overturned);
    assert_eq!(c.audit_outcomes().get(&(0, "failed")), None);
    assert!(
        c.convictions().is_empty(),
        "the liar is refused, not convicted"
    );
    assert!(c
        .history(now, 0.0)
        .events
        .iter()
        .any(|ev| ev.text.contains("refuted by a second validator")));
}

#[test]
fn with_two_replicas_a_disputed_audit_is_unconfirmed_and_the_step_replayed() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(1, 2, 1.0, [11; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.cheat = Some((0, 0));
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| !b.proceed)));
    assert_eq!(c.committed(), 0);
    assert_eq!(c.audit_outcomes().get(&(0, "unconfirmed")), Some(&1));
    assert!(c.convictions().is_empty());
    assert!(c.epoch() > e);
    // Everyone keeps their slot and trains step 1 again.
    for &id in &ids {
        assert!(c.heartbeat(id, now).is_ok());
        let wiring = c.wiring(id, e).expect("ok").expect("plan");
        assert_eq!(wiring.step, 0);
    }
    let e2 = c.epoch();
    let (answers, _) = drive(&mut c, &world(1), &ids, &keys, e2, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1);
}

#[test]
fn forged_and_malformed_audit_messages_are_refused_and_counted() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 3, 1.0, [13; 32], now);
    let e = c.epoch();
    let w = world(2);
    for &id in &ids {
        c.step_done(&w.report(&c, id, e, 1), now).expect("report");
    }
    let mut orders = Vec::new();
    for &id in &ids {
        for o in c.barrier(id, e, 1, now).expect("orders").audits {
            orders.push((id, o));
        }
    }
    let (provider, provide) = orders
        .iter()
        .find(|(_, o)| o.role == AuditRole::Provide && o.stage == 1)
        .cloned()
        .expect("a provider on stage 1");
    let (validator, validate) = orders
        .iter()
        .find(|(_, o)| o.audit == provide.audit && o.role != AuditRole::Provide)
        .cloned()
        .expect("its validator");
    let stranger = ids
        .iter()
        .copied()
        .find(|&x| x != provider && x != validator)
        .expect("a third worker");
    // Evidence: garbage, the wrong bytes, from someone else.
    for bytes in [Vec::new(), b"not safetensors".to_vec(), vec![0xff; 64]] {
        let r = c.put_evidence(provider, provide.audit, bytes, MAX, now);
        assert!(
            matches!(r, Err(CoordError::Refused("bad_evidence", _))),
            "{r:?}"
        );
    }
    let wrong = Evidence {
        input: Some(b"other".to_vec()),
        targets: Some(b"t".to_vec()),
        gradient: None,
    }
    .encode()
    .expect("encode");
    let r = c.put_evidence(provider, provide.audit, wrong, MAX, now);
    assert!(
        matches!(r, Err(CoordError::Refused("bad_evidence", _))),
        "{r:?}"
    );
    let missing = Evidence::default().encode().expect("encode");
    let r = c.put_evidence(provider, provide.audit, missing, MAX, now);
    assert!(
        matches!(r, Err(CoordError::Refused("bad_evidence", _))),
        "{r:?}"
    );
    assert_eq!(c.refused().get("bad_evidence"), Some(&5));
    let good = w
        .evidence(&c, provide.stage, provide.mb)
        .encode()
        .expect("encode");
    let r = c.put_evidence(stranger, provide.audit, good.clone(), MAX, now);
    assert!(matches!(r, Err(CoordError::Refused("audit", _))), "{r:?}");
    let r = c.put_evidence(provider, provide.audit, vec![0; MAX + 1], MAX, now);
    assert!(r.is_err());
    assert!(c
        .put_evidence(provider, 999_999, good.clone(), MAX, now)
        .is_err());
    // The provider's own upload still counts: the refusals convicted nobody.
    c.put_evidence(provider, provide.audit, good, MAX, now)
        .expect("matching evidence");
    assert!(c.convictions().is_empty());
    // Verdicts: from a worker that is no validator, unsigned, signed by
    // another key, malformed hashes, then a second different verdict.
    let replica = match validate.role {
        AuditRole::Validate { audited_replica } => audited_replica,
        AuditRole::Provide | AuditRole::Weights | AuditRole::Update => unreachable!(),
    };
    let ev = Evidence::decode(
        &c.evidence_for(validator, provide.audit)
            .expect("ok")
            .expect("provided"),
        MAX,
    )
    .expect("evidence");
    assert!(matches!(
        c.evidence_for(stranger, provide.audit),
        Err(CoordError::Refused("audit", _))
    ));
    let (i, o, g) = w.recompute(1, provide.mb, &hash(ev.input.as_deref().expect("input")));
    let honest = signed(
        &keys[&validator],
        validator,
        e,
        &validate,
        replica,
        [&i, &o, &g],
    );
    let not_validator = stranger;
    let mut r = honest.clone();
    r.worker = not_validator;
    assert!(matches!(
        c.audit_report(&r, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    let forged = signed(
        &keys[&not_validator],
        validator,
        e,
        &validate,
        replica,
        [&i, &o, &g],
    );
    assert!(matches!(
        c.audit_report(&forged, RUN_ID, now),
        Err(CoordError::Refused("signature", _))
    ));
    let mut unsigned = honest.clone();
    if let AuditResult::Recomputed { signature, .. } = &mut unsigned.result {
        *signature = "zz".into();
    }
    assert!(matches!(
        c.audit_report(&unsigned, RUN_ID, now),
        Err(CoordError::Refused("signature", _))
    ));
    let (g64, long) = ("G".repeat(64), "ab".repeat(33));
    for bad in ["", "AB", "é", g64.as_str(), long.as_str()] {
        let r = signed(
            &keys[&validator],
            validator,
            e,
            &validate,
            replica,
            [bad, &o, &g],
        );
        assert!(
            matches!(
                c.audit_report(&r, RUN_ID, now),
                Err(CoordError::Refused("audit_report", _))
            ),
            "{bad:?}"
        );
    }
    // Another run's verdict does not verify here.
    let elsewhere = {
        let message = audit_message(&AuditClaim {
            run_id: "another run",
            audit: validate.audit,
            step: 1,
            stage: 1,
            mb: validate.mb,
            audited_replica: replica,
            input: &i,
            output: &o,
            gradient: &g,
        });
        let mut r = honest.clone();
        if let AuditResult::Recomputed { signature, .. } = &mut r.result {
            *signature = keys[&validator].sign(AUDIT_DOMAIN, &message);
        }
        r
    };
    assert!(matches!(
        c.audit_report(&elsewhere, RUN_ID, now),
        Err(CoordError::Refused("signature", _))
    ));
    c.audit_report(&honest, RUN_ID, now)
        .expect("the honest verdict");
    let changed = signed(
        &keys[&validator],
        validator,
        e,
        &validate,
        replica,
        [&i, &zeros(), &g],
    );
    assert!(matches!(
        c.audit_report(&changed, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    let mut unknown = honest.clone();
    unknown.audit = 999_999;
    assert!(matches!(
        c.audit_report(&unknown, RUN_ID, now),
        Err(CoordError::Invalid(_))
    ));
    assert_eq!(c.refused().get("signature"), Some(&3));
    assert_eq!(c.refused().get("audit_report"), Some(&7));
    assert!(c.convictions().is_empty());
    // The rest of the audits go through and the step commits.
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1);
}

#[test]
fn evidence_that_never_matches_convicts_at_the_deadline() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 3, 1.0, [17; 32], now);
    let e = c.epoch();
    let mut w = world(2);
    w.forgers = vec![ids[4]];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers[&ids[4]].is_some(), "given its order again");
    assert!(answers[&ids[0]].is_none(), "waiting for the evidence");
    assert!(c.refused().get("bad_evidence").is_some_and(|&n| n >= 1));
    assert!(c.convictions().is_empty(), "not before the deadline");
    let late = now + c.audit_deadline() + Duration::from_secs(1);
    for &id in &ids {
        c.heartbeat(id, late - Duration::from_millis(10)).ok();
    }
    c.expire(late);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1, "{:?}", c.refused());
    assert_eq!(convictions[0].worker, ids[4]);
    assert_eq!(convictions[0].reason, "bad_evidence");
    assert_eq!(c.committed(), 0);
    assert!(c.epoch() > e);
}

#[test]
fn a_validator_that_never_answers_is_vacated_at_the_deadline() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(1, 3, 1.0, [19; 32], now);
    let e = c.epoch();
    let silent = first_validator_of(&mut c, &world(1), &ids, e, 0, now);
    let mut w = world(1);
    w.silent = vec![silent];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    let other = ids.iter().copied().find(|&x| x != silent).expect("another");
    assert!(answers[&other].is_none(), "waiting for a verdict");
    let late = now + c.audit_deadline() + Duration::from_secs(1);
    for &id in &ids {
        c.heartbeat(id, late - Duration::from_millis(10)).ok();
    }
    c.expire(late);
    assert!(c.epoch() > e, "the barrier is not left hanging");
    assert_eq!(c.committed(), 0);
    assert!(
        c.heartbeat(silent, late).is_err(),
        "the silent one lost its slot"
    );
    assert!(c.convictions().is_empty());
    // The others are released from the barrier.
    assert!(c.barrier(other, e, 1, late).is_some_and(|b| !b.proceed));
}

#[test]
fn a_lost_worker_drops_the_open_audits() {
    let now = Instant::now();
    let (mut c, ids, _) = setup(1, 3, 1.0, [23; 32], now);
    let e = c.epoch();
    let w = world(1);
    for &id in &ids {
        c.step_done(&w.report(&c, id, e, 1), now).expect("report");
    }
    assert!(c
        .barrier(ids[0], e, 1, now)
        .is_some_and(|b| !b.audits.is_empty()));
    c.lose(ids[2], now);
    assert!(c.barrier(ids[0], e, 1, now).is_some_and(|b| !b.proceed));
    assert!(c.audit_outcomes().is_empty());
    assert!(c.convictions().is_empty());
}

#[test]
fn at_rate_zero_nothing_is_audited() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 3, 0.0, [29; 32], now);
    let e = c.epoch();
    for step in 1..=3 {
        let (answers, orders) = drive(&mut c, &world(2), &ids, &keys, e, step, now);
        assert!(orders.is_empty());
        assert!(answers
            .values()
            .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    }
    assert_eq!(c.committed(), 3);
    assert!(c.audit_outcomes().is_empty());
}

#[test]
fn single_replica_stages_are_not_audited() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 1, 1.0, [31; 32], now);
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &world(2), &ids, &keys, e, 1, now);
    assert!(orders.is_empty());
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
}

#[test]
fn the_draw_is_reproducible_with_the_key_and_unpredictable_without() {
    let draws = |key: [u8; 32]| -> Vec<u64> {
        (0..64)
            .map(|step| super::draw(&key, 1, step, 0, 1, "rate"))
            .collect()
    };
    assert_eq!(draws([1; 32]), draws([1; 32]));
    let (a, b) = (draws([1; 32]), draws([2; 32]));
    assert!(
        a.iter().zip(&b).all(|(x, y)| x != y),
        "another key, other draws"
    );
    // What is drawn differs with what it is for and where.
    assert_ne!(
        super::draw(&[1; 32], 1, 5, 0, 1, "rate"),
        super::draw(&[1; 32], 1, 5, 0, 1, "mb")
    );
    assert_ne!(
        super::draw(&[1; 32], 1, 5, 0, 1, "rate"),
        super::draw(&[1; 32], 2, 5, 0, 1, "rate")
    );
    // At rate 0.25 about a quarter of the shards are drawn.
    let hits = (0..4000)
        .filter(|&s| super::unit(super::draw(&[3; 32], 1, s, 0, 0, "rate")) < 0.25)
        .count();
    assert!((850..1150).contains(&hits), "{hits}");
    // Two coordinators with the same key give the same orders.
    let now = Instant::now();
    let orders = |secret| {
        let (mut c, ids, _) = setup(2, 3, 0.5, secret, now);
        let e = c.epoch();
        let w = world(2);
        for &id in &ids {
            c.step_done(&w.report(&c, id, e, 1), now).expect("report");
        }
        ids.iter()
            .map(|&id| c.barrier(id, e, 1, now).map(|b| b.audits))
            .collect::<Vec<_>>()
    };
    assert_eq!(orders([41; 32]), orders([41; 32]));
    // The key outlives a restart through the state file.
    let (c, _, _) = setup(1, 2, 0.5, [43; 32], now);
    let p = c.persisted();
    assert_eq!(
        p.audit_secret.as_deref(),
        Some(hex::encode([43u8; 32]).as_str())
    );
    let again = Coordinator::new("t", layout(1, 2), LEASE, None, Some(p));
    assert_eq!(again.persisted().audit_secret, c.persisted().audit_secret);
    let fresh = Coordinator::new("t", layout(1, 2), LEASE, None, None);
    assert_ne!(fresh.persisted().audit_secret, c.persisted().audit_secret);
}

#[test]
fn a_chain_mismatch_is_counted_and_the_step_replayed_without_conviction() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(2, 2, 1.0, [37; 32], now);
    let e = c.epoch();
    let mut w = world(2);
    // Stage 1 replica 1 commits to an input it was not sent.
    w.misreport_input = vec![ids[3]];
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(orders.is_empty(), "no audit of a broken step");
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| !b.proceed)));
    assert_eq!(c.chain_mismatches().get(&1), Some(&2));
    assert_eq!(c.refused().get("chain_mismatch"), Some(&2));
    assert!(c.convictions().is_empty());
    assert_eq!(c.committed(), 0);
    for &id in &ids {
        assert!(c.heartbeat(id, now).is_ok(), "everyone keeps their slot");
    }
    let events = c.history(now, 0.0).events;
    assert!(events
        .iter()
        .any(|ev| ev.text.contains("misreports what crossed the link")));
}

#[test]
fn audits_are_booked_with_the_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = crate::ledger::Ledger::open(&dir.path().join("l.sqlite"), &[]).expect("ledger");
    let now = Instant::now();
    let mut l = layout(1, 3);
    let model = crate::model::ModelConfig {
        vocab: 16,
        dim: 8,
        layers: 1,
        heads: 2,
        kv_heads: 2,
        ffn_dim: 16,
        seq_len: 4,
        tied: false,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
    };
    l.cost = Some(crate::ledger::CostModel::new(&model, 1));
    let mut c = Coordinator::new("t", l, LEASE, None, None)
        .with_audit_rate(1.0)
        .with_audit_secret([47; 32])
        .with_ledger(ledger);
    let mut ids = Vec::new();
    let mut keys = BTreeMap::new();
    for r in 0..3 {
        let key = Identity::from_secret([r as u8 + 60; 32]);
        let (id, _) = c
            .register(register(Some(0), Some(r), &key), now)
            .expect("register");
        ids.push(id);
        keys.insert(id, key);
    }
    let e = c.epoch();
    drive(&mut c, &world(1), &ids, &keys, e, 1, now);
    assert_eq!(c.committed(), 1);
    let totals = c.ledger().expect("ledger").totals(1, 1).expect("totals");
    assert_eq!(totals.len(), 3);
    for t in &totals {
        assert_eq!(t.audits_passed, 1, "{t:?}");
        assert_eq!(t.audits_failed, 0);
        assert!(t.validation_flops > 0.0, "{t:?}");
    }
}

#[path = "contribution_audit_tests.rs"]
mod contribution;

/// A 1 × `replicas` run with the coordinator as validator of last resort,
/// whose step 1 every honest shard passed (so the replicas agreed on a
/// digest of their parameters).
fn refereed(
    replicas: usize,
    secret: [u8; 32],
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>, World) {
    refereed_from(setup(1, replicas, 1.0, secret, now), now)
}

/// `run` (a one-stage coordinator, its ids and keys) with the coordinator
/// as validator of last resort, whose step 1 every honest shard passed (so
/// the replicas agreed on a digest of their parameters).
fn refereed_from(
    (c, ids, keys): (Coordinator, Vec<u64>, BTreeMap<u64, Identity>),
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>, World) {
    let mut c = c.with_coordinator_validator(true);
    let mut w = world(1);
    w.params = true;
    let e = c.epoch();
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 1);
    (c, ids, keys, w)
}

#[test]
fn with_two_replicas_the_coordinator_recomputes_and_convicts_the_dishonest_worker() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(2, [11; 32], now);
    let e = c.epoch();
    w.cheat = Some((0, 0));
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(answers[&ids[1]].as_ref().is_some_and(|b| !b.proceed));
    // One upload was enough: the first uploader's (the cheater's own,
    // honest parameters).
    let uploads: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Weights)
        .map(|(x, _)| *x)
        .collect();
    assert_eq!(uploads, vec![ids[0]], "{orders:?}");
    assert_eq!(c.committed(), 1, "the step is not booked");
    assert_eq!(c.audit_outcomes().get(&(0, "failed")), Some(&1));
    assert_eq!(c.audit_outcomes().get(&(0, "unconfirmed")), None);
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    assert_eq!(c.coordinator_recompute_seconds().0, 1);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].worker, ids[0]);
    assert_eq!(convictions[0].reason, "failed_audit");
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["second_validator"], "coordinator");
    assert_eq!(evidence["coordinator"], evidence["recomputed"][0]);
    assert!(
        c.heartbeat(ids[1], now).is_ok(),
        "the validator keeps its slot"
    );
    assert!(matches!(
        c.heartbeat(ids[0], now),
        Err(CoordError::Quarantined(_))
    ));
}

#[test]
fn with_two_replicas_the_coordinator_overturns_a_lying_validator() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(2, [12; 32], now);
    let e = c.epoch();
    // Replica 1 validates replica 0 and lies.
    w.liars = vec![ids[1]];
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    assert_eq!(c.committed(), 2, "the audit passes and the step commits");
    // An upload that comes after the decision (the other uploader's, sent
    // at the same time) is not needed, and not refused.
    let audit = orders
        .iter()
        .find(|(_, o)| o.role == AuditRole::Weights)
        .map(|(_, o)| o.audit)
        .expect("parameters were ordered");
    for &id in &ids {
        assert!(c.referee_job(id, audit).expect("not refused").is_none());
    }
    assert_eq!(c.audit_outcomes().get(&(0, "overturned")), Some(&1));
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "overturned")),
        Some(&1)
    );
    assert_eq!(c.refused().get("overturned_verdict"), Some(&1));
    assert!(c.convictions().is_empty());
    assert!(c
        .history(now, 0.0)
        .events
        .iter()
        .any(|ev| ev.text.contains("the coordinator")));
}

#[test]
fn parameters_not_matching_the_agreed_digest_are_refused_and_the_other_upload_decides() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(2, [13; 32], now);
    let e = c.epoch();
    w.cheat = Some((0, 0));
    // The cheater, first to be asked, uploads other parameters.
    w.bad_weights = vec![ids[0]];
    let (_, orders) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    let uploads: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Weights)
        .map(|(x, _)| *x)
        .collect();
    assert_eq!(uploads, vec![ids[0], ids[1]], "{orders:?}");
    assert_eq!(c.refused().get("bad_weights"), Some(&1));
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "refused_weights")),
        Some(&1)
    );
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].worker, ids[0]);
}

#[test]
fn parameters_refused_by_every_uploader_leave_the_audit_unconfirmed_at_the_deadline() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(2, [14; 32], now);
    let e = c.epoch();
    w.cheat = Some((0, 0));
    w.bad_weights = ids.clone();
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(answers[&ids[0]].is_none(), "waiting for parameters");
    assert_eq!(c.refused().get("bad_weights"), Some(&2));
    let later = now + c.audit_deadline() + Duration::from_secs(1);
    assert!(c.barrier(ids[1], e, 2, later).is_some_and(|b| !b.proceed));
    assert_eq!(c.audit_outcomes().get(&(0, "unconfirmed")), Some(&1));
    assert!(c.convictions().is_empty());
}

#[test]
fn at_the_first_step_no_digest_is_agreed_and_a_dispute_stays_unconfirmed() {
    let now = Instant::now();
    let (c, ids, keys) = setup(1, 2, 1.0, [15; 32], now);
    let mut c = c.with_coordinator_validator(true);
    let e = c.epoch();
    let mut w = world(1);
    w.params = true;
    w.cheat = Some((0, 0));
    let (_, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(orders.iter().all(|(_, o)| o.role != AuditRole::Weights));
    assert_eq!(c.audit_outcomes().get(&(0, "unconfirmed")), Some(&1));
    assert!(c.coordinator_recomputations().is_empty());
}

#[test]
fn two_colluding_validators_cannot_convict_an_honest_worker() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(3, [41; 32], now);
    // Replicas 1 and 2 lie in every verdict, the same lie: whenever both
    // validate replica 0, they agree against its honest commitment.
    w.liars = vec![ids[1], ids[2]];
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(
        answers
            .values()
            .all(|b| b.as_ref().is_some_and(|b| b.proceed)),
        "{orders:?}"
    );
    assert_eq!(c.committed(), 2, "the step is booked");
    assert!(c.convictions().is_empty(), "{:?}", c.convictions());
    assert_eq!(c.audit_outcomes().get(&(0, "failed")), None);
    // Replica 0's audit: both liars validated it, and the coordinator's
    // own recomputation reproduced the commitment and refuted both.
    let validated_0: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == (AuditRole::Validate { audited_replica: 0 }))
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(validated_0.len(), 2, "{orders:?}");
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "overturned")),
        Some(&1)
    );
    // Every verdict they gave was refuted (replica 0's audit: both; each
    // other audit a liar validated first: the liar, by the honest second
    // validator or the coordinator).
    let refused = c.refused().get("overturned_verdict").copied().unwrap_or(0);
    assert!(refused >= 2, "{:?}", c.refused());
    assert!(c
        .history(now, 0.0)
        .events
        .iter()
        .any(|ev| ev.text.contains("the coordinator's own recomputation")));
    for id in &ids {
        assert!(c.heartbeat(*id, now).is_ok(), "nobody is quarantined");
    }
}

#[test]
fn a_failure_two_validators_agree_on_is_confirmed_by_the_coordinator() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed(3, [42; 32], now);
    w.cheat = Some((0, 0));
    let e = c.epoch();
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(answers[&ids[1]].as_ref().is_some_and(|b| !b.proceed));
    assert_eq!(c.committed(), 1, "the step is not booked");
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].worker, ids[0]);
    assert_eq!(convictions[0].reason, "failed_audit");
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["validators"].as_array().map(Vec::len), Some(2));
    assert_eq!(evidence["confirmed_by"], "coordinator");
    assert_eq!(evidence["coordinator"], evidence["recomputed"][0]);
}

#[test]
fn evidence_targets_must_carry_the_first_stages_signature_over_them() {
    use crate::link::origin::Origin;
    let now = Instant::now();
    let (c, ids, keys) = setup(2, 1, 0.0, [43; 32], now);
    let mut c = c.with_target_origins(true);
    let w = world(2);
    let e = c.epoch();
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed)));
    // What the coordinator's frames of this epoch are signed under: the
    // run id every worker derives from the run's name ("t").
    let base = crate::link::RunId(crate::coord::setup::run_id("t"));
    let run = crate::link::sign::epoch_run_id(&base, e);
    let mb = 0;
    let committed = super::Hashes::of(&w.commit(&c, ids[1], 1, mb));
    let tokens: [u8; 32] = *blake3::hash(format!("tokens {mb}").as_bytes()).as_bytes();
    let ids_bytes: Vec<u8> = (0..32u32).flat_map(|t| t.to_le_bytes()).collect();
    let honest = w.evidence(&c, 1, mb);
    let with = |targets: Vec<u8>| Evidence {
        targets: Some(targets),
        ..honest.clone()
    };
    let signed = |by: &Identity, replica: u32, step: u64, ids: &[u8], input: [u8; 32]| {
        let o = Origin::new(Some(by), &run, replica, step, mb, ids, input);
        [ids, &o.to_bytes()[..]].concat()
    };
    let first = &keys[&ids[0]];
    // The first stage's signature over the ids, at step 1 (0-based 0),
    // over the tokens it committed: taken.
    let good = signed(first, 0, 0, &ids_bytes, tokens);
    assert_eq!(c.evidence_problem(1, mb, 1, &committed, &with(good)), None);
    // Other ids than it signed: refused.
    let mut altered = signed(first, 0, 0, &ids_bytes, tokens);
    altered[0] ^= 1;
    let p = c.evidence_problem(1, mb, 1, &committed, &with(altered));
    assert!(
        p.as_deref().is_some_and(|p| p.contains("signature")),
        "{p:?}"
    );
    // Signed by the audited worker itself, for another step, over other
    // tokens, naming a replica that did not sample it, or without an
    // origin: refused.
    for (bad, why) in [
        (
            signed(&keys[&ids[1]], 0, 0, &ids_bytes, tokens),
            "signature",
        ),
        (signed(first, 0, 1, &ids_bytes, tokens), "signature"),
        (signed(first, 0, 0, &ids_bytes, [7; 32]), "tokens"),
        (signed(first, 1, 0, &ids_bytes, tokens), "did not sample"),
        (ids_bytes.clone(), "origin"),
    ] {
        let p = c.evidence_problem(1, mb, 1, &committed, &with(bad));
        assert!(
            p.as_deref().is_some_and(|p| p.contains(why)),
            "{why}: {p:?}"
        );
    }
    // Off, the targets are taken as uploaded.
    let c = c.with_target_origins(false);
    assert_eq!(
        c.evidence_problem(1, mb, 1, &committed, &with(ids_bytes)),
        None
    );
}
