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
//!
//! Authorship: with a signer ([`RingMember::set_signer`]) every frame a
//! rank writes carries its identity's signature (`link::sign`, domain
//! `pipewright ring v1`): its own chunk and the partial sums it forwards in
//! the reduce-scatter, and the chunk it finished for the all-gather, which
//! the other ranks forward untouched, so its header names the chunk's owner
//! and its signature stays the owner's. With keys
//! ([`RingMember::set_keys`]) a receiver checks every frame against the key
//! of the author it expects (`bad_signature` otherwise). A received partial
//! sum or chunk with a NaN or an infinity is refused (`non_finite`) and
//! kept as it arrived, for a complaint; and a rank never sends a value of
//! its own that is not finite ([`RingError::Unsendable`]), so such a frame
//! with a valid signature proves its author broke the protocol.

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use std::sync::Arc;

use crate::identity::Identity;
use crate::link::frame::{Digest, Frame, FrameHeader, FrameKind, FrameLimits};
use crate::link::sign::{sign_frame, PeerKeys};
use crate::link::{
    Codec, DType, Link, LinkConfig, LinkError, RejectReason, Role, RunId, RunKey, Shape, WorkerId,
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
    /// The stage's replica each rank holds, by rank: the author a frame
    /// names (and whose key checks it). Empty: rank `r` is replica `r`.
    pub replicas: Vec<u32>,
    /// Signs every frame this member writes (none: frames go unsigned).
    pub signer: Option<Arc<Identity>>,
    /// Checks the author signature of every frame received (none: no
    /// check).
    pub keys: Option<Arc<PeerKeys>>,
    /// A test's dishonest relay: what it does to a gathered frame it
    /// relays, with its own identity.
    #[cfg(test)]
    pub(crate) relay_tamper: Option<fn(&mut Frame, &Identity)>,
}

impl RingConfig {
    /// A config with segments of [`SEGMENT_BYTES`] and a 30 s timeout.
    pub fn new(rank: usize, world: usize, run_id: RunId, key: RunKey, worker_id: WorkerId) -> Self {
        RingConfig {
            rank,
            world,
            run_id,
            key,
            worker_id,
            stage: 0,
            segment_bytes: SEGMENT_BYTES,
            timeout: Duration::from_secs(30),
            abort: None,
            max_send_rate: None,
            replicas: Vec::new(),
            signer: None,
            keys: None,
            #[cfg(test)]
            relay_tamper: None,
        }
    }

    /// The replica rank `rank` holds (see [`RingConfig::replicas`]).
    pub(super) fn replica(&self, rank: usize) -> u32 {
        self.replicas.get(rank).copied().unwrap_or(rank as u32)
    }

    /// A frame this member writes in its gradient exchange: f32 `payload`
    /// whose BLAKE3 hash is `hash`, of training step `step`, told apart
    /// within it by `tag` ([`ring_tag`]); signed when it has a signer.
    pub(super) fn frame(&self, step: u64, tag: u64, payload: Vec<u8>, hash: Digest) -> Frame {
        self.frame_shaped(step, tag, payload, hash, [0; 32])
    }

    /// [`RingConfig::frame`] with `input_hash` in its header's field of
    /// that name (a gathered contribution's shape,
    /// [`super::receipt::shape_field`]).
    pub(super) fn frame_shaped(
        &self,
        step: u64,
        tag: u64,
        payload: Vec<u8>,
        hash: Digest,
        input_hash: [u8; 32],
    ) -> Frame {
        let mut frame = Frame {
            header: FrameHeader {
                run_id: self.run_id,
                step,
                micro_batch: tag,
                stage: self.stage,
                replica: self.replica(self.rank),
                kind: FrameKind::AllReduce,
                dtype: DType::F32,
                codec: Codec::F32,
                // Segments are at most MAX_SEGMENT_BYTES, so the count fits.
                shape: Shape::vector((payload.len() / 4) as u32),
                sender: self.worker_id,
                input_hash,
                signature: [0; crate::link::frame::SIGNATURE_LEN],
            },
            payload,
            verified_hash: Some(hash),
        };
        if let Some(id) = &self.signer {
            sign_frame(&mut frame, id);
        }
        frame
    }

    /// Checks the author signature of `frame`, received from `link`, which
    /// should be rank `author`'s (no keys: no check). A failure is counted
    /// on the link (`bad_signature`) and refuses the frame.
    pub(super) fn check_author(
        &self,
        frame: &Frame,
        link: &Link,
        peer: usize,
        author: usize,
    ) -> Result<(), RingError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        match keys.check(frame, (self.stage, self.replica(author))) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!("refused a gradient ring frame from rank {peer}: {e}");
                link.stats().record_rejected(RejectReason::BadSignature);
                Err(RingError::Refused {
                    peer,
                    origin: author,
                    reason: RejectReason::BadSignature.name(),
                    frame: None,
                })
            }
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
    /// A frame arrived intact and authentic (run key) but its author
    /// signature does not verify (`bad_signature`), or its values failed
    /// the checks (NaN or infinity, an absurd norm): refused, counted on
    /// the link it came from, never used.
    #[error("refused rank {origin}'s contribution from rank {peer}: {reason}")]
    Refused {
        /// The neighbour it arrived from.
        peer: usize,
        /// The rank whose contribution (or partial sum, or finished chunk)
        /// the frame says it is: its author.
        origin: usize,
        /// The refusal's counted reason.
        reason: &'static str,
        /// The refused frame as it arrived, when it is signed and refused
        /// for values anyone can check from it alone (`non_finite`): the
        /// evidence of a complaint.
        frame: Option<RefusedFrame>,
    },
    /// This member's own values (its contribution, or a partial sum it
    /// would forward) are not finite: not sent, so an honest member never
    /// signs a frame its receiver would refuse.
    #[error("not sending {what}: it holds a NaN or an infinity")]
    Unsendable {
        /// Which values.
        what: String,
    },
}

/// A refused ring frame kept for a complaint (its `Debug` shows the header
/// only).
#[derive(Clone)]
pub struct RefusedFrame(pub Box<Frame>);

impl std::fmt::Debug for RefusedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusedFrame")
            .field("header", &self.0.header)
            .finish()
    }
}

/// One rank of a ring all-reduce.
#[derive(Debug)]
pub struct RingMember {
    pub(super) config: RingConfig,
    /// Link to the next rank (absent when `world == 1`).
    pub(super) next: Option<Link>,
    /// Link from the previous rank (absent when `world == 1`).
    pub(super) prev: Option<Link>,
    /// Sequence number of the next operation within the training step;
    /// every rank must run the same operations in the same order, and
    /// frames carry it to prove it.
    pub(super) op: u64,
    /// The training step the operations belong to (0-based), carried and
    /// signed in every frame ([`RingMember::begin_step`]).
    pub(super) step: u64,
    /// Whether this member refuses to send its own non-finite values
    /// ([`RingError::Unsendable`]); only a drill turns it off.
    pub(super) screen_own: bool,
    pub(super) broken: bool,
    /// The step's receipts of the contributions received straight from
    /// their author (a ring neighbour), by the author's rank: kept while
    /// frames are checked against keys, for a contribution audit's proof
    /// (`sync::receipt`).
    pub(super) receipts: std::collections::BTreeMap<usize, Vec<super::receipt::Receipt>>,
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
        if config.world > MAX_WORLD {
            return Err(RingError::Config(format!(
                "a ring has at most {MAX_WORLD} members"
            )));
        }
        if !config.replicas.is_empty() && config.replicas.len() != config.world {
            return Err(RingError::Config(format!(
                "{} replicas named for a ring of {}",
                config.replicas.len(),
                config.world
            )));
        }
        if config.world == 1 {
            return Ok(RingMember {
                config,
                next: None,
                prev: None,
                op: 0,
                step: 0,
                screen_own: true,
                broken: false,
                receipts: Default::default(),
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
            step: 0,
            screen_own: true,
            broken: false,
            receipts: Default::default(),
        })
    }

    /// Starts training step `step` (0-based): the operations that follow
    /// are numbered from 0 within it, and every frame carries and signs
    /// the step. `screen_own: false` (a drill only) lets this member send
    /// its own non-finite values.
    pub fn begin_step(&mut self, step: u64, screen_own: bool) {
        self.step = step;
        self.op = 0;
        self.screen_own = screen_own;
        self.receipts.clear();
    }

    /// The proof (`sync::receipt`) of the contribution rank `origin` sent
    /// this member straight in the current step's gathers: `None` when it
    /// sent none here (it is no ring neighbour, no contribution was
    /// gathered, or frames were not checked against keys).
    pub fn receipt_proof(&self, origin: usize) -> Option<Vec<u8>> {
        self.receipts
            .get(&origin)
            .map(|r| super::receipt::encode(r))
    }

    /// Signs every frame this member writes from now on with `identity`
    /// (none: unsigned).
    pub fn set_signer(&mut self, identity: Option<Arc<Identity>>) {
        self.config.signer = identity;
    }

    /// Checks every frame received from now on against the author's key in
    /// `keys` (none: no check).
    pub fn set_keys(&mut self, keys: Option<Arc<PeerKeys>>) {
        self.config.keys = keys;
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
        let plan = Plan::new(buf.len(), self.config.world, self.config.segment_bytes / 4);
        if plan.len.div_ceil(plan.segment) >= MAX_SEGMENTS {
            return Err(RingError::Config(format!(
                "a buffer of {} elements needs more than {MAX_SEGMENTS} segments",
                buf.len()
            )));
        }
        let result = Exchange {
            config: &self.config,
            next,
            prev,
            op,
            step: self.step,
            screen_own: self.screen_own,
            plan,
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
    step: u64,
    screen_own: bool,
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

    /// The frame this rank writes carrying `payload` (hashed `hash`) as
    /// segment `seg` of ring step `step`, signed.
    fn frame(&self, step: usize, seg: usize, payload: Vec<u8>, hash: Digest) -> Frame {
        self.config.frame(
            self.step,
            ring_tag(false, self.op, step, seg),
            payload,
            hash,
        )
    }

    /// The rank that wrote what arrives at ring step `step`: the previous
    /// rank in the reduce-scatter (its partial sum), the chunk's owner in
    /// the all-gather.
    fn author(&self, step: usize) -> usize {
        let n = self.config.world;
        if step < n - 1 {
            self.config.prev()
        } else {
            // Chunk `rank − (step − n + 1)` is owned by the rank before it.
            (self.config.rank + 2 * n - (step + 2 - n) % n) % n
        }
    }

    /// The ring step whose tag a frame arriving at ring step `step` carries:
    /// its own in the reduce-scatter; in the all-gather, the one at which
    /// its owner finished the chunk (the frame is forwarded untouched).
    fn tag_step(&self, step: usize) -> usize {
        step.min(self.config.world - 1)
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
        // piece as it is copied out, checked to be finite.
        for (seg, range) in self
            .plan
            .segments(self.chunk_index(0))
            .into_iter()
            .enumerate()
        {
            let data = &buf[range];
            if self.screen_own && !data.iter().all(|x| x.is_finite()) {
                return Err(RingError::Unsendable {
                    what: format!("its own gradient (segment {seg} of its chunk)"),
                });
            }
            let (payload, hash) = to_wire_hashed(data);
            send(self.frame(0, seg, payload, hash))?;
        }
        let n_f32 = n as f32;
        for step in 0..n - 1 {
            let chunk = self.chunk_index(step + 1);
            let last = step == n - 2;
            for (seg, range) in self.plan.segments(chunk).into_iter().enumerate() {
                // One pass per piece, while it is in cache: check the
                // incoming bytes against their hash and that they are
                // finite, add them to our values (in our buffer: on every
                // rank but the chunk's owner, the all-gather overwrites
                // them anyway), hash the sum for the frame that forwards it.
                // The received frame keeps what arrived, for a complaint if
                // it is refused; once accepted it carries the sum on, so no
                // allocation.
                let local = &mut buf[range.clone()];
                let mut out = blake3::Hasher::new();
                let (mut incoming_finite, mut sum_finite) = (true, true);
                let mut frame = self.receive(step, seg, range.len(), |at, bytes| {
                    if !incoming_finite {
                        return;
                    }
                    if !finite_wire(bytes) {
                        incoming_finite = false;
                        return;
                    }
                    let x = &mut local[at / 4..at / 4 + bytes.len() / 4];
                    if last {
                        finish_sum(bytes, x, n_f32);
                    } else {
                        accumulate(bytes, x);
                    }
                    sum_finite &= x.iter().all(|v| v.is_finite());
                    hash_f32s(&mut out, x);
                })?;
                if !incoming_finite {
                    return Err(self.refuse_non_finite(frame, self.author(step)));
                }
                if self.screen_own && !sum_finite {
                    return Err(RingError::Unsendable {
                        what: format!("the partial sum of segment {seg} at ring step {}", step + 1),
                    });
                }
                to_wire_into(&buf[range], &mut frame.payload);
                let payload = std::mem::take(&mut frame.payload);
                let hash = *out.finalize().as_bytes();
                send(self.frame(step + 1, seg, payload, hash))?;
            }
        }
        // All-gather: finished chunks travel on around the ring verbatim,
        // their owner's header and signature untouched, so a forwarded
        // frame keeps the hash verified on receipt and is not hashed again.
        for step in n - 1..2 * (n - 1) {
            let chunk = self.chunk_index(step - (n - 1));
            for (seg, range) in self.plan.segments(chunk).into_iter().enumerate() {
                let local = &mut buf[range.clone()];
                let mut finite = true;
                let mut frame = self.receive(step, seg, range.len(), |at, bytes| {
                    let x = &mut local[at / 4..at / 4 + bytes.len() / 4];
                    from_wire(bytes, x);
                    finite &= x.iter().all(|v| v.is_finite());
                })?;
                if !finite {
                    return Err(self.refuse_non_finite(frame, self.author(step)));
                }
                if step + 1 < 2 * (n - 1) {
                    frame.header.sender = self.config.worker_id;
                    send(frame)?;
                }
            }
        }
        Ok(())
    }

    /// Counts a refusal of `frame`, written by rank `author`, for a NaN or
    /// an infinity on the link from the previous rank, and returns the
    /// error that reports it with the frame as it arrived.
    fn refuse_non_finite(&self, frame: Frame, author: usize) -> RingError {
        self.prev.stats().record_rejected(RejectReason::NonFinite);
        RingError::Refused {
            peer: self.config.prev(),
            origin: author,
            reason: RejectReason::NonFinite.name(),
            frame: Some(RefusedFrame(Box::new(frame))),
        }
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
        let author = self.author(step);
        let expected = (
            self.step,
            ring_tag(false, self.op, self.tag_step(step), seg),
            self.config.stage,
            self.config.replica(author),
            elems * 4,
        );
        let got = (
            h.step,
            h.micro_batch,
            h.stage,
            h.replica,
            authentic.payload_len(),
        );
        if h.kind != FrameKind::AllReduce || h.codec != Codec::F32 || expected != got {
            return Err(RingError::Protocol {
                peer,
                detail: format!(
                    "expected (step, tag, stage, author replica, bytes) = {expected:?}, got {:?} {got:?}",
                    h.kind
                ),
            });
        }
        let frame = self
            .prev
            .verify_in_pieces(authentic, PIECE_BYTES, each)
            .map_err(|e| link_failure(peer, timeout, e))?;
        self.config.check_author(&frame, self.prev, peer, author)?;
        Ok(frame)
    }
}

/// Bytes of a segment worked on at a time: hashed, summed and hashed again
/// while they are in this core's cache. A multiple of 4 (whole f32s) and of
/// BLAKE3's 1 KiB chunk, so pieces keep its SIMD lanes full.
pub(super) const PIECE_BYTES: usize = 64 << 10;

/// How often a waiting receive checks whether the exchange was aborted.
pub(super) const ABORT_POLL: Duration = Duration::from_millis(50);

/// The segments' size unless configured: 1 MiB.
pub const SEGMENT_BYTES: usize = 1 << 20;

/// Largest accepted segment: a frame's dimension is a u32 element count.
const MAX_SEGMENT_BYTES: usize = 1 << 30;

/// Most members of a ring: the ring step fits 16 bits of a tag.
const MAX_WORLD: usize = 1 << 15;

/// Most segments of one buffer: the segment fits 24 bits of a tag.
pub(super) const MAX_SEGMENTS: usize = 1 << 24;

/// The `micro_batch` field of a ring or gather frame: bit 63 marks the
/// gather, bits 40–62 the operation within the training step, bits 24–39
/// the ring step (0 in the gather) and bits 0–23 the segment. It names the
/// bucket and segment a frame carries, and its author signs it.
pub(super) fn ring_tag(gather: bool, op: u64, step: usize, seg: usize) -> u64 {
    (u64::from(gather) << 63)
        | ((op & ((1 << 23) - 1)) << 40)
        | ((step as u64 & 0xFFFF) << 24)
        | (seg as u64 & ((1 << 24) - 1))
}

/// Whether every little-endian f32 in `bytes` is finite.
pub(super) fn finite_wire(bytes: &[u8]) -> bool {
    if cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
            return v.iter().all(|x| x.is_finite());
        }
    }
    bytes
        .chunks_exact(4)
        .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
}

/// Feeds the little-endian bytes of `data` to `hasher`.
fn hash_f32s(hasher: &mut blake3::Hasher, data: &[f32]) {
    if cfg!(target_endian = "little") {
        hasher.update(bytemuck::cast_slice(data));
    } else {
        for x in data {
            hasher.update(&x.to_le_bytes());
        }
    }
}

/// Writes the little-endian bytes of `data` over `out` (same length).
fn to_wire_into(data: &[f32], out: &mut [u8]) {
    if cfg!(target_endian = "little") {
        out.copy_from_slice(bytemuck::cast_slice(data));
    } else {
        for (b, x) in out.chunks_exact_mut(4).zip(data) {
            b.copy_from_slice(&x.to_le_bytes());
        }
    }
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
/// `local[i] += incoming[i]` (`incoming`: the little-endian f32 bytes of a
/// received piece, left as they arrived). The incoming partial sum is
/// always the one added to: the fixed grouping that makes the result
/// independent of timing (a single f32 addition is exact whichever operand
/// comes first).
fn accumulate(incoming: &[u8], local: &mut [f32]) {
    match wire_f32s(incoming) {
        // A loop without branches inside, so the compiler vectorises it.
        Some(wire) => {
            for (w, x) in wire.iter().zip(local.iter_mut()) {
                *x += *w;
            }
        }
        None => {
            for (b, x) in incoming.chunks_exact(4).zip(local.iter_mut()) {
                *x += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// The chunk owner's last reduce-scatter step: the mean
/// `(incoming[i] + local[i]) / n`, written to `local` (and from there into
/// the frame that starts its all-gather).
fn finish_sum(incoming: &[u8], local: &mut [f32], n: f32) {
    match wire_f32s(incoming) {
        Some(wire) => {
            for (w, x) in wire.iter().zip(local.iter_mut()) {
                *x = (*w + *x) / n;
            }
        }
        None => {
            for (b, x) in incoming.chunks_exact(4).zip(local.iter_mut()) {
                *x = (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + *x) / n;
            }
        }
    }
}

/// The bytes as f32s when they can be read in place: on a little-endian
/// machine with 4-byte-aligned bytes.
fn wire_f32s(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice::<u8, f32>(bytes).ok()
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

    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The identity of rank `r` of a test ring (stage 0, replica `r`).
    pub(crate) fn identity_of(rank: usize) -> Identity {
        Identity::from_secret([rank as u8 + 60; 32])
    }

    /// The public keys of a test ring of `world` (stage 0).
    pub(crate) fn ring_keys(world: usize) -> Arc<PeerKeys> {
        let entries: Vec<(usize, usize, String)> = (0..world)
            .map(|r| (0, r, identity_of(r).public_hex()))
            .collect();
        Arc::new(PeerKeys::from_hex(&entries).expect("keys"))
    }

    /// Makes `c` sign with its rank's identity and check every frame
    /// against the ring's keys.
    pub(crate) fn signing(c: &mut RingConfig) {
        c.signer = Some(Arc::new(identity_of(c.rank)));
        c.keys = Some(ring_keys(c.world));
    }

    /// Refusals counted for `reason` on both of `m`'s links.
    pub(crate) fn counted(m: &RingMember, reason: RejectReason) -> u64 {
        let (next, prev) = m.links();
        [next, prev]
            .into_iter()
            .flatten()
            .map(|l| l.stats().rejected(reason))
            .sum()
    }

    #[test]
    fn signed_rings_verify_and_reduce_bit_for_bit_as_unsigned_ones() {
        for world in 1..=4 {
            let len = 10_007;
            let run = |sign: bool| {
                on_ring(
                    world,
                    |c| {
                        c.segment_bytes = 4096;
                        if sign {
                            signing(c);
                        }
                    },
                    |mut m| {
                        m.begin_step(3, true);
                        let mut buf = input(m.rank(), len);
                        m.allreduce_mean(&mut buf).expect("allreduce");
                        let refused = counted(&m, RejectReason::BadSignature);
                        (bits(&buf), refused)
                    },
                )
            };
            let plain = run(false);
            let signed = run(true);
            for (rank, ((a, _), (b, refused))) in plain.iter().zip(&signed).enumerate() {
                assert_eq!(a, b, "world {world} rank {rank}");
                assert_eq!(*refused, 0, "world {world} rank {rank}");
            }
        }
    }

    #[test]
    fn a_frame_not_signed_by_its_author_is_refused_and_counted() {
        // Rank 1 signs with a key that is not its registered one, or not
        // at all: rank 2, which receives its partial sums, refuses the
        // first one (`bad_signature`).
        for stranger in [true, false] {
            let answered = std::sync::Barrier::new(3);
            let results = on_ring(
                3,
                |c| {
                    c.timeout = Duration::from_secs(3);
                    signing(c);
                    if c.rank == 1 {
                        c.signer = stranger.then(|| Arc::new(Identity::from_secret([1; 32])));
                    }
                },
                |mut m| {
                    let mut buf = input(m.rank(), 5000);
                    let r = m.allreduce_mean(&mut buf).err();
                    answered.wait();
                    (r, counted(&m, RejectReason::BadSignature))
                },
            );
            let (err, refused) = &results[2];
            assert!(
                matches!(
                    err,
                    Some(RingError::Refused {
                        peer: 1,
                        origin: 1,
                        reason: "bad_signature",
                        frame: None
                    })
                ),
                "stranger {stranger}: {err:?}"
            );
            assert_eq!(*refused, 1, "stranger {stranger}");
        }
    }

    #[test]
    fn non_finite_values_are_refused_with_their_frame_and_never_sent_by_an_honest_rank() {
        for honest in [true, false] {
            let answered = std::sync::Barrier::new(3);
            let results = on_ring(
                3,
                |c| {
                    c.timeout = Duration::from_secs(3);
                    signing(c);
                },
                |mut m| {
                    let rank = m.rank();
                    // Rank 1's own screen is on unless it is the drill.
                    m.begin_step(0, honest || rank != 1);
                    let mut buf = input(rank, 6000);
                    if rank == 1 {
                        // In its own chunk (the second third).
                        buf[2500] = f32::INFINITY;
                    }
                    let r = m.allreduce_mean(&mut buf).err();
                    answered.wait();
                    (r, counted(&m, RejectReason::NonFinite))
                },
            );
            if honest {
                let (err, _) = &results[1];
                assert!(matches!(err, Some(RingError::Unsendable { .. })), "{err:?}");
                assert!(results.iter().all(|(_, n)| *n == 0), "nothing refused");
                continue;
            }
            let (err, refused) = &results[2];
            let Some(RingError::Refused {
                peer: 1,
                origin: 1,
                reason: "non_finite",
                frame: Some(frame),
            }) = err
            else {
                panic!("{err:?}");
            };
            assert_eq!(*refused, 1);
            // Kept as it arrived, signed by its author.
            let f = &frame.0;
            assert!(ring_keys(3).check(f, (0, 1)).is_ok());
            let mut values = vec![0f32; f.payload.len() / 4];
            from_wire(&f.payload, &mut values);
            assert!(values.iter().any(|v| !v.is_finite()));
            assert_eq!(
                f.content_hash(),
                crate::link::frame::content_hash(&f.payload)
            );
        }
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
