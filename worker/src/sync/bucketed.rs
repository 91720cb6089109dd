//! Overlapping gradient communication with backward.
//!
//! Backward produces gradients layer by layer, last layer first. Grouping
//! them into buckets and reducing each bucket as soon as it is complete
//! hides most of the all-reduce behind the remaining backward compute.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};

use super::contribution::{ContributionReport, Contributions};
use super::receipt::Part;
use super::ring::{RingError, RingMember};
use super::robust::{agree, digest, Reduce};

/// What the background thread hands back: the member (for the next step),
/// the combined buckets in index order, and what the gathered buckets
/// showed of every replica's contribution (none when no bucket was
/// gathered).
type Outcome = Result<Observed, RingError>;

/// The member, the combined buckets and the contributions' report.
type Observed = (RingMember, Vec<Vec<f32>>, Option<ContributionReport>);

/// A step's worth of bucketed all-reduces running on a background thread.
///
/// Buckets are reduced strictly in index order (0, 1, 2, …) on every rank,
/// which is what keeps the ranks' operations aligned; push them in the order
/// backward produces them, numbered in that order, for the best overlap.
#[derive(Debug)]
pub struct BucketedAllReduce {
    /// How each bucket, by index, is combined.
    rules: Vec<Reduce>,
    tx: Option<Sender<(usize, Vec<f32>)>>,
    worker: Option<JoinHandle<Outcome>>,
}

impl BucketedAllReduce {
    /// Starts a background thread that will average `buckets` buckets over
    /// `member`'s ring.
    pub fn start(member: RingMember, buckets: usize) -> Result<Self, RingError> {
        Self::start_with(member, vec![Reduce::Ring; buckets])
    }

    /// Starts a background thread that will combine one bucket per entry
    /// of `rules` over `member`'s ring, bucket `i` as `rules[i]` says.
    pub fn start_with(member: RingMember, rules: Vec<Reduce>) -> Result<Self, RingError> {
        let (tx, rx) = mpsc::channel();
        let thread_rules = rules.clone();
        let worker = thread::Builder::new()
            .name("allreduce-buckets".into())
            .spawn(move || reduce_in_order(member, thread_rules, rx))
            .map_err(|e| RingError::Config(format!("cannot start the bucket thread: {e}")))?;
        Ok(BucketedAllReduce {
            rules,
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// Hands bucket `index` over for averaging; returns at once.
    pub fn push(&self, index: usize, data: Vec<f32>) -> Result<(), RingError> {
        if index >= self.rules.len() {
            return Err(RingError::Config(format!(
                "bucket {index} is outside 0..{}",
                self.rules.len()
            )));
        }
        let sent = self.tx.as_ref().map(|tx| tx.send((index, data)));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped early because an all-reduce failed; `wait`
            // reports that error.
            _ => Err(RingError::Broken),
        }
    }

    /// Waits until every bucket is averaged and returns the ring member
    /// together with the averaged buckets, in index order.
    pub fn wait(self) -> Result<(RingMember, Vec<Vec<f32>>), RingError> {
        self.wait_observed().map(|(m, buckets, _)| (m, buckets))
    }

    /// [`BucketedAllReduce::wait`], with the report of every replica's
    /// contribution over the gathered buckets (their hashes as received,
    /// this replica's as sent, and their statistics against the aggregate);
    /// `None` when no bucket was gathered (every rule [`Reduce::Ring`]).
    /// The report comes only once the replicas agreed on the aggregates.
    pub fn wait_observed(mut self) -> Result<Observed, RingError> {
        // Closing the channel tells the thread no more buckets are coming.
        drop(self.tx.take());
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            _ => Err(RingError::Config("bucket thread panicked".into())),
        }
    }
}

impl Drop for BucketedAllReduce {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

fn reduce_in_order(
    mut member: RingMember,
    rules: Vec<Reduce>,
    rx: Receiver<(usize, Vec<f32>)>,
) -> Outcome {
    let buckets = rules.len();
    let mut waiting: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut done: Vec<Vec<f32>> = Vec::with_capacity(buckets);
    // Digests of the gathered buckets' aggregates, checked once at the end.
    let mut digests = Vec::new();
    let gathered = rules
        .iter()
        .filter(|r| matches!(r, Reduce::Gather(_)))
        .count();
    let parts = u32::try_from(gathered)
        .map_err(|_| RingError::Config("too many gathered buckets".into()))?;
    let mut seen = (parts > 0).then(|| Contributions::new(member.world(), member.rank()));
    // The gathered buckets so far: the next one's place among them.
    let mut part = Part {
        index: 0,
        count: parts,
    };
    while done.len() < buckets {
        let next = done.len();
        if let Some(mut data) = waiting.remove(&next) {
            // Its place among the gathered buckets, which their frames sign.
            rules[next].apply_observed(&mut member, &mut data, seen.as_mut(), Some(part))?;
            if matches!(rules[next], Reduce::Gather(_)) {
                digests.extend(digest(&data));
                part.index += 1;
            }
            done.push(data);
            continue;
        }
        let Ok((index, data)) = rx.recv() else {
            return Err(RingError::Config(format!(
                "wait() called before bucket {next} of {buckets} was pushed"
            )));
        };
        if index < next || waiting.insert(index, data).is_some() {
            return Err(RingError::Config(format!("bucket {index} pushed twice")));
        }
    }
    if !digests.is_empty() {
        agree(&mut member, &digests)?;
    }
    Ok((member, done, seen.map(Contributions::finish)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ring::tests::{exact_mean, input, on_ring};

    #[test]
    fn buckets_pushed_out_of_order_are_averaged_and_returned_in_order() {
        let sizes = [1000usize, 17, 0, 40_000];
        let total: usize = sizes.iter().sum();
        let results = on_ring(
            3,
            |_| {},
            |member| {
                let rank = member.rank();
                let grads = input(rank, total);
                let mut parts = Vec::new();
                let mut at = 0;
                for &n in &sizes {
                    parts.push(grads[at..at + n].to_vec());
                    at += n;
                }
                let job = BucketedAllReduce::start(member, sizes.len()).expect("start");
                // Ranks push in different orders; reduction order is fixed.
                let order: Vec<usize> = if rank % 2 == 0 {
                    vec![3, 1, 0, 2]
                } else {
                    vec![0, 1, 2, 3]
                };
                for i in order {
                    job.push(i, parts[i].clone()).expect("push");
                }
                let (mut member, out) = job.wait().expect("wait");
                // The member is reusable for the next step.
                let mut one = vec![rank as f32];
                member.allreduce_mean(&mut one).expect("reuse");
                assert_eq!(one, vec![1.0]);
                out.concat()
            },
        );
        let mean = exact_mean(3, total);
        for got in &results {
            assert_eq!(got.len(), total);
            for (g, m) in got.iter().zip(&mean) {
                assert!((f64::from(*g) - m).abs() <= 1e-6);
            }
            assert_eq!(got, &results[0]);
        }
    }

    #[test]
    fn gathered_buckets_report_every_contribution_and_name_the_attacker() {
        use crate::sync::contribution::{contribution_hash, Suspicion};
        use pipewright_spec::Aggregation;
        let sizes = [700usize, 0, 5000];
        let total: usize = sizes.iter().sum();
        // Rank `r`'s buckets: a common gradient with a little of its own
        // noise; rank 2 flips its sign. The last bucket (a loss sum) is
        // gathered for its mean.
        let buckets = |r: usize| -> Vec<Vec<f32>> {
            let mut g = input(0, total);
            for (i, x) in g.iter_mut().enumerate() {
                *x += 0.001 * ((i + r) % 3) as f32;
                if r == 2 {
                    *x = -*x;
                }
            }
            let mut parts = Vec::new();
            let mut at = 0;
            for &n in &sizes {
                parts.push(g[at..at + n].to_vec());
                at += n;
            }
            parts.push(vec![40.0 + r as f32]);
            parts
        };
        let mut rules = vec![Reduce::Gather(Aggregation::Median); sizes.len()];
        rules.push(Reduce::Gather(Aggregation::Mean));
        let results = on_ring(
            3,
            |_| {},
            |member| {
                let parts = buckets(member.rank());
                let job = BucketedAllReduce::start_with(member, rules.clone()).expect("start");
                for (i, p) in parts.into_iter().enumerate().rev() {
                    job.push(i, p).expect("push");
                }
                let (_, _, report) = job.wait_observed().expect("wait");
                report.expect("gathered buckets give a report")
            },
        );
        let expected: Vec<[u8; 32]> = (0..3)
            .map(|r| contribution_hash(buckets(r).iter().map(Vec::as_slice)))
            .collect();
        for (rank, report) in results.iter().enumerate() {
            assert_eq!(report.own, rank);
            assert_eq!(report.hashes, expected, "rank {rank}");
            assert_eq!(report.sent(), expected[rank]);
            let named: Vec<(usize, Suspicion)> = report.suspects();
            if rank == 2 {
                assert!(named.is_empty(), "{named:?}");
            } else {
                assert_eq!(named, vec![(2, Suspicion::Direction)], "rank {rank}");
            }
            // Every rank computed the same statistics.
            assert_eq!(report.stats, results[0].stats);
        }
        // Under the ring's mean nothing is gathered and nothing reported.
        let reports = on_ring(
            3,
            |_| {},
            |member| {
                let job = BucketedAllReduce::start(member, 1).expect("start");
                job.push(0, vec![1.0; 10]).expect("push");
                job.wait_observed().expect("wait").2
            },
        );
        assert!(reports.iter().all(Option::is_none));
    }

    #[test]
    fn missing_bucket_and_bad_index_are_errors() {
        let results = on_ring(
            1,
            |_| {},
            |member| {
                let job = BucketedAllReduce::start(member, 2).expect("start");
                let bad = job.push(2, vec![]).unwrap_err();
                job.push(0, vec![1.0]).expect("push");
                (bad, job.wait().unwrap_err())
            },
        );
        let (bad, missing) = &results[0];
        assert!(matches!(bad, RingError::Config(_)), "{bad}");
        assert!(
            matches!(missing, RingError::Config(m) if m.contains("bucket 1")),
            "{missing}"
        );
    }

    /// Once a bucket's all-reduce failed, a later push fails (`Broken`) but
    /// the wait still reports the failure itself: here the refusal of a
    /// NaN chunk, with the refused frame kept for a complaint.
    #[test]
    fn after_a_failed_push_the_wait_reports_the_refusal() {
        let answered = std::sync::Barrier::new(3);
        let results = on_ring(
            3,
            |c| c.timeout = std::time::Duration::from_secs(3),
            |mut member| {
                let rank = member.rank();
                // Rank 1 sends NaN, as the `grad-nan` drill does.
                member.begin_step(0, rank != 1);
                let job = BucketedAllReduce::start(member, 2).expect("start");
                let fill = if rank == 1 { f32::NAN } else { 1.0 };
                let _ = job.push(0, vec![fill; 3000]);
                // Long enough for rank 2 to refuse rank 1's chunk.
                std::thread::sleep(std::time::Duration::from_millis(500));
                let pushed = job.push(1, vec![1.0; 10]);
                let r = job.wait().err();
                answered.wait();
                (pushed, r)
            },
        );
        let (pushed, err) = &results[2];
        assert!(matches!(pushed, Err(RingError::Broken)), "{pushed:?}");
        assert!(
            matches!(
                err,
                Some(RingError::Refused {
                    origin: 1,
                    reason: "non_finite",
                    frame: Some(_),
                    ..
                })
            ),
            "{err:?}"
        );
    }
}
