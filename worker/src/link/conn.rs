//! [`Link`]: an authenticated TCP connection carrying frames both ways.
//!
//! Each link owns two threads. The sender thread drains a queue bounded in
//! frames and in bytes, so a producer that outruns the network blocks in
//! [`Link::send`] instead of growing memory. The receiver thread reads
//! frames, authenticates their headers and hands them over a bounded
//! channel, so a slow consumer stops the reader, which fills the TCP window,
//! which in turn stops the remote sender: backpressure end to end.
//!
//! The one pass over each payload that authentication costs per side runs
//! in the caller's thread, not the link's: [`Link::send`] hashes the payload
//! before queueing it, and [`Link::recv`] checks it against the
//! authenticated hash before returning it. The link's threads only move
//! bytes, so hashing overlaps the socket copies instead of queueing behind
//! them.

use std::collections::VecDeque;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::frame::{
    self, AuthenticFrame, Frame, FrameError, FrameLimits, RejectReason, RunId, RunKey, WorkerId,
};
use super::handshake::{handshake, HandshakeError, Role};
use super::stats::LinkStats;

/// Buffer size for the socket reader: large enough to take in many small
/// frames per system call, small enough that large payloads bypass it.
const IO_BUFFER: usize = 64 << 10;

/// Settings of a link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Run the link belongs to; frames for other runs are rejected.
    pub run_id: RunId,
    /// Key that authenticates the handshake and every frame.
    pub key: RunKey,
    /// This worker's id, sent in the handshake.
    pub worker_id: WorkerId,
    /// Most frames waiting to be sent.
    pub send_queue_frames: usize,
    /// Most encoded bytes waiting to be sent. A single frame larger than
    /// this is still sent, but only once the queue is otherwise empty.
    pub send_queue_bytes: usize,
    /// Most verified frames waiting for [`Link::recv`].
    pub recv_queue_frames: usize,
    /// Limits applied to every incoming frame.
    pub limits: FrameLimits,
    /// Deadline for connecting and for the handshake.
    pub handshake_timeout: Duration,
    /// Deadline for one socket write; a peer that stops reading for this
    /// long is treated as gone. `None` waits forever.
    pub write_timeout: Option<Duration>,
    /// Set by the owner to stop waiting: callers that wait for a peer
    /// (connecting, accepting, a stage waiting for a frame) give up as soon
    /// as it is true, e.g. when the coordinator rewired the run.
    pub abort: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Most bytes per second this side sends, paced by the kernel (see
    /// [`super::cap_send_rate`]); `None` sends as fast as the path allows.
    pub max_send_rate: Option<u64>,
}

impl LinkConfig {
    /// Whether the owner asked waits to stop.
    pub fn aborted(&self) -> bool {
        self.abort
            .as_ref()
            .is_some_and(|a| a.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl LinkConfig {
    /// Defaults suited to activation traffic: 8 frames / 64 MiB each way.
    pub fn new(run_id: RunId, key: RunKey, worker_id: WorkerId) -> Self {
        LinkConfig {
            run_id,
            key,
            worker_id,
            send_queue_frames: 8,
            send_queue_bytes: 64 << 20,
            recv_queue_frames: 8,
            limits: FrameLimits::default(),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Some(Duration::from_secs(60)),
            abort: None,
            max_send_rate: None,
        }
    }
}

/// Why a link operation failed.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Connecting or accepting failed.
    #[error("cannot open link to {addr}: {source}")]
    Connect {
        /// Address tried (or the listener's address).
        addr: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("link handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The connection is closed; the reason is recorded when known.
    #[error("link closed: {0}")]
    Closed(String),
    /// Nothing arrived (or no queue space opened) within the deadline.
    #[error("link timed out after {0:?}")]
    Timeout(Duration),
    /// An authentic frame's payload did not match the content hash its
    /// header carries, after the caller had already worked on it (see
    /// [`Link::verify_in_pieces`]).
    #[error("peer sent a payload that does not match its authenticated content hash")]
    BadContent,
}

/// Send queue shared between [`Link::send`] and the sender thread.
struct SendQueue {
    state: Mutex<QueueState>,
    /// Signalled when space frees up or the link closes.
    space: Condvar,
    /// Signalled when a frame arrives or the link closes.
    work: Condvar,
    max_frames: usize,
    max_bytes: usize,
}

struct QueueState {
    frames: VecDeque<Frame>,
    /// Frames queued plus the one being written.
    occupied_frames: usize,
    /// Encoded bytes queued plus the frame being written.
    occupied_bytes: usize,
    /// Set when the link can no longer send, with the reason.
    closed: Option<String>,
    /// Set by [`Link::finish`]: send what is queued, then stop.
    draining: bool,
}

impl SendQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A poisoned lock means a link thread panicked; the state itself is
        // still consistent (every update is a few field writes), so carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, reason: String) {
        let mut s = self.lock();
        s.closed.get_or_insert(reason);
        drop(s);
        self.space.notify_all();
        self.work.notify_all();
    }
}

/// An authenticated, bidirectional frame connection to one peer.
pub struct Link {
    queue: Arc<SendQueue>,
    /// Behind a mutex so a link can be shared: one thread sending while
    /// another receives.
    incoming: Mutex<Receiver<AuthenticFrame>>,
    stats: Arc<LinkStats>,
    peer: WorkerId,
    peer_addr: Option<SocketAddr>,
    stream: TcpStream,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connects to `addr` and runs the handshake as initiator.
    pub fn connect<A: ToSocketAddrs + std::fmt::Debug>(
        addr: A,
        config: &LinkConfig,
    ) -> Result<Link, LinkError> {
        let connect_err = |source| LinkError::Connect {
            addr: format!("{addr:?}"),
            source,
        };
        let mut last = None;
        for a in addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&a, config.handshake_timeout) {
                Ok(s) => return Link::from_stream(s, Role::Initiator, config),
                Err(e) => last = Some(e),
            }
        }
        Err(connect_err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing")
        })))
    }

    /// Accepts one connection on `listener` and runs the handshake as
    /// acceptor.
    pub fn accept(listener: &TcpListener, config: &LinkConfig) -> Result<Link, LinkError> {
        let (stream, _) = listener.accept().map_err(|source| LinkError::Connect {
            addr: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "listener".into()),
            source,
        })?;
        Link::from_stream(stream, Role::Acceptor, config)
    }

    /// Runs the handshake on an open stream and starts the link's threads.
    pub fn from_stream(
        mut stream: TcpStream,
        role: Role,
        config: &LinkConfig,
    ) -> Result<Link, LinkError> {
        let io_err = |source| LinkError::Connect {
            addr: "stream".into(),
            source,
        };
        // Small control frames must not wait for Nagle's timer; large ones
        // are batched by the buffered writer anyway.
        stream.set_nodelay(true).map_err(io_err)?;
        if let Some(rate) = config.max_send_rate {
            super::cap_send_rate(&stream, rate).map_err(io_err)?;
        }
        let peer = handshake(
            &mut stream,
            role,
            &config.key,
            &config.run_id,
            &config.worker_id,
            config.handshake_timeout,
        )?;
        stream
            .set_write_timeout(config.write_timeout)
            .map_err(io_err)?;
        let peer_addr = stream.peer_addr().ok();
        let stats = Arc::new(LinkStats::default());
        let queue = Arc::new(SendQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                occupied_frames: 0,
                occupied_bytes: 0,
                closed: None,
                draining: false,
            }),
            space: Condvar::new(),
            work: Condvar::new(),
            max_frames: config.send_queue_frames.max(1),
            max_bytes: config.send_queue_bytes,
        });
        let (tx, incoming) = mpsc::sync_channel(config.recv_queue_frames.max(1));

        let sender = {
            let stream = stream.try_clone().map_err(io_err)?;
            let (queue, stats, key) = (queue.clone(), stats.clone(), config.key.clone());
            thread::Builder::new()
                .name("link-send".into())
                .spawn(move || send_loop(stream, &queue, &stats, &key))
                .map_err(io_err)?
        };
        let receiver = {
            let reader = ReceiverThread {
                stream: stream.try_clone().map_err(io_err)?,
                queue: queue.clone(),
                stats: stats.clone(),
                key: config.key.clone(),
                limits: config.limits,
                run_id: config.run_id,
                peer,
                tx,
            };
            thread::Builder::new()
                .name("link-recv".into())
                .spawn(move || reader.run())
                .map_err(io_err)?
        };
        Ok(Link {
            queue,
            incoming: Mutex::new(incoming),
            stats,
            peer,
            peer_addr,
            stream,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// The peer's worker id, as proven in the handshake.
    pub fn peer(&self) -> WorkerId {
        self.peer
    }

    /// The peer's socket address, when known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Counters of this link.
    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }

    /// Queues `frame` for sending, blocking while the queue is full.
    pub fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.enqueue(frame, None)
    }

    /// Like [`Link::send`] but gives up after `timeout` without queue space.
    pub fn send_timeout(&self, frame: Frame, timeout: Duration) -> Result<(), LinkError> {
        self.enqueue(frame, Some(timeout))
    }

    fn enqueue(&self, mut frame: Frame, timeout: Option<Duration>) -> Result<(), LinkError> {
        // The payload is hashed here, in the caller's thread, so the sender
        // thread only writes: hashing the next frame overlaps writing the
        // previous one instead of queueing behind it.
        frame.hash_payload();
        let size = frame.encoded_len();
        let deadline = timeout.map(|t| Instant::now() + t);
        let q = &*self.queue;
        let mut s = q.lock();
        loop {
            if let Some(reason) = &s.closed {
                return Err(LinkError::Closed(reason.clone()));
            }
            let fits = s.occupied_frames == 0
                || (s.occupied_frames < q.max_frames && s.occupied_bytes + size <= q.max_bytes);
            if fits {
                break;
            }
            s = match deadline {
                None => q.space.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(LinkError::Timeout(timeout.unwrap_or_default()));
                    }
                    q.space
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        s.occupied_frames += 1;
        s.occupied_bytes += size;
        self.stats.record_queue(s.occupied_frames, s.occupied_bytes);
        s.frames.push_back(frame);
        drop(s);
        q.work.notify_one();
        Ok(())
    }

    fn incoming(&self) -> MutexGuard<'_, Receiver<AuthenticFrame>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every queued frame has been handed to the operating
    /// system, or `timeout` passes. Dropping a link discards queued frames,
    /// so call this (or [`Link::finish`]) when they must arrive.
    pub fn flush(&self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        let q = &*self.queue;
        let mut s = q.lock();
        while s.occupied_frames > 0 {
            if let Some(reason) = &s.closed {
                return Err(LinkError::Closed(reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::Timeout(timeout));
            }
            s = q
                .space
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Checks an authentic frame's payload against the hash its header
    /// carries, here in the receiving caller's thread, so that the link's
    /// reader thread goes on reading meanwhile. A mismatch is dropped and
    /// counted like every other rejection.
    fn verified(&self, authentic: AuthenticFrame) -> Option<Frame> {
        self.verify_in_pieces(authentic, usize::MAX, |_, _| {}).ok()
    }

    /// Waits for the next verified frame.
    pub fn recv(&self) -> Result<Frame, LinkError> {
        let incoming = self.incoming();
        loop {
            let authentic = incoming.recv().map_err(|_| self.closed())?;
            if let Some(f) = self.verified(authentic) {
                return Ok(f);
            }
        }
    }

    /// Waits at most `timeout` for the next verified frame.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Frame, LinkError> {
        let deadline = Instant::now() + timeout;
        let incoming = self.incoming();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let authentic = self.next_authentic(&incoming, left, timeout)?;
            if let Some(f) = self.verified(authentic) {
                return Ok(f);
            }
        }
    }

    /// Waits at most `timeout` for the next frame whose header is authentic
    /// and leaves its payload unchecked, for a caller that checks it in its
    /// own pass over the bytes with [`Link::verify_in_pieces`], which it
    /// must then call. Meant for callers that read the whole payload anyway
    /// (the all-reduce sums it): one pass instead of two.
    pub fn recv_authentic_timeout(&self, timeout: Duration) -> Result<AuthenticFrame, LinkError> {
        self.next_authentic(&self.incoming(), timeout, timeout)
    }

    /// [`AuthenticFrame::verify_in_pieces`] for a frame this link received,
    /// counted like every frame [`Link::recv`] returns or drops. A mismatch
    /// is [`LinkError::BadContent`].
    pub fn verify_in_pieces(
        &self,
        authentic: AuthenticFrame,
        piece: usize,
        each: impl FnMut(usize, &mut [u8]),
    ) -> Result<Frame, LinkError> {
        let len = authentic.encoded_len() as u64;
        match authentic.verify_in_pieces(piece, each) {
            Ok(f) => {
                self.stats.record_received(len);
                Ok(f)
            }
            Err(_) => {
                self.stats.record_rejected(RejectReason::BadContentHash);
                Err(LinkError::BadContent)
            }
        }
    }

    fn next_authentic(
        &self,
        incoming: &Receiver<AuthenticFrame>,
        wait: Duration,
        timeout: Duration,
    ) -> Result<AuthenticFrame, LinkError> {
        incoming.recv_timeout(wait).map_err(|e| match e {
            RecvTimeoutError::Timeout => LinkError::Timeout(timeout),
            RecvTimeoutError::Disconnected => self.closed(),
        })
    }

    /// The next verified frame if one is waiting.
    pub fn try_recv(&self) -> Result<Option<Frame>, LinkError> {
        let incoming = self.incoming();
        loop {
            match incoming.try_recv() {
                Ok(authentic) => {
                    if let Some(f) = self.verified(authentic) {
                        return Ok(Some(f));
                    }
                }
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Err(self.closed()),
            }
        }
    }

    fn closed(&self) -> LinkError {
        LinkError::Closed(
            self.stats
                .close_reason()
                .unwrap_or_else(|| "connection closed".into()),
        )
    }

    /// Sends everything queued, then closes the sending half so the peer
    /// sees a clean end of stream after the last frame. Frames may still be
    /// received until the peer closes its half.
    pub fn finish(&mut self) -> Result<(), LinkError> {
        {
            let mut s = self.queue.lock();
            s.draining = true;
        }
        self.queue.work.notify_all();
        if let Some(h) = self.sender.take() {
            // The sender thread never panics on peer input; a panic here is a
            // bug in this module and is reported as a closed link.
            if h.join().is_err() {
                return Err(LinkError::Closed("sender thread panicked".into()));
            }
        }
        match self.queue.lock().closed.clone() {
            Some(reason) if reason != FINISHED => Err(LinkError::Closed(reason)),
            _ => Ok(()),
        }
    }
}

/// Close reason the sender thread records after a clean [`Link::finish`].
const FINISHED: &str = "finished";

impl Drop for Link {
    fn drop(&mut self) {
        self.queue.close("link dropped".into());
        // Shutting the socket down unblocks both threads wherever they are.
        let _ = self.stream.shutdown(Shutdown::Both);
        // Drop our end of the channel before joining, so a receiver thread
        // blocked on a full channel wakes with an error.
        let (_, dead) = mpsc::sync_channel(1);
        let incoming = self.incoming.get_mut().unwrap_or_else(|p| p.into_inner());
        drop(std::mem::replace(incoming, dead));
        for h in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

/// What the sender thread should do next.
enum Next {
    /// Write the frames moved into the batch.
    Write,
    /// [`Link::finish`] was called and the queue is empty.
    Finish,
    /// The link is closed for the given reason.
    Stop(String),
}

/// Most frames written by one vectored write.
const MAX_BATCH_FRAMES: usize = 64;

/// Frames are gathered into one write until they reach this many bytes, so
/// bursts of small frames share a system call while a large frame frees its
/// queue space as soon as it is written.
const MAX_BATCH_BYTES: usize = 256 << 10;

/// Waits for queued frames and moves the next batch of them into `batch`.
fn next_batch(queue: &SendQueue, batch: &mut Vec<Frame>) -> Next {
    let mut s = queue.lock();
    loop {
        if let Some(reason) = &s.closed {
            return Next::Stop(reason.clone());
        }
        if !s.frames.is_empty() {
            let mut bytes = 0;
            while let Some(frame) = s.frames.front() {
                if !batch.is_empty()
                    && (batch.len() == MAX_BATCH_FRAMES
                        || bytes + frame.encoded_len() > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += frame.encoded_len();
                batch.extend(s.frames.pop_front());
            }
            return Next::Write;
        }
        if s.draining {
            return Next::Finish;
        }
        s = queue.work.wait(s).unwrap_or_else(|p| p.into_inner());
    }
}

fn send_loop(mut stream: TcpStream, queue: &SendQueue, stats: &LinkStats, key: &RunKey) {
    let mut batch = Vec::new();
    let reason = loop {
        match next_batch(queue, &mut batch) {
            Next::Write => {}
            Next::Finish => {
                break match stream.shutdown(Shutdown::Write) {
                    Ok(()) => FINISHED.to_string(),
                    Err(e) => format!("write failed: {e}"),
                };
            }
            Next::Stop(reason) => break reason,
        }
        // One vectored write for the whole batch: headers, payloads and tags
        // leave together instead of as separate small segments.
        let result = frame::write_frames(&mut stream, &batch, key);
        let frames = batch.len();
        let bytes: usize = batch.iter().map(Frame::encoded_len).sum();
        batch.clear();
        match result {
            Ok(n) => stats.record_sent(frames as u64, n),
            Err(e) => break format!("write failed: {e}"),
        }
        let mut s = queue.lock();
        s.occupied_frames -= frames;
        s.occupied_bytes -= bytes;
        drop(s);
        queue.space.notify_all();
    };
    if reason != FINISHED {
        stats.record_close(reason.clone());
        // A failed write leaves the peer's view of the stream undefined;
        // end the connection in both directions.
        let _ = stream.shutdown(Shutdown::Both);
    }
    queue.close(reason);
}

struct ReceiverThread {
    stream: TcpStream,
    queue: Arc<SendQueue>,
    stats: Arc<LinkStats>,
    key: RunKey,
    limits: FrameLimits,
    run_id: RunId,
    peer: WorkerId,
    tx: SyncSender<AuthenticFrame>,
}

impl ReceiverThread {
    fn run(self) {
        let mut r = BufReader::with_capacity(IO_BUFFER, &self.stream);
        let reason = loop {
            // Headers are authenticated here; payloads are checked against
            // their authenticated hash by whoever calls `recv`, so this
            // thread only reads and the hashing overlaps the next read.
            match frame::read_authentic(&mut r, &self.key, &self.limits) {
                Ok(f) => {
                    // Authentic frames still must belong to this run and name
                    // the peer proven in the handshake as their author.
                    let verdict = if f.header().run_id != self.run_id {
                        Some(RejectReason::WrongRun)
                    } else if f.header().sender != self.peer {
                        Some(RejectReason::WrongSender)
                    } else {
                        None
                    };
                    if let Some(reason) = verdict {
                        self.stats.record_rejected(reason);
                        continue;
                    }
                    if self.tx.send(f).is_err() {
                        break "link dropped".to_string();
                    }
                }
                Err(FrameError::Closed) => {
                    // The peer finished sending; our own sending half stays
                    // usable until the peer closes the socket entirely.
                    self.stats.record_close("peer closed the connection".into());
                    return;
                }
                Err(e) => {
                    if let Some(reason) = e.reason() {
                        self.stats.record_rejected(reason);
                    }
                    if e.desynchronizes() {
                        let reason = format!("stream out of sync: {e}");
                        tracing::warn!(peer = ?self.stream.peer_addr().ok(), %reason, "closing link");
                        break reason;
                    }
                }
            }
        };
        self.stats.record_close(reason.clone());
        let _ = self.stream.shutdown(Shutdown::Both);
        self.queue.close(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::frame::{Codec, DType, FrameHeader, FrameKind, Shape};
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const RUN: RunId = RunId([3; 16]);
    const KEY: RunKey = RunKey([11; 32]);

    fn config(id: u8) -> LinkConfig {
        LinkConfig::new(RUN, KEY, WorkerId([id; 16]))
    }

    /// Opens a link between two configs on loopback: (initiator, acceptor).
    fn pair(a: LinkConfig, b: LinkConfig) -> (Link, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = thread::spawn(move || Link::accept(&listener, &b));
        let init = Link::connect(addr, &a).expect("connect");
        (init, acceptor.join().expect("join").expect("accept"))
    }

    /// The value of `counter` once it has not changed for `quiet`; gives
    /// up (returning the last value) after a minute.
    fn settled(counter: &AtomicUsize, quiet: Duration) -> usize {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut last = counter.load(Ordering::SeqCst);
        let mut since = Instant::now();
        while Instant::now() < give_up {
            thread::sleep(Duration::from_millis(20));
            let now = counter.load(Ordering::SeqCst);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        last
    }

    fn frame(from: u8, step: u64, len: usize) -> Frame {
        Frame {
            header: FrameHeader {
                run_id: RUN,
                step,
                micro_batch: 0,
                stage: 0,
                replica: 0,
                kind: FrameKind::Activation,
                dtype: DType::I8,
                codec: Codec::Raw,
                shape: Shape::new(&[len as u32]).expect("rank 1"),
                sender: WorkerId([from; 16]),
                input_hash: [0; 32],
                signature: [0; crate::link::frame::SIGNATURE_LEN],
            },
            payload: (0..len).map(|i| (i as u64 + step) as u8).collect(),
            verified_hash: None,
        }
    }

    #[test]
    fn frames_arrive_in_order_both_ways() {
        let (a, b) = pair(config(1), config(2));
        assert_eq!(a.peer(), WorkerId([2; 16]));
        assert_eq!(b.peer(), WorkerId([1; 16]));
        let n = 300;
        thread::scope(|s| {
            s.spawn(|| {
                for i in 0..n {
                    a.send(frame(1, i, 1 + (i as usize * 997) % 70_000))
                        .expect("send a");
                }
            });
            s.spawn(|| {
                for i in 0..n {
                    b.send(frame(2, i, 10)).expect("send b");
                }
            });
            for i in 0..n {
                let f = b.recv_timeout(Duration::from_secs(10)).expect("recv at b");
                assert_eq!(f, frame(1, i, 1 + (i as usize * 997) % 70_000));
                let g = a.recv_timeout(Duration::from_secs(10)).expect("recv at a");
                assert_eq!(g.header.step, i);
            }
        });
        assert_eq!(b.stats().snapshot().frames_received, n);
        // Frames reach `b` before `a`'s writer thread counts them.
        a.flush(Duration::from_secs(10)).expect("flush");
        assert_eq!(a.stats().snapshot().frames_sent, n);
        assert_eq!(b.stats().rejected_total(), 0);
    }

    #[test]
    fn slow_reader_blocks_the_writer_and_queue_stays_bounded() {
        let payload = 1 << 20;
        let one = frame(1, 0, payload).encoded_len();
        let mut a_cfg = config(1);
        a_cfg.send_queue_frames = 4;
        a_cfg.send_queue_bytes = 3 * one;
        let mut b_cfg = config(2);
        b_cfg.recv_queue_frames = 2;
        let (a, b) = pair(a_cfg, b_cfg);
        let total = 64u64;
        let accepted = AtomicUsize::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                for i in 0..total {
                    a.send(frame(1, i, payload)).expect("send");
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            });
            // The writer stalls once the send queue, the socket buffers and
            // the receive channel are full: wait until its count stops moving
            // rather than guessing how long filling them takes on this machine.
            let stalled_at = settled(&accepted, Duration::from_millis(500));
            // Whatever is in flight is bounded by those buffers: far fewer
            // than 64 MiB.
            assert!(
                stalled_at < 40,
                "writer was not held back: {stalled_at} frames accepted"
            );
            for i in 0..total {
                let f = b.recv_timeout(Duration::from_secs(10)).expect("recv");
                assert_eq!(f.header.step, i);
                assert_eq!(f.payload.len(), payload);
            }
        });
        // The reader can hold the last frame before the writer thread has
        // counted it: wait until the queue is empty, which it becomes only
        // after the count.
        a.flush(Duration::from_secs(10)).expect("flush");
        let snap = a.stats().snapshot();
        assert_eq!(snap.frames_sent, total);
        assert!(snap.queue_peak_bytes as usize <= 3 * one, "{snap:?}");
        assert!(snap.queue_peak_frames <= 3, "{snap:?}");
    }

    /// A raw peer that completed the handshake with the right key and
    /// writes whatever bytes it likes.
    fn raw_peer() -> (TcpStream, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let link = thread::spawn(move || Link::accept(&listener, &config(2)));
        let mut raw = TcpStream::connect(addr).expect("connect");
        handshake(
            &mut raw,
            Role::Initiator,
            &KEY,
            &RUN,
            &WorkerId([1; 16]),
            Duration::from_secs(5),
        )
        .expect("handshake");
        (raw, link.join().expect("join").expect("accept"))
    }

    #[test]
    fn forged_and_misattributed_frames_are_dropped_and_counted() {
        let (mut raw, link) = raw_peer();
        let good = frame(1, 7, 100);
        let mut other_run = frame(1, 8, 100);
        other_run.header.run_id = RunId([4; 16]);
        let mut bytes = frame::encode(&good, &RunKey([12; 32]));
        bytes.extend(frame::encode(&frame(9, 9, 100), &KEY));
        bytes.extend(frame::encode(&other_run, &KEY));
        let mut flipped = frame::encode(&good, &KEY);
        flipped[frame::HEADER_LEN + 3] ^= 4;
        bytes.extend(flipped);
        bytes.extend(frame::encode(&good, &KEY));
        raw.write_all(&bytes).expect("write");
        let got = link
            .recv_timeout(Duration::from_secs(5))
            .expect("the good frame");
        assert_eq!(got, good);
        let stats = link.stats();
        assert_eq!(stats.rejected(RejectReason::BadTag), 1);
        assert_eq!(stats.rejected(RejectReason::BadContentHash), 1);
        assert_eq!(stats.rejected(RejectReason::WrongSender), 1);
        assert_eq!(stats.rejected(RejectReason::WrongRun), 1);
        assert_eq!(
            stats.close_reason(),
            None,
            "bad frames must not close the link"
        );

        // Garbage where a header should be cannot be skipped: the link closes.
        raw.write_all(&[0x55; frame::HEADER_LEN]).expect("write");
        let err = link.recv_timeout(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, LinkError::Closed(r) if r.contains("out of sync")),
            "{err}"
        );
        assert_eq!(stats.rejected(RejectReason::BadMagic), 1);
    }

    #[test]
    fn payload_checked_in_the_callers_pass_is_counted_and_a_mismatch_is_an_error() {
        let (mut raw, link) = raw_peer();
        let good = frame(1, 1, 5000);
        let mut forged = frame::encode(&good, &KEY);
        // A payload byte changed after sealing: the header (and its tag)
        // stays authentic, the content hash no longer matches.
        forged[frame::HEADER_LEN + 10] ^= 1;
        raw.write_all(&forged).expect("write");
        raw.write_all(&frame::encode(&good, &KEY)).expect("write");
        let wait = Duration::from_secs(5);
        let first = link.recv_authentic_timeout(wait).expect("authentic");
        let err = link.verify_in_pieces(first, 1024, |_, _| {}).unwrap_err();
        assert!(matches!(err, LinkError::BadContent), "{err}");
        let second = link.recv_authentic_timeout(wait).expect("authentic");
        let mut sum = 0u64;
        let got = link
            .verify_in_pieces(second, 1024, |_, p| {
                sum += p.iter().map(|&b| u64::from(b)).sum::<u64>()
            })
            .expect("good frame");
        assert_eq!(got, good);
        assert_eq!(sum, good.payload.iter().map(|&b| u64::from(b)).sum::<u64>());
        let stats = link.stats();
        assert_eq!(stats.rejected(RejectReason::BadContentHash), 1);
        assert_eq!(stats.snapshot().frames_received, 1);
    }

    #[test]
    fn a_link_with_a_send_rate_cap_sends_no_faster() {
        let mut capped = config(1);
        capped.max_send_rate = Some(16 << 20);
        let (a, b) = pair(capped, config(2));
        let start = Instant::now();
        for i in 0..8 {
            a.send(frame(1, i, 1 << 20)).expect("send");
        }
        for _ in 0..8 {
            b.recv_timeout(Duration::from_secs(10)).expect("recv");
        }
        // 8 MiB at 16 MiB/s: half a second, less the first window.
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 0.35, "8 MiB at 16 MiB/s arrived in {took:.3} s");
    }

    #[test]
    fn wrong_key_cannot_open_a_link() {
        let mut bad = config(1);
        bad.key = RunKey([0; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = thread::spawn(move || Link::accept(&listener, &config(2)));
        let err = Link::connect(addr, &bad).unwrap_err();
        assert!(
            matches!(err, LinkError::Handshake(HandshakeError::BadProof)),
            "{err}"
        );
        assert!(matches!(
            acceptor.join().expect("join"),
            Err(LinkError::Handshake(HandshakeError::BadProof))
        ));
    }

    #[test]
    fn finish_delivers_everything_then_the_peer_sees_the_end() {
        let (mut a, b) = pair(config(1), config(2));
        for i in 0..5 {
            a.send(frame(1, i, 1000)).expect("send");
        }
        a.finish().expect("finish");
        assert!(matches!(a.send(frame(1, 9, 1)), Err(LinkError::Closed(_))));
        for i in 0..5 {
            assert_eq!(b.recv().expect("recv").header.step, i);
        }
        let end = b.recv_timeout(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&end, LinkError::Closed(r) if r.contains("peer closed")),
            "{end}"
        );
        // The finished side can still receive.
        b.send(frame(2, 1, 10)).expect("send back");
        assert_eq!(
            a.recv_timeout(Duration::from_secs(5))
                .expect("reply")
                .header
                .step,
            1
        );
    }

    #[test]
    fn dropped_peer_is_an_error_not_a_hang() {
        let (a, b) = pair(config(1), config(2));
        drop(b);
        let err = a.recv_timeout(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::Closed(_)), "{err}");
    }
}
