//! Pipeline schedules as operation lists: the order in which one stage
//! runs the forwards and backwards of the micro-batches of one optimizer
//! step, for GPipe, 1F1B and ZB-H1, and the most micro-batches a list keeps
//! alive at once (what sizes a stage's activations).
//!
//! A schedule is a pure function of (kind, stage, stages, micro-batches):
//! every stage computes its own list with [`ops`] and needs no coordination
//! beyond the activations and gradients that flow along the links. The
//! worker checks the lists (each micro-batch forwarded and backpropagated
//! exactly once, no cross-stage deadlock) and times them with its
//! discrete-event simulator, whose module documentation draws them.

use std::collections::VecDeque;

use crate::ScheduleKind;

/// One operation a stage runs on one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Forward of the micro-batch (keeps its activations until the weight
    /// gradient is done).
    Forward {
        /// Micro-batch id within the step.
        mb: u32,
    },
    /// Whole backward: input gradient for the previous stage, then weight
    /// gradients, back to back.
    Backward {
        /// Micro-batch id within the step.
        mb: u32,
    },
    /// Input half of the backward: the gradient sent to the previous stage.
    BackwardInput {
        /// Micro-batch id within the step.
        mb: u32,
    },
    /// Weight half of the backward: accumulates this stage's parameter
    /// gradients and frees the micro-batch's activations.
    BackwardWeight {
        /// Micro-batch id within the step.
        mb: u32,
    },
}

impl Op {
    /// The micro-batch this operation works on.
    pub fn micro_batch(self) -> u32 {
        match self {
            Op::Forward { mb }
            | Op::Backward { mb }
            | Op::BackwardInput { mb }
            | Op::BackwardWeight { mb } => mb,
        }
    }

    /// The same operation on micro-batch `mb`.
    pub fn with_micro_batch(self, mb: u32) -> Op {
        match self {
            Op::Forward { .. } => Op::Forward { mb },
            Op::Backward { .. } => Op::Backward { mb },
            Op::BackwardInput { .. } => Op::BackwardInput { mb },
            Op::BackwardWeight { .. } => Op::BackwardWeight { mb },
        }
    }

    /// Whether this operation produces the gradient the previous stage waits
    /// for.
    pub fn sends_input_gradient(self) -> bool {
        matches!(self, Op::Backward { .. } | Op::BackwardInput { .. })
    }

    /// Whether this operation ends the micro-batch's life on the stage (its
    /// activations can be freed afterwards).
    pub fn frees_activations(self) -> bool {
        matches!(self, Op::Backward { .. } | Op::BackwardWeight { .. })
    }
}

/// The ordered operations stage `stage` (0-based) of `stages` runs in one
/// optimizer step of `micro_batches` micro-batches, numbered from 0.
///
/// * [`ScheduleKind::Gpipe`]: forwards 0, 1, …, m−1, then backwards in the
///   same ascending order. The order of the backwards changes neither the
///   makespan nor the memory (every activation is alive at the turn);
///   ascending is the order 1F1B uses too.
/// * [`ScheduleKind::OneFOneB`]: `w = min(stages − stage − 1, m)` warm-up
///   forwards, then, while forwards remain, one forward followed by the
///   backward of the oldest micro-batch, then the remaining backwards. A
///   backward frees one activation before the next forward takes one, so
///   at most `stages − stage` micro-batches are in flight.
/// * [`ScheduleKind::ZbH1`]: the 1F1B order with each backward replaced by
///   its input half `B`, at the same position. The weight half `W` of
///   micro-batch `k` runs right after the input half of micro-batch
///   `k + stage` (the last `stage + 1` weight halves run at the end, in
///   order). Stage `s` thus keeps `s` weight halves pending: the gradient
///   chain `B` on the critical path runs at `tB` per hop instead of
///   `tB + tW`, and the deferred `W`s fill the slots where 1F1B's cool-down
///   waits for gradients. At most `(stages − stage) + stage = stages`
///   micro-batches are in flight on any stage, which is the peak of 1F1B's
///   first stage, so the pipeline's peak activation memory is unchanged.
///   With unit costs and `m ≥ stages` the bubble per stage is
///   `(stages − 1)·(tF + tB − tW)`, a third of 1F1B's.
///
/// A `stage` outside `0..stages` has nothing to do and gets an empty list.
/// Micro-batch ids are `u32`; a count above `u32::MAX` is cut to it.
pub fn ops(kind: ScheduleKind, stage: usize, stages: usize, micro_batches: usize) -> Vec<Op> {
    if stage >= stages {
        return Vec::new();
    }
    let m = u32::try_from(micro_batches).unwrap_or(u32::MAX);
    match kind {
        ScheduleKind::Gpipe => gpipe(m),
        ScheduleKind::OneFOneB => one_f_one_b(stage, stages, m, None),
        ScheduleKind::ZbH1 => one_f_one_b(stage, stages, m, Some(stage)),
    }
}

/// The lists of every stage of a `stages`-stage pipeline, first stage first.
pub fn plan(kind: ScheduleKind, stages: usize, micro_batches: usize) -> Vec<Vec<Op>> {
    (0..stages)
        .map(|stage| ops(kind, stage, stages, micro_batches))
        .collect()
}

fn gpipe(m: u32) -> Vec<Op> {
    let forwards = (0..m).map(|mb| Op::Forward { mb });
    let backwards = (0..m).map(|mb| Op::Backward { mb });
    forwards.chain(backwards).collect()
}

/// 1F1B order; with `defer_weights = Some(d)` each backward is split and
/// the weight half of micro-batch `k` follows the input half of `k + d`.
fn one_f_one_b(stage: usize, stages: usize, m: u32, defer_weights: Option<usize>) -> Vec<Op> {
    let warm_up = u32::try_from(stages - stage - 1).unwrap_or(u32::MAX).min(m);
    let mut out: Vec<Op> = (0..warm_up).map(|mb| Op::Forward { mb }).collect();
    let mut next_forward = warm_up;
    let mut pending_weights = VecDeque::new();
    for mb in 0..m {
        if next_forward < m {
            out.push(Op::Forward { mb: next_forward });
            next_forward += 1;
        }
        match defer_weights {
            None => out.push(Op::Backward { mb }),
            Some(defer) => {
                out.push(Op::BackwardInput { mb });
                pending_weights.push_back(mb);
                if pending_weights.len() > defer {
                    if let Some(w) = pending_weights.pop_front() {
                        out.push(Op::BackwardWeight { mb: w });
                    }
                }
            }
        }
    }
    out.extend(
        pending_weights
            .into_iter()
            .map(|mb| Op::BackwardWeight { mb }),
    );
    out
}

/// Most micro-batches alive at once on a stage running `ops` in order: the
/// number of activation caches the stage must hold at its peak.
pub fn peak_in_flight(ops: impl Iterator<Item = Op>) -> usize {
    let mut alive = 0usize;
    let mut peak = 0;
    for op in ops {
        if matches!(op, Op::Forward { .. }) {
            alive += 1;
            peak = peak.max(alive);
        } else if op.frees_activations() {
            alive = alive.saturating_sub(1);
        }
    }
    peak
}

#[cfg(test)]
mod tests;
