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
//! operation fails. See `docs/protocol.md`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use super::ring::{
    from_wire, link_failure, to_wire_hashed, RingConfig, RingError, RingMember, ABORT_POLL,
    PIECE_BYTES,
};
use crate::link::frame::{Frame, FrameKind};
use crate::link::{Codec, Link, LinkError, RejectReason};

/// Which way round the ring a contribution travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Sent to the next rank, received from the previous one.
    Forward = 0,
    /// Sent to the previous rank, received from the next one.
    Backward = 1,
}

/// The `micro_batch` field of a gather frame: a flag bit that no ring
/// all-reduce tag has, the direction, the hop (1-based) and the segment.
fn tag(way: Way, hop: usize, seg: usize) -> u64 {
    (1 << 63) | ((way as u64) << 62) | ((hop as u64) << 32) | seg as u64
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
        if self.broken {
            return Err(RingError::Broken);
        }
        let op = self.op;
        self.op += 1;
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(vec![mine.to_vec()]);
        };
        let gather = Gather {
            config: &self.config,
            next,
            prev,
            op,
            abort: AtomicBool::new(false),
        };
        let result = gather.run(mine);
        self.broken = result.is_err();
        result
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
        }
    }
}

struct Gather<'a> {
    config: &'a RingConfig,
    next: &'a Link,
    prev: &'a Link,
    op: u64,
    abort: AtomicBool,
}

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

    fn frame(&self, way: Way, hop: usize, seg: usize, payload: Vec<u8>) -> Frame {
        self.config.frame(self.op, tag(way, hop, seg), payload)
    }

    fn run(&self, mine: &[f32]) -> Result<Vec<Vec<f32>>, RingError> {
        let n = self.config.world;
        let rank = self.config.rank;
        let (fwd_hops, back_hops) = hops(n);
        let (to_next, next_box) = mpsc::channel::<Frame>();
        let (to_prev, prev_box) = mpsc::channel::<Frame>();
        // Our own contribution, hashed once, goes both ways.
        let own: Vec<(Vec<u8>, crate::link::frame::Digest)> = self
            .segments(mine.len())
            .into_iter()
            .map(|r| to_wire_hashed(&mine[r]))
            .collect();
        for (seg, (payload, hash)) in own.iter().enumerate() {
            for (way, hops, tx) in [
                (Way::Forward, fwd_hops, &to_next),
                (Way::Backward, back_hops, &to_prev),
            ] {
                if hops > 0 {
                    let mut f = self.frame(way, 1, seg, payload.clone());
                    f.verified_hash = Some(*hash);
                    // The feeders have not started; the channel is open.
                    let _ = tx.send(f);
                }
            }
        }
        drop(own);
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
        for (origin, data) in received {
            all[origin] = Some(data);
        }
        all.into_iter()
            .enumerate()
            .map(|(r, c)| {
                c.ok_or_else(|| RingError::Config(format!("rank {r}'s contribution never came")))
            })
            .collect()
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
    /// `hops` hops. Returns them with their author's rank.
    fn direction(
        &self,
        way: Way,
        hops: usize,
        len: usize,
        relay: mpsc::Sender<Frame>,
    ) -> Result<Vec<(usize, Vec<f32>)>, RingError> {
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
            for (seg, range) in self.segments(len).into_iter().enumerate() {
                let local = &mut data[range.clone()];
                let mut finite = true;
                let frame =
                    self.receive(link, peer, tag(way, hop, seg), range.len(), |at, bytes| {
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
                    });
                }
                if hop < hops {
                    let mut f = frame;
                    f.header.micro_batch = tag(way, hop + 1, seg);
                    f.header.replica = rank as u32;
                    f.header.sender = self.config.worker_id;
                    relay.send(f).map_err(|_| RingError::PeerGone {
                        peer,
                        reason: "sending stopped".into(),
                    })?;
                }
            }
            out.push((origin, data));
        }
        Ok(out)
    }

    /// The next frame from `link`, checked to be the one expected, its
    /// payload checked against its hash while `each` reads it.
    fn receive(
        &self,
        link: &Link,
        peer: usize,
        tag: u64,
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
        let expected = (self.op, tag, peer as u32, elems * 4);
        let got = (h.step, h.micro_batch, h.replica, authentic.payload_len());
        if h.kind != FrameKind::AllReduce || h.codec != Codec::F32 || expected != got {
            return Err(RingError::Protocol {
                peer,
                detail: format!(
                    "expected gather (op, tag, rank, bytes) = {expected:?}, got {:?} {got:?}",
                    h.kind
                ),
            });
        }
        link.verify_in_pieces(authentic, PIECE_BYTES, each)
            .map_err(|e| link_failure(peer, timeout, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ring::tests::{input, on_ring};

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
}
