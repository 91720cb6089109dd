//! All-gather of the replicas' gradient contributions over the ring's two
//! links, for the robust aggregations: every rank ends with every rank's
//! contribution, as its author sent it, and aggregates them itself, so no
//! single rank decides anyone's result.
//!
//! Both links of the ring carry frames in both directions. A rank sends
//! its own contribution to both neighbours; the *forward* direction
//! (to the next rank, from the previous one) relays contributions
//! `⌊n/2⌋` hops, the *backward* direction (to the previous rank, from the
//! next) `n − 1 − ⌊n/2⌋` hops, so every contribution reaches every rank
//! once along the shorter way round. Each rank sends `n − 1` contributions
//! in all, the same bytes as a one-way all-gather, in half the hops. With
//! 3 replicas every contribution arrives straight from its author: no
//! rank relays another's, so none can alter one in passing.
//!
//! Every received segment is checked against its authenticated hash and,
//! in the same pass, for NaN and infinities: a non-finite value is refused
//! (reason `non_finite`, counted on the link it arrived on) and the whole
//! operation fails. A contribution's frames name its author, not the rank
//! that relays them, and carry the author's signature (when the member
//! signs, `RingMember::set_signer`): a relay forwards them untouched and
//! every receiver checks them against the author's key (`bad_signature`),
//! so with more than 3 replicas a relay cannot pass off a contribution of
//! its own making as another's. A rank does not send a contribution of its
//! own that is not finite (`RingError::Unsendable`). See
//! `docs/protocol.md`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use super::receipt::{shape_field, Part, Receipt};
use super::ring::{
    from_wire, link_failure, ring_tag, to_wire_hashed, RefusedFrame, RingConfig, RingError,
    RingMember, ABORT_POLL, MAX_SEGMENTS, PIECE_BYTES,
};
use crate::link::frame::{Frame, FrameKind};
use crate::link::{Codec, Link, LinkError, RejectReason, Shape};

/// Which way round the ring a contribution travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Sent to the next rank, received from the previous one.
    Forward = 0,
    /// Sent to the previous rank, received from the next one.
    Backward = 1,
}

/// The `micro_batch` field of a gather frame of operation `op`: the
/// gather's flag bit, the operation and the segment ([`ring_tag`]). Its
/// author writes it once and sends the same signed frame both ways; relays
/// forward it untouched, and the receiver knows from the hop whose it is.
fn tag(op: u64, seg: usize) -> u64 {
    ring_tag(true, op, 0, seg)
}

/// Hops each direction relays in a ring of `n`: (forward, backward).
fn hops(n: usize) -> (usize, usize) {
    (n / 2, n - 1 - n / 2)
}

impl RingMember {
    /// Every rank's `mine`, in rank order (this rank's own included),
    /// bit for bit as each author sent it. Every rank must call this with a
    /// buffer of the same length, in the same order relative to the
    /// member's other operations.
    pub fn allgather(&mut self, mine: &[f32]) -> Result<Vec<Vec<f32>>, RingError> {
        self.allgather_part(mine, None)
    }

    /// [`RingMember::allgather`] of bucket `part` of this step's
    /// contribution: its frames sign the contribution's shape
    /// ([`super::receipt::shape_field`]), a received frame that signs
    /// another shape is refused, and the neighbours' frames are kept as
    /// receipts ([`RingMember::receipt_proof`]) when frames are checked
    /// against keys.
    pub fn allgather_part(
        &mut self,
        mine: &[f32],
        part: Option<Part>,
    ) -> Result<Vec<Vec<f32>>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let op = self.op;
        self.op += 1;
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(vec![mine.to_vec()]);
        };
        if self.screen_own && !mine.iter().all(|x| x.is_finite()) {
            self.broken = true;
            return Err(RingError::Unsendable {
                what: "its own contribution".into(),
            });
        }
        let gather = Gather {
            config: &self.config,
            next,
            prev,
            op,
            step: self.step,
            abort: AtomicBool::new(false),
            shape: shape_field(part, mine.len()),
            keep: part.filter(|_| self.config.keys.is_some()),
        };
        let result = gather.run(mine);
        self.broken = result.is_err();
        let (all, receipts) = result?;
        for (origin, mut r) in receipts {
            self.receipts.entry(origin).or_default().append(&mut r);
        }
        Ok(all)
    }

    /// Counts a refusal (`reason`) of rank `origin`'s contribution, as
    /// received by [`RingMember::allgather`], on the link it arrived on,
    /// and returns the error that reports it.
    pub fn refuse(&mut self, origin: usize, reason: RejectReason) -> RingError {
        let (n, rank) = (self.config.world, self.config.rank);
        let (forward, _) = hops(n);
        let distance = (rank + n - origin % n) % n;
        let (link, peer) = if distance <= forward {
            (&self.prev, self.config.prev())
        } else {
            (&self.next, self.config.next())
        };
        if let Some(l) = link {
            l.stats().record_rejected(reason);
        }
        self.broken = true;
        RingError::Refused {
            peer,
            origin,
            reason: reason.name(),
            frame: None,
        }
    }
}

struct Gather<'a> {
    config: &'a RingConfig,
    next: &'a Link,
    prev: &'a Link,
    op: u64,
    step: u64,
    abort: AtomicBool,
    /// The `input_hash` field every frame of this gather signs.
    shape: [u8; 32],
    /// The bucket's place in the contribution, when the frames received
    /// straight from their author are kept as receipts.
    keep: Option<Part>,
}

/// Every rank's contribution, and the receipts kept (by author rank).
type Gathered = (Vec<Vec<f32>>, Vec<(usize, Vec<Receipt>)>);

/// A contribution received one way: its author's rank, the values, and
/// its receipts when they are kept.
type Arrived = (usize, Vec<f32>, Vec<Receipt>);

impl Gather<'_> {
    fn segment(&self) -> usize {
        (self.config.segment_bytes / 4).max(1)
    }

    /// Segment ranges of a contribution of `len` elements; an empty one
    /// still has one empty segment, so every hop exchanges a frame.
    fn segments(&self, len: usize) -> Vec<std::ops::Range<usize>> {
        if len == 0 {
            return vec![std::ops::Range::default()];
        }
        let seg = self.segment();
        (0..len)
            .step_by(seg)
            .map(|s| s..(s + seg).min(len))
            .collect()
    }

    fn run(&self, mine: &[f32]) -> Result<Gathered, RingError> {
        let n = self.config.world;
        let rank = self.config.rank;
        let (fwd_hops, back_hops) = hops(n);
        let (to_next, next_box) = mpsc::channel::<Frame>();
        let (to_prev, prev_box) = mpsc::channel::<Frame>();
        let segments = self.segments(mine.len());
        if segments.len() >= MAX_SEGMENTS {
            return Err(RingError::Config(format!(
                "a contribution of {} elements needs more than {MAX_SEGMENTS} segments",
                mine.len()
            )));
        }
        // Our own contribution, hashed and signed once, goes both ways.
        for (seg, r) in segments.into_iter().enumerate() {
            let (payload, hash) = to_wire_hashed(&mine[r]);
            let f =
                self.config
                    .frame_shaped(self.step, tag(self.op, seg), payload, hash, self.shape);
            // The feeders have not started; the channels are open.
            if back_hops > 0 {
                let _ = to_prev.send(f.clone());
            }
            if fwd_hops > 0 {
                let _ = to_next.send(f);
            }
        }
        let len = mine.len();
        let received = thread::scope(|s| {
            let feed_next = s.spawn(|| self.feed(self.next, self.config.next(), next_box));
            let feed_prev = s.spawn(|| self.feed(self.prev, self.config.prev(), prev_box));
            let backward = s.spawn(move || self.direction(Way::Backward, back_hops, len, to_prev));
            let forward = self.direction(Way::Forward, fwd_hops, len, to_next);
            if forward.is_err() {
                self.abort.store(true, Ordering::Relaxed);
            }
            let backward = backward.join().unwrap_or_else(|_| {
                Err(RingError::Config("gather receiving thread panicked".into()))
            });
            if backward.is_err() {
                self.abort.store(true, Ordering::Relaxed);
            }
            let joined = |h: thread::ScopedJoinHandle<'_, Result<(), RingError>>| {
                h.join()
                    .unwrap_or_else(|_| Err(RingError::Config("gather feeder panicked".into())))
            };
            let fed = joined(feed_next).and(joined(feed_prev));
            // A refusal or a sending failure is the root cause; a receive
            // that merely noticed the abort is not. A refusal in either
            // direction wins over the other direction's error.
            let (forward, backward) = match (forward, backward) {
                (Err(e @ RingError::Refused { .. }), _)
                | (_, Err(e @ RingError::Refused { .. })) => return Err(e),
                pair => pair,
            };
            let mut received = Vec::new();
            for r in [forward, backward] {
                match r {
                    Ok(mut v) => received.append(&mut v),
                    Err(e) => return fed.and(Err(e)),
                }
            }
            fed.map(|()| received)
        })?;
        let mut all: Vec<Option<Vec<f32>>> = vec![None; n];
        all[rank] = Some(mine.to_vec());
        let mut receipts = Vec::new();
        for (origin, data, kept) in received {
            all[origin] = Some(data);
            if !kept.is_empty() {
                receipts.push((origin, kept));
            }
        }
        let all = all
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                c.ok_or_else(|| RingError::Config(format!("rank {r}'s contribution never came")))
            })
            .collect::<Result<_, _>>()?;
        Ok((all, receipts))
    }

    /// Sends what arrives on `outbox` to `link`, then flushes it.
    fn feed(
        &self,
        link: &Link,
        peer: usize,
        outbox: mpsc::Receiver<Frame>,
    ) -> Result<(), RingError> {
        let timeout = self.config.timeout;
        let sent = (|| {
            for frame in outbox {
                if self.abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
                link.send_timeout(frame, timeout)
                    .map_err(|e| link_failure(peer, timeout, e))?;
            }
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            link.flush(timeout)
                .map_err(|e| link_failure(peer, timeout, e))
        })();
        if sent.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        sent
    }

    /// Receives the contributions travelling `way`, `hops` of them, and
    /// relays each one hop further (through `relay`) until it has gone
    /// `hops` hops. Returns them with their author's rank and, for the one
    /// that came straight from its author, its receipts when they are kept.
    fn direction(
        &self,
        way: Way,
        hops: usize,
        len: usize,
        relay: mpsc::Sender<Frame>,
    ) -> Result<Vec<Arrived>, RingError> {
        let n = self.config.world;
        let rank = self.config.rank;
        let (link, peer) = match way {
            Way::Forward => (self.prev, self.config.prev()),
            Way::Backward => (self.next, self.config.next()),
        };
        let mut out = Vec::with_capacity(hops);
        for hop in 1..=hops {
            let origin = match way {
                Way::Forward => (rank + n - hop) % n,
                Way::Backward => (rank + hop) % n,
            };
            let mut data = vec![0f32; len];
            let mut kept = Vec::new();
            for (seg, range) in self.segments(len).into_iter().enumerate() {
                let local = &mut data[range.clone()];
                let mut finite = true;
                let frame = self.receive(link, peer, origin, seg, range.len(), |at, bytes| {
                    let x = &mut local[at / 4..at / 4 + bytes.len() / 4];
                    from_wire(bytes, x);
                    finite &= x.iter().all(|v| v.is_finite());
                })?;
                if !finite {
                    link.stats().record_rejected(RejectReason::NonFinite);
                    return Err(RingError::Refused {
                        peer,
                        origin,
                        reason: RejectReason::NonFinite.name(),
                        frame: Some(RefusedFrame(Box::new(frame))),
                    });
                }
                if let (1, Some(part)) = (hop, self.keep) {
                    kept.push(Receipt {
                        tag: frame.header.micro_batch,
                        part,
                        part_len: len as u64,
                        signature: frame.header.signature,
                        payload: frame.payload.clone(),
                    });
                }
                if hop < hops {
                    // Relayed untouched: the author's header and signature.
                    let mut f = frame;
                    f.header.sender = self.config.worker_id;
                    #[cfg(test)]
                    if let (Some(tamper), Some(id)) =
                        (self.config.relay_tamper, self.config.signer.as_deref())
                    {
                        tamper(&mut f, id);
                    }
                    relay.send(f).map_err(|_| RingError::PeerGone {
                        peer,
                        reason: "sending stopped".into(),
                    })?;
                }
            }
            out.push((origin, data, kept));
        }
        Ok(out)
    }

    /// The next frame from `link`, checked to be segment `seg` of rank
    /// `origin`'s contribution, its payload checked against its hash while
    /// `each` reads it, then its author signature against `origin`'s key.
    fn receive(
        &self,
        link: &Link,
        peer: usize,
        origin: usize,
        seg: usize,
        elems: usize,
        each: impl FnMut(usize, &mut [u8]),
    ) -> Result<Frame, RingError> {
        let timeout = self.config.timeout;
        let deadline = Instant::now() + timeout;
        let authentic = loop {
            if self.abort.load(Ordering::Relaxed) {
                return Err(RingError::PeerGone {
                    peer,
                    reason: "the gather was aborted".into(),
                });
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(ABORT_POLL);
            match link.recv_authentic_timeout(slice) {
                Ok(f) => break f,
                Err(LinkError::Timeout(_)) if Instant::now() < deadline => {}
                Err(e) => return Err(link_failure(peer, timeout, e)),
            }
        };
        let h = authentic.header();
        let expected = (
            self.step,
            tag(self.op, seg),
            self.config.stage,
            self.config.replica(origin),
            elems * 4,
            Shape::vector(elems as u32),
            self.shape,
        );
        let got = (
            h.step,
            h.micro_batch,
            h.stage,
            h.replica,
            authentic.payload_len(),
            h.shape,
            h.input_hash,
        );
        if h.kind != FrameKind::AllReduce || h.codec != Codec::F32 || expected != got {
            return Err(RingError::Protocol {
                peer,
                detail: format!(
                    "expected gather (step, tag, stage, author replica, bytes, shape, part) = \
                     {expected:?}, got {:?} {got:?}",
                    h.kind
                ),
            });
        }
        let frame = link
            .verify_in_pieces(authentic, PIECE_BYTES, each)
            .map_err(|e| link_failure(peer, timeout, e))?;
        self.config.check_author(&frame, link, peer, origin)?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::link::sign::sign_frame;
    use crate::sync::ring::tests::{counted, input, on_ring, signing};

    /// A dishonest relay's forgery: the contribution it relays negated,
    /// still in its author's name, signed with the relay's own key (the
    /// only one it holds).
    fn forge(f: &mut Frame, relay: &Identity) {
        negate(f, relay);
        sign_frame(f, relay);
    }

    /// A dishonest relay's alteration: the contribution negated, its
    /// author's signature left as it was.
    fn negate(f: &mut Frame, _: &Identity) {
        for b in f.payload.chunks_exact_mut(4) {
            let x = -f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.verified_hash = None;
    }

    #[test]
    fn signed_gathers_deliver_every_contribution_and_refuse_none() {
        for world in 1..=5 {
            let results = on_ring(
                world,
                |c| {
                    c.segment_bytes = 4096;
                    signing(c);
                },
                |mut m| {
                    m.begin_step(2, true);
                    let all = m.allgather(&input(m.rank(), 3000)).expect("gather");
                    (all, counted(&m, RejectReason::BadSignature))
                },
            );
            for (rank, (all, refused)) in results.iter().enumerate() {
                for (r, c) in all.iter().enumerate() {
                    assert_eq!(c, &input(r, 3000), "world {world} rank {rank} got {r}");
                }
                assert_eq!(*refused, 0);
            }
        }
    }

    /// With 5 replicas rank 2 relays rank 1's contribution to rank 3 and
    /// rank 3's to rank 1. Unsigned, its forgery is taken for its author's;
    /// signed, it is refused (`bad_signature`) and counted by the receiver
    /// it reaches, whether it re-signs the frame with its own key or leaves
    /// the author's signature on an altered payload, and taken by nobody.
    /// (The first receiver to refuse ends its gather, so whether the other
    /// relayed contribution still reaches rank 2, to be forged and refused
    /// too, depends on timing: at least one is, and every refusal anywhere
    /// is of a relayed forgery.)
    #[test]
    fn a_relay_cannot_pass_off_a_contribution_in_anothers_name() {
        let unsigned = on_ring(
            5,
            |c| {
                if c.rank == 2 {
                    c.relay_tamper = Some(forge);
                    c.signer = Some(std::sync::Arc::new(Identity::from_secret([2; 32])));
                }
            },
            |mut m| m.allgather(&input(m.rank(), 2000)).expect("gather"),
        );
        assert_ne!(unsigned[3][1], input(1, 2000), "forged unseen");
        assert_ne!(unsigned[1][3], input(3, 2000), "forged unseen");
        for tamper in [forge as fn(&mut Frame, &Identity), negate] {
            let answered = std::sync::Barrier::new(5);
            let results = on_ring(
                5,
                |c| {
                    c.timeout = std::time::Duration::from_secs(3);
                    signing(c);
                    if c.rank == 2 {
                        c.relay_tamper = Some(tamper);
                    }
                },
                |mut m| {
                    let r = m.allgather(&input(m.rank(), 2000));
                    answered.wait();
                    (r, counted(&m, RejectReason::BadSignature))
                },
            );
            let mut refusals = 0;
            for (rank, (got, refused)) in results.iter().enumerate() {
                // Only ranks 1 and 3 take anything through rank 2; the
                // others may finish, with every contribution as its author
                // sent it.
                let err = match got {
                    Ok(all) => {
                        assert!(rank != 1 && rank != 3, "rank {rank} finished");
                        for (r, c) in all.iter().enumerate() {
                            assert_eq!(c, &input(r, 2000), "rank {rank} took {r}'s");
                        }
                        None
                    }
                    Err(e) => Some(e),
                };
                if let Some(RingError::Refused {
                    peer,
                    origin,
                    reason,
                    ..
                }) = err
                {
                    let expected = match rank {
                        3 => 1,
                        1 => 3,
                        _ => panic!("rank {rank} refused {origin} ({reason})"),
                    };
                    assert_eq!((*peer, *origin, *reason), (2, expected, "bad_signature"));
                    assert_eq!(*refused, 1, "rank {rank}");
                    refusals += 1;
                } else {
                    assert_eq!(*refused, 0, "rank {rank}: {err:?}");
                }
            }
            assert!(refusals >= 1, "nobody refused the forgery");
        }
    }

    #[test]
    fn every_rank_gets_every_contribution_in_rank_order() {
        for world in 1..=5 {
            for (len, segment) in [(0, 4096), (1, 4096), (1000, 4096), (70_001, 16 << 10)] {
                let results = on_ring(
                    world,
                    |c| c.segment_bytes = segment,
                    |mut m| {
                        let mine = input(m.rank(), len);
                        let all = m.allgather(&mine).expect("gather");
                        // The member goes on to other operations.
                        let mut one = vec![m.rank() as f32];
                        m.allreduce_mean(&mut one).expect("then a mean");
                        all
                    },
                );
                for (rank, all) in results.iter().enumerate() {
                    assert_eq!(all.len(), world);
                    for (r, c) in all.iter().enumerate() {
                        assert_eq!(c, &input(r, len), "world {world} rank {rank} got {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_non_finite_contribution_is_refused_and_counted() {
        // Every rank keeps its links until all have their answer: a rank
        // that has refused and gone would otherwise end its neighbours'
        // gathers with a closed link before they see the refusal.
        let answered = std::sync::Barrier::new(3);
        let results = on_ring(
            3,
            |c| c.timeout = std::time::Duration::from_secs(3),
            |mut m| {
                let mut mine = input(m.rank(), 5000);
                if m.rank() == 1 {
                    mine[4321] = f32::NAN;
                }
                // Rank 1 sends it anyway, as the `grad-nan` drill does.
                m.begin_step(0, m.rank() != 1);
                let r = m.allgather(&mine);
                let (next, prev) = m.links();
                let counted = [next, prev]
                    .into_iter()
                    .flatten()
                    .map(|l| l.stats().rejected(RejectReason::NonFinite))
                    .sum::<u64>();
                answered.wait();
                (m.rank(), r.err(), counted)
            },
        );
        for (rank, err, counted) in results {
            if rank == 1 {
                continue;
            }
            assert!(
                matches!(err, Some(RingError::Refused { origin: 1, .. })),
                "rank {rank}: {err:?}"
            );
            assert_eq!(counted, 1, "rank {rank}");
        }
    }

    #[test]
    fn an_honest_rank_never_sends_a_non_finite_contribution() {
        let answered = std::sync::Barrier::new(3);
        let results = on_ring(
            3,
            |c| c.timeout = std::time::Duration::from_secs(2),
            |mut m| {
                let mut mine = input(m.rank(), 5000);
                if m.rank() == 1 {
                    mine[17] = f32::INFINITY;
                }
                let r = m.allgather(&mine).err();
                answered.wait();
                (r, counted(&m, RejectReason::NonFinite))
            },
        );
        assert!(
            matches!(results[1].0, Some(RingError::Unsendable { .. })),
            "{:?}",
            results[1].0
        );
        // Its replicas' gathers fail without its contribution, and nothing
        // non-finite ever reached them.
        for (rank, (err, refused)) in results.iter().enumerate() {
            assert!(err.is_some(), "rank {rank}");
            assert_eq!(*refused, 0, "rank {rank}");
        }
    }
}
