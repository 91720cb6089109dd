//! Discrete-event timing of a pipeline step: each stage runs its list in
//! order, starting an operation as soon as the stage is free and the
//! operation's inputs have arrived over the links.

use std::collections::HashMap;

use pipewright_spec::ScheduleKind;

use super::validate::{check_structure, ScheduleError};
use super::{peak_in_flight, Op};

/// Durations of one stage's operations, in any consistent time unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpCosts {
    /// One micro-batch's forward.
    pub forward: f64,
    /// One micro-batch's input-gradient half of the backward.
    pub backward_input: f64,
    /// One micro-batch's weight-gradient half of the backward.
    pub backward_weight: f64,
}

impl OpCosts {
    /// Forward plus whole backward: the work one micro-batch costs the stage.
    pub fn total(&self) -> f64 {
        self.forward + self.backward_input + self.backward_weight
    }

    /// Duration of `op` on this stage; a whole backward is both halves.
    pub fn of(&self, op: Op) -> f64 {
        match op {
            Op::Forward { .. } => self.forward,
            Op::Backward { .. } => self.backward_input + self.backward_weight,
            Op::BackwardInput { .. } => self.backward_input,
            Op::BackwardWeight { .. } => self.backward_weight,
        }
    }

    fn is_valid(&self) -> bool {
        [self.forward, self.backward_input, self.backward_weight]
            .iter()
            .all(|t| t.is_finite() && *t >= 0.0)
    }
}

/// Per-stage operation times and the latency of one hop between stages.
#[derive(Clone, Debug, PartialEq)]
pub struct StageCosts {
    /// Costs of each stage, first stage first.
    pub stages: Vec<OpCosts>,
    /// Time from the end of an operation to its output being usable by the
    /// neighbouring stage.
    pub link_latency: f64,
}

impl StageCosts {
    /// The same costs on every one of `stages` stages.
    pub fn uniform(stages: usize, costs: OpCosts, link_latency: f64) -> Self {
        Self {
            stages: vec![costs; stages],
            link_latency,
        }
    }

    fn check(&self, stages: usize) -> Result<(), ScheduleError> {
        if self.stages.len() != stages {
            return Err(ScheduleError::CostStages {
                stages,
                costs: self.stages.len(),
            });
        }
        if let Some(stage) = self.stages.iter().position(|c| !c.is_valid()) {
            return Err(ScheduleError::InvalidCost { stage });
        }
        if !(self.link_latency.is_finite() && self.link_latency >= 0.0) {
            return Err(ScheduleError::InvalidCost { stage: stages });
        }
        Ok(())
    }
}

/// One operation placed in time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// The operation.
    pub op: Op,
    /// When it starts.
    pub start: f64,
    /// When it ends.
    pub end: f64,
}

/// What one stage did during the simulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTimeline {
    /// Total time spent running operations.
    pub busy: f64,
    /// Idle share of the step, `(makespan − busy) / makespan` (0 for an
    /// empty step): waiting for the pipeline to fill, for gradients, or for
    /// the other stages to finish.
    pub bubble_fraction: f64,
    /// Most micro-batches holding activations at once (forward done, weight
    /// gradient not yet): the stage's activation memory in micro-batches.
    pub peak_in_flight: usize,
    /// The stage's operations in execution order.
    pub spans: Vec<Span>,
}

/// Result of [`simulate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// Time from the first operation's start to the last one's end.
    pub makespan: f64,
    /// Per-stage account, first stage first.
    pub stages: Vec<StageTimeline>,
}

/// Rows longer than this are cut: the picture is for people, and a tiny
/// `unit` must not allocate without bound.
const MAX_CELLS: usize = 4096;

impl Timeline {
    /// Bubble fraction averaged over the stages: the share of the
    /// pipeline's capacity lost to idling.
    pub fn mean_bubble_fraction(&self) -> f64 {
        if self.stages.is_empty() {
            return 0.0;
        }
        self.stages.iter().map(|s| s.bubble_fraction).sum::<f64>() / self.stages.len() as f64
    }

    /// Draw the timeline, one row per stage and one two-character cell per
    /// `unit` of time: `F` forward, `B` input gradient (a whole backward
    /// shows as `B` for all its cells), `W` weight gradient, followed by the
    /// micro-batch id in base 36 (modulo 36); `. ` is idle. Rows are cut at
    /// 4096 cells; a `unit` that is not positive and finite draws nothing.
    pub fn render(&self, unit: f64) -> String {
        if !(unit.is_finite() && unit > 0.0) {
            return String::new();
        }
        let cells = ((self.makespan / unit).ceil() as usize).min(MAX_CELLS);
        let mut out = String::new();
        for (s, stage) in self.stages.iter().enumerate() {
            let mut row = format!("stage {s} ");
            let mut spans = stage.spans.iter().peekable();
            for cell in 0..cells {
                let mid = (cell as f64 + 0.5) * unit;
                while spans.next_if(|span| span.end <= mid).is_some() {}
                match spans.peek() {
                    Some(span) if span.start <= mid => {
                        let letter = match span.op {
                            Op::Forward { .. } => 'F',
                            Op::Backward { .. } | Op::BackwardInput { .. } => 'B',
                            Op::BackwardWeight { .. } => 'W',
                        };
                        row.push(letter);
                        row.push(char::from_digit(span.op.micro_batch() % 36, 36).unwrap_or('?'));
                    }
                    _ => row.push_str(". "),
                }
            }
            out.push_str(row.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Time one step of `ops_per_stage` (first stage first) under `cost`.
///
/// Each stage runs its list in order; an operation starts when the stage is
/// free and its inputs are there: a forward on stage `s > 0` needs the
/// forward of the same micro-batch on `s − 1`, and an input gradient (or
/// whole backward) on `s < S − 1` needs the input gradient of the same
/// micro-batch on `s + 1`, each plus one link latency. The lists are
/// validated first, so an invalid or deadlocking schedule is an error, not a
/// hang.
pub fn simulate(ops_per_stage: &[Vec<Op>], cost: &StageCosts) -> Result<Timeline, ScheduleError> {
    check_structure(ops_per_stage)?;
    cost.check(ops_per_stage.len())?;
    let spans = run(ops_per_stage, cost)?;
    let makespan = spans.iter().flatten().map(|s| s.end).fold(0.0, f64::max);
    let stages = spans
        .into_iter()
        .map(|spans| {
            let busy: f64 = spans.iter().map(|s| s.end - s.start).sum();
            let bubble_fraction = if makespan > 0.0 {
                (makespan - busy) / makespan
            } else {
                0.0
            };
            let peak_in_flight = peak_in_flight(spans.iter().map(|s| s.op));
            StageTimeline {
                busy,
                bubble_fraction,
                peak_in_flight,
                spans,
            }
        })
        .collect();
    Ok(Timeline { makespan, stages })
}

/// The event loop shared by [`simulate`] and the deadlock check of
/// [`super::validate`]. Costs must already be checked against the stages.
pub(super) fn run(
    ops_per_stage: &[Vec<Op>],
    cost: &StageCosts,
) -> Result<Vec<Vec<Span>>, ScheduleError> {
    let n = ops_per_stage.len();
    let latency = cost.link_latency;
    // When each micro-batch's forward / input gradient finished, per stage.
    let mut forward_done: Vec<HashMap<u32, f64>> = vec![HashMap::new(); n];
    let mut input_done: Vec<HashMap<u32, f64>> = vec![HashMap::new(); n];
    let mut next = vec![0usize; n];
    let mut free = vec![0.0f64; n];
    let mut spans: Vec<Vec<Span>> = ops_per_stage
        .iter()
        .map(|ops| Vec::with_capacity(ops.len()))
        .collect();

    // Start times depend only on finish times already known, so sweeping the
    // stages until none can advance gives the exact event order's result.
    let mut progressed = true;
    while progressed {
        progressed = false;
        for s in 0..n {
            while let Some(&op) = ops_per_stage[s].get(next[s]) {
                let mb = op.micro_batch();
                let ready = match op {
                    Op::Forward { .. } if s == 0 => Some(0.0),
                    Op::Forward { .. } => forward_done[s - 1].get(&mb).map(|t| t + latency),
                    Op::Backward { .. } | Op::BackwardInput { .. } if s + 1 == n => {
                        forward_done[s].get(&mb).copied()
                    }
                    Op::Backward { .. } | Op::BackwardInput { .. } => {
                        input_done[s + 1].get(&mb).map(|t| t + latency)
                    }
                    Op::BackwardWeight { .. } => input_done[s].get(&mb).copied(),
                };
                let Some(ready) = ready else { break };
                let start = free[s].max(ready);
                let end = start + cost.stages[s].of(op);
                match op {
                    Op::Forward { .. } => {
                        forward_done[s].insert(mb, end);
                    }
                    Op::Backward { .. } | Op::BackwardInput { .. } => {
                        input_done[s].insert(mb, end);
                    }
                    Op::BackwardWeight { .. } => {}
                }
                free[s] = end;
                spans[s].push(Span { op, start, end });
                next[s] += 1;
                progressed = true;
            }
        }
    }
    match (0..n).find(|&s| next[s] < ops_per_stage[s].len()) {
        Some(stage) => Err(ScheduleError::Deadlock {
            stage,
            op: ops_per_stage[stage][next[stage]],
        }),
        None => Ok(spans),
    }
}

/// Ideal makespan of one step of `micro_batches` micro-batches under `kind`
/// with per-stage times `cost`: the pipeline efficiency benchmark reports
/// this bound divided by the measured step time.
///
/// With `T_s = tF_s + tB_s + tW_s`, `b` the stage with the largest `T_s`
/// (the bottleneck), `S` stages, `m` micro-batches and link latency `L`:
///
/// ```text
/// GPipe, 1F1B:  m·T_b + Σ_{s≠b} T_s                         + 2(S−1)·L
/// ZB-H1:        m·T_b + Σ_{s≠b} max(0, tF_s + tB_s − tW_s)   + 2(S−1)·L
/// ```
///
/// The bottleneck works through all `m` micro-batches while every other
/// stage contributes its share of pipeline fill and drain once; one
/// micro-batch crosses each of the `S − 1` links twice. For uniform stages
/// the first line is the classic `(m + S − 1)·(tF + tB)` (here `tB` counts
/// both halves); in ZB-H1 the deferred weight halves hide `tW` of each
/// stage's share, which gives the paper's `(S − 1)·(tF + tB − tW)` bubble.
///
/// Either is raised to the single micro-batch critical path when that is
/// longer (few micro-batches): forwards down and input gradients back up
/// every stage, then stage 0's weight half, `Σ_s (tF_s + tB_s) + tW_0 +
/// 2(S−1)·L` (for GPipe and 1F1B the backward is whole, so every `tW_s`
/// counts). With uniform stages, no latency and `m ≥ S` the simulated
/// makespans of [`super::ops`] equal this bound; with latency they exceed
/// it, because 1F1B's steady state does not cover the round trip. With
/// uneven stages it is a model, not a strict bound: the fill of the stages
/// after the bottleneck partly hides behind the bottleneck's warm-up
/// forwards, so a schedule can beat it (an efficiency above 1 means the
/// stages are far from balanced). Returns 0 for no stages or no
/// micro-batches; costs are not checked here (a NaN time gives NaN).
pub fn theoretical_bound(kind: ScheduleKind, micro_batches: usize, cost: &StageCosts) -> f64 {
    let Some(bottleneck) = cost.stages.iter().map(OpCosts::total).reduce(f64::max) else {
        return 0.0;
    };
    if micro_batches == 0 {
        return 0.0;
    }
    let links = 2.0 * (cost.stages.len() - 1) as f64 * cost.link_latency;
    let fill: f64 = cost.stages.iter().map(|c| share(kind, c)).sum();
    // Remove one bottleneck's share: the bottleneck counts m times instead.
    let bottleneck_share = cost
        .stages
        .iter()
        .filter(|c| c.total() == bottleneck)
        .map(|c| share(kind, c))
        .next()
        .unwrap_or(0.0);
    let steady = micro_batches as f64 * bottleneck + fill - bottleneck_share + links;
    let first_weight = cost.stages.first().map_or(0.0, |c| c.backward_weight);
    let critical = match kind {
        ScheduleKind::Gpipe | ScheduleKind::OneFOneB => {
            cost.stages.iter().map(OpCosts::total).sum::<f64>()
        }
        ScheduleKind::ZbH1 => {
            cost.stages
                .iter()
                .map(|c| c.forward + c.backward_input)
                .sum::<f64>()
                + first_weight
        }
    } + links;
    steady.max(critical)
}

/// What a non-bottleneck stage adds to the makespan through fill and drain.
fn share(kind: ScheduleKind, c: &OpCosts) -> f64 {
    match kind {
        ScheduleKind::Gpipe | ScheduleKind::OneFOneB => c.total(),
        ScheduleKind::ZbH1 => (c.forward + c.backward_input - c.backward_weight).max(0.0),
    }
}
