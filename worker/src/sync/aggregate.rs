//! Robust aggregation of the replicas' gradient contributions: pure
//! functions of the contributions, in rank order, with a fixed order of
//! every float operation so that every replica that holds the same
//! contributions computes the same bits.
//!
//! - `median`: element-wise; for an even count, `(a + b) · 0.5` of the two
//!   middle values (in f32).
//! - `trimmedMean`: element-wise, the largest and the smallest value are
//!   dropped and the rest averaged (summed in ascending order in f64, then
//!   divided and rounded to f32 once). With fewer than 3 contributions
//!   nothing is dropped.
//! - `centeredClip`: starts at the element-wise median `v`; the radius
//!   `τ` is the median over the replicas of `‖g_i − v‖₂`; then
//!   [`CLIP_ITERATIONS`] times `v ← v + (1/n) Σ_i clip(g_i − v, τ)` with
//!   `clip(x, τ) = x · min(1, τ / ‖x‖₂)`, everything in f64 (norms summed
//!   in element order, the sum over `i` in rank order), rounded to f32 at
//!   the end. An honest majority's contributions lie within `τ` of the
//!   centre, so they count in full; any one contribution moves the result
//!   by at most `τ / n` per iteration, however far away it is.
//! - `mean`: the contributions summed in rank order in f64, divided by `n`
//!   (the ring, not this function, averages under `aggregation: mean`;
//!   this one serves the loss and tests).
//!
//! Element-wise rules sort each element's `n` values with
//! [`f32::total_cmp`]: the sorted values, and so the result, do not depend
//! on the order the contributions are given in.

use pipewright_spec::Aggregation;
use rayon::prelude::*;

/// Iterations of centered clipping after the median start.
pub const CLIP_ITERATIONS: usize = 1;

/// Elements per parallel task of the element-wise rules (a fixed split,
/// so the work division never changes a result: each element is computed
/// alone).
const PAR_CHUNK: usize = 1 << 14;

/// Writes the aggregate of `contributions` (one per replica, in rank
/// order, all of `out.len()` elements) under `rule` into `out`.
///
/// Panics if a contribution's length differs from `out`'s or there is no
/// contribution: callers check lengths when they receive them.
pub fn aggregate(rule: Aggregation, contributions: &[&[f32]], out: &mut [f32]) {
    assert!(!contributions.is_empty(), "no contribution to aggregate");
    for c in contributions {
        assert_eq!(c.len(), out.len(), "contribution length");
    }
    match rule {
        Aggregation::Mean => mean(contributions, out),
        Aggregation::Median => elementwise(contributions, out, median_of_sorted),
        Aggregation::TrimmedMean => elementwise(contributions, out, trimmed_of_sorted),
        Aggregation::CenteredClip => centered_clip(contributions, out),
    }
}

/// The contributions' element-wise mean, summed in rank order in f64.
pub fn mean(contributions: &[&[f32]], out: &mut [f32]) {
    let n = contributions.len() as f64;
    out.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(k, chunk)| {
            let at = k * PAR_CHUNK;
            for (j, o) in chunk.iter_mut().enumerate() {
                let sum: f64 = contributions.iter().map(|c| f64::from(c[at + j])).sum();
                *o = (sum / n) as f32;
            }
        });
}

/// Applies `of_sorted` to each element's values, sorted ascending.
fn elementwise(contributions: &[&[f32]], out: &mut [f32], of_sorted: fn(&[f32]) -> f32) {
    let n = contributions.len();
    out.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(k, chunk)| {
            let at = k * PAR_CHUNK;
            let mut values = vec![0f32; n];
            for (j, o) in chunk.iter_mut().enumerate() {
                for (v, c) in values.iter_mut().zip(contributions) {
                    *v = c[at + j];
                }
                values.sort_unstable_by(f32::total_cmp);
                *o = of_sorted(&values);
            }
        });
}

/// The median of values sorted ascending (not empty).
fn median_of_sorted(s: &[f32]) -> f32 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) * 0.5
    }
}

/// The mean of values sorted ascending after dropping the first and the
/// last (none dropped when fewer than 3).
fn trimmed_of_sorted(s: &[f32]) -> f32 {
    let kept = if s.len() >= 3 { &s[1..s.len() - 1] } else { s };
    let sum: f64 = kept.iter().map(|&x| f64::from(x)).sum();
    (sum / kept.len() as f64) as f32
}

/// Centered clipping from the median (see the module documentation).
fn centered_clip(contributions: &[&[f32]], out: &mut [f32]) {
    let n = contributions.len();
    elementwise(contributions, out, median_of_sorted);
    let mut v: Vec<f64> = out.iter().map(|&x| f64::from(x)).collect();
    let tau = clip_radius(contributions, &v);
    let mut step = vec![0f64; v.len()];
    for _ in 0..CLIP_ITERATIONS {
        let factors: Vec<f64> = contributions
            .iter()
            .map(|c| {
                let d = distance(c, &v);
                if d > tau {
                    tau / d
                } else {
                    1.0
                }
            })
            .collect();
        step.iter_mut().for_each(|s| *s = 0.0);
        for (c, f) in contributions.iter().zip(&factors) {
            for ((s, &x), &centre) in step.iter_mut().zip(c.iter()).zip(&v) {
                *s += (f64::from(x) - centre) * f;
            }
        }
        for (centre, s) in v.iter_mut().zip(&step) {
            *centre += s / n as f64;
        }
    }
    for (o, x) in out.iter_mut().zip(&v) {
        *o = *x as f32;
    }
}

/// `‖c − v‖₂`, summed in element order in f64.
fn distance(c: &[f32], v: &[f64]) -> f64 {
    c.iter()
        .zip(v)
        .map(|(&x, &centre)| {
            let d = f64::from(x) - centre;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// The clipping radius: the median of the contributions' distances to
/// `centre` (for an even count, the mean of the two middle ones).
pub fn clip_radius(contributions: &[&[f32]], centre: &[f64]) -> f64 {
    let mut d: Vec<f64> = contributions.iter().map(|c| distance(c, centre)).collect();
    d.sort_unstable_by(f64::total_cmp);
    let n = d.len();
    if n % 2 == 1 {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) * 0.5
    }
}

/// The L2 norm of `x`, summed in element order in f64.
pub fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| {
            let v = f64::from(v);
            v * v
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rule: Aggregation, cs: &[Vec<f32>]) -> Vec<f32> {
        let refs: Vec<&[f32]> = cs.iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; cs[0].len()];
        aggregate(rule, &refs, &mut out);
        out
    }

    const ROBUST: [Aggregation; 3] = [
        Aggregation::Median,
        Aggregation::TrimmedMean,
        Aggregation::CenteredClip,
    ];

    #[test]
    fn exact_small_examples() {
        let three = vec![
            vec![1.0, -2.0, 0.0],
            vec![3.0, 5.0, 0.5],
            vec![2.0, 4.0, -7.0],
        ];
        assert_eq!(run(Aggregation::Median, &three), vec![2.0, 4.0, 0.0]);
        // Three values: dropping the extremes leaves the median.
        assert_eq!(run(Aggregation::TrimmedMean, &three), vec![2.0, 4.0, 0.0]);
        assert_eq!(
            run(Aggregation::Mean, &three),
            vec![2.0, 7.0 / 3.0, -6.5 / 3.0]
        );
        let four = vec![
            vec![1.0, 10.0],
            vec![4.0, -2.0],
            vec![2.0, 6.0],
            vec![3.0, 0.0],
        ];
        assert_eq!(run(Aggregation::Median, &four), vec![2.5, 3.0]);
        // Drop 1 and 4 (mean of 2, 3) and −2 and 10 (mean of 0, 6).
        assert_eq!(run(Aggregation::TrimmedMean, &four), vec![2.5, 3.0]);
        let five = vec![vec![1.0], vec![2.0], vec![4.0], vec![8.0], vec![100.0]];
        assert_eq!(run(Aggregation::TrimmedMean, &five), vec![14.0 / 3.0]);
        assert_eq!(run(Aggregation::Median, &five), vec![4.0]);
    }

    #[test]
    fn centered_clip_of_agreeing_replicas_is_their_mean() {
        // Two equal and one close: every distance is within the radius
        // (the median distance) except at most the farthest, which is
        // clipped only slightly; the result is near the mean.
        let cs = vec![vec![1.0, 2.0], vec![1.0, 2.0], vec![1.3, 2.4]];
        let got = run(Aggregation::CenteredClip, &cs);
        // Median start (1, 2); τ = median of (0, 0, 0.5) = 0; the third
        // one is clipped to nothing: the result stays at the median.
        assert_eq!(got, vec![1.0, 2.0]);
        let cs = vec![vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
        let got = run(Aggregation::CenteredClip, &cs);
        // Median start (0, 0); distances 0, 1, 1; τ = 1: nothing clipped,
        // so the first iteration lands on the mean and stays there.
        assert!((got[0] - 1.0 / 3.0).abs() < 1e-7 && (got[1] - 1.0 / 3.0).abs() < 1e-7);
    }

    /// Honest contributions near `base`, one far off at `bad`.
    fn with_attacker(n: usize, len: usize, bad: &dyn Fn(&[f32]) -> Vec<f32>) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let mut cs: Vec<Vec<f32>> = (0..n - 1)
            .map(|r| {
                base.iter()
                    .enumerate()
                    .map(|(i, &b)| b + 0.01 * (((i + 3 * r) % 5) as f32 - 2.0))
                    .collect()
            })
            .collect();
        cs.insert(1, bad(&base));
        cs
    }

    #[test]
    fn one_wild_replica_cannot_move_the_result_far() {
        let len = 257;
        type Liar = Box<dyn Fn(&[f32]) -> Vec<f32>>;
        let attacks: [(&str, Liar); 3] = [
            (
                "scale",
                Box::new(|b: &[f32]| b.iter().map(|x| x * 1e6).collect()),
            ),
            (
                "sign-flip",
                Box::new(|b: &[f32]| b.iter().map(|x| -x * 100.0).collect()),
            ),
            ("constant", Box::new(|b: &[f32]| vec![3e30; b.len()])),
        ];
        for n in [3, 4, 5] {
            for (name, attack) in &attacks {
                let cs = with_attacker(n, len, attack.as_ref());
                let honest: Vec<&Vec<f32>> = cs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 1)
                    .map(|(_, c)| c)
                    .collect();
                for rule in ROBUST {
                    let got = run(rule, &cs);
                    // Every element stays within the honest values' range,
                    // widened by a little for centered clipping's radius.
                    for (i, g) in got.iter().enumerate() {
                        let lo = honest.iter().map(|c| c[i]).fold(f32::INFINITY, f32::min);
                        let hi = honest
                            .iter()
                            .map(|c| c[i])
                            .fold(f32::NEG_INFINITY, f32::max);
                        let slack = if rule == Aggregation::CenteredClip {
                            0.2
                        } else {
                            1e-6
                        };
                        assert!(
                            *g >= lo - slack && *g <= hi + slack,
                            "{n} replicas, {name}, {rule:?}: [{i}] = {g} outside [{lo}, {hi}]"
                        );
                    }
                }
                // The mean, for contrast, is dragged off.
                let mean = run(Aggregation::Mean, &cs);
                assert!(mean.iter().any(|m| m.abs() > 5.0), "{name}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_order_of_element_wise_inputs() {
        let cs = with_attacker(4, 1000, &|b| b.iter().map(|x| -x).collect());
        let mut rev = cs.clone();
        rev.reverse();
        for rule in [Aggregation::Median, Aggregation::TrimmedMean] {
            let a: Vec<u32> = run(rule, &cs).iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = run(rule, &rev).iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b, "{rule:?}");
        }
        // Every rule is a pure function: same input, same bits, also across
        // the parallel split (a buffer longer than one task).
        let big = with_attacker(3, 3 * PAR_CHUNK + 5, &|b| {
            b.iter().map(|x| x * 9.0).collect()
        });
        for rule in ROBUST {
            assert_eq!(run(rule, &big), run(rule, &big), "{rule:?}");
        }
    }

    #[test]
    fn centered_clip_bounds_the_pull_of_one_replica() {
        // The attacker sits ever farther away; the result moves by at most
        // a bounded amount, unlike the mean.
        let near = run(
            Aggregation::CenteredClip,
            &with_attacker(3, 64, &|b| b.iter().map(|x| x + 1.0).collect()),
        );
        let far = run(
            Aggregation::CenteredClip,
            &with_attacker(3, 64, &|b| b.iter().map(|x| x + 1e9).collect()),
        );
        let moved = norm(
            &near
                .iter()
                .zip(&far)
                .map(|(a, b)| a - b)
                .collect::<Vec<f32>>(),
        );
        assert!(moved < 0.5, "moved {moved}");
    }

    #[test]
    fn norms_and_radius() {
        assert_eq!(norm(&[3.0, 4.0]), 5.0);
        let cs: Vec<&[f32]> = vec![&[0.0, 0.0], &[3.0, 4.0], &[6.0, 8.0]];
        assert_eq!(clip_radius(&cs, &[0.0, 0.0]), 5.0);
    }
}
