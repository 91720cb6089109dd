//! What a replica can say about every replica's contribution to a step's
//! robust aggregation, from the all-gather alone: the hash of each
//! contribution as it arrived (this replica's own: as it sent it), and
//! cheap statistics of each against the aggregate, from which it names the
//! peers whose contribution looks dishonest.
//!
//! The hash of a contribution is the BLAKE3 hash of the exact bytes its
//! author sent in the gather: every gathered bucket of the step, in bucket
//! order, each as its little-endian f32 bytes (the gather's payloads,
//! segment after segment). A worker's own hash is what it signs in its
//! step commitment; a peer's is what a validator reports it received.
//!
//! The statistics cover the buckets combined by a robust rule only (not a
//! bucket gathered for its plain mean, such as the last stage's loss sum,
//! whose scale has nothing to do with a gradient's): over all of them
//! together, the cosine between a contribution `c` and the aggregate `a`,
//! `⟨c, a⟩ / (‖c‖ ‖a‖)`, and the norm ratio `‖c‖ / m`, where `m` is the
//! median of the replicas' contribution norms (for an even count, the mean
//! of the two middle ones), sums in f64 in element order. The ratio is to
//! the median norm, not to the aggregate's: an element-wise median or
//! trimmed mean of noisy gradients is much shorter than any one of them
//! (measured up to 9× on the test manifests), while honest replicas' norms
//! are alike. A contribution is *suspect* when its cosine is below
//! [`SUSPECT_COSINE`] or its norm ratio is beyond [`SUSPECT_NORM_RATIO`]
//! either way. A suspicion convicts no one: it is a reason to audit.

use std::fmt;

/// A contribution whose cosine with the aggregate is below this is
/// suspect: it points away from what the replicas agreed on. A sign-flipped
/// contribution has a cosine near minus the honest ones'.
pub const SUSPECT_COSINE: f64 = 0.0;

/// A contribution whose norm is more than this many times the median of the
/// replicas' norms, or less than its inverse, is suspect. A scaled
/// contribution (×100 in the drill) is far outside; honest replicas' ratios
/// measured on the test manifests stay within [0.75, 8.95] (the high end
/// with tied embeddings across two stages), a margin of more than 3×.
pub const SUSPECT_NORM_RATIO: f64 = 30.0;

/// One contribution's statistics against the aggregate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContributionStats {
    /// `⟨c, a⟩ / (‖c‖ ‖a‖)`; 1 when both are zero, 0 when one of them is.
    pub cosine: f64,
    /// `‖c‖ / m`, `m` the median of the replicas' norms; 1 when both are
    /// zero, infinite when only `m` is.
    pub norm_ratio: f64,
}

impl ContributionStats {
    /// Why this contribution is suspect, if it is.
    pub fn suspicion(&self) -> Option<Suspicion> {
        let ratio = self.norm_ratio;
        if self.cosine.is_nan() || self.cosine < SUSPECT_COSINE {
            Some(Suspicion::Direction)
        } else if !(1.0 / SUSPECT_NORM_RATIO..=SUSPECT_NORM_RATIO).contains(&ratio) {
            Some(Suspicion::Norm)
        } else {
            None
        }
    }
}

/// Why a contribution is suspect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspicion {
    /// Its cosine with the aggregate is below [`SUSPECT_COSINE`].
    Direction,
    /// Its norm ratio is beyond [`SUSPECT_NORM_RATIO`] either way.
    Norm,
}

impl Suspicion {
    /// The name reports and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Suspicion::Direction => "cosine",
            Suspicion::Norm => "norm_ratio",
        }
    }
}

impl fmt::Display for Suspicion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every replica's contribution to one step, as one replica saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContributionReport {
    /// This replica's rank in the ring.
    pub own: usize,
    /// Per rank, the hash of its contribution as received (this rank's:
    /// as sent).
    pub hashes: Vec<[u8; 32]>,
    /// Per rank, its statistics against the aggregate (over the robust
    /// buckets; all 1 when there was none).
    pub stats: Vec<ContributionStats>,
}

impl ContributionReport {
    /// The hash of the contribution this replica sent: what its step
    /// commitment covers.
    pub fn sent(&self) -> [u8; 32] {
        self.hashes[self.own]
    }

    /// The peers (never this replica) whose contribution is suspect, in rank
    /// order, with the reason.
    pub fn suspects(&self) -> Vec<(usize, Suspicion)> {
        self.stats
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != self.own)
            .filter_map(|(r, s)| s.suspicion().map(|why| (r, why)))
            .collect()
    }
}

/// Accumulates a [`ContributionReport`] bucket by bucket.
#[derive(Debug)]
pub struct Contributions {
    own: usize,
    hashers: Vec<blake3::Hasher>,
    /// Per rank, `⟨c, a⟩` over the robust buckets.
    dot: Vec<f64>,
    /// Per rank, `‖c‖²` over the robust buckets.
    squares: Vec<f64>,
    /// `‖a‖²` over the robust buckets.
    aggregate_square: f64,
}

impl Contributions {
    /// An empty record for a ring of `world` ranks, seen by rank `own`.
    pub fn new(world: usize, own: usize) -> Self {
        Contributions {
            own,
            hashers: vec![blake3::Hasher::new(); world],
            dot: vec![0.0; world],
            squares: vec![0.0; world],
            aggregate_square: 0.0,
        }
    }

    /// Adds one gathered bucket: every rank's contribution (in rank order)
    /// to the hashes and, when `robust` (the bucket was combined by a
    /// robust rule), with `aggregate` to the statistics.
    ///
    /// Panics if the contributions' count is not the ring's or a length
    /// differs from `aggregate`'s: the gather checks both.
    pub fn add(&mut self, all: &[&[f32]], aggregate: &[f32], robust: bool) {
        assert_eq!(all.len(), self.hashers.len(), "contributions per bucket");
        for (h, c) in self.hashers.iter_mut().zip(all) {
            hash_le(h, c);
        }
        if !robust {
            return;
        }
        for (r, c) in all.iter().enumerate() {
            assert_eq!(c.len(), aggregate.len(), "contribution length");
            let (mut dot, mut sq) = (0f64, 0f64);
            for (&x, &a) in c.iter().zip(aggregate) {
                let x = f64::from(x);
                dot += x * f64::from(a);
                sq += x * x;
            }
            self.dot[r] += dot;
            self.squares[r] += sq;
        }
        self.aggregate_square += aggregate
            .iter()
            .map(|&a| f64::from(a) * f64::from(a))
            .sum::<f64>();
    }

    /// The report of every bucket added.
    pub fn finish(self) -> ContributionReport {
        let a = self.aggregate_square.sqrt();
        let mut norms: Vec<f64> = self.squares.iter().map(|s| s.sqrt()).collect();
        norms.sort_unstable_by(f64::total_cmp);
        let n = norms.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => norms[n / 2],
            _ => (norms[n / 2 - 1] + norms[n / 2]) * 0.5,
        };
        let stats = self
            .dot
            .iter()
            .zip(&self.squares)
            .map(|(&dot, &sq)| stats(dot, sq.sqrt(), a, median))
            .collect();
        ContributionReport {
            own: self.own,
            hashes: self
                .hashers
                .iter()
                .map(|h| *h.finalize().as_bytes())
                .collect(),
            stats,
        }
    }
}

/// The statistics of a contribution of norm `c` whose dot product with an
/// aggregate of norm `a` is `dot`, the replicas' median norm being `m`.
fn stats(dot: f64, c: f64, a: f64, m: f64) -> ContributionStats {
    let cosine = match (c > 0.0, a > 0.0) {
        (false, false) => 1.0,
        (true, true) => (dot / (c * a)).clamp(-1.0, 1.0),
        _ => 0.0,
    };
    let norm_ratio = match (c > 0.0, m > 0.0) {
        (false, false) => 1.0,
        (true, false) => f64::INFINITY,
        _ => c / m,
    };
    ContributionStats { cosine, norm_ratio }
}

/// Feeds `data`'s little-endian bytes to `h`: the bytes the gather sends.
fn hash_le(h: &mut blake3::Hasher, data: &[f32]) {
    if cfg!(target_endian = "little") {
        h.update(bytemuck::cast_slice(data));
    } else {
        for x in data {
            h.update(&x.to_le_bytes());
        }
    }
}

/// The hash [`ContributionReport::hashes`] gives a contribution made of
/// `buckets` (the gathered ones, in bucket order): what a validator that
/// recomputes a replica's step compares with its commitment.
pub fn contribution_hash<'a>(buckets: impl IntoIterator<Item = &'a [f32]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for b in buckets {
        hash_le(&mut h, b);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::aggregate::aggregate;
    use pipewright_spec::Aggregation;

    /// Three honest contributions around a common gradient, each with its
    /// own noise of relative size `noise`.
    fn honest(n: usize, len: usize, noise: f32) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.01)
            .collect();
        (0..n)
            .map(|r| {
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| b + noise * 0.1 * (((i * 7 + 13 * r) % 9) as f32 - 4.0) * 0.1)
                    .collect()
            })
            .collect()
    }

    fn report(rule: Aggregation, buckets: &[Vec<Vec<f32>>], own: usize) -> ContributionReport {
        let n = buckets[0].len();
        let mut c = Contributions::new(n, own);
        for b in buckets {
            let refs: Vec<&[f32]> = b.iter().map(Vec::as_slice).collect();
            let mut out = vec![0f32; b[0].len()];
            aggregate(rule, &refs, &mut out);
            c.add(&refs, &out, true);
        }
        c.finish()
    }

    #[test]
    fn honest_replicas_are_not_suspect_and_attackers_are() {
        for rule in [
            Aggregation::Median,
            Aggregation::TrimmedMean,
            Aggregation::CenteredClip,
        ] {
            for n in [3, 4, 5] {
                let clean = vec![honest(n, 300, 1.0), honest(n, 77, 1.0)];
                let r = report(rule, &clean, 0);
                assert!(r.suspects().is_empty(), "{rule:?} {n}: {:?}", r.stats);
                for s in &r.stats {
                    assert!(
                        s.cosine > 0.5 && (0.5..2.0).contains(&s.norm_ratio),
                        "{s:?}"
                    );
                }
                for (attack, why) in [
                    (-1.0f32, Suspicion::Direction),
                    (100.0, Suspicion::Norm),
                    (0.01, Suspicion::Norm),
                ] {
                    let mut bad = clean.clone();
                    for b in &mut bad {
                        b[1].iter_mut().for_each(|x| *x *= attack);
                    }
                    let r = report(rule, &bad, 0);
                    assert_eq!(r.suspects(), vec![(1, why)], "{rule:?} {n} ×{attack}");
                    // The attacker itself names no one but may not name
                    // itself.
                    let own = report(rule, &bad, 1);
                    assert!(own.suspects().iter().all(|&(p, _)| p != 1));
                }
            }
        }
    }

    #[test]
    fn hashes_are_those_of_the_bytes_sent_in_bucket_order() {
        let buckets = [honest(3, 10, 1.0), honest(3, 4, 2.0)];
        let r = report(Aggregation::Median, &buckets, 2);
        for rank in 0..3 {
            let expected = contribution_hash(buckets.iter().map(|b| b[rank].as_slice()));
            assert_eq!(r.hashes[rank], expected);
            let mut bytes = Vec::new();
            for b in &buckets {
                bytes.extend(b[rank].iter().flat_map(|x| x.to_le_bytes()));
            }
            assert_eq!(expected, *blake3::hash(&bytes).as_bytes());
        }
        assert_eq!(r.sent(), r.hashes[2]);
        // Another order of the buckets is another contribution.
        let swapped = contribution_hash([buckets[1][0].as_slice(), buckets[0][0].as_slice()]);
        assert_ne!(swapped, r.hashes[0]);
        // One bit changed anywhere changes the hash.
        let mut flipped = buckets.clone();
        flipped[1][0][3] = f32::from_bits(flipped[1][0][3].to_bits() ^ 1);
        let f = report(Aggregation::Median, &flipped, 2);
        assert_ne!(f.hashes[0], r.hashes[0]);
        assert_eq!(f.hashes[1], r.hashes[1]);
    }

    #[test]
    fn buckets_gathered_for_their_mean_are_hashed_but_not_measured() {
        let grads = honest(3, 50, 1.0);
        // A loss sum far larger than the gradients, and different per
        // replica: measured, it would make every cosine near 1.
        let losses = [vec![40.0f32], vec![41.0], vec![39.0]];
        let mut c = Contributions::new(3, 0);
        let mut flipped = grads.clone();
        flipped[2].iter_mut().for_each(|x| *x = -*x);
        let refs: Vec<&[f32]> = flipped.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; 50];
        aggregate(Aggregation::Median, &refs, &mut out);
        c.add(&refs, &out, true);
        let loss_refs: Vec<&[f32]> = losses.iter().map(Vec::as_slice).collect();
        c.add(&loss_refs, &[40.0], false);
        let r = c.finish();
        assert_eq!(r.suspects(), vec![(2, Suspicion::Direction)]);
        assert_eq!(
            r.hashes[1],
            contribution_hash([flipped[1].as_slice(), losses[1].as_slice()])
        );
    }

    #[test]
    fn zero_aggregates_and_contributions() {
        assert_eq!(
            stats(0.0, 0.0, 0.0, 0.0),
            ContributionStats {
                cosine: 1.0,
                norm_ratio: 1.0
            }
        );
        // Zero against a non-zero aggregate: no direction, no length.
        assert_eq!(
            stats(0.0, 0.0, 1.0, 1.0),
            ContributionStats {
                cosine: 0.0,
                norm_ratio: 0.0
            }
        );
        assert_eq!(stats(0.0, 1.0, 1.0, 0.0).norm_ratio, f64::INFINITY);
        assert_eq!(stats(0.0, 0.0, 1.0, 1.0).suspicion(), Some(Suspicion::Norm));
        assert_eq!(
            stats(-2.0, 1.0, 2.0, 1.0).suspicion(),
            Some(Suspicion::Direction)
        );
        assert_eq!(stats(1.9, 1.0, 2.0, 1.0).suspicion(), None);
        // The ratio is to the median norm, not to the aggregate's.
        assert_eq!(stats(1.0, 9.0, 0.2, 1.0).suspicion(), None);
        assert_eq!(
            stats(62.0, 31.0, 2.0, 1.0).suspicion(),
            Some(Suspicion::Norm)
        );
        assert_eq!(
            stats(0.03, 0.03, 1.0, 1.0).suspicion(),
            Some(Suspicion::Norm)
        );
        // No robust bucket at all: nothing is suspect.
        let r = Contributions::new(3, 1).finish();
        assert!(r.suspects().is_empty());
    }
}
