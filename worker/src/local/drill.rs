//! The `--kill-workers N` fault drill: N live worker processes killed with
//! SIGKILL at seeded random steps spread over the run, one at a time, each
//! once the run has recovered from the one before; a kill has recovered
//! when the run completed a step in a later epoch.

use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::process::Worker;
use crate::coord::{Phase, Status};

/// One kill of the drill.
struct Kill {
    at: Instant,
    /// The run's step and epoch when it fell.
    step: u64,
    epoch: u64,
    /// Seconds from the kill to the next step completed after it.
    recovered: Option<f64>,
}

/// The drill's plan and what became of its kills.
pub(super) struct Drill {
    /// Picks the kills' steps, then each kill's victim.
    rng: StdRng,
    /// The step at or after which each kill falls, in order.
    steps: Vec<u64>,
    kills: Vec<Kill>,
}

impl Drill {
    /// `kills` kills seeded by `seed` in a run of `run_steps` steps.
    pub(super) fn new(kills: usize, seed: u64, run_steps: u64) -> Drill {
        // The drill's kills fall at seeded random steps, spread over the
        // run, each at whatever moment of that step the launcher gets to it.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut steps: Vec<u64> = (0..kills)
            .map(|_| rng.random_range(1..run_steps.saturating_sub(2).max(2)))
            .collect();
        steps.sort_unstable();
        Drill {
            rng,
            steps,
            kills: Vec::new(),
        }
    }

    /// Marks the kills the run has recovered from by `status`.
    pub(super) fn note(&mut self, status: &Status) {
        for k in self.kills.iter_mut().filter(|k| k.recovered.is_none()) {
            if status.epoch > k.epoch && status.step > k.step {
                k.recovered = Some(k.at.elapsed().as_secs_f64());
            }
        }
    }

    /// Whether the next kill falls now: its step has come, the last kill
    /// was recovered from, and the run is training with a step to go.
    fn due(&self, status: &Status, run_steps: u64) -> bool {
        let quiet_now = self.kills.last().is_none_or(|k| k.recovered.is_some());
        self.kills.len() < self.steps.len()
            && quiet_now
            && status.step >= self.steps[self.kills.len()]
            && status.phase == Phase::Training
            && status.step + 1 < run_steps
    }

    /// Kills a random live worker when the next kill is due.
    pub(super) fn strike(
        &mut self,
        workers: &mut [Worker],
        status: &Status,
        run_steps: u64,
        bar: &ProgressBar,
    ) -> Result<()> {
        if !self.due(status, run_steps) {
            return Ok(());
        }
        let live: Vec<usize> = (0..workers.len()).filter(|&i| !workers[i].done).collect();
        if live.is_empty() {
            return Ok(());
        }
        let w = &mut workers[live[self.rng.random_range(0..live.len())]];
        bar.println(format!(
            "fault drill: kill -9 stage {} replica {} at step {}",
            w.stage, w.replica, status.step
        ));
        w.child.kill().context("killing a worker")?;
        self.kills.push(Kill {
            at: Instant::now(),
            step: status.step,
            epoch: status.epoch,
            recovered: None,
        });
        Ok(())
    }

    /// The kills made.
    pub(super) fn kills(&self) -> usize {
        self.kills.len()
    }

    /// Seconds each recovered kill took, shortest first.
    pub(super) fn recoveries(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.kills.iter().filter_map(|k| k.recovered).collect();
        r.sort_by(f64::total_cmp);
        r
    }

    /// Whether some kill was never recovered from.
    pub(super) fn unrecovered(&self) -> bool {
        self.kills.iter().any(|k| k.recovered.is_none())
    }
}
