//! Which replica of each stage runs each micro-batch of a step.
//!
//! A step trains `R × M` micro-batches (`R` replicas, `M` micro-batches
//! each); micro-batch `g` samples the data of replica `g / M`, micro-batch
//! `g % M`, whoever runs it. Under `routing: lanes` replica `r` of every
//! stage runs `g ∈ [r·M, (r+1)·M)`: each replica is a pipeline of its own.
//! Under `routing: throughput` the coordinator gives every replica of a
//! stage a share of the step's micro-batches in proportion to its measured
//! speed (as SWARM does), so a slow machine holds back only its own share;
//! a micro-batch then travels from whichever replica ran it at stage `s` to
//! whichever runs it at `s + 1`.
//!
//! Every stage runs its micro-batches in the order of the schedule for all
//! `R × M` micro-batches restricted to its own: those orders come from one
//! valid single-pipeline schedule, so the routed pipeline cannot deadlock
//! whatever the assignment.

use serde::{Deserialize, Serialize};

/// The assignment of one step's micro-batches to replicas, stage by stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `assign[s][g]`: the replica of stage `s` that runs micro-batch `g`.
    pub assign: Vec<Vec<u16>>,
}

impl Route {
    /// Replica `r` of every stage runs micro-batches `r·M .. (r+1)·M`.
    pub fn lanes(stages: usize, replicas: usize, micro_batches: usize) -> Route {
        let lane: Vec<u16> = (0..replicas * micro_batches)
            .map(|g| (g / micro_batches) as u16)
            .collect();
        Route {
            assign: vec![lane; stages],
        }
    }

    /// Whether this is the lanes route.
    pub fn is_lanes(&self, micro_batches: usize) -> bool {
        self.assign.iter().all(|a| {
            a.iter()
                .enumerate()
                .all(|(g, &r)| r as usize == g / micro_batches.max(1))
        })
    }

    /// Refuses a route that does not fit an `stages × replicas` layout with
    /// `micro_batches` per replica, or that leaves a replica without work.
    pub fn check(
        &self,
        stages: usize,
        replicas: usize,
        micro_batches: usize,
    ) -> Result<(), String> {
        let n = replicas * micro_batches;
        if self.assign.len() != stages {
            return Err(format!(
                "the route covers {} stages, the run has {stages}",
                self.assign.len()
            ));
        }
        for (s, a) in self.assign.iter().enumerate() {
            if a.len() != n {
                return Err(format!(
                    "stage {s} of the route places {} micro-batches, a step has {n}",
                    a.len()
                ));
            }
            if let Some(&r) = a.iter().find(|&&r| r as usize >= replicas) {
                return Err(format!(
                    "stage {s} of the route names replica {r} of {replicas}"
                ));
            }
        }
        Ok(())
    }

    /// Micro-batches replica `replica` of stage `stage` runs, ascending.
    pub fn mine(&self, stage: usize, replica: usize) -> Vec<u64> {
        self.assign[stage]
            .iter()
            .enumerate()
            .filter(|&(_, &r)| r as usize == replica)
            .map(|(g, _)| g as u64)
            .collect()
    }

    /// Replica of stage `stage` that runs micro-batch `g`.
    pub fn replica(&self, stage: usize, g: u64) -> usize {
        self.assign[stage][g as usize] as usize
    }

    /// Micro-batches per replica of `stage`.
    pub fn counts(&self, stage: usize, replicas: usize) -> Vec<usize> {
        let mut c = vec![0; replicas];
        for &r in &self.assign[stage] {
            c[r as usize] += 1;
        }
        c
    }

    /// Longest busy time of `stage` under this route, given each replica's
    /// seconds per micro-batch.
    pub fn makespan(&self, stage: usize, seconds_per_mb: &[f64]) -> f64 {
        self.counts(stage, seconds_per_mb.len())
            .iter()
            .zip(seconds_per_mb)
            .map(|(&k, &t)| k as f64 * t)
            .fold(0.0, f64::max)
    }
}

/// Shares of `total` micro-batches for replicas taking `seconds_per_mb`
/// each, minimising the slowest replica's busy time; every replica keeps at
/// least one (so that its speed goes on being measured), when there are
/// enough to go round.
pub fn balanced_counts(total: usize, seconds_per_mb: &[f64]) -> Vec<usize> {
    let n = seconds_per_mb.len();
    let mut counts = vec![0usize; n];
    if n == 0 {
        return counts;
    }
    let floor = usize::from(total >= n);
    for c in counts.iter_mut() {
        *c = floor;
    }
    let cost = |i: usize, k: usize| (k as f64) * seconds_per_mb[i].max(1e-9);
    for _ in floor * n..total {
        // The replica that would finish its next micro-batch soonest; ties
        // go to the lowest index, so every coordinator computes the same.
        let best = (0..n)
            .min_by(|&a, &b| {
                cost(a, counts[a] + 1)
                    .partial_cmp(&cost(b, counts[b] + 1))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(0);
        counts[best] += 1;
    }
    counts
}

/// Spreads micro-batches `0..Σ counts` over the replicas, `counts[r]` to
/// replica `r`, interleaved (smooth weighted round robin) so that every
/// replica's micro-batches are spread over the step rather than bunched.
pub fn interleave(counts: &[usize]) -> Vec<u16> {
    let total: usize = counts.iter().sum();
    let mut credit = vec![0i64; counts.len()];
    let mut left = counts.to_vec();
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        for (c, &k) in credit.iter_mut().zip(counts) {
            *c += k as i64;
        }
        let pick = (0..counts.len())
            .filter(|&r| left[r] > 0)
            .max_by_key(|&r| (credit[r], std::cmp::Reverse(r)))
            .unwrap_or(0);
        credit[pick] -= total as i64;
        left[pick] -= 1;
        out.push(pick as u16);
    }
    out
}

/// The throughput-weighted route for a step: stage by stage, the replicas
/// in `lanes` share it by [`balanced_counts`] of their seconds per
/// micro-batch (`None`: not measured yet, taken as the mean of the stage's
/// measured ones, or 1 s if none is); the other replicas get nothing. When
/// every replica of every stage gets an even share, that is the lanes route.
pub fn weighted(
    stages: usize,
    replicas: usize,
    micro_batches: usize,
    seconds_per_mb: &[Vec<Option<f64>>],
    lanes: &[usize],
) -> Route {
    let total = replicas * micro_batches;
    let assign = (0..stages)
        .map(|s| {
            let known: Vec<Option<f64>> = lanes
                .iter()
                .map(|&r| {
                    seconds_per_mb
                        .get(s)
                        .and_then(|v| v.get(r).copied().flatten())
                })
                .collect();
            let measured: Vec<f64> = known.iter().flatten().copied().collect();
            let fill = if measured.is_empty() {
                1.0
            } else {
                measured.iter().sum::<f64>() / measured.len() as f64
            };
            let times: Vec<f64> = known.iter().map(|t| t.unwrap_or(fill)).collect();
            let mut counts = vec![0usize; replicas];
            for (&r, c) in lanes.iter().zip(balanced_counts(total, &times)) {
                counts[r] = c;
            }
            counts
        })
        .collect::<Vec<_>>();
    // Even shares everywhere: the lanes route, whose replicas each run one
    // whole pipeline of consecutive micro-batches (the fewest bubbles, and
    // no traffic between lanes).
    if assign.iter().all(|c| c.iter().all(|&k| k == micro_batches)) {
        return Route::lanes(stages, replicas, micro_batches);
    }
    Route {
        assign: assign.iter().map(|c| interleave(c)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_give_each_replica_its_own_block() {
        let r = Route::lanes(3, 2, 4);
        assert!(r.check(3, 2, 4).is_ok());
        assert!(r.is_lanes(4));
        assert_eq!(r.mine(1, 0), vec![0, 1, 2, 3]);
        assert_eq!(r.mine(2, 1), vec![4, 5, 6, 7]);
        assert_eq!(r.replica(0, 5), 1);
    }

    #[test]
    fn a_replica_three_times_slower_gets_a_quarter() {
        // 8 micro-batches, 1 s and 3 s each: 6 and 2 finish together at 6 s.
        assert_eq!(balanced_counts(8, &[1.0, 3.0]), vec![6, 2]);
        // Equal speeds split evenly.
        assert_eq!(balanced_counts(8, &[2.0, 2.0]), vec![4, 4]);
        // A very slow replica still keeps one micro-batch to be measured.
        assert_eq!(balanced_counts(8, &[1.0, 100.0]), vec![7, 1]);
        // Fewer micro-batches than replicas: nobody is guaranteed one.
        assert_eq!(balanced_counts(1, &[1.0, 1.0]).iter().sum::<usize>(), 1);
    }

    #[test]
    fn interleaving_spreads_shares_over_the_step() {
        let a = interleave(&[6, 2]);
        assert_eq!(a.len(), 8);
        assert_eq!(a.iter().filter(|&&r| r == 1).count(), 2);
        // The slow replica's two are not adjacent.
        let pos: Vec<usize> = (0..8).filter(|&g| a[g] == 1).collect();
        assert!(pos[1] - pos[0] >= 3, "{a:?}");
        assert_eq!(interleave(&[4, 4]), vec![0, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn weighted_routes_fill_unknown_speeds_and_fit_the_layout() {
        let times = vec![vec![Some(1.0), Some(3.0)], vec![None, None]];
        let r = weighted(2, 2, 4, &times, &[0, 1]);
        assert!(r.check(2, 2, 4).is_ok());
        assert_eq!(r.counts(0, 2), vec![6, 2]);
        assert_eq!(r.counts(1, 2), vec![4, 4]);
        assert!(r.makespan(0, &[1.0, 3.0]) < Route::lanes(2, 2, 4).makespan(0, &[1.0, 3.0]));
        // A replica left out gets nothing; the others share the whole step.
        let times = vec![
            vec![Some(1.0), Some(9.0), Some(3.0)],
            vec![None, None, None],
        ];
        let r = weighted(2, 3, 2, &times, &[0, 2]);
        assert!(r.check(2, 3, 2).is_ok());
        assert_eq!(r.counts(0, 3), vec![5, 0, 1]);
        assert_eq!(r.counts(1, 3), vec![3, 0, 3]);
        // Even speeds (or none measured yet) everywhere: the lanes route.
        let even = vec![vec![Some(2.0), Some(2.1)], vec![None, None]];
        assert_eq!(weighted(2, 2, 4, &even, &[0, 1]), Route::lanes(2, 2, 4));
    }

    #[test]
    fn malformed_routes_are_refused() {
        let mut r = Route::lanes(2, 2, 2);
        assert!(r.check(3, 2, 2).unwrap_err().contains("2 stages"));
        r.assign[1][0] = 7;
        assert!(r.check(2, 2, 2).unwrap_err().contains("replica 7"));
        r.assign[1].pop();
        assert!(r.check(2, 2, 2).unwrap_err().contains("3 micro-batches"));
    }
}
