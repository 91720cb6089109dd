//! Ring all-reduce of f32 gradients over authenticated TCP links.
//!
//! The `n` replicas of a stage form a ring; each holds a link to the next
//! rank (it only sends there) and from the previous one (it only receives).
//! The buffer is cut into `n` chunks. In `n − 1` reduce-scatter steps every
//! rank forwards a running sum so that rank `r` ends up owning the complete
//! sum of chunk `(r + 1) mod n`, which it divides by `n`; in `n − 1`
//! all-gather steps the finished chunks travel once more around the ring.
//! Each rank sends and receives `2(n − 1)/n` of the buffer, the optimum.
//!
//! Chunks are cut into segments of at most [`RingConfig::segment_bytes`], and
//! a segment is forwarded as soon as it has been reduced, so a large buffer
//! streams through the ring instead of moving one whole chunk per step.
//!
//! Determinism: chunk `c` is always summed in ring order starting at rank
//! `c` (`((x_c + x_{c+1}) + x_{c+2}) + …`), whatever the timing, and the
//! owner's final bits are copied verbatim to everyone else, so every rank
//! ends with bit-identical results.

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::link::frame::{Frame, FrameHeader, FrameKind, FrameLimits};
use crate::link::{
    Codec, DType, Link, LinkConfig, LinkError, Role, RunId, RunKey, Shape, WorkerId,
};

/// Settings of one ring member.
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// This member's position in the ring, `0..world`.
    pub rank: usize,
    /// Number of members.
    pub world: usize,
    /// Run the ring belongs to.
    pub run_id: RunId,
    /// Key that authenticates the links and every frame.
    pub key: RunKey,
    /// This worker's id, carried in every frame it sends.
    pub worker_id: WorkerId,
    /// Pipeline stage whose replicas form the ring (carried in frames).
    pub stage: u32,
    /// Largest payload of one frame; chunks are streamed in segments of
    /// this size.
    pub segment_bytes: usize,
    /// Deadline for connecting, and for each wait on the previous rank.
    pub timeout: Duration,
    /// Stops connecting as soon as it is true (see [`LinkConfig::abort`]).
    pub abort: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Most bytes per second sent to the next rank (see
    /// [`LinkConfig::max_send_rate`]).
    pub max_send_rate: Option<u64>,
}

impl RingConfig {
    /// A config with 1 MiB segments and a 30 s timeout.
    pub fn new(rank: usize, world: usize, run_id: RunId, key: RunKey, worker_id: WorkerId) -> Self {
        RingConfig {
            rank,
            world,
            run_id,
            key,
            worker_id,
            stage: 0,
            segment_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
            abort: None,
            max_send_rate: None,
        }
    }

    /// A frame of this member's gradient exchange: f32 `payload` of
    /// operation `op`, told apart within it by `tag`.
    pub(super) fn frame(&self, op: u64, tag: u64, payload: Vec<u8>) -> Frame {
        Frame {
            header: FrameHeader {
                run_id: self.run_id,
                step: op,
                micro_batch: tag,
                stage: self.stage,
                replica: self.rank as u32,
                kind: FrameKind::AllReduce,
                dtype: DType::F32,
                codec: Codec::F32,
                // Segments are at most MAX_SEGMENT_BYTES, so the count fits.
                shape: Shape::vector((payload.len() / 4) as u32),
                sender: self.worker_id,
                input_hash: [0; 32],
                signature: [0; crate::link::frame::SIGNATURE_LEN],
            },
            payload,
            verified_hash: None,
        }
    }

    pub(super) fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    pub(super) fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn link_config(&self) -> LinkConfig {
        let mut c = LinkConfig::new(self.run_id, self.key.clone(), self.worker_id);
        c.send_queue_frames = 4;
        c.send_queue_bytes = 4 * (self.segment_bytes + 256);
        c.recv_queue_frames = 4;
        c.limits = FrameLimits {
            max_payload: self.segment_bytes as u64,
        };
        c.handshake_timeout = self.timeout;
        c.write_timeout = Some(self.timeout);
        c.abort = self.abort.clone();
        c.max_send_rate = self.max_send_rate;
        c
    }
}

/// Why a ring operation failed. After any error other than
/// [`RingError::Config`] the member is unusable; drop it and reconnect.
#[derive(Debug, Error)]
pub enum RingError {
    /// The configuration or arguments are inconsistent.
    #[error("invalid ring configuration: {0}")]
    Config(String),
    /// Could not open the link to a neighbour.
    #[error("cannot link rank {rank} with rank {peer}: {source}")]
    Connect {
        /// This rank.
        rank: usize,
        /// The neighbour.
        peer: usize,
        /// What went wrong.
        #[source]
        source: LinkError,
    },
    /// The previous rank never connected.
    #[error("rank {prev} did not connect within {timeout:?}")]
    AcceptTimeout {
        /// The previous rank.
        prev: usize,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A neighbour's connection closed mid-operation.
    #[error("rank {peer} is gone: {reason}")]
    PeerGone {
        /// The neighbour.
        peer: usize,
        /// Why the link closed.
        reason: String,
    },
    /// A neighbour sent nothing (or accepted nothing) within the deadline.
    #[error("timed out after {timeout:?} waiting on rank {peer}")]
    Timeout {
        /// The neighbour.
        peer: usize,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A neighbour sent a frame that does not fit the algorithm (another
    /// operation, a different buffer length): the ranks disagree.
    #[error("rank {peer} broke the protocol: {detail}")]
    Protocol {
        /// The neighbour.
        peer: usize,
        /// What was expected and what arrived.
        detail: String,
    },
    /// An earlier error left this member unusable.
    #[error("ring member is broken by an earlier error")]
    Broken,
    /// A contribution arrived intact and authentic but failed the checks
    /// on its values (NaN or infinity, an absurd norm): refused, counted on
    /// the link it came from, never used.
    #[error("refused rank {origin}'s contribution from rank {peer}: {reason}")]
    Refused {
        /// The neighbour it arrived from.
        peer: usize,
        /// The rank whose contribution it is.
        origin: usize,
        /// The refusal's counted reason.
        reason: &'static str,
    },
}

/// One rank of a ring all-reduce.
#[derive(Debug)]
pub struct RingMember {
    pub(super) config: RingConfig,
    /// Link to the next rank (absent when `world == 1`).
    pub(super) next: Option<Link>,
    /// Link from the previous rank (absent when `world == 1`).
    pub(super) prev: Option<Link>,
    /// Sequence number of the next operation; every rank must run the same
    /// operations in the same order, and frames carry it to prove it.
    pub(super) op: u64,
    pub(super) broken: bool,
}

impl RingMember {
    /// Binds `listen_addr`, then joins the ring as [`RingMember::connect`].
    pub fn bind_and_connect(
        config: RingConfig,
        listen_addr: SocketAddr,
        next_addr: SocketAddr,
    ) -> Result<Self, RingError> {
        let listener = TcpListener::bind(listen_addr).map_err(|e| RingError::Connect {
            rank: config.rank,
            peer: config.prev(),
            source: LinkError::Connect {
                addr: listen_addr.to_string(),
                source: e,
            },
        })?;
        RingMember::connect(config, listener, &next_addr.to_string())
    }

    /// Joins the ring: accepts the previous rank on `listener` while
    /// connecting to the next rank at `next_addr` (retrying until
    /// `config.timeout` in case it is not listening yet).
    pub fn connect(
        config: RingConfig,
        listener: TcpListener,
        next_addr: &str,
    ) -> Result<Self, RingError> {
        if config.world == 0 || config.rank >= config.world {
            return Err(RingError::Config(format!(
                "rank {} is outside a ring of {}",
                config.rank, config.world
            )));
        }
        if !(4..=MAX_SEGMENT_BYTES).contains(&config.segment_bytes) {
            return Err(RingError::Config(format!(
                "segment_bytes must be between 4 and {MAX_SEGMENT_BYTES}"
            )));
        }
        if config.world == 1 {
            return Ok(RingMember {
                config,
                next: None,
                prev: None,
                op: 0,
                broken: false,
            });
        }
        let link_config = config.link_config();
        // Accept on another thread: every rank connects before it accepts,
        // and both handshakes must progress at once or the ring deadlocks.
        let (prev, next) = thread::scope(|s| {
            let accepting = s.spawn(|| accept_prev(&listener, &config, &link_config));
            let next = connect_next(next_addr, &config, &link_config);
            let prev = accepting
                .join()
                .unwrap_or_else(|_| Err(RingError::Config("accepting thread panicked".into())));
            (prev, next)
        });
        Ok(RingMember {
            next: Some(next?),
            prev: Some(prev?),
            config,
            op: 0,
            broken: false,
        })
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Number of members in the ring.
    pub fn world(&self) -> usize {
        self.config.world
    }

    /// The configuration this member was built with.
    pub fn config(&self) -> &RingConfig {
        &self.config
    }

    /// Links to the next and from the previous rank, for their counters.
    pub fn links(&self) -> (Option<&Link>, Option<&Link>) {
        (self.next.as_ref(), self.prev.as_ref())
    }

    /// Replaces `buf` on every rank with the element-wise mean of all ranks'
    /// buffers, bit-identical everywhere. Every rank must call this with a
    /// buffer of the same length, in the same order relative to other
    /// operations.
    pub fn allreduce_mean(&mut self, buf: &mut [f32]) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let op = self.op;
        self.op += 1;
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            // A ring of one: the mean is the buffer itself.
            return Ok(());
        };
        let result = Exchange {
            config: &self.config,
            next,
            prev,
            op,
            plan: Plan::new(buf.len(), self.config.world, self.config.segment_bytes / 4),
            abort: AtomicBool::new(false),
        }
        .run(buf);
        self.broken = result.is_err();
        result
    }
}

/// Binds `n` listeners on loopback ports chosen by the system, with their
/// addresses: the sockets of a ring whose members all run on this machine.
pub fn loopback_listeners(n: usize) -> std::io::Result<(Vec<TcpListener>, Vec<SocketAddr>)> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((listeners, addrs))
}

/// Builds a ring of `world` members on loopback, each on its own thread
/// with the configuration `config(rank)` returns, runs `body` on every
/// member and returns the results in rank order. Panics if a member cannot
/// join or a body panics: meant for tests and benchmarks.
pub fn on_loopback_ring<T: Send>(
    world: usize,
    config: impl Fn(usize) -> RingConfig + Sync,
    body: impl Fn(RingMember) -> T + Sync,
) -> Vec<T> {
    let (listeners, addrs) = loopback_listeners(world).expect("bind loopback listeners");
    thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addrs, config, body) = (&addrs, &config, &body);
                s.spawn(move || {
                    let next = addrs[(rank + 1) % world].to_string();
                    let member =
                        RingMember::connect(config(rank), listener, &next).expect("join the ring");
                    body(member)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ring member thread"))
            .collect()
    })
}

fn accept_prev(
    listener: &TcpListener,
    config: &RingConfig,
    link_config: &LinkConfig,
) -> Result<Link, RingError> {
    let prev = config.prev();
    // A connection whose handshake fails (stray, forged, or left from an
    // earlier wiring) is dropped and the wait goes on.
    crate::pipeline::accept_within(listener, link_config, config.timeout).map_err(|e| match e {
        LinkError::Timeout(timeout) => RingError::AcceptTimeout { prev, timeout },
        source => RingError::Connect {
            rank: config.rank,
            peer: prev,
            source,
        },
    })
}

fn connect_next(
    addr: &str,
    config: &RingConfig,
    link_config: &LinkConfig,
) -> Result<Link, RingError> {
    let link_err = |source| RingError::Connect {
        rank: config.rank,
        peer: config.next(),
        source,
    };
    // The next rank may simply not be listening yet: retried until the
    // timeout.
    let stream =
        crate::pipeline::connect_stream(addr, config.timeout, link_config).map_err(link_err)?;
    Link::from_stream(stream, Role::Initiator, link_config).map_err(link_err)
}

/// How a buffer is cut into chunks and segments; identical on every rank
/// because it depends only on the length, the world size and the segment
/// size.
struct Plan {
    len: usize,
    world: usize,
    segment: usize,
}

impl Plan {
    fn new(len: usize, world: usize, segment: usize) -> Self {
        Plan {
            len,
            world,
            segment: segment.max(1),
        }
    }

    /// Element range of chunk `c`; chunk sizes differ by at most one.
    fn chunk(&self, c: usize) -> Range<usize> {
        let start = c * self.len / self.world;
        let end = (c + 1) * self.len / self.world;
        start..end
    }

    /// Segment ranges of chunk `c`, in order. An empty chunk still has one
    /// empty segment so that every step exchanges at least one frame and the
    /// ranks stay in lockstep.
    fn segments(&self, c: usize) -> Vec<Range<usize>> {
        let chunk = self.chunk(c);
        if chunk.is_empty() {
            return vec![chunk];
        }
        (chunk.start..chunk.end)
            .step_by(self.segment)
            .map(|s| s..(s + self.segment).min(chunk.end))
            .collect()
    }
}

/// One all-reduce in progress.
struct Exchange<'a> {
    config: &'a RingConfig,
    next: &'a Link,
    prev: &'a Link,
    op: u64,
    plan: Plan,
    /// Set when either side of the exchange fails, so the other stops
    /// promptly instead of waiting out its timeout.
    abort: AtomicBool,
}

impl Exchange<'_> {
    fn chunk_index(&self, offset: usize) -> usize {
        let n = self.config.world;
        (self.config.rank + n * 2 - offset % n) % n
    }

    /// The frame carrying `data` as segment `seg` of ring step `step`.
    fn frame(&self, step: usize, seg: usize, payload: Vec<u8>) -> Frame {
        self.config.frame(self.op, tag(step, seg), payload)
    }

    /// Re-addresses a received frame as our segment `seg` of ring `step`.
    fn forward(&self, mut frame: Frame, step: usize, seg: usize) -> Frame {
        frame.header.micro_batch = tag(step, seg);
        frame.header.replica = self.config.rank as u32;
        frame.header.sender = self.config.worker_id;
        frame
    }

    fn run(&self, buf: &mut [f32]) -> Result<(), RingError> {
        let n = self.config.world;
        let (to_send, outbox) = mpsc::channel::<Frame>();
        thread::scope(|s| {
            // The feeder moves frames into the bounded link queue, so this
            // thread never blocks on sending and always keeps receiving:
            // that is what keeps every rank of the ring moving at once.
            let feeder = s.spawn(|| {
                let fed = self.feed(outbox);
                if fed.is_err() {
                    self.abort.store(true, Ordering::Relaxed);
                }
                fed
            });
            let result = self.exchange(buf, n, &to_send);
            // Raise the flag before closing the channel so the feeder, on
            // seeing the channel end, knows not to wait for a flush.
            if result.is_err() {
                self.abort.store(true, Ordering::Relaxed);
            }
            drop(to_send);
            let fed = feeder.join().unwrap_or_else(|_| {
                Err(RingError::Config(
                    "all-reduce feeder thread panicked".into(),
                ))
            });
            // A feeder failure is the root cause when both failed: the
            // receive side merely noticed the abort.
            fed.and(result)
        })
    }

    fn feed(&self, outbox: mpsc::Receiver<Frame>) -> Result<(), RingError> {
        let peer = self.config.next();
        for frame in outbox {
            if self.abort.load(Ordering::Relaxed) {
                break;
            }
            self.next
                .send_timeout(frame, self.config.timeout)
                .map_err(|e| link_failure(peer, self.config.timeout, e))?;
        }
        if self.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        // The operation is only complete once our last frames have left:
        // the caller may drop the member right after it returns.
        self.next
            .flush(self.config.timeout)
            .map_err(|e| link_failure(peer, self.config.timeout, e))
    }

    fn exchange(
        &self,
        buf: &mut [f32],
        n: usize,
        to_send: &mpsc::Sender<Frame>,
    ) -> Result<(), RingError> {
        let send = |frame: Frame| {
            to_send.send(frame).map_err(|_| RingError::PeerGone {
                peer: self.config.next(),
                reason: "sending stopped".into(),
            })
        };
        // Reduce-scatter, step 0: send our own chunk `rank`, hashed piece by
        // piece as it is copied out.
        for (seg, range) in self
            .plan
            .segments(self.chunk_index(0))
            .into_iter()
            .enumerate()
        {
            let (payload, hash) = to_wire_hashed(&buf[range]);
            let mut frame = self.frame(0, seg, payload);
            frame.verified_hash = Some(hash);
            send(frame)?;
        }
        let n_f32 = n as f32;
        for step in 0..n - 1 {
            let chunk = self.chunk_index(step + 1);
            let last = step == n - 2;
            for (seg, range) in self.plan.segments(chunk).into_iter().enumerate() {
                // One pass per piece, while it is in cache: check the
                // incoming bytes against their hash, add our values, hash
                // the sum for the frame that forwards it. The received frame
                // carries the sum on, so no allocation. Only the chunk's
                // owner (the last step) keeps the sum; on every other rank
                // the all-gather overwrites it anyway.
                let local = &mut buf[range.clone()];
                let mut out = blake3::Hasher::new();
                let mut frame = self.receive(step, seg, range.len(), |at, bytes| {
                    let x = &mut local[at / 4..at / 4 + bytes.len() / 4];
                    if last {
                        finish_sum(bytes, x, n_f32);
                    } else {
                        accumulate(bytes, x);
                    }
                    out.update(bytes);
                })?;
                frame.verified_hash = Some(*out.finalize().as_bytes());
                send(self.forward(frame, step + 1, seg))?;
            }
        }
        // All-gather: finished chunks travel on around the ring verbatim,
        // so a forwarded frame keeps the hash verified on receipt and is not
        // hashed again.
        for step in n - 1..2 * (n - 1) {
            let chunk = self.chunk_index(step - (n - 1));
            for (seg, range) in self.plan.segments(chunk).into_iter().enumerate() {
                let local = &mut buf[range.clone()];
                let frame = self.receive(step, seg, range.len(), |at, bytes| {
                    from_wire(bytes, &mut local[at / 4..at / 4 + bytes.len() / 4]);
                })?;
                if step + 1 < 2 * (n - 1) {
                    send(self.forward(frame, step + 1, seg))?;
                }
            }
        }
        Ok(())
    }

    /// Receives the next frame from the previous rank, checks it is the one
    /// the algorithm expects, and checks its payload against its hash while
    /// handing it to `each` piece by piece (see [`Link::verify_in_pieces`]).
    fn receive(
        &self,
        step: usize,
        seg: usize,
        elems: usize,
        each: impl FnMut(usize, &mut [u8]),
    ) -> Result<Frame, RingError> {
        let peer = self.config.prev();
        let timeout = self.config.timeout;
        let deadline = Instant::now() + timeout;
        // Wait in short slices so a failure on the sending side ends the
        // wait at once rather than after the full timeout.
        let authentic = loop {
            if self.abort.load(Ordering::Relaxed) {
                return Err(RingError::PeerGone {
                    peer: self.config.next(),
                    reason: "sending to the next rank failed".into(),
                });
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(ABORT_POLL);
            match self.prev.recv_authentic_timeout(slice) {
                Ok(f) => break f,
                Err(LinkError::Timeout(_)) if Instant::now() < deadline => {}
                Err(e) => return Err(link_failure(peer, timeout, e)),
            }
        };
        let h = authentic.header();
        let expected = (self.op, tag(step, seg), peer as u32, elems * 4);
        let got = (h.step, h.micro_batch, h.replica, authentic.payload_len());
        if h.kind != FrameKind::AllReduce || h.codec != Codec::F32 || expected != got {
            return Err(RingError::Protocol {
                peer,
                detail: format!(
                    "expected (op, step<<32|segment, rank, bytes) = {expected:?}, got {:?} {got:?}",
                    h.kind
                ),
            });
        }
        self.prev
            .verify_in_pieces(authentic, PIECE_BYTES, each)
            .map_err(|e| link_failure(peer, timeout, e))
    }
}

/// Bytes of a segment worked on at a time: hashed, summed and hashed again
/// while they are in this core's cache. A multiple of 4 (whole f32s) and of
/// BLAKE3's 1 KiB chunk, so pieces keep its SIMD lanes full.
pub(super) const PIECE_BYTES: usize = 64 << 10;

/// How often a waiting receive checks whether the exchange was aborted.
pub(super) const ABORT_POLL: Duration = Duration::from_millis(50);

/// Largest accepted segment: a frame's dimension is a u32 element count.
const MAX_SEGMENT_BYTES: usize = 1 << 30;

/// The `micro_batch` field of a ring frame: ring step and segment index.
fn tag(step: usize, seg: usize) -> u64 {
    ((step as u64) << 32) | seg as u64
}

/// The little-endian bytes of `data` and their BLAKE3 hash, hashed piece by
/// piece right after each piece is copied.
pub(super) fn to_wire_hashed(data: &[f32]) -> (Vec<u8>, crate::link::frame::Digest) {
    let mut out = Vec::with_capacity(data.len() * 4);
    let mut hasher = blake3::Hasher::new();
    for piece in data.chunks(PIECE_BYTES / 4) {
        let at = out.len();
        if cfg!(target_endian = "little") {
            out.extend_from_slice(bytemuck::cast_slice(piece));
        } else {
            out.extend(piece.iter().flat_map(|x| x.to_le_bytes()));
        }
        hasher.update(&out[at..]);
    }
    (out, *hasher.finalize().as_bytes())
}

/// Copies little-endian f32 `wire` bytes into `out` (same element count).
pub(super) fn from_wire(wire: &[u8], out: &mut [f32]) {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(wire);
    } else {
        for (x, b) in out.iter_mut().zip(wire.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// A reduce-scatter step on a rank that forwards the sum:
/// `incoming[i] = incoming[i] + local[i]` (the little-endian f32 bytes of a
/// received piece). The incoming partial sum always comes first: the fixed
/// order that makes the result independent of timing.
fn accumulate(incoming: &mut [u8], local: &[f32]) {
    match wire_f32s(incoming) {
        // A loop without branches inside, so the compiler vectorises it.
        Some(wire) => {
            for (w, x) in wire.iter_mut().zip(local) {
                *w += *x;
            }
        }
        None => {
            for (b, x) in incoming.chunks_exact_mut(4).zip(local) {
                let sum = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + *x;
                b.copy_from_slice(&sum.to_le_bytes());
            }
        }
    }
}

/// The chunk owner's last reduce-scatter step: the mean
/// `(incoming[i] + local[i]) / n`, written both to `local` and back into
/// `incoming` for the all-gather.
fn finish_sum(incoming: &mut [u8], local: &mut [f32], n: f32) {
    match wire_f32s(incoming) {
        Some(wire) => {
            for (w, x) in wire.iter_mut().zip(local.iter_mut()) {
                *x = (*w + *x) / n;
                *w = *x;
            }
        }
        None => {
            for (b, x) in incoming.chunks_exact_mut(4).zip(local.iter_mut()) {
                *x = (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + *x) / n;
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// The bytes as f32s when they can be used in place: on a little-endian
/// machine with 4-byte-aligned bytes.
fn wire_f32s(bytes: &mut [u8]) -> Option<&mut [f32]> {
    if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice_mut::<u8, f32>(bytes).ok()
    } else {
        None
    }
}

pub(super) fn link_failure(peer: usize, timeout: Duration, e: LinkError) -> RingError {
    match e {
        LinkError::Timeout(_) => RingError::Timeout { peer, timeout },
        LinkError::BadContent => RingError::Protocol {
            peer,
            detail: LinkError::BadContent.to_string(),
        },
        other => RingError::PeerGone {
            peer,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(rank: usize, world: usize) -> RingConfig {
        let mut c = RingConfig::new(
            rank,
            world,
            RunId([6; 16]),
            RunKey([8; 32]),
            WorkerId([rank as u8; 16]),
        );
        c.timeout = Duration::from_secs(10);
        c
    }

    /// Builds a ring of `world` members on loopback and runs `body` on each
    /// member in its own thread, returning the per-rank results.
    pub(crate) fn on_ring<T: Send>(
        world: usize,
        tweak: impl Fn(&mut RingConfig) + Sync,
        body: impl Fn(RingMember) -> T + Sync,
    ) -> Vec<T> {
        on_loopback_ring(
            world,
            |rank| {
                let mut c = config(rank, world);
                tweak(&mut c);
                c
            },
            body,
        )
    }

    /// Rank `r`'s test buffer: values in [-1, 1] that differ per rank.
    pub(crate) fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (rank as u64 + 1).wrapping_mul(0xC2B2_AE3D);
                (h % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    pub(crate) fn exact_mean(world: usize, len: usize) -> Vec<f64> {
        let mut sum = vec![0f64; len];
        for r in 0..world {
            for (s, x) in sum.iter_mut().zip(input(r, len)) {
                *s += f64::from(x);
            }
        }
        sum.iter().map(|s| s / world as f64).collect()
    }

    fn check_mean(world: usize, len: usize, segment_bytes: usize) {
        let results = on_ring(
            world,
            |c| c.segment_bytes = segment_bytes,
            |mut m| {
                let mut buf = input(m.rank(), len);
                m.allreduce_mean(&mut buf).expect("allreduce");
                // A second operation on the same ring must also work.
                let mut again = input(m.rank(), len);
                m.allreduce_mean(&mut again).expect("second allreduce");
                assert_eq!(bits(&buf), bits(&again), "same input, same output");
                buf
            },
        );
        let mean = exact_mean(world, len);
        for (rank, got) in results.iter().enumerate() {
            for (i, (g, m)) in got.iter().zip(&mean).enumerate() {
                assert!(
                    (f64::from(*g) - m).abs() <= 1e-6,
                    "world {world} rank {rank} [{i}]: {g} vs {m}"
                );
            }
            assert_eq!(
                bits(got),
                bits(&results[0]),
                "rank {rank} differs from rank 0"
            );
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn mean_is_exact_and_identical_on_every_rank() {
        for world in 1..=4 {
            for len in [0, 1, 3, 1000, 100_003] {
                check_mean(world, len, 4096);
            }
        }
    }

    #[test]
    fn large_buffers_stream_in_many_segments() {
        check_mean(3, 1 << 20, 64 << 10);
    }

    #[test]
    fn dead_peer_is_an_error_not_a_hang() {
        let started = Instant::now();
        let results = on_ring(
            3,
            |c| c.timeout = Duration::from_millis(1500),
            |mut m| {
                if m.rank() == 2 {
                    // Rank 2 dies before the operation.
                    drop(m);
                    return None;
                }
                let mut buf = input(m.rank(), 10_000);
                let err = m.allreduce_mean(&mut buf).unwrap_err();
                let again = m.allreduce_mean(&mut buf).unwrap_err();
                assert!(matches!(again, RingError::Broken));
                Some(err)
            },
        );
        for err in results.into_iter().flatten() {
            assert!(
                matches!(err, RingError::PeerGone { .. } | RingError::Timeout { .. }),
                "{err}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn silent_peer_times_out() {
        // Rank 1 stays connected until rank 0 has its answer: had it left
        // after a fixed time, a slow rank 0 would see it gone instead.
        let done = std::sync::Barrier::new(2);
        let results = on_ring(
            2,
            |c| c.timeout = Duration::from_millis(500),
            |mut m| {
                if m.rank() == 1 {
                    // Alive but never joins the operation.
                    done.wait();
                    return None;
                }
                let mut buf = vec![1.0; 16];
                let err = m.allreduce_mean(&mut buf).unwrap_err();
                done.wait();
                Some(err)
            },
        );
        let err = results[0].as_ref().expect("rank 0 result");
        assert!(matches!(err, RingError::Timeout { peer: 1, .. }), "{err}");
    }

    #[test]
    fn mismatched_lengths_are_a_protocol_error() {
        let results = on_ring(
            2,
            |c| c.timeout = Duration::from_secs(2),
            |mut m| {
                let mut buf = vec![1.0; 100 + m.rank()];
                m.allreduce_mean(&mut buf).err()
            },
        );
        assert!(
            results
                .iter()
                .flatten()
                .any(|e| matches!(e, RingError::Protocol { .. })),
            "{results:?}"
        );
    }

    #[test]
    fn bad_rank_is_a_config_error() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let err = RingMember::connect(config(3, 3), listener, &addr.to_string()).unwrap_err();
        assert!(matches!(err, RingError::Config(_)), "{err}");
    }
}
