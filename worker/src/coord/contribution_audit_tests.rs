//! Contribution audits through the state machine, with the audits' model
//! of honest and dishonest workers (`super::World`): a replica's
//! contribution is a hash of its micro-batches' inputs, a `flip` replica
//! commits to and sends a corrupted one, a `send_lie` replica commits to
//! the honest one and sends a corrupted one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::*;
use crate::coord::api::{ContributionScope, SuspectReport};

/// A one-or-more-stage run under a robust aggregation with contribution
/// audits at `rate` and no micro-batch audits.
fn robust(
    stages: usize,
    replicas: usize,
    rate: f64,
    secret: [u8; 32],
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>) {
    let (c, ids, keys) = setup(stages, replicas, 0.0, secret, now);
    let c = c
        .with_robust_aggregation(true)
        .with_contribution_audit_rate(rate);
    (c, ids, keys)
}

/// The contribution audit orders among `orders`, as (worker, order).
fn contribution_orders(orders: &[(u64, AuditOrder)]) -> Vec<(u64, AuditOrder)> {
    orders
        .iter()
        .filter(|(_, o)| o.contribution.is_some())
        .cloned()
        .collect()
}

/// The replica of `worker` (a one-stage run's ids are replica ordered).
fn replica_of(c: &Coordinator, worker: u64) -> usize {
    c.identity_of(worker).expect("seated").1 .1
}

/// After every report of step 1 is in: the worker ordered to validate
/// `replica`'s contribution first, and every order of that step.
fn first_contribution_validator(
    c: &mut Coordinator,
    w: &World,
    ids: &[u64],
    epoch: u64,
    replica: usize,
    now: Instant,
) -> u64 {
    for &id in ids {
        c.step_done(&w.report(c, id, epoch, 1), now)
            .expect("report");
    }
    ids.iter()
        .copied()
        .find(|&id| {
            c.barrier(id, epoch, 1, now).is_some_and(|b| {
                b.audits.iter().any(|o| {
                    o.contribution.is_some()
                        && o.role
                            == (AuditRole::Validate {
                                audited_replica: replica,
                            })
                })
            })
        })
        .expect("the replica has a validator")
}

fn proceeded(answers: &BTreeMap<u64, Option<Barrier>>) -> bool {
    answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| b.proceed))
}

#[test]
fn at_rate_one_every_shard_is_audited_by_a_ring_neighbour_and_passes() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 4, 1.0, [71; 32], now);
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &world(1), &ids, &keys, e, 1, now);
    assert!(proceeded(&answers), "{answers:?}");
    assert_eq!(c.committed(), 1);
    let orders = contribution_orders(&orders);
    let provided: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Provide)
        .map(|(w, _)| *w)
        .collect();
    assert_eq!(provided.len(), 4, "one per shard: {orders:?}");
    for (w, o) in &orders {
        // The scope is the audited replica's routed micro-batches, and the
        // order's micro-batch the first of them.
        let scope = o.contribution.as_ref().expect("a contribution audit");
        let audited = match o.role {
            AuditRole::Provide => replica_of(&c, *w),
            AuditRole::Validate { audited_replica } => audited_replica,
            AuditRole::Weights | AuditRole::Update => {
                unreachable!("a contribution audit wants no parameters")
            }
        };
        assert_eq!(scope.micro_batches, c.current_route().mine(0, audited));
        assert_eq!(o.mb, scope.micro_batches[0]);
        if let AuditRole::Validate { audited_replica } = o.role {
            // Ring 0-1-2-3-0: a validator is next to the audited replica.
            let v = replica_of(&c, *w);
            let distance = (v + 4 - audited_replica) % 4;
            assert!(
                distance == 1 || distance == 3,
                "{v} validates {audited_replica}"
            );
        }
    }
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "passed")),
        Some(&4)
    );
    assert!(
        c.audit_outcomes().is_empty(),
        "micro-batch audits are counted apart"
    );
    assert!(c.refused().is_empty(), "{:?}", c.refused());
    // Through two stages, where every micro-batch's payloads are checked
    // against the neighbours' commitments.
    let (mut c, ids, keys) = robust(2, 3, 1.0, [72; 32], now);
    let e = c.epoch();
    let (answers, _) = drive(&mut c, &world(2), &ids, &keys, e, 1, now);
    assert!(proceeded(&answers), "{:?}", c.refused());
    for stage in 0..2 {
        assert_eq!(
            c.contribution_audit_outcomes().get(&(stage, "passed")),
            Some(&3)
        );
    }
}

#[test]
fn at_rate_zero_or_under_mean_no_contribution_is_audited() {
    let now = Instant::now();
    // Rate 0 turns them off, suspicions included; the suspicions are
    // still counted.
    let (mut c, ids, keys) = robust(1, 3, 0.0, [73; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.suspects = vec![(ids[0], 1, "cosine"), (ids[2], 1, "norm_ratio")];
    for step in 1..=2 {
        let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, step, now);
        assert!(orders.is_empty(), "{orders:?}");
        assert!(proceeded(&answers));
    }
    assert!(c.contribution_audit_outcomes().is_empty());
    assert_eq!(c.contribution_suspicions().get(&(0, "cosine")), Some(&2));
    assert_eq!(
        c.contribution_suspicions().get(&(0, "norm_ratio")),
        Some(&2)
    );
    // Under mean (no robust rule) a rate does nothing.
    let (c, ids, keys) = setup(1, 3, 0.0, [74; 32], now);
    let mut c = c.with_contribution_audit_rate(1.0);
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(orders.is_empty(), "{orders:?}");
    assert!(proceeded(&answers));
}

#[test]
fn a_suspected_replica_is_audited_once_whoever_suspects_it() {
    let now = Instant::now();
    // A rate so small that nothing is drawn at random.
    let (mut c, ids, keys) = robust(1, 4, 1e-12, [75; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    // Replicas 0 and 3 suspect replica 2; replica 1 suspects itself (not
    // a suspicion) and replica 0 by a reason it does not give.
    w.suspects = vec![
        (ids[0], 2, "cosine"),
        (ids[3], 2, "norm_ratio"),
        (ids[1], 1, "cosine"),
    ];
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(proceeded(&answers));
    let orders = contribution_orders(&orders);
    let provided: Vec<u64> = orders
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Provide)
        .map(|(w, _)| *w)
        .collect();
    assert_eq!(provided, vec![ids[2]], "{orders:?}");
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "passed")),
        Some(&1)
    );
    assert_eq!(c.contribution_suspicions().get(&(0, "cosine")), Some(&1));
    assert_eq!(
        c.contribution_suspicions().get(&(0, "norm_ratio")),
        Some(&1)
    );
    assert!(c.convictions().is_empty(), "a suspicion convicts no one");
    // A report naming a replica the stage lacks, or a reason no worker
    // gives, is malformed.
    for (replica, reason) in [(4, "cosine"), (0, "gut feeling")] {
        let mut d = world(1).report(&c, ids[0], e, 2);
        d.suspects = vec![SuspectReport {
            replica,
            reason: reason.into(),
        }];
        let Err(CoordError::Invalid(text)) = c.step_done(&d, now) else {
            panic!("{replica} {reason} accepted");
        };
        assert!(text.starts_with("malformed step report"), "{text}");
    }
}

#[test]
fn a_flipped_contribution_is_convicted_by_recomputation() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [76; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.flip = Some((0, 1));
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers[&ids[0]].as_ref().is_some_and(|b| !b.proceed));
    assert_eq!(c.committed(), 0, "the step is trained again");
    assert!(c.epoch() > e);
    let validators: Vec<u64> = contribution_orders(&orders)
        .iter()
        .filter(|(_, o)| o.role == (AuditRole::Validate { audited_replica: 1 }))
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(validators.len(), 2, "both neighbours: {orders:?}");
    assert_ne!(validators[0], validators[1]);
    assert_eq!(c.refused().get("failed_audit"), Some(&1));
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "failed")),
        Some(&1)
    );
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1);
    assert_eq!(convictions[0].worker, ids[1]);
    assert_eq!(convictions[0].reason, "failed_audit");
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    let committed = w.contribution(&c, 0, 1, &[2, 3]).0;
    assert_eq!(evidence["contribution"], serde_json::json!(committed));
    assert_eq!(evidence["validators"].as_array().map(Vec::len), Some(2));
    let recomputed = evidence["recomputed"].as_array().expect("recomputed");
    assert_eq!(recomputed[0], recomputed[1]);
    assert_ne!(recomputed[0], evidence["contribution"]);
    // Quarantined, its slot vacated.
    assert_eq!(c.status(now).shards[1].worker, None);
    assert!(matches!(
        c.heartbeat(ids[1], now),
        Err(CoordError::Quarantined(t)) if t.contains("failed_audit")
    ));
    let text = &c.status(now).quarantined;
    assert_eq!(text.len(), 1);
}

#[test]
fn a_replica_that_sends_other_than_it_signed_is_convicted_by_what_was_received() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [77; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.send_lie = Some((0, 2));
    let (_, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert_eq!(c.committed(), 0);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1, "{:?}", c.refused());
    assert_eq!(convictions[0].worker, ids[2]);
    let evidence: serde_json::Value = serde_json::from_str(&convictions[0].evidence).expect("JSON");
    // The first validator recomputed what it signed and proved, with the
    // frames it signed, receiving something else: no second one needed.
    let committed = evidence["contribution"].clone();
    assert_eq!(evidence["recomputed"][0], committed);
    assert_ne!(evidence["received"][0], committed);
    assert_eq!(
        evidence["receipt_frames"][0], 2,
        "1500 elements, 1024 a frame"
    );
    assert_eq!(evidence["recomputed"][1], serde_json::Value::Null);
    let detail = &c.history(now, 0.0).events;
    assert!(
        detail
            .iter()
            .any(|ev| ev.text.contains("sent another one") && ev.text.contains("2 frames")),
        "{detail:?}"
    );
    assert_eq!(c.refused().get("unproven_receipt"), None);
}

#[test]
fn two_neighbours_that_claim_a_receipt_they_cannot_prove_convict_no_one() {
    // Both ring neighbours of replica 1 say it sent them another
    // contribution than it committed to, the same lie, with no frames.
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [91; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.receipt_liars = vec![ids[0], ids[2]];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(c.convictions().is_empty(), "{:?}", c.convictions());
    // Every receipt they claimed is struck and counted against them; the
    // recomputations agree with the commitments, so the step goes on.
    assert!(c.refused().get("unproven_receipt").is_some_and(|&n| n >= 2));
    // Both were asked about replica 1, the second after the first's claim
    // was struck.
    let struck = c
        .history(now, 0.0)
        .events
        .iter()
        .filter(|ev| ev.text.contains("unproven_receipt") && ev.text.contains("replica 1 in"))
        .count();
    assert_eq!(struck, 2);
    assert!(proceeded(&answers), "{:?}", c.refused());
    assert_eq!(c.committed(), 1);
    assert_eq!(c.contribution_audit_outcomes().get(&(0, "failed")), None);
}

#[test]
fn a_proof_of_another_replica_step_epoch_or_of_a_part_or_in_anothers_name_is_refused() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [92; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.send_lie = Some((0, 1));
    let v = first_contribution_validator(&mut c, &w, &ids, e, 1, now);
    let audit = c
        .barrier(v, e, 1, now)
        .expect("orders")
        .audits
        .into_iter()
        .find(|o| o.role == (AuditRole::Validate { audited_replica: 1 }))
        .expect("the validation order")
        .audit;
    let sent = corrupted_contribution(0, 1);
    let (first, rest) = sent.split_at(1024);
    let epoch_id = crate::link::sign::epoch_run_id(&run_id(), e);
    let proof = |key: &Identity, id, step, replica: u32, parts: &[&[f32]]| {
        crate::sync::receipt::signed_proof(key, id, step, (0, replica), parts, 1024)
    };
    let bad = [
        // Signed by another replica, in its own name or in replica 1's.
        proof(&keys[&ids[2]], epoch_id, 0, 2, &[&sent]),
        proof(&keys[&ids[2]], epoch_id, 0, 1, &[&sent]),
        // Another step, another epoch.
        proof(&keys[&ids[1]], epoch_id, 1, 1, &[&sent]),
        proof(&keys[&ids[1]], run_id(), 0, 1, &[&sent]),
        // Its first frame only (a whole frame of 1024 elements).
        proof(&keys[&ids[1]], epoch_id, 0, 1, &[first, rest])[..10 + 96 + 4096].to_vec(),
        // Not a proof at all.
        b"pwreceipt1 and then nothing of the kind".to_vec(),
    ];
    for (k, p) in bad.iter().enumerate() {
        let signature = receipt_signature(&keys[&v], v, audit, p);
        let r = c.put_receipt(v, audit, p, &signature, &run_id(), now);
        assert!(
            matches!(r, Err(CoordError::Refused("bad_receipt", _))),
            "{k}: {r:?}"
        );
    }
    assert_eq!(c.refused().get("bad_receipt"), Some(&(bad.len() as u64)));
    // A true proof in the validator's name, signed by anyone else (the
    // audited replica, to displace the validator's own), is refused
    // before it is read.
    let true_proof = proof(&keys[&ids[1]], epoch_id, 0, 1, &[&sent]);
    for signer in [ids[1], ids[2]] {
        if signer == v {
            continue;
        }
        let signature = receipt_signature(&keys[&signer], v, audit, &true_proof);
        let r = c.put_receipt(v, audit, &true_proof, &signature, &run_id(), now);
        assert!(
            matches!(r, Err(CoordError::Refused("signature", _))),
            "{r:?}"
        );
    }
    // Signed for another upload: refused too.
    let signature = receipt_signature(&keys[&v], v, audit, &bad[0]);
    let r = c.put_receipt(v, audit, &true_proof, &signature, &run_id(), now);
    assert!(
        matches!(r, Err(CoordError::Refused("signature", _))),
        "{r:?}"
    );
    // Its own, signed by it: kept.
    let signature = receipt_signature(&keys[&v], v, audit, &true_proof);
    c.put_receipt(v, audit, &true_proof, &signature, &run_id(), now)
        .expect("the validator's proof");
    assert!(c.convictions().is_empty());
}

#[test]
fn a_lying_first_validator_is_overturned_and_the_contribution_audit_passes() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [78; 32], now);
    let e = c.epoch();
    let first = first_contribution_validator(&mut c, &world(1), &ids, e, 0, now);
    let mut w = world(1);
    w.liars = vec![first];
    let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(proceeded(&answers), "{:?}", c.refused());
    assert_eq!(c.committed(), 1);
    let overturned = c
        .contribution_audit_outcomes()
        .get(&(0, "overturned"))
        .copied();
    assert!(overturned.is_some_and(|n| n >= 1));
    assert_eq!(c.refused().get("overturned_verdict").copied(), overturned);
    assert!(c.convictions().is_empty());
}

#[test]
fn with_two_replicas_a_disputed_contribution_is_unconfirmed_and_the_step_replayed() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 2, 1.0, [79; 32], now);
    let e = c.epoch();
    let mut w = world(1);
    w.flip = Some((0, 0));
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 1, now);
    assert!(answers
        .values()
        .all(|b| b.as_ref().is_some_and(|b| !b.proceed)));
    // One neighbour only: never a second validator.
    let validators = contribution_orders(&orders)
        .iter()
        .filter(|(_, o)| o.role == (AuditRole::Validate { audited_replica: 0 }))
        .count();
    assert_eq!(validators, 1);
    assert_eq!(c.committed(), 0);
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "unconfirmed")),
        Some(&1)
    );
    assert!(c.convictions().is_empty());
    assert!(c.epoch() > e);
    let e2 = c.epoch();
    let (answers, _) = drive(&mut c, &world(1), &ids, &keys, e2, 1, now);
    assert!(proceeded(&answers));
    assert_eq!(c.committed(), 1);
}

#[test]
fn evidence_sets_missing_a_micro_batch_or_not_matching_are_refused() {
    let now = Instant::now();
    for forger in [true, false] {
        let (mut c, ids, keys) = robust(2, 3, 1.0, [80; 32], now);
        let e = c.epoch();
        let mut w = world(2);
        // Stage 1 replica 1: a forged input, or a micro-batch left out.
        if forger {
            w.forgers = vec![ids[4]];
        } else {
            w.short_sets = vec![ids[4]];
        }
        let (answers, _) = drive(&mut c, &w, &ids, &keys, e, 1, now);
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
    }
    // Refused for the right reason, and a good upload after a bad one is
    // taken.
    let (mut c, ids, _) = robust(2, 3, 1.0, [80; 32], now);
    let e = c.epoch();
    let w = world(2);
    for &id in &ids {
        c.step_done(&w.report(&c, id, e, 1), now).expect("report");
    }
    let b = c.barrier(ids[4], e, 1, now).expect("orders");
    let o = b
        .audits
        .iter()
        .find(|o| o.role == AuditRole::Provide && o.contribution.is_some())
        .expect("a provide order")
        .clone();
    let mbs = o
        .contribution
        .as_ref()
        .expect("scope")
        .micro_batches
        .clone();
    let good: BTreeMap<u64, Evidence> = mbs.iter().map(|&m| (m, w.evidence(&c, 1, m))).collect();
    let mut short = good.clone();
    short.remove(&mbs[0]);
    let mut wrong = good.clone();
    if let Some(e) = wrong.get_mut(&mbs[1]) {
        e.input = Some(b"another input".to_vec());
    }
    let mut extra = good.clone();
    extra.insert(99, w.evidence(&c, 1, mbs[0]));
    for (set, words) in [
        (&short, "the audit covers"),
        (&extra, "the audit covers"),
        (&wrong, "micro-batch 3: the input hashes to"),
    ] {
        let bytes = Evidence::encode_set(set).expect("encode");
        let Err(CoordError::Refused("bad_evidence", text)) =
            c.put_evidence(ids[4], o.audit, bytes, MAX, now)
        else {
            panic!("a bad set accepted");
        };
        assert!(text.contains(words), "{text}");
    }
    // A single micro-batch's file is not a set.
    let single = w.evidence(&c, 1, mbs[0]).encode().expect("encode");
    assert!(c.put_evidence(ids[4], o.audit, single, MAX, now).is_err());
    // Over the limit per micro-batch.
    let bytes = Evidence::encode_set(&good).expect("encode");
    assert!(c
        .put_evidence(ids[4], o.audit, bytes.clone(), 8, now)
        .is_err());
    c.put_evidence(ids[4], o.audit, bytes, MAX, now)
        .expect("the matching set is kept");
    assert_eq!(c.refused().get("bad_evidence"), Some(&5));
}

#[test]
fn forged_and_mismatched_contribution_verdicts_are_refused_and_counted() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [81; 32], now);
    let e = c.epoch();
    let w = world(1);
    let validator = first_contribution_validator(&mut c, &w, &ids, e, 0, now);
    let provider = ids[0];
    let orders = c.barrier(provider, e, 1, now).expect("orders").audits;
    for o in orders.iter().filter(|o| o.role == AuditRole::Provide) {
        assert!(w.carry_out(&mut c, &keys, provider, e, o, now));
    }
    let o = c
        .barrier(validator, e, 1, now)
        .expect("orders")
        .audits
        .into_iter()
        .find(|o| o.role == (AuditRole::Validate { audited_replica: 0 }))
        .expect("its order");
    let committed = w.contribution(&c, 0, 0, &[0, 1]).0;
    // Signed by another identity.
    let stranger = Identity::from_secret([200; 32]);
    let forged = signed_contribution(&stranger, validator, e, &o, 0, &committed, &committed);
    assert!(matches!(
        c.audit_report(&forged, RUN_ID, now),
        Err(CoordError::Refused("signature", _))
    ));
    // Signed over other hashes than it reports.
    let mut swapped =
        signed_contribution(&keys[&validator], validator, e, &o, 0, &committed, &zeros());
    if let AuditResult::Contribution { received, .. } = &mut swapped.result {
        *received = committed.clone();
    }
    assert!(matches!(
        c.audit_report(&swapped, RUN_ID, now),
        Err(CoordError::Refused("signature", _))
    ));
    // Not a hash.
    let short = signed_contribution(&keys[&validator], validator, e, &o, 0, "abc", &committed);
    assert!(matches!(
        c.audit_report(&short, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    // From a worker that is not its validator.
    let other = ids
        .iter()
        .copied()
        .find(|&x| x != validator && x != provider)
        .expect("a third");
    let not_mine = signed_contribution(&keys[&other], other, e, &o, 0, &committed, &committed);
    assert!(matches!(
        c.audit_report(&not_mine, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    // A micro-batch verdict on a contribution audit.
    let wrong_kind = signed(&keys[&validator], validator, e, &o, 0, [&committed; 3]);
    assert!(matches!(
        c.audit_report(&wrong_kind, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    assert_eq!(c.refused().get("signature"), Some(&2));
    assert_eq!(c.refused().get("audit_report"), Some(&3));
    assert!(c.convictions().is_empty());
    // The honest verdict is taken; a second, different one is refused.
    let honest = signed_contribution(
        &keys[&validator],
        validator,
        e,
        &o,
        0,
        &committed,
        &committed,
    );
    c.audit_report(&honest, RUN_ID, now).expect("taken");
    let again = signed_contribution(&keys[&validator], validator, e, &o, 0, &zeros(), &committed);
    assert!(matches!(
        c.audit_report(&again, RUN_ID, now),
        Err(CoordError::Refused("audit_report", _))
    ));
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "passed")),
        Some(&1)
    );
}

#[test]
fn validators_that_could_not_recompute_or_received_nothing_convict_no_one() {
    let now = Instant::now();
    let (mut c, ids, keys) = robust(1, 3, 1.0, [82; 32], now);
    let e = c.epoch();
    let w = world(1);
    for &id in &ids {
        c.step_done(&w.report(&c, id, e, 1), now).expect("report");
    }
    // Every provider uploads; every validator says 64 zeros for both.
    let mut orders = Vec::new();
    for _ in 0..3 {
        for &id in &ids {
            let Some(b) = c.barrier(id, e, 1, now) else {
                continue;
            };
            for o in b.audits {
                if orders.contains(&(id, o.clone())) {
                    continue;
                }
                match o.role {
                    AuditRole::Provide => {
                        assert!(w.carry_out(&mut c, &keys, id, e, &o, now));
                    }
                    AuditRole::Validate { audited_replica } => {
                        let r = signed_contribution(
                            &keys[&id],
                            id,
                            e,
                            &o,
                            audited_replica,
                            &zeros(),
                            &zeros(),
                        );
                        c.audit_report(&r, RUN_ID, now).expect("taken");
                    }
                    AuditRole::Weights | AuditRole::Update => {
                        unreachable!("a contribution audit wants no parameters")
                    }
                }
                orders.push((id, o));
            }
        }
    }
    assert!(c.convictions().is_empty(), "{:?}", c.refused());
    // The first audit left unconfirmed breaks the step off (the others
    // are dropped with it).
    assert_eq!(
        c.contribution_audit_outcomes().get(&(0, "unconfirmed")),
        Some(&1)
    );
    assert_eq!(c.contribution_audit_outcomes().get(&(0, "failed")), None);
    assert_eq!(c.committed(), 0);
    assert!(c.epoch() > e);
}

#[test]
fn a_robust_step_report_without_its_contribution_is_refused() {
    let now = Instant::now();
    let (mut c, ids, _) = robust(1, 3, 0.0, [83; 32], now);
    let e = c.epoch();
    let mut d = world(1).report(&c, ids[0], e, 1);
    d.commitment.as_mut().expect("commitment").contribution = None;
    assert!(matches!(
        c.step_done(&d, now),
        Err(CoordError::Refused("malformed_digest", t)) if t.contains("commitment.contribution")
    ));
    assert_eq!(c.refused().get("malformed_digest"), Some(&1));
    // Under mean a report without one is what every worker sends.
    let (mut c, ids, _) = setup(1, 3, 0.0, [83; 32], now);
    let e = c.epoch();
    let mut d = world(1).report(&c, ids[0], e, 1);
    d.commitment.as_mut().expect("commitment").contribution = None;
    assert!(c.step_done(&d, now).is_ok());
    // One replica under a robust rule gathers nothing: none needed.
    let (mut c, ids, _) = robust(1, 1, 1.0, [83; 32], now);
    let e = c.epoch();
    let mut d = world(1).report(&c, ids[0], e, 1);
    d.commitment.as_mut().expect("commitment").contribution = None;
    assert!(c.step_done(&d, now).is_ok());
}

#[test]
fn contribution_audits_are_booked_with_the_whole_step_recomputed() {
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
    let cost = crate::ledger::CostModel::new(&model, 1);
    let f = cost.flops(0, 1, &(0..1), 2);
    let step_flops = f[0] + f[1] + f[2];
    l.cost = Some(cost);
    let mut c = Coordinator::new("t", l, LEASE, None, None)
        .with_audit_secret([84; 32])
        .with_robust_aggregation(true)
        .with_contribution_audit_rate(1.0)
        .with_ledger(ledger);
    let mut ids = Vec::new();
    let mut keys = BTreeMap::new();
    for r in 0..3 {
        let key = Identity::from_secret([r as u8 + 90; 32]);
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
    let mut validated = 0.0;
    for t in &totals {
        assert_eq!(t.audits_passed, 1, "{t:?}");
        assert_eq!(t.audits_failed, 0);
        let n = t.validation_flops / step_flops;
        assert!((n - n.round()).abs() < 1e-9, "{t:?}: whole steps only");
        validated += t.validation_flops;
    }
    // Three audits, one whole step of two micro-batches recomputed each.
    assert!((validated - 3.0 * step_flops).abs() < 1e-6 * step_flops);
}

#[test]
fn old_bodies_parse_and_new_fields_are_left_out_when_empty() {
    // A step report, an order and a verdict as workers and coordinators
    // without contribution audits write them.
    let d: StepDone = serde_json::from_str(
        r#"{"worker":1,"epoch":2,"completed":3,"loss":null,"grad_norm":1.0,
            "seconds":0.5,"busy_seconds":0.4,"commitment":null}"#,
    )
    .expect("an old step report");
    assert!(d.suspects.is_empty());
    let o: AuditOrder =
        serde_json::from_str(r#"{"audit":1,"step":2,"stage":0,"mb":3,"role":{"kind":"provide"}}"#)
            .expect("an old order");
    assert_eq!(o.contribution, None);
    let r: AuditReport = serde_json::from_str(
        r#"{"worker":1,"epoch":2,"completed":3,"audit":4,
            "result":{"kind":"recomputed","output":"a","gradient":"b","input":"c","signature":"d"}}"#,
    )
    .expect("an old verdict");
    assert!(matches!(r.result, AuditResult::Recomputed { .. }));
    // Without suspects or a scope the new fields are not written.
    let text = serde_json::to_string(&d).expect("json");
    assert!(!text.contains("suspects"), "{text}");
    let text = serde_json::to_string(&o).expect("json");
    assert!(!text.contains("contribution"), "{text}");
    // With them they are, and read back.
    let mut o2 = o.clone();
    o2.contribution = Some(ContributionScope {
        micro_batches: vec![3, 5],
        committed: None,
    });
    let back: AuditOrder =
        serde_json::from_str(&serde_json::to_string(&o2).expect("json")).expect("parse");
    assert_eq!(back, o2);
    // A scope without the committed hash (an older coordinator's) reads
    // as none; with it, it reads back.
    let text = serde_json::to_string(&o2).expect("json");
    assert!(!text.contains("committed"), "{text}");
    o2.contribution = Some(ContributionScope {
        micro_batches: vec![3, 5],
        committed: Some("c".repeat(64)),
    });
    let back: AuditOrder =
        serde_json::from_str(&serde_json::to_string(&o2).expect("json")).expect("parse");
    assert_eq!(back, o2);
    let v = AuditResult::Contribution {
        recomputed: "r".into(),
        received: "x".into(),
        signature: "s".into(),
    };
    let text = serde_json::to_string(&v).expect("json");
    assert!(text.contains(r#""kind":"contribution""#), "{text}");
    assert_eq!(
        serde_json::from_str::<AuditResult>(&text).expect("parse"),
        v
    );
    // The message names the audit kind, so no micro-batch verdict's
    // signature can stand for a contribution verdict.
    let m = crate::coord::api::contribution_message(&crate::coord::api::ContributionClaim {
        run_id: "r",
        audit: 1,
        step: 2,
        stage: 0,
        audited_replica: 3,
        recomputed: "a",
        received: "b",
    });
    assert_eq!(
        String::from_utf8(m).expect("text"),
        "run=r audit=1 step=2 stage=0 contribution replica=3 recomputed=a received=b"
    );
}

/// A 1 × `replicas` run under a robust aggregation, contribution audits
/// at rate 1, the coordinator validating, whose step 1 every honest shard
/// passed (so the replicas agreed on a digest of their parameters).
fn refereed_robust(
    replicas: usize,
    secret: [u8; 32],
    now: Instant,
) -> (Coordinator, Vec<u64>, BTreeMap<u64, Identity>, World) {
    refereed_from(robust(1, replicas, 1.0, secret, now), now)
}

#[test]
fn two_lying_neighbours_are_refuted_by_the_coordinators_recomputation() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed_robust(3, [84; 32], now);
    // Replicas 0 and 1, the honest replica 2's only ring neighbours, both
    // say its work does not give what it signed.
    w.liars = vec![ids[0], ids[1]];
    let e = c.epoch();
    let (answers, orders) = drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(c.convictions().is_empty(), "{:?}", c.convictions());
    // The coordinator recomputed replica 2's step from uploaded parameters.
    let uploads = contribution_orders(&orders)
        .iter()
        .filter(|(_, o)| o.role == AuditRole::Weights)
        .count();
    assert!(uploads >= 1, "{orders:?}");
    assert!(
        c.coordinator_recomputations()
            .get(&(0, "overturned"))
            .is_some_and(|&n| n >= 1),
        "{:?}",
        c.coordinator_recomputations()
    );
    // Both liars were refuted and refused; nobody was convicted, and the
    // honest replica keeps its slot.
    assert!(c
        .refused()
        .get("overturned_verdict")
        .is_some_and(|&n| n >= 2));
    assert!(c.heartbeat(ids[2], now).is_ok());
    assert!(c.status(now).quarantined.is_empty());
    assert!(answers.contains_key(&ids[2]));
}

#[test]
fn a_flipped_contribution_is_convicted_with_the_coordinators_recomputation_agreeing() {
    let now = Instant::now();
    let (mut c, ids, keys, mut w) = refereed_robust(3, [85; 32], now);
    w.flip = Some((0, 1));
    let e = c.epoch();
    drive(&mut c, &w, &ids, &keys, e, 2, now);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1, "{:?}", c.refused());
    assert_eq!(convictions[0].worker, ids[1]);
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["confirmed_by"], "coordinator");
    assert_eq!(evidence["coordinator"], evidence["recomputed"][0]);
    assert_eq!(evidence["recomputed"][0], evidence["recomputed"][1]);
    assert_ne!(evidence["coordinator"], evidence["contribution"]);
    assert_eq!(
        c.coordinator_recomputations().get(&(0, "convicted")),
        Some(&1)
    );
    assert!(c.refused().get("overturned_verdict").is_none());
}

#[test]
fn with_two_replicas_the_coordinator_is_the_second_validator_of_a_contribution() {
    let now = Instant::now();
    // A flipped contribution: the one neighbour and the coordinator agree.
    let (mut c, ids, keys, mut w) = refereed_robust(2, [86; 32], now);
    w.flip = Some((0, 0));
    let e = c.epoch();
    drive(&mut c, &w, &ids, &keys, e, 2, now);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1, "{:?}", c.refused());
    assert_eq!(convictions[0].worker, ids[0]);
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["second_validator"], "coordinator");
    assert_eq!(evidence["coordinator"], evidence["recomputed"][0]);
    assert!(c.heartbeat(ids[1], now).is_ok(), "the validator stays");
    // A lying validator: the coordinator reproduces the commitment and
    // refutes it; the step goes on.
    let (mut c, ids, keys, mut w) = refereed_robust(2, [87; 32], now);
    w.liars = vec![ids[1]];
    let e = c.epoch();
    drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(c.convictions().is_empty());
    assert!(c
        .refused()
        .get("overturned_verdict")
        .is_some_and(|&n| n >= 1));
    assert!(c.heartbeat(ids[0], now).is_ok());
    // A replica that sends other than it signed: the one neighbour proves
    // it with the frames it signed, which convicts with no recomputation
    // by the coordinator.
    let (mut c, ids, keys, mut w) = refereed_robust(2, [88; 32], now);
    w.send_lie = Some((0, 0));
    let e = c.epoch();
    drive(&mut c, &w, &ids, &keys, e, 2, now);
    let convictions = c.convictions();
    assert_eq!(convictions.len(), 1, "{:?}", c.refused());
    assert_eq!(convictions[0].worker, ids[0]);
    let evidence: serde_json::Value =
        serde_json::from_str(&convictions[0].evidence).expect("one line of JSON");
    assert_eq!(evidence["receipt_frames"][0], 2);
    assert_eq!(evidence["coordinator"], serde_json::Value::Null);
    assert!(c.coordinator_recomputations().is_empty());
    // The neighbour claims a receipt it cannot prove: struck, and with its
    // recomputation equal to the commitment the audit passes.
    let (mut c, ids, keys, mut w) = refereed_robust(2, [89; 32], now);
    w.receipt_liars = vec![ids[1]];
    let e = c.epoch();
    drive(&mut c, &w, &ids, &keys, e, 2, now);
    assert!(c.convictions().is_empty());
    assert!(c.refused().get("unproven_receipt").is_some_and(|&n| n >= 1));
    assert_eq!(c.committed(), 2);
}
