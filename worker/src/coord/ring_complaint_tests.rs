//! Complaints about refused gradient ring frames through the state
//! machine: a signed ring frame holding a NaN or an infinity convicts its
//! author (`refused_frame`), including one a real ring refused; a finite
//! one, however large, convicts no one (`unfounded_complaint`); a ring
//! frame signed by anyone but the author it names (a relay's forgery),
//! unsigned, signed in the pipeline frames' domain, altered, reshaped, of
//! another epoch or run key convicts no one and is counted (`complaint`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::{ComplaintVerdict, Coordinator};
use crate::coord::test_support::{self, refusal, seated_by_shard, ByShard};
use crate::identity::{Identity, FRAME_DOMAIN};
use crate::link::frame::{encode, Frame, FrameHeader, SIGNATURE_LEN};
use crate::link::sign::{epoch_run_id, frame_message, sign_frame, PeerKeys};
use crate::link::{Codec, DType, FrameKind, RunId, RunKey, Shape, WorkerId};
use crate::sync::{on_loopback_ring, RingConfig, RingError};

const RUN: RunId = RunId([5; 16]);
const KEY: RunKey = RunKey([11; 32]);

/// A 2 × 3 run with every shard registered under its own identity: the
/// coordinator, the worker ids and the identities by shard.
fn setup(now: Instant) -> (Coordinator, ByShard<u64>, ByShard<Identity>) {
    seated_by_shard(2, 3, 40, now)
}

/// A gradient ring frame of stage 1 `replica` at training step `step`
/// (0-based), carrying `values`, in `epoch`.
fn ring_frame(epoch: u64, replica: u32, step: u64, values: &[f32]) -> Frame {
    Frame::new(
        FrameHeader {
            run_id: epoch_run_id(&RUN, epoch),
            step,
            micro_batch: (2 << 40) | (1 << 24),
            stage: 1,
            replica,
            kind: FrameKind::AllReduce,
            dtype: DType::F32,
            codec: Codec::F32,
            shape: Shape::vector(values.len() as u32),
            sender: WorkerId([replica as u8; 16]),
            input_hash: [0; 32],
            signature: [0; SIGNATURE_LEN],
        },
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

fn signed(f: Frame, by: &Identity) -> Vec<u8> {
    test_support::signed(f, by, &KEY)
}

fn with(at: usize, value: f32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) * 0.01).collect();
    v[at] = value;
    v
}

#[test]
fn a_signed_ring_frame_with_a_nan_or_an_infinity_convicts_its_author_once() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    let nan = signed(ring_frame(e, 2, 3, &with(7, f32::NAN)), &keys[&(1, 2)]);
    let verdict = c.complaint(ids[&(1, 0)], e, &nan, &KEY, &RUN, now);
    assert_eq!(
        verdict.expect("convicted"),
        ComplaintVerdict::Convicted {
            shard: (1, 2),
            worker: ids[&(1, 2)]
        }
    );
    let convicted = c.convictions();
    assert_eq!(convicted.len(), 1);
    assert_eq!(convicted[0].identity, keys[&(1, 2)].public_hex());
    assert_eq!((convicted[0].stage, convicted[0].replica), (1, 2));
    assert_eq!(convicted[0].step, 4, "the signed training step, 1-based");
    assert_eq!(convicted[0].reason, "refused_frame");
    assert!(convicted[0].evidence.contains("AllReduce"));
    assert!(convicted[0].evidence.contains("non_finite"));
    assert!(c.barred_worker(ids[&(1, 2)]).is_some(), "quarantined");
    // The other receiver of the same contribution shows it too: nothing
    // more happens.
    let again = c.complaint(ids[&(1, 1)], e, &nan, &KEY, &RUN, now);
    assert_eq!(again.expect("known"), ComplaintVerdict::AlreadyConvicted);
    assert_eq!(c.convictions().len(), 1);

    // An infinity in a partial sum convicts its author as well.
    let inf = signed(
        ring_frame(e, 0, 3, &with(39, f32::INFINITY)),
        &keys[&(1, 0)],
    );
    let verdict = c.complaint(ids[&(1, 1)], e, &inf, &KEY, &RUN, now);
    assert!(matches!(
        verdict,
        Ok(ComplaintVerdict::Convicted { shard: (1, 0), .. })
    ));
    assert_eq!(c.refused().get("refused_frame"), Some(&2));
    assert_eq!(c.refused().get("complaint"), None);
}

#[test]
fn a_finite_ring_frame_convicts_no_one_however_large() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    // The norm test needs the other contributions: a frame alone cannot
    // show that one is absurd, so only NaN and infinities convict.
    for values in [with(0, 0.5), with(3, 3e37), vec![0.0; 40], Vec::new()] {
        let body = signed(ring_frame(e, 1, 2, &values), &keys[&(1, 1)]);
        let r = c.complaint(ids[&(1, 2)], e, &body, &KEY, &RUN, now);
        assert_eq!(refusal(r), "unfounded_complaint");
    }
    assert!(c.convictions().is_empty());
    assert!(c.barred_worker(ids[&(1, 1)]).is_none());
    assert!(c.barred_worker(ids[&(1, 2)]).is_none());
    assert_eq!(c.refused().get("unfounded_complaint"), Some(&4));
}

#[test]
fn forged_relayed_altered_or_malformed_ring_frames_convict_no_one() {
    let now = Instant::now();
    let (mut c, ids, keys) = setup(now);
    let e = c.epoch();
    let complainer = ids[&(1, 0)];
    let nan = with(7, f32::NAN);
    let frame = ring_frame(e, 2, 3, &nan);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A relay (replica 1) passing off a NaN contribution in replica 2's
    // name can only sign it with its own key.
    cases.push(("signed by a relay", signed(frame.clone(), &keys[&(1, 1)])));
    cases.push((
        "signed by the complainer",
        signed(frame.clone(), &keys[&(1, 0)]),
    ));
    let stranger = Identity::from_secret([99; 32]);
    cases.push(("signed by a stranger", signed(frame.clone(), &stranger)));
    cases.push(("unsigned", encode(&frame, &KEY)));
    // The author's signature over the same fields, but in the pipeline
    // frames' domain: not a ring frame's signature.
    let mut other_domain = frame.clone();
    let hash = other_domain.hash_payload();
    other_domain.header.signature =
        keys[&(1, 2)].sign_bytes(FRAME_DOMAIN, &frame_message(&other_domain.header, &hash));
    cases.push(("pipeline domain", encode(&other_domain, &KEY)));
    // An honest frame, signed, whose payload the complainer replaced by NaN.
    let mut altered = ring_frame(e, 2, 3, &with(7, 0.5));
    sign_frame(&mut altered, &keys[&(1, 2)]);
    altered.payload = nan.iter().flat_map(|v| v.to_le_bytes()).collect();
    altered.verified_hash = None;
    cases.push(("altered payload", encode(&altered, &KEY)));
    // The signed step, tag or author changed.
    for (what, alter) in [
        (
            "another step",
            (|f: &mut Frame| f.header.step += 1) as fn(&mut Frame),
        ),
        ("another segment", |f: &mut Frame| f.header.micro_batch += 1),
        ("another author", |f: &mut Frame| f.header.replica = 0),
    ] {
        let mut f = frame.clone();
        sign_frame(&mut f, &keys[&(1, 2)]);
        alter(&mut f);
        cases.push((what, encode(&f, &KEY)));
    }
    // The author's bytes read as a matrix, or under another codec.
    let mut reshaped = frame.clone();
    sign_frame(&mut reshaped, &keys[&(1, 2)]);
    reshaped.header.shape = Shape::matrix(4, 10);
    cases.push(("reshaped", encode(&reshaped, &KEY)));
    let mut half = ring_frame(e, 2, 3, &nan[..20]);
    half.header.dtype = DType::F16;
    half.header.codec = Codec::F16;
    half.header.shape = Shape::vector(40);
    cases.push(("another codec", signed(half, &keys[&(1, 2)])));
    // Of another epoch, another run key, cut short.
    cases.push((
        "another epoch",
        signed(ring_frame(e + 3, 2, 3, &nan), &keys[&(1, 2)]),
    ));
    let mut genuine = frame.clone();
    sign_frame(&mut genuine, &keys[&(1, 2)]);
    cases.push(("another run key", encode(&genuine, &RunKey([1; 32]))));
    let whole = encode(&genuine, &KEY);
    cases.push(("truncated", whole[..whole.len() - 3].to_vec()));
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
        Ok(ComplaintVerdict::Convicted { shard: (1, 2), .. })
    ));
}

/// A real ring of stage 1's three replicas, signed and checked with the
/// registered keys: replica 1 sends NaN in its gradient (its own screen
/// turned off, as the `grad-nan` drill does), under the ring mean and in
/// a robust rule's gather. The frame its receiver refused, shown to the
/// coordinator as it arrived, convicts replica 1 and nobody else.
#[test]
fn the_frame_a_ring_refused_convicts_its_author() {
    for gather in [false, true] {
        let now = Instant::now();
        let (mut c, ids, keys) = setup(now);
        let e = c.epoch();
        let shared: Vec<(usize, usize, String)> = keys
            .iter()
            .map(|(&(s, r), k)| (s, r, k.public_hex()))
            .collect();
        let peer_keys = Arc::new(PeerKeys::from_hex(&shared).expect("keys"));
        let answered = std::sync::Barrier::new(3);
        let errors = on_loopback_ring(
            3,
            |rank| {
                let mut cfg = RingConfig::new(
                    rank,
                    3,
                    epoch_run_id(&RUN, e),
                    KEY,
                    WorkerId([rank as u8; 16]),
                );
                cfg.stage = 1;
                cfg.timeout = Duration::from_secs(5);
                cfg.signer = Some(Arc::new(keys[&(1, rank)].clone()));
                cfg.keys = Some(peer_keys.clone());
                cfg
            },
            |mut m| {
                let rank = m.rank();
                m.begin_step(6, rank != 1);
                let mut buf: Vec<f32> = (0..3000).map(|i| (i % 13) as f32 * 0.1).collect();
                if rank == 1 {
                    buf[1234] = f32::NAN;
                }
                let r = if gather {
                    m.allgather(&buf).map(|_| ())
                } else {
                    m.allreduce_mean(&mut buf)
                };
                answered.wait();
                r.err()
            },
        );
        let refused: Vec<Frame> = errors
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                RingError::Refused {
                    origin: 1,
                    reason: "non_finite",
                    frame: Some(f),
                    ..
                } => Some(*f.0),
                _ => None,
            })
            .collect();
        assert!(!refused.is_empty(), "gather {gather}: a receiver refused");
        let body = encode(&refused[0], &KEY);
        let verdict = c.complaint(ids[&(1, 2)], e, &body, &KEY, &RUN, now);
        assert_eq!(
            verdict.expect("convicted"),
            ComplaintVerdict::Convicted {
                shard: (1, 1),
                worker: ids[&(1, 1)]
            },
            "gather {gather}"
        );
        assert_eq!(c.convictions()[0].step, 7, "gather {gather}");
        assert_eq!(c.convictions().len(), 1);
    }
}
