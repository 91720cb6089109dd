//! How a bucket of gradients is combined among the replicas, and the
//! cheap checks every tensor received from a peer passes before it is
//! used.
//!
//! Under `aggregation: mean` a bucket goes through the ring all-reduce
//! ([`RingMember::allreduce_mean`]), unchanged. Under a robust rule the
//! replicas all-gather their contributions ([`RingMember::allgather`]),
//! check them ([`screen_contributions`]) and each computes the same
//! aggregate ([`super::aggregate()`]) from the same contributions in rank
//! order.

use pipewright_spec::Aggregation;

use super::aggregate::{aggregate, norm};
use super::contribution::Contributions;
use super::receipt::Part;
use super::ring::{RingError, RingMember};
use crate::link::RejectReason;

/// A received contribution is refused when its L2 norm exceeds this many
/// times the median of the replicas' norms (the median of 3 or more
/// contributions is an honest one's when at most a minority lies). Far
/// above any honest spread between replicas at one step, and far below
/// what overflows a sum.
pub const MAX_NORM_RATIO: f64 = 1e6;

/// A received activation or activation gradient is refused when the root
/// mean square of its values exceeds this: a fixed ceiling far above any
/// hidden state or gradient a stage computes.
pub const MAX_TENSOR_RMS: f64 = 1e6;

/// How one bucket is combined among the replicas of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// The ring all-reduce's mean: bandwidth-optimal, every chunk summed by
    /// one owner whose bits everyone takes.
    Ring,
    /// An all-gather of every replica's contribution, checked, and the
    /// rule applied locally on every replica.
    Gather(Aggregation),
}

impl Reduce {
    /// The rule for the gradient buckets of a run whose manifest asks for
    /// `aggregation`.
    pub fn for_gradients(aggregation: Aggregation) -> Self {
        match aggregation {
            Aggregation::Mean => Reduce::Ring,
            other => Reduce::Gather(other),
        }
    }

    /// Replaces `data` with its combination over the ring's members.
    pub fn apply(self, member: &mut RingMember, data: &mut [f32]) -> Result<(), RingError> {
        self.apply_observed(member, data, None, None)
    }

    /// [`Reduce::apply`], and under a gather, adds every rank's contribution
    /// and the aggregate to `seen` (a bucket gathered for its plain mean is
    /// hashed, not measured: see [`Contributions::add`]). `part`: the
    /// bucket's place among the step's gathered buckets, which its frames
    /// sign (`sync::receipt`).
    pub fn apply_observed(
        self,
        member: &mut RingMember,
        data: &mut [f32],
        seen: Option<&mut Contributions>,
        part: Option<Part>,
    ) -> Result<(), RingError> {
        match self {
            Reduce::Ring => member.allreduce_mean(data),
            Reduce::Gather(rule) => {
                let all = member.allgather_part(data, part)?;
                let refs: Vec<&[f32]> = all.iter().map(Vec::as_slice).collect();
                if let Some((origin, reason)) = screen_contributions(&refs, member.rank()) {
                    return Err(member.refuse(origin, reason));
                }
                aggregate(rule, &refs, data);
                if let Some(seen) = seen {
                    seen.add(&refs, data, rule != Aggregation::Mean);
                }
                Ok(())
            }
        }
    }
}

/// Checks that every rank computed the same aggregates, given their
/// [`digest`]s (concatenated, one per gathered bucket): the ranks
/// all-gather them and any difference breaks the operation off.
/// [`super::BucketedAllReduce`] does this once per step, after its last
/// bucket. A replica that sent different
/// contributions to different ranks (or a relay that altered one) makes
/// honest ranks' aggregates differ; each honest rank compares with its ring
/// neighbours directly, and with one dishonest rank the honest ones form a
/// chain of such neighbours, so they either all agree or the step breaks
/// off.
pub fn agree(member: &mut RingMember, digests: &[f32]) -> Result<(), RingError> {
    let all = member.allgather(digests)?;
    match all.iter().position(|d| d != digests) {
        None => Ok(()),
        Some(rank) => Err(RingError::Protocol {
            peer: rank,
            detail: "its aggregate differs from this rank's: the replicas did not all \
                     receive the same contributions"
                .into(),
        }),
    }
}

/// A BLAKE3 digest of `values`' bits, as 16 f32s of 16 bits each (finite,
/// so they pass the gather's checks).
pub fn digest(values: &[f32]) -> Vec<f32> {
    let mut h = blake3::Hasher::new();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
        .as_bytes()
        .chunks_exact(2)
        .map(|b| f32::from(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// The first contribution (in rank order, `own` skipped) to refuse, with
/// the reason: a non-finite value, or a norm beyond [`MAX_NORM_RATIO`]
/// times the median norm.
pub fn screen_contributions(contributions: &[&[f32]], own: usize) -> Option<(usize, RejectReason)> {
    let norms: Vec<f64> = contributions.iter().map(|c| norm(c)).collect();
    for (r, (c, n)) in contributions.iter().zip(&norms).enumerate() {
        if r != own && (!n.is_finite() || c.iter().any(|x| !x.is_finite())) {
            return Some((r, RejectReason::NonFinite));
        }
    }
    let mut sorted = norms.clone();
    sorted.sort_unstable_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let limit = MAX_NORM_RATIO * median;
    if median > 0.0 {
        for (r, n) in norms.iter().enumerate() {
            if r != own && *n > limit {
                return Some((r, RejectReason::AbsurdNorm));
            }
        }
    }
    None
}

/// Why a received tensor is refused, if it is: a NaN or an infinity, or a
/// root mean square above [`MAX_TENSOR_RMS`].
pub fn screen_tensor(data: &[f32]) -> Option<RejectReason> {
    if data.iter().any(|x| !x.is_finite()) {
        return Some(RejectReason::NonFinite);
    }
    if data.is_empty() {
        return None;
    }
    let rms = norm(data) / (data.len() as f64).sqrt();
    (rms > MAX_TENSOR_RMS).then_some(RejectReason::AbsurdNorm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ring::tests::{input, on_ring};

    #[test]
    fn tensors_with_nan_inf_or_absurd_values_are_refused() {
        assert_eq!(screen_tensor(&[1.0, -2.0, 0.0]), None);
        assert_eq!(screen_tensor(&[]), None);
        assert_eq!(
            screen_tensor(&[1.0, f32::NAN]),
            Some(RejectReason::NonFinite)
        );
        assert_eq!(
            screen_tensor(&[f32::NEG_INFINITY]),
            Some(RejectReason::NonFinite)
        );
        assert_eq!(screen_tensor(&[2e6, 2e6]), Some(RejectReason::AbsurdNorm));
        // One large value among many is within the mean-square ceiling.
        let mut v = vec![0.0f32; 10_000];
        v[0] = 5e7;
        assert_eq!(screen_tensor(&v), None);
    }

    #[test]
    fn contributions_are_screened_against_the_median_norm() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 2.0];
        let scaled = [100.0f32, 100.0];
        let absurd = [1e7f32, 0.0];
        let nan = [f32::NAN, 0.0];
        assert_eq!(screen_contributions(&[&a, &b, &scaled], 0), None);
        assert_eq!(
            screen_contributions(&[&a, &absurd, &b], 0),
            Some((1, RejectReason::AbsurdNorm))
        );
        assert_eq!(
            screen_contributions(&[&a, &b, &nan], 0),
            Some((2, RejectReason::NonFinite))
        );
        // Its own contribution is not screened by the replica that made it.
        assert_eq!(screen_contributions(&[&a, &absurd, &b], 1), None);
    }

    #[test]
    fn ranks_whose_aggregates_differ_break_off() {
        // Rank 1 aggregates with another rule than the rest, as if it had
        // been sent other contributions: every rank notices.
        let results = on_ring(
            5,
            |_| {},
            |mut m| {
                let mut data = input(m.rank(), 500);
                let rule = if m.rank() == 1 {
                    Aggregation::Median
                } else {
                    Aggregation::TrimmedMean
                };
                Reduce::Gather(rule)
                    .apply(&mut m, &mut data)
                    .and_then(|()| agree(&mut m, &digest(&data)))
                    .err()
            },
        );
        for (rank, err) in results.iter().enumerate() {
            assert!(
                matches!(err, Some(RingError::Protocol { .. })),
                "rank {rank}: {err:?}"
            );
        }
    }

    #[test]
    fn robust_buckets_are_bit_identical_on_every_rank_and_resist_one_liar() {
        for rule in [
            Aggregation::Median,
            Aggregation::TrimmedMean,
            Aggregation::CenteredClip,
        ] {
            for world in [3, 4] {
                let results = on_ring(
                    world,
                    |_| {},
                    |mut m| {
                        let mut data = input(0, 3000);
                        // Honest ranks differ a little; rank 1 flips and
                        // scales its contribution.
                        for (i, x) in data.iter_mut().enumerate() {
                            *x += 0.001 * ((i + m.rank()) % 3) as f32;
                        }
                        if m.rank() == 1 {
                            data.iter_mut().for_each(|x| *x *= -100.0);
                        }
                        Reduce::Gather(rule)
                            .apply(&mut m, &mut data)
                            .expect("reduce");
                        data
                    },
                );
                let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let honest = input(0, 3000);
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(bits(got), bits(&results[0]), "{rule:?} rank {rank}");
                }
                let off = results[0]
                    .iter()
                    .zip(&honest)
                    .map(|(g, h)| (g - h).abs())
                    .fold(0.0f32, f32::max);
                assert!(off < 0.05, "{rule:?} world {world}: off by {off}");
            }
        }
    }
}
