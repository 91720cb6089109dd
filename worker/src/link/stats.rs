//! Counters a link keeps for metrics and for tests: traffic, rejections by
//! reason, and the high-water mark of the send queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::frame::RejectReason;

/// Lock-free counters shared by a link's threads and its owner.
#[derive(Debug, Default)]
pub struct LinkStats {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    rejected: [AtomicU64; RejectReason::COUNT],
    queue_peak_frames: AtomicU64,
    queue_peak_bytes: AtomicU64,
    close_reason: Mutex<Option<String>>,
}

/// A point-in-time copy of [`LinkStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatsSnapshot {
    /// Frames written to the socket.
    pub frames_sent: u64,
    /// Encoded bytes written to the socket.
    pub bytes_sent: u64,
    /// Valid frames handed to the receiver.
    pub frames_received: u64,
    /// Encoded bytes of valid frames received.
    pub bytes_received: u64,
    /// Rejected frames, by reason (only reasons with a non-zero count).
    pub rejected: Vec<(RejectReason, u64)>,
    /// Most frames ever waiting in (or being written from) the send queue.
    pub queue_peak_frames: u64,
    /// Most encoded bytes ever waiting in (or being written from) the send
    /// queue.
    pub queue_peak_bytes: u64,
    /// Why the connection closed, if it has.
    pub close_reason: Option<String>,
}

/// Traffic and refusals summed over several links, for a worker's
/// cumulative metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Encoded bytes written to the sockets.
    pub bytes_sent: u64,
    /// Encoded bytes of valid frames received.
    pub bytes_received: u64,
    /// Rejected frames, indexed by `RejectReason as usize`.
    pub rejected: [u64; RejectReason::COUNT],
}

impl Traffic {
    /// What was added between `earlier` and `self`, counter by counter; a
    /// counter that went down (the links were replaced) counts from zero.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let delta = |now: u64, then: u64| if now >= then { now - then } else { now };
        let mut rejected = [0; RejectReason::COUNT];
        for (i, r) in rejected.iter_mut().enumerate() {
            *r = delta(self.rejected[i], earlier.rejected[i]);
        }
        Traffic {
            bytes_sent: delta(self.bytes_sent, earlier.bytes_sent),
            bytes_received: delta(self.bytes_received, earlier.bytes_received),
            rejected,
        }
    }
}

impl LinkStats {
    /// Adds this link's counters to `total`.
    pub fn add_to(&self, total: &mut Traffic) {
        total.bytes_sent += self.bytes_sent.load(Ordering::Relaxed);
        total.bytes_received += self.bytes_received.load(Ordering::Relaxed);
        for (t, c) in total.rejected.iter_mut().zip(&self.rejected) {
            *t += c.load(Ordering::Relaxed);
        }
    }

    /// Counts `frames` frames of `bytes` encoded bytes in all sent.
    pub(crate) fn record_sent(&self, frames: u64, bytes: u64) {
        self.frames_sent.fetch_add(frames, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one valid frame of `bytes` encoded bytes received.
    pub(crate) fn record_received(&self, bytes: u64) {
        self.frames_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one rejected frame.
    pub(crate) fn record_rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Raises the queue high-water marks to the given occupancy.
    pub(crate) fn record_queue(&self, frames: usize, bytes: usize) {
        self.queue_peak_frames
            .fetch_max(frames as u64, Ordering::Relaxed);
        self.queue_peak_bytes
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    /// Records why the connection closed; the first reason wins because
    /// later ones are usually consequences of it.
    pub(crate) fn record_close(&self, reason: String) {
        if let Ok(mut slot) = self.close_reason.lock() {
            slot.get_or_insert(reason);
        }
    }

    /// Frames rejected for `reason` so far.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Frames rejected for any reason so far.
    pub fn rejected_total(&self) -> u64 {
        self.rejected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> LinkStatsSnapshot {
        LinkStatsSnapshot {
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            rejected: RejectReason::ALL
                .iter()
                .map(|&r| (r, self.rejected(r)))
                .filter(|&(_, n)| n > 0)
                .collect(),
            queue_peak_frames: self.queue_peak_frames.load(Ordering::Relaxed),
            queue_peak_bytes: self.queue_peak_bytes.load(Ordering::Relaxed),
            close_reason: self.close_reason(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_and_snapshot_lists_only_seen_reasons() {
        let s = LinkStats::default();
        s.record_sent(1, 100);
        s.record_sent(1, 50);
        s.record_received(7);
        s.record_rejected(RejectReason::BadTag);
        s.record_rejected(RejectReason::BadTag);
        s.record_rejected(RejectReason::WrongRun);
        s.record_queue(3, 300);
        s.record_queue(2, 900);
        s.record_close("first".into());
        s.record_close("second".into());
        let snap = s.snapshot();
        assert_eq!((snap.frames_sent, snap.bytes_sent), (2, 150));
        assert_eq!((snap.frames_received, snap.bytes_received), (1, 7));
        assert_eq!(
            snap.rejected,
            vec![(RejectReason::BadTag, 2), (RejectReason::WrongRun, 1)]
        );
        assert_eq!(s.rejected_total(), 3);
        assert_eq!((snap.queue_peak_frames, snap.queue_peak_bytes), (3, 900));
        assert_eq!(snap.close_reason.as_deref(), Some("first"));
    }

    #[test]
    fn traffic_sums_links_and_counts_replaced_links_from_zero() {
        let (a, b) = (LinkStats::default(), LinkStats::default());
        a.record_sent(1, 100);
        b.record_received(40);
        b.record_rejected(RejectReason::BadTag);
        let mut first = Traffic::default();
        a.add_to(&mut first);
        b.add_to(&mut first);
        assert_eq!((first.bytes_sent, first.bytes_received), (100, 40));
        assert_eq!(first.rejected[RejectReason::BadTag as usize], 1);
        // The links are replaced by one that has sent 30 bytes so far.
        let c = LinkStats::default();
        c.record_sent(1, 30);
        let mut second = Traffic::default();
        c.add_to(&mut second);
        let d = second.since(&first);
        assert_eq!((d.bytes_sent, d.bytes_received), (30, 0));
        assert_eq!(d.rejected.iter().sum::<u64>(), 0);
        // The same links, later.
        a.record_sent(1, 5);
        let mut third = Traffic::default();
        a.add_to(&mut third);
        b.add_to(&mut third);
        assert_eq!(third.since(&first).bytes_sent, 5);
    }
}
