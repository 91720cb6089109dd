//! Receipts of gathered contributions: what a replica keeps of the frames
//! in which its ring neighbours sent it their gradient contribution, so it
//! can later prove to the coordinator what it received.
//!
//! Under a robust aggregation every replica signs, in its step commitment,
//! the hash of the contribution it sent (`sync::contribution`). A
//! contribution audit's validator (a ring neighbour of the audited replica)
//! says what it received. "I received something else" is a claim about a
//! peer; on the validator's word alone two colluding neighbours could make
//! it of an honest replica. So the claim must come with its proof: the
//! frames themselves, each signed by the author (`link::sign`, ring
//! domain), which the validator keeps for the step (a [`Receipt`] per
//! frame) and uploads with its verdict. The coordinator checks every
//! signature against the author's registered key and hashes the payloads:
//! only a set of frames the author signed can make the received hash, and
//! it convicts on its own.
//!
//! **A complete set.** A strict subset of an honest author's frames hashes
//! to something else than its commitment; the coordinator must therefore
//! tell a whole contribution from a part of one. Each gathered frame of a
//! contribution signs, in its header's `input_hash` field (unused by the
//! gather otherwise), the contribution's shape as its author lays it out:
//! `part (u32) ‖ parts (u32) ‖ part_len (u64) ‖ 16 zero bytes`, all
//! little-endian, where `parts` is the number of gathered buckets of the
//! step, `part` this bucket's index among them and `part_len` its element
//! count. A receiver refuses a frame whose shape is not its own bucket's
//! (replicas of a stage lay out their buckets alike), or whose header's
//! tensor shape is not a vector of its segment's length, so a set whose
//! frames cover, in order, every part `0..parts` and every segment of
//! each, adding up to each `part_len`, is the whole contribution.
//! Gathers that are not a contribution (the replicas' digest agreement)
//! sign 32 zero bytes there.
//!
//! **The proof's bytes**, all integers little-endian: `b"pwreceipt1"`, then
//! per frame, in (part, segment) order: `tag (u64) ‖ part (u32) ‖ parts
//! (u32) ‖ part_len (u64) ‖ signature (64) ‖ elements (u32) ‖ payload (4 ×
//! elements)`. Every other field of the signed header (the epoch's run
//! id, the step, the author's stage and replica, kind, element type, codec
//! and shape) follows from the audit and the record, so a frame shown for
//! another step, epoch or author fails its signature.

use ed25519_dalek::VerifyingKey;

use crate::link::frame::{FrameHeader, FrameKind, SIGNATURE_LEN};
use crate::link::sign::{domain_of, frame_message};
use crate::link::{Codec, DType, RunId, Shape, WorkerId};

/// The first bytes of a proof.
const MAGIC: &[u8] = b"pwreceipt1";

/// Bytes of a record before its payload.
const RECORD_HEAD: usize = 8 + 4 + 4 + 8 + SIGNATURE_LEN + 4;

/// Where a gathered bucket sits in its author's contribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Its index among the step's gathered buckets.
    pub index: u32,
    /// How many buckets the step gathers.
    pub count: u32,
}

/// The `input_hash` field a gathered frame of bucket `part` (of `len`
/// elements) signs; 32 zero bytes for a gather that is no contribution.
pub fn shape_field(part: Option<Part>, len: usize) -> [u8; 32] {
    let mut f = [0u8; 32];
    if let Some(p) = part {
        f[..4].copy_from_slice(&p.index.to_le_bytes());
        f[4..8].copy_from_slice(&p.count.to_le_bytes());
        f[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    }
    f
}

/// One frame of a peer's contribution as received: what a proof needs of
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The frame's `micro_batch` field (the gather's tag: operation and
    /// segment).
    pub tag: u64,
    /// Its bucket's place in the contribution.
    pub part: Part,
    /// Its bucket's element count.
    pub part_len: u64,
    /// The author's signature.
    pub signature: [u8; SIGNATURE_LEN],
    /// The payload: little-endian f32s.
    pub payload: Vec<u8>,
}

/// The proof of a contribution received as `receipts` (in the order they
/// came: part by part, segment by segment).
pub fn encode(receipts: &[Receipt]) -> Vec<u8> {
    let bytes: usize = receipts.iter().map(|r| RECORD_HEAD + r.payload.len()).sum();
    let mut out = Vec::with_capacity(MAGIC.len() + bytes);
    out.extend_from_slice(MAGIC);
    for r in receipts {
        out.extend_from_slice(&r.tag.to_le_bytes());
        out.extend_from_slice(&r.part.index.to_le_bytes());
        out.extend_from_slice(&r.part.count.to_le_bytes());
        out.extend_from_slice(&r.part_len.to_le_bytes());
        out.extend_from_slice(&r.signature);
        out.extend_from_slice(&((r.payload.len() / 4) as u32).to_le_bytes());
        out.extend_from_slice(&r.payload);
    }
    out
}

/// Whose contribution a proof must be, and where it was sent: what the
/// coordinator needs to check one (it gathers it under its lock and checks
/// the proof outside it).
#[derive(Clone, Copy, Debug)]
pub struct Author {
    /// The run id of the epoch the step was trained in
    /// (`link::sign::epoch_run_id`).
    pub run_id: RunId,
    /// The step, 0-based.
    pub step: u64,
    /// The author's stage and replica.
    pub stage: u32,
    pub replica: u32,
    /// Its registered key.
    pub key: VerifyingKey,
}

/// What a checked proof shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    /// The hash of the contribution the frames make
    /// ([`crate::sync::contribution::contribution_hash`] of their payloads).
    pub hash: [u8; 32],
    /// How many frames.
    pub frames: usize,
    /// How many elements.
    pub elements: u64,
}

/// The part a proof's frames are in, as they are read.
#[derive(Clone, Copy)]
struct Under {
    part: Part,
    /// The part's element count, as signed.
    len: u64,
    /// Its gather operation and the last segment read.
    op: u64,
    seg: u64,
    /// Its elements read so far.
    done: u64,
}

/// Checks `bytes` as a proof of a whole contribution by `author`: well
/// formed, every frame's signature the author's over the header the audit
/// gives, and the frames the complete set (every part, every segment, in
/// order); at most `max_elements` elements. Returns the hash they make, or
/// what is wrong.
pub fn verify(bytes: &[u8], author: &Author, max_elements: u64) -> Result<Proven, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("the proof does not start with pwreceipt1")?;
    let mut hasher = blake3::Hasher::new();
    let (mut frames, mut elements) = (0usize, 0u64);
    // The part under way.
    let mut at: Option<Under> = None;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEAD {
            return Err(format!("frame {frames} is cut short"));
        }
        let (head, tail) = rest.split_at(RECORD_HEAD);
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
        let tag = u64_at(0);
        let part = Part {
            index: u32_at(8),
            count: u32_at(12),
        };
        let part_len = u64_at(16);
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&head[24..24 + SIGNATURE_LEN]);
        let n = u64::from(u32_at(24 + SIGNATURE_LEN));
        let len = usize::try_from(n.saturating_mul(4)).map_err(|_| "too large".to_string())?;
        if tail.len() < len {
            return Err(format!("frame {frames}'s payload is cut short"));
        }
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        elements = elements.saturating_add(n);
        if elements > max_elements {
            return Err(format!(
                "the frames hold more than the {max_elements} elements allowed (the model's \
                 parameters)"
            ));
        }
        if tag >> 63 != 1 {
            return Err(format!("frame {frames} is not a gather frame"));
        }
        let (op, seg) = ((tag >> 40) & ((1 << 23) - 1), tag & ((1 << 24) - 1));
        let here = Under {
            part,
            len: part_len,
            op,
            seg,
            done: n,
        };
        // This frame must be the next segment of the part under way, or
        // the first of the next part once that one is whole.
        let next = match at {
            None => (part.index == 0 && part.count > 0 && seg == 0).then_some(here),
            Some(u) if u.done < u.len => {
                (part == u.part && part_len == u.len && op == u.op && seg == u.seg + 1).then_some(
                    Under {
                        done: u.done + n,
                        ..here
                    },
                )
            }
            Some(u) => (part.index == u.part.index + 1
                && part.count == u.part.count
                && op > u.op
                && seg == 0)
                .then_some(here),
        };
        let Some(next) = next.filter(|u| u.done <= u.len) else {
            return Err(format!(
                "frame {frames} (part {} of {}, segment {seg}) does not continue the \
                 contribution",
                part.index, part.count
            ));
        };
        at = Some(next);
        let header = FrameHeader {
            run_id: author.run_id,
            step: author.step,
            micro_batch: tag,
            stage: author.stage,
            replica: author.replica,
            kind: FrameKind::AllReduce,
            dtype: DType::F32,
            codec: Codec::F32,
            shape: Shape::vector(n as u32),
            sender: WorkerId::default(),
            input_hash: shape_field(Some(part), part_len as usize),
            signature,
        };
        let payload_hash = *blake3::hash(payload).as_bytes();
        if !crate::identity::verify_bytes(
            &author.key,
            domain_of(FrameKind::AllReduce),
            &frame_message(&header, &payload_hash),
            &signature,
        ) {
            return Err(format!(
                "frame {frames} (part {}, segment {seg}) is not signed by stage {} replica {} \
                 for step {}",
                part.index, author.stage, author.replica, author.step
            ));
        }
        hasher.update(payload);
        frames += 1;
    }
    match at {
        Some(u) if u.part.index + 1 == u.part.count && u.done == u.len => Ok(Proven {
            hash: *hasher.finalize().as_bytes(),
            frames,
            elements,
        }),
        None => Err("the proof holds no frame".into()),
        Some(u) => Err(format!(
            "the frames end in part {} of {}: not the whole contribution",
            u.part.index, u.part.count
        )),
    }
}

/// A proof of `buckets` as `identity`, stage `stage` replica `replica`,
/// signs them in step `step` under `run_id`, gathered in segments of
/// `segment` elements: what a neighbour that received them keeps.
#[cfg(test)]
pub(crate) fn signed_proof(
    identity: &crate::identity::Identity,
    run_id: RunId,
    step: u64,
    (stage, replica): (u32, u32),
    buckets: &[&[f32]],
    segment: usize,
) -> Vec<u8> {
    use crate::link::frame::Frame;
    let count = buckets.len() as u32;
    let mut receipts = Vec::new();
    for (index, b) in buckets.iter().enumerate() {
        let part = Part {
            index: index as u32,
            count,
        };
        let ranges: Vec<std::ops::Range<usize>> = if b.is_empty() {
            vec![std::ops::Range::default()]
        } else {
            (0..b.len())
                .step_by(segment)
                .map(|s| s..(s + segment).min(b.len()))
                .collect()
        };
        for (seg, r) in ranges.into_iter().enumerate() {
            let payload: Vec<u8> = b[r].iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut f = Frame {
                header: FrameHeader {
                    run_id,
                    step,
                    micro_batch: super::ring::ring_tag(true, index as u64, 0, seg),
                    stage,
                    replica,
                    kind: FrameKind::AllReduce,
                    dtype: DType::F32,
                    codec: Codec::F32,
                    shape: Shape::vector((payload.len() / 4) as u32),
                    sender: WorkerId::default(),
                    input_hash: shape_field(Some(part), b.len()),
                    signature: [0; SIGNATURE_LEN],
                },
                payload,
                verified_hash: None,
            };
            crate::link::sign::sign_frame(&mut f, identity);
            receipts.push(Receipt {
                tag: f.header.micro_batch,
                part,
                part_len: b.len() as u64,
                signature: f.header.signature,
                payload: f.payload,
            });
        }
    }
    encode(&receipts)
}

#[cfg(test)]
mod tests {
    use pipewright_spec::Aggregation;

    use super::*;
    use crate::identity::public_key_from_hex;
    use crate::link::RejectReason;
    use crate::sync::contribution::contribution_hash;
    use crate::sync::ring::tests::{counted, identity_of, input, on_ring, signing};
    use crate::sync::{BucketedAllReduce, Reduce, RingMember};

    /// Bucket sizes of the test step: several segments of 1024 elements,
    /// a short one, an empty one.
    const SIZES: [usize; 4] = [2500, 17, 0, 1024];

    fn buckets(rank: usize) -> Vec<Vec<f32>> {
        let all = input(rank, SIZES.iter().sum());
        let mut at = 0;
        SIZES
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect()
    }

    /// One step (step 4) of every bucket gathered under the median on a
    /// signed ring of `world`, frames checked against keys when `keys`:
    /// each rank's member afterwards.
    fn step(world: usize, keys: bool) -> Vec<RingMember> {
        on_ring(
            world,
            |c| {
                c.segment_bytes = 4096;
                signing(c);
                if !keys {
                    c.keys = None;
                }
            },
            |mut m| {
                let rank = m.rank();
                m.begin_step(4, true);
                let rules = vec![Reduce::Gather(Aggregation::Median); SIZES.len()];
                let job = BucketedAllReduce::start_with(m, rules).expect("start");
                for (i, b) in buckets(rank).into_iter().enumerate() {
                    job.push(i, b).expect("push");
                }
                job.wait().expect("step").0
            },
        )
    }

    fn author(replica: usize, key: &VerifyingKey) -> Author {
        Author {
            run_id: RunId([6; 16]),
            step: 4,
            stage: 0,
            replica: replica as u32,
            key: *key,
        }
    }

    fn key(replica: usize) -> VerifyingKey {
        public_key_from_hex(&identity_of(replica).public_hex()).expect("key")
    }

    /// The records of a proof, as (head, payload) byte strings.
    fn records(proof: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut rest = &proof[MAGIC.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let (head, tail) = rest.split_at(RECORD_HEAD);
            let n = u32::from_le_bytes(head[RECORD_HEAD - 4..].try_into().unwrap()) as usize;
            let (payload, tail) = tail.split_at(4 * n);
            out.push((head.to_vec(), payload.to_vec()));
            rest = tail;
        }
        out
    }

    fn joined(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (h, p) in records {
            out.extend_from_slice(h);
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn a_neighbours_proof_makes_its_contribution_and_names_no_other() {
        for world in [2, 3, 4] {
            let members = step(world, true);
            for m in &members {
                let rank = m.rank();
                for origin in 0..world {
                    let proof = m.receipt_proof(origin);
                    let neighbour =
                        origin == (rank + 1) % world || origin == (rank + world - 1) % world;
                    if origin == rank || !neighbour {
                        assert_eq!(proof, None, "world {world}: rank {rank} of {origin}");
                        continue;
                    }
                    let proof = proof.expect("a neighbour's proof");
                    let k = key(origin);
                    let p = verify(&proof, &author(origin, &k), u64::MAX).expect("verifies");
                    let b = buckets(origin);
                    assert_eq!(p.hash, contribution_hash(b.iter().map(Vec::as_slice)));
                    assert_eq!(p.frames, 3 + 1 + 1 + 1);
                    assert_eq!(p.elements, SIZES.iter().sum::<usize>() as u64);
                    // Not another replica's, step's or run's.
                    let other = key((origin + 1) % world);
                    assert!(verify(&proof, &author(origin, &other), u64::MAX).is_err());
                    let mut a = author(origin, &k);
                    a.step = 5;
                    assert!(verify(&proof, &a, u64::MAX).is_err());
                    a = author(origin, &k);
                    a.run_id = RunId([7; 16]);
                    assert!(verify(&proof, &a, u64::MAX).is_err());
                    assert!(
                        verify(&proof, &author(origin, &k), 100).is_err(),
                        "too large"
                    );
                }
            }
        }
    }

    #[test]
    fn part_of_a_contribution_or_altered_frames_prove_nothing() {
        let members = step(3, true);
        let proof = members[0].receipt_proof(1).expect("proof");
        let k = key(1);
        let a = author(1, &k);
        let recs = records(&proof);
        assert_eq!(recs.len(), 6);
        let refused = |recs: &[(Vec<u8>, Vec<u8>)]| verify(&joined(recs), &a, u64::MAX);
        // Whole: it verifies.
        assert!(refused(&recs).is_ok());
        // The last part left out, or its first segments, or a middle one.
        for drop in 0..recs.len() {
            let mut r = recs.clone();
            r.remove(drop);
            let e = refused(&r).expect_err("a part is missing");
            assert!(
                e.contains("does not continue") || e.contains("not the whole"),
                "{drop}: {e}"
            );
        }
        // Repeated or swapped frames.
        let mut r = recs.clone();
        r.insert(1, recs[1].clone());
        assert!(refused(&r).is_err());
        let mut r = recs.clone();
        r.swap(0, 1);
        assert!(refused(&r).is_err());
        // A payload altered, or its signature.
        let mut r = recs.clone();
        r[1].1[0] ^= 1;
        assert!(refused(&r).unwrap_err().contains("not signed"));
        let mut r = recs.clone();
        r[1].0[30] ^= 1;
        assert!(refused(&r).unwrap_err().contains("not signed"));
        // The signed shape rewritten: fewer parts than were sent.
        let mut r = recs[..3].to_vec();
        for (h, _) in &mut r {
            h[12..16].copy_from_slice(&1u32.to_le_bytes());
        }
        assert!(refused(&r).unwrap_err().contains("not signed"));
        // Cut short, empty, or not a proof.
        assert!(verify(&proof[..proof.len() - 1], &a, u64::MAX).is_err());
        assert!(verify(MAGIC, &a, u64::MAX).is_err());
        assert!(verify(b"junk", &a, u64::MAX).is_err());
        assert!(verify(&[], &a, u64::MAX).is_err());
    }

    #[test]
    fn the_test_helper_signs_what_a_ring_sends() {
        let members = step(3, true);
        let sent = members[0].receipt_proof(2).expect("proof");
        let b = buckets(2);
        let made = signed_proof(
            &identity_of(2),
            RunId([6; 16]),
            4,
            (0, 2),
            &b.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            1024,
        );
        assert_eq!(made, sent);
    }

    #[test]
    fn without_keys_nothing_is_kept() {
        let members = step(3, false);
        for m in &members {
            for origin in 0..3 {
                assert_eq!(m.receipt_proof(origin), None);
            }
        }
    }

    #[test]
    fn a_frame_that_signs_another_shape_is_refused() {
        let results = on_ring(
            3,
            |c| {
                c.segment_bytes = 4096;
                signing(c);
            },
            |mut m| {
                m.begin_step(0, true);
                let count = if m.rank() == 1 { 2 } else { 1 };
                let part = Some(Part { index: 0, count });
                let r = m.allgather_part(&input(m.rank(), 100), part);
                (r.is_err(), counted(&m, RejectReason::BadSignature))
            },
        );
        for (rank, (failed, _)) in results.iter().enumerate() {
            assert!(failed, "rank {rank} took a frame of another shape");
        }
    }
}
