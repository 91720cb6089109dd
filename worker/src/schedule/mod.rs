//! Pipeline schedules: the order in which one stage runs the forwards and
//! backwards of the micro-batches of one optimizer step.
//!
//! A schedule is a pure function of (kind, stage, stages, micro-batches):
//! every stage computes its own list with [`ops`] and needs no coordination
//! beyond the activations and gradients that flow along the links. The
//! lists are checked with [`validate`] (each micro-batch forwarded and
//! backpropagated exactly once, and no cross-stage deadlock) and timed with
//! the discrete-event [`simulate`], which gives the makespan, busy time,
//! bubble fraction and peak activation count of each stage. The pipeline
//! efficiency benchmark divides [`theoretical_bound`] by a measured step time.
//!
//! The diagrams below show 4 stages and 8 micro-batches (numbered from 0)
//! with unit costs: a forward `F` takes 1, the input half `B` and the weight
//! half `W` of a backward take 1 each, so a whole backward (`BB`) takes 2.
//! One row per stage, one two-character cell per time unit, `.` is idle.
//!
//! GPipe: every forward, then every backward. All 8 activations are alive on
//! every stage at the peak; makespan 33, bubble 9/33 on every stage.
//!
//! ```text
//! stage 0 F0F1F2F3F4F5F6F7. . . . . . . . . B0B0B1B1B2B2B3B3B4B4B5B5B6B6B7B7
//! stage 1 . F0F1F2F3F4F5F6F7. . . . . . B0B0B1B1B2B2B3B3B4B4B5B5B6B6B7B7. .
//! stage 2 . . F0F1F2F3F4F5F6F7. . . B0B0B1B1B2B2B3B3B4B4B5B5B6B6B7B7. . . .
//! stage 3 . . . F0F1F2F3F4F5F6F7B0B0B1B1B2B2B3B3B4B4B5B5B6B6B7B7. . . . . .
//! ```
//!
//! 1F1B (PipeDream-flush): a few warm-up forwards, then one forward and one
//! backward in turn, then the remaining backwards. Same makespan as GPipe,
//! but stage `s` never holds more than `S − s` activations.
//!
//! ```text
//! stage 0 F0F1F2F3. . . . . . B0B0F4B1B1F5B2B2F6B3B3F7B4B4. B5B5. B6B6. B7B7
//! stage 1 . F0F1F2. . . . B0B0F3B1B1F4B2B2F5B3B3F6B4B4F7B5B5. B6B6. B7B7. .
//! stage 2 . . F0F1. . B0B0F2B1B1F3B2B2F4B3B3F5B4B4F6B5B5F7B6B6. B7B7. . . .
//! stage 3 . . . F0B0B0F1B1B1F2B2B2F3B3B3F4B4B4F5B5B5F6B6B6F7B7B7. . . . . .
//! ```
//!
//! ZB-H1 (zero bubble, Qi et al. 2023): the 1F1B order with each backward
//! split; the input half goes where 1F1B puts the backward, so gradients
//! reach the previous stage sooner, and the weight halves are deferred into
//! what would have been the cool-down bubbles. Makespan 27, bubble 3/27,
//! and no stage holds more than `S` activations, the peak of 1F1B.
//!
//! ```text
//! stage 0 F0F1F2F3. . . B0W0F4B1W1F5B2W2F6B3W3F7B4W4B5W5B6W6B7W7
//! stage 1 . F0F1F2. . B0F3B1W0F4B2W1F5B3W2F6B4W3F7B5W4B6W5B7W6W7
//! stage 2 . . F0F1. B0F2B1F3B2W0F4B3W1F5B4W2F6B5W3F7B6W4B7W5W6W7
//! stage 3 . . . F0B0F1B1F2B2F3B3W0F4B4W1F5B5W2F6B6W3F7B7W4W5W6W7
//! ```

mod sim;
mod validate;

#[cfg(test)]
mod tests;

/// The operation lists themselves live in the spec crate, so that the
/// operator sizes a stage from the same lists the workers run.
pub use pipewright_spec::sizing::schedule::{ops, peak_in_flight, plan, Op};
pub use sim::{simulate, theoretical_bound, OpCosts, Span, StageCosts, StageTimeline, Timeline};
pub use validate::{validate, ScheduleError};
