//! Checks that a set of per-stage operation lists is a complete, runnable
//! pipeline step. Lists may come from a manifest-selected schedule or from a
//! peer, so every defect is a typed error, never a panic.

use std::collections::{BTreeMap, BTreeSet};

use super::sim::{self, OpCosts, StageCosts};
use super::Op;

/// Why a set of operation lists is not a valid pipeline step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A pipeline needs at least one stage.
    #[error("the schedule has no stages")]
    NoStages,
    /// A micro-batch is forwarded twice on a stage.
    #[error("stage {stage}: micro-batch {mb} is forwarded twice")]
    DuplicateForward {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// A micro-batch's input or weight gradient is computed twice.
    #[error("stage {stage}: micro-batch {mb} has its backward work twice")]
    DuplicateBackward {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// A backward comes before (or without) the forward it differentiates.
    #[error("stage {stage}: micro-batch {mb} has a backward before its forward")]
    BackwardBeforeForward {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// A weight half comes before the input half it needs.
    #[error("stage {stage}: micro-batch {mb} has its weight gradient before its input gradient")]
    WeightBeforeInput {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// A micro-batch that another stage runs is never forwarded here.
    #[error("stage {stage}: micro-batch {mb} is never forwarded")]
    MissingForward {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// A forwarded micro-batch never gets its full backward (both halves).
    #[error("stage {stage}: micro-batch {mb} never completes its backward")]
    MissingBackward {
        /// Stage index.
        stage: usize,
        /// Micro-batch id.
        mb: u32,
    },
    /// The stages wait on each other forever.
    #[error("deadlock: stage {stage} waits forever at {op:?}")]
    Deadlock {
        /// First stage found stuck.
        stage: usize,
        /// The operation it cannot start.
        op: Op,
    },
    /// The cost table does not describe the same number of stages.
    #[error("costs are given for {costs} stages but the schedule has {stages}")]
    CostStages {
        /// Stages in the schedule.
        stages: usize,
        /// Stages in the cost table.
        costs: usize,
    },
    /// A negative, infinite or NaN time in the cost table.
    #[error("stage {stage}: operation times must be finite and non-negative")]
    InvalidCost {
        /// Stage index (the number of stages for the link latency).
        stage: usize,
    },
}

/// Check that `ops_per_stage` (first stage first) is a valid step: on every
/// stage each micro-batch that appears anywhere is forwarded exactly once and
/// backpropagated exactly once (one `Backward`, or one `BackwardInput`
/// followed by one `BackwardWeight`), never before its forward; and the
/// stages, each running its list in order, cannot deadlock given that a
/// forward needs the previous stage's forward of the same micro-batch and an
/// input gradient needs the next stage's input gradient of the same
/// micro-batch.
pub fn validate(ops_per_stage: &[Vec<Op>]) -> Result<(), ScheduleError> {
    check_structure(ops_per_stage)?;
    // Whether a deadlock exists does not depend on the durations.
    let unit = OpCosts {
        forward: 1.0,
        backward_input: 1.0,
        backward_weight: 1.0,
    };
    let costs = StageCosts::uniform(ops_per_stage.len(), unit, 0.0);
    sim::run(ops_per_stage, &costs).map(|_| ())
}

/// Progress of one micro-batch on one stage while scanning its list.
#[derive(Clone, Copy, Default)]
struct Progress {
    forward: bool,
    input: bool,
    weight: bool,
}

/// The per-stage half of [`validate`]: everything except deadlock freedom.
pub(super) fn check_structure(ops_per_stage: &[Vec<Op>]) -> Result<(), ScheduleError> {
    if ops_per_stage.is_empty() {
        return Err(ScheduleError::NoStages);
    }
    let all: BTreeSet<u32> = ops_per_stage
        .iter()
        .flatten()
        .map(|op| op.micro_batch())
        .collect();
    for (stage, ops) in ops_per_stage.iter().enumerate() {
        let mut seen: BTreeMap<u32, Progress> = BTreeMap::new();
        for &op in ops {
            let mb = op.micro_batch();
            let p = seen.entry(mb).or_default();
            match op {
                Op::Forward { .. } => {
                    if p.forward {
                        return Err(ScheduleError::DuplicateForward { stage, mb });
                    }
                    p.forward = true;
                }
                _ if !p.forward => return Err(ScheduleError::BackwardBeforeForward { stage, mb }),
                Op::Backward { .. } | Op::BackwardInput { .. } if p.input => {
                    return Err(ScheduleError::DuplicateBackward { stage, mb })
                }
                Op::Backward { .. } => {
                    p.input = true;
                    p.weight = true;
                }
                Op::BackwardInput { .. } => p.input = true,
                Op::BackwardWeight { .. } if p.weight => {
                    return Err(ScheduleError::DuplicateBackward { stage, mb })
                }
                Op::BackwardWeight { .. } if !p.input => {
                    return Err(ScheduleError::WeightBeforeInput { stage, mb })
                }
                Op::BackwardWeight { .. } => p.weight = true,
            }
        }
        for &mb in &all {
            let p = seen.get(&mb).copied().unwrap_or_default();
            if !p.forward {
                return Err(ScheduleError::MissingForward { stage, mb });
            }
            if !(p.input && p.weight) {
                return Err(ScheduleError::MissingBackward { stage, mb });
            }
        }
    }
    Ok(())
}
