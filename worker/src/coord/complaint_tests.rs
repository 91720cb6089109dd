//! Complaints about refused frames through the state machine: a frame
//! that fails the screen and carries its author's signature convicts the
//! author; an honest frame, a forged or altered signature, a reinterpreted
//! payload and malformed bodies convict nobody and are counted.

use std::time::Instant;

use super::super::{ComplaintVerdict, CoordError, Coordinator};
use crate::coord::test_support::{self, refusal, seated_by_shard, ByShard};
use crate::identity::Identity;
use crate::link::codec::TensorWire;
use crate::link::frame::{encode, Frame, FrameHeader, SIGNATURE_LEN};
use crate::link::sign::{epoch_run_id, sign_frame};
use crate::link::{FrameKind, RunId, RunKey, Shape, WorkerId};

const RUN: RunId = RunId([7; 16]);
const KEY: RunKey = RunKey([9; 32]);

/// A 2 × 3 run with every shard registered under its own identity: the
/// coordinator, the worker ids by shard and the identities by shard.
fn setup(now: Instant) -> (Coordinator, ByShard<u64>, ByShard<Identity>) {
    seated_by_shard(2, 3, 10, now)
}

/// An activation frame of stage 0 `replica` at `step`, micro-batch 1,
/// of `values` (4 × 8 f32), in `epoch`.
fn activation(epoch: u64, replica: u32, step: u64, values: &[f32]) -> Frame {
    let wire = TensorWire::F32;
    Frame::new(
        FrameHeader {
            run_id: epoch_run_id(&RUN, epoch),
            step,
            micro_batch: 1,
            stage: 0,
            replica,
            kind: FrameKind::Activation,
            dtype: wire.dtype,
            codec: wire.codec,
            shape: Shape::matrix(4, 8),
            sender: WorkerId([replica as u8; 16]),
            input_hash: [3; 32],
            signature: [0; SIGNATURE_LEN],
        },
        wire.encode(values, 4, 8).expect("encode"),
    )
}

fn signed(f: Frame, by: &Identity) -> Vec<u8> {
    test_support::signed(f, by, &KEY)
}

fn nan_values() -> Vec<f32> {
    let mut v = vec![0.5f32; 32];
    v[17] = f32::NAN;
    v
}

#[test]
fn a_signed_frame_every_receiver_refuses_convicts_its_author_once() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    let nan = signed(activation(e, 1, 4, &nan_values()), &keys[&(0, 1)]);
    let verdict = c.complaint(ids[&(1, 1)], e, &nan, &KEY, &RUN, now);
    assert_eq!(
        verdict.expect("convicted"),
        ComplaintVerdict::Convicted {
            shard: (0, 1),
            worker: ids[&(0, 1)]
        }
    );
    let convicted = c.convictions();
    assert_eq!(convicted.len(), 1);
    assert_eq!(convicted[0].identity, keys[&(0, 1)].public_hex());
    assert_eq!((convicted[0].stage, convicted[0].replica), (0, 1));
    assert_eq!(convicted[0].step, 5);
    assert_eq!(convicted[0].reason, "refused_frame");
    assert!(convicted[0].evidence.contains("non_finite"));
    assert!(c.barred_worker(ids[&(0, 1)]).is_some(), "quarantined");
    assert_eq!(c.refused().get("refused_frame"), Some(&1));
    // Another receiver showing the same frame later changes nothing.
    let again = c.complaint(ids[&(1, 2)], e, &nan, &KEY, &RUN, now);
    assert_eq!(again.expect("known"), ComplaintVerdict::AlreadyConvicted);
    assert_eq!(c.convictions().len(), 1);
    assert_eq!(c.refused().get("complaint"), None);

    // An absurd norm convicts as well.
    let absurd = signed(activation(e, 2, 4, &[3e7; 32]), &keys[&(0, 2)]);
    let verdict = c.complaint(ids[&(1, 2)], e, &absurd, &KEY, &RUN, now);
    assert!(matches!(
        verdict,
        Ok(ComplaintVerdict::Convicted { shard: (0, 2), .. })
    ));
    assert!(c.convictions()[1].evidence.contains("absurd_norm"));
}

#[test]
fn a_complaint_about_an_honest_frame_convicts_no_one_and_is_counted() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    let values: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25).collect();
    let honest = signed(activation(e, 0, 2, &values), &keys[&(0, 0)]);
    let r = c.complaint(ids[&(1, 0)], e, &honest, &KEY, &RUN, now);
    assert_eq!(refusal(r), "unfounded_complaint");
    // Zeros, the lazy worker's activations, pass the screen too: a
    // complaint about them convicts no one either.
    let zeros = signed(activation(e, 0, 2, &[0.0; 32]), &keys[&(0, 0)]);
    let r = c.complaint(ids[&(1, 0)], e, &zeros, &KEY, &RUN, now);
    assert_eq!(refusal(r), "unfounded_complaint");
    assert!(c.convictions().is_empty());
    assert!(c.barred_worker(ids[&(0, 0)]).is_none());
    assert!(c.barred_worker(ids[&(1, 0)]).is_none());
    assert_eq!(c.refused().get("unfounded_complaint"), Some(&2));
}

#[test]
fn forged_altered_or_reinterpreted_frames_and_malformed_complaints_convict_no_one() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    let complainer = ids[&(1, 1)];
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A NaN frame in stage 0 replica 1's name, signed by another identity
    // (the complainer's own, or a stranger's).
    let frame = activation(e, 1, 4, &nan_values());
    cases.push((
        "signed by the complainer",
        signed(frame.clone(), &keys[&(1, 1)]),
    ));
    let stranger = Identity::from_secret([99; 32]);
    cases.push(("signed by a stranger", signed(frame.clone(), &stranger)));
    cases.push(("unsigned", encode(&frame, &KEY)));
    // An honest frame, signed, whose payload the complainer replaced by
    // NaN (the frame re-encoded with the new payload's hash).
    let values = vec![0.25f32; 32];
    let mut altered = activation(e, 1, 4, &values);
    sign_frame(&mut altered, &keys[&(0, 1)]);
    altered.payload = TensorWire::F32.encode(&nan_values(), 4, 8).expect("encode");
    altered.verified_hash = None;
    cases.push(("altered payload", encode(&altered, &KEY)));
    // The author's bytes read under another shape.
    let mut reshaped = activation(e, 1, 4, &values);
    sign_frame(&mut reshaped, &keys[&(0, 1)]);
    reshaped.header.shape = Shape::matrix(8, 4);
    cases.push(("another shape", encode(&reshaped, &KEY)));
    // A NaN frame signed by its author, but of another epoch, another
    // run key, cut short, or not a frame at all.
    let other_epoch = activation(e + 7, 1, 4, &nan_values());
    cases.push(("another epoch", signed(other_epoch, &keys[&(0, 1)])));
    let mut f = activation(e, 1, 4, &nan_values());
    sign_frame(&mut f, &keys[&(0, 1)]);
    cases.push(("another run key", encode(&f, &RunKey([1; 32]))));
    let whole = encode(&f, &KEY);
    cases.push(("truncated", whole[..whole.len() - 5].to_vec()));
    cases.push(("empty", Vec::new()));
    cases.push(("noise", (0..600).map(|i| (i * 7 % 256) as u8).collect()));
    // An activation relabelled as targets: not target ids and their
    // origin (`relayed_targets`).
    let mut targets = activation(e, 1, 4, &nan_values());
    targets.header.kind = FrameKind::Targets;
    cases.push(("targets", signed(targets, &keys[&(0, 1)])));
    for (what, body) in &cases {
        let r = c.complaint(complainer, e, body, &KEY, &RUN, now);
        assert_eq!(refusal(r), "complaint", "{what}");
    }
    assert!(c.convictions().is_empty(), "nobody convicted");
    assert_eq!(c.refused().get("complaint"), Some(&(cases.len() as u64)));
    // The genuine frame still convicts its author.
    let r = c.complaint(complainer, e, &whole, &KEY, &RUN, now);
    assert!(matches!(
        r,
        Ok(ComplaintVerdict::Convicted { shard: (0, 1), .. })
    ));
    // A complaint from an unknown or a quarantined worker is not heard.
    assert!(matches!(
        c.complaint(9999, e, &whole, &KEY, &RUN, now),
        Err(CoordError::UnknownWorker(9999))
    ));
    assert!(matches!(
        c.complaint(ids[&(0, 1)], e, &whole, &KEY, &RUN, now),
        Err(CoordError::Quarantined(_))
    ));
}

#[test]
fn the_wiring_hands_out_every_shard_holders_public_key() {
    let now = Instant::now();
    let (c, _, keys) = setup(now);
    let mut got = c.shard_keys();
    got.sort();
    let want: Vec<(usize, usize, String)> = keys
        .iter()
        .map(|(&(s, r), k)| (s, r, k.public_hex()))
        .collect();
    assert_eq!(got, want);
}

mod rechecks {
    use super::*;
    use crate::coord::complaint_api::{recheck_message, BrokenStep, RecheckReport};
    use crate::identity::RECHECK_DOMAIN;
    use crate::link::sign::SignedHeader;

    const RUN_HEX: &str = "0707070707070707";

    /// The signed header of stage 0 `replica`'s activation of micro-batch
    /// `mb` at `step`, computed from the tokens whose hash is `input` and
    /// hashing to `output`'s bytes.
    fn header(
        e: u64,
        replica: u32,
        step: u64,
        mb: u64,
        by: &Identity,
        bytes: &[f32],
    ) -> SignedHeader {
        let mut f = activation(e, replica, step, bytes);
        f.header.micro_batch = mb;
        f.header.input_hash = tokens(mb);
        sign_frame(&mut f, by);
        SignedHeader::of(&f)
    }

    fn tokens(mb: u64) -> [u8; 32] {
        *blake3::hash(format!("tokens {mb}").as_bytes()).as_bytes()
    }

    fn honest(mb: u64) -> Vec<f32> {
        (0..32).map(|i| (i as f32 + mb as f32) * 0.1).collect()
    }

    fn output_hash(values: &[f32]) -> String {
        hex::encode(blake3::hash(&TensorWire::F32.encode(values, 4, 8).expect("encode")).as_bytes())
    }

    /// Stage 0 replica 1 signs `sent(mb)` for micro-batches 0 and 1 of step
    /// 3; its receiver reports the headers and a stage-0 peer suspects it.
    /// Returns how many rechecks were ordered.
    fn broken_step(
        c: &mut Coordinator,
        ids: &ByShard<u64>,
        keys: &ByShard<Identity>,
        sent: fn(u64) -> Vec<f32>,
        now: Instant,
    ) -> usize {
        let e = c.epoch();
        let frames = (0..2)
            .map(|mb| header(e, 1, 3, mb, &keys[&(0, 1)], &sent(mb)))
            .collect();
        let receiver = BrokenStep {
            worker: ids[&(1, 1)],
            epoch: e,
            step: 3,
            suspects: Vec::new(),
            frames,
        };
        assert_eq!(c.broken_step(&receiver, &RUN, now).expect("kept"), 0);
        let peer = BrokenStep {
            worker: ids[&(0, 0)],
            epoch: e,
            step: 3,
            suspects: vec![(0, 1)],
            frames: Vec::new(),
        };
        c.broken_step(&peer, &RUN, now).expect("ordered")
    }

    /// Each validator (stage 0 replicas 0 and 2) carries out its orders,
    /// reporting what `computes(validator, mb)` gives.
    fn validate(
        c: &mut Coordinator,
        ids: &ByShard<u64>,
        keys: &ByShard<Identity>,
        computes: &dyn Fn(usize, u64) -> Vec<f32>,
        now: Instant,
    ) {
        for v in [0, 2] {
            let worker = ids[&(0, v)];
            let orders = c.recheck_orders(worker);
            assert_eq!(orders.len(), 2, "validator {v}: {orders:?}");
            for o in orders {
                let (input, output) = (hex::encode(tokens(o.mb)), output_hash(&computes(v, o.mb)));
                let message = recheck_message(RUN_HEX, &o, &input, &output);
                let r = RecheckReport {
                    worker,
                    recheck: o.recheck,
                    signature: keys[&(0, v)].sign(RECHECK_DOMAIN, &message),
                    input,
                    output,
                    error: None,
                };
                c.recheck_report(&r, RUN_HEX, now).expect("accepted");
            }
            assert!(c.recheck_orders(worker).is_empty());
        }
    }

    #[test]
    fn a_first_stage_that_signed_zeros_is_convicted_by_two_validators() {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        let epoch = c.epoch();
        assert_eq!(broken_step(&mut c, &ids, &keys, |_| vec![0.0; 32], now), 2);
        assert!(c.epoch() > epoch, "a new epoch carries the orders");
        assert!(c.recheck_only(c.epoch()), "in which nobody links");
        assert!(
            c.recheck_orders(ids[&(0, 1)]).is_empty(),
            "not its own validator"
        );
        validate(&mut c, &ids, &keys, &|_, mb| honest(mb), now);
        let convicted = c.convictions();
        assert_eq!(convicted.len(), 1, "{convicted:?}");
        assert_eq!((convicted[0].stage, convicted[0].replica), (0, 1));
        assert_eq!(convicted[0].reason, "failed_recheck");
        assert_eq!(convicted[0].step, 4);
        assert!(c.barred_worker(ids[&(0, 1)]).is_some());
        assert_eq!(c.recheck_outcomes().get("failed"), Some(&2));
        assert_eq!(c.open_rechecks(), 0);
        assert!(!c.recheck_only(c.epoch()), "the conviction's epoch trains");
        for v in [(0, 0), (0, 2), (1, 1)] {
            assert!(c.barred_worker(ids[&v]).is_none(), "{v:?} is honest");
        }
    }

    #[test]
    fn a_recheck_of_an_honest_worker_convicts_no_one() {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        assert_eq!(broken_step(&mut c, &ids, &keys, honest, now), 2);
        let held = c.epoch();
        assert!(c.recheck_only(held));
        validate(&mut c, &ids, &keys, &|_, mb| honest(mb), now);
        assert!(c.convictions().is_empty());
        assert_eq!(c.recheck_outcomes().get("passed"), Some(&2));
        assert!(c.epoch() > held, "decided: the run trains again");
        assert!(!c.recheck_only(c.epoch()));
        // The same step reported again orders nothing more.
        assert_eq!(broken_step(&mut c, &ids, &keys, honest, now), 0);
    }

    #[test]
    fn validators_that_disagree_convict_no_one() {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        assert_eq!(broken_step(&mut c, &ids, &keys, |_| vec![0.0; 32], now), 2);
        // Validator 2 lies: neither the signed value nor validator 0's.
        validate(
            &mut c,
            &ids,
            &keys,
            &|v, mb| if v == 2 { vec![9.0; 32] } else { honest(mb) },
            now,
        );
        assert!(c.convictions().is_empty());
        assert_eq!(c.recheck_outcomes().get("unconfirmed"), Some(&2));
    }

    #[test]
    fn forged_headers_and_bad_verdicts_are_refused_and_counted() {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        let e = c.epoch();
        let report = |frames: Vec<SignedHeader>| BrokenStep {
            worker: ids[&(1, 1)],
            epoch: e,
            step: 3,
            suspects: vec![(0, 1)],
            frames,
        };
        let zeros = [0.0f32; 32];
        // Signed by another identity than the shard's, of another step,
        // of another epoch, or not a header at all.
        let forged = header(e, 1, 3, 0, &keys[&(1, 1)], &zeros);
        let other_step = header(e, 1, 2, 0, &keys[&(0, 1)], &zeros);
        let other_epoch = header(e + 3, 1, 3, 0, &keys[&(0, 1)], &zeros);
        let mut garbled = header(e, 1, 3, 0, &keys[&(0, 1)], &zeros);
        garbled.signature = "zz".into();
        for (what, f) in [
            ("forged", forged),
            ("other step", other_step),
            ("other epoch", other_epoch),
            ("garbled", garbled),
        ] {
            let r = c.broken_step(&report(vec![f]), &RUN, now);
            assert_eq!(refusal(r), "complaint", "{what}");
        }
        assert_eq!(c.open_rechecks(), 0, "nothing kept");
        assert_eq!(c.refused().get("complaint"), Some(&4));
        // A genuine one orders a recheck; verdicts from a non-validator,
        // with a bad signature or malformed hashes are refused.
        let genuine = header(e, 1, 3, 0, &keys[&(0, 1)], &zeros);
        assert_eq!(
            c.broken_step(&report(vec![genuine]), &RUN, now)
                .expect("ok"),
            1
        );
        // The recheck started a new epoch: a late report of the old one
        // whose header its shard's holder did not sign (the author may
        // have been replaced since) is dropped, not held against anyone.
        assert!(c.epoch() > e);
        let late = header(e, 1, 3, 1, &keys[&(1, 1)], &zeros);
        assert_eq!(
            c.broken_step(&report(vec![late]), &RUN, now).expect("ok"),
            0
        );
        assert_eq!(c.refused().get("complaint"), Some(&4));
        let o = c.recheck_orders(ids[&(0, 0)]).pop().expect("an order");
        let (input, output) = (hex::encode(tokens(0)), output_hash(&honest(0)));
        let message = recheck_message(RUN_HEX, &o, &input, &output);
        let good = RecheckReport {
            worker: ids[&(0, 0)],
            recheck: o.recheck,
            signature: keys[&(0, 0)].sign(RECHECK_DOMAIN, &message),
            input: input.clone(),
            output: output.clone(),
            error: None,
        };
        let stranger = RecheckReport {
            worker: ids[&(1, 0)],
            signature: keys[&(1, 0)].sign(RECHECK_DOMAIN, &message),
            ..good.clone()
        };
        assert_eq!(
            refusal(c.recheck_report(&stranger, RUN_HEX, now)),
            "audit_report"
        );
        let mut unsigned = good.clone();
        unsigned.signature = keys[&(0, 2)].sign(RECHECK_DOMAIN, &message);
        assert_eq!(
            refusal(c.recheck_report(&unsigned, RUN_HEX, now)),
            "signature"
        );
        let mut malformed = good.clone();
        malformed.output = "xyz".into();
        assert_eq!(
            refusal(c.recheck_report(&malformed, RUN_HEX, now)),
            "audit_report"
        );
        c.recheck_report(&good, RUN_HEX, now)
            .expect("the genuine verdict");
        assert!(c.convictions().is_empty());
    }

    #[test]
    fn a_validator_that_could_not_recompute_leaves_the_recheck_unconfirmed() {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        assert_eq!(broken_step(&mut c, &ids, &keys, |_| vec![0.0; 32], now), 2);
        for v in [0, 2] {
            let worker = ids[&(0, v)];
            for o in c.recheck_orders(worker) {
                let (input, output) = if v == 0 {
                    (String::new(), String::new())
                } else {
                    (hex::encode(tokens(o.mb)), output_hash(&honest(o.mb)))
                };
                let message = recheck_message(RUN_HEX, &o, &input, &output);
                let r = RecheckReport {
                    worker,
                    recheck: o.recheck,
                    signature: keys[&(0, v)].sign(RECHECK_DOMAIN, &message),
                    error: (v == 0).then(|| "holds another step".to_string()),
                    input,
                    output,
                };
                c.recheck_report(&r, RUN_HEX, now).expect("accepted");
            }
        }
        assert!(c.convictions().is_empty(), "one validator cannot convict");
        assert_eq!(c.recheck_outcomes().get("unconfirmed"), Some(&2));
        assert!(!c.recheck_only(c.epoch()));
    }
}
