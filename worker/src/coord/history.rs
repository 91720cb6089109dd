//! What the run page draws: one point per committed step and the events
//! that changed the run, each kept in a bounded ring (the oldest dropped
//! first). Times are the state machine's `Instant`s; they become Unix
//! seconds only when read, against a wall-clock reading the caller passes,
//! so the state machine stays free of clocks. Served at `GET /v1/history`.
//!
//! Kept in memory only: a restarted coordinator starts a fresh history
//! (its counters live in the state file).

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Steps kept.
pub const STEP_POINTS: usize = 2000;
/// Events kept.
pub const EVENTS: usize = 200;
/// Longest event text kept, in characters.
const MAX_TEXT: usize = 240;
/// Longest peer-supplied string (a name, a key) quoted in an event.
const MAX_QUOTED: usize = 48;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A worker took a slot.
    Registered,
    /// A worker waits for a vacancy.
    Standby,
    /// A worker was lost (its lease expired or its process exited).
    Lost,
    /// A vacated shard went to a standby.
    Reassigned,
    /// An epoch's plan was made: every training shard is wired and
    /// training starts from the plan's step.
    Epoch,
    /// The run stopped training to recover from a lost shard.
    Recovery,
    /// The first step after a recovery was committed.
    Recovered,
    /// A checkpoint was committed.
    Checkpoint,
    /// The run finished.
    Succeeded,
    /// The run gave up.
    Failed,
    /// A registration or step report was refused.
    Refused,
    /// An audit by recomputation could not be decided (unconfirmed).
    Audit,
    /// A worker was convicted of dishonest work and its identity barred.
    Quarantined,
}

/// One committed step, as `/v1/history` serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    /// The step.
    pub step: u64,
    /// Its mean loss, when the last stage reported one.
    pub loss: Option<f32>,
    /// Training tokens per second over the steps before it.
    pub tokens_per_second: f64,
    /// When it was committed, Unix seconds.
    pub time: f64,
}

/// One event, as `/v1/history` serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened (the last time, for a repeated one), Unix seconds.
    pub time: f64,
    /// What it is about.
    pub kind: EventKind,
    /// What happened, in words.
    pub text: String,
    /// How many times in a row it happened.
    pub count: u64,
}

/// `GET /v1/history`: oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    /// The most recent committed steps.
    pub steps: Vec<StepPoint>,
    /// The most recent events.
    pub events: Vec<Event>,
}

#[derive(Clone, Debug)]
struct Point {
    step: u64,
    loss: Option<f32>,
    tokens_per_second: f64,
    at: Instant,
}

#[derive(Clone, Debug)]
struct Happened {
    at: Instant,
    kind: EventKind,
    text: String,
    count: u64,
}

/// The two rings.
#[derive(Clone, Debug)]
pub struct History {
    points: VecDeque<Point>,
    events: VecDeque<Happened>,
    max_points: usize,
    max_events: usize,
}

impl Default for History {
    fn default() -> Self {
        History::with_capacity(STEP_POINTS, EVENTS)
    }
}

impl History {
    /// Rings of at most `points` steps and `events` events.
    pub fn with_capacity(points: usize, events: usize) -> Self {
        History {
            points: VecDeque::new(),
            events: VecDeque::new(),
            max_points: points.max(1),
            max_events: events.max(1),
        }
    }

    /// Step `step` was committed at `at`.
    pub fn step(&mut self, step: u64, loss: Option<f32>, tokens_per_second: f64, at: Instant) {
        if self.points.len() == self.max_points {
            self.points.pop_front();
        }
        self.points.push_back(Point {
            step,
            loss: loss.filter(|l| l.is_finite()),
            tokens_per_second: if tokens_per_second.is_finite() {
                tokens_per_second
            } else {
                0.0
            },
            at,
        });
    }

    /// The run went back to `step`: the points after it will be trained
    /// (and recorded) again.
    pub fn rewind(&mut self, step: u64) {
        while self.points.back().is_some_and(|p| p.step > step) {
            self.points.pop_back();
        }
    }

    /// Something happened at `at`. The same event again right after the
    /// last one only counts it again.
    pub fn event(&mut self, kind: EventKind, text: impl Into<String>, at: Instant) {
        let text = clip(&text.into(), MAX_TEXT);
        if let Some(last) = self
            .events
            .back_mut()
            .filter(|e| e.kind == kind && e.text == text)
        {
            last.count += 1;
            last.at = at;
            return;
        }
        if self.events.len() == self.max_events {
            self.events.pop_front();
        }
        self.events.push_back(Happened {
            at,
            kind,
            text,
            count: 1,
        });
    }

    /// The rings with times in Unix seconds, given that `now` is
    /// `unix_now`.
    pub fn view(&self, now: Instant, unix_now: f64) -> HistoryView {
        let unix = |at: Instant| unix_now - now.saturating_duration_since(at).as_secs_f64();
        HistoryView {
            steps: self
                .points
                .iter()
                .map(|p| StepPoint {
                    step: p.step,
                    loss: p.loss,
                    tokens_per_second: p.tokens_per_second,
                    time: unix(p.at),
                })
                .collect(),
            events: self
                .events
                .iter()
                .map(|e| Event {
                    time: unix(e.at),
                    kind: e.kind,
                    text: e.text.clone(),
                    count: e.count,
                })
                .collect(),
        }
    }
}

/// A string a peer sent (a worker's name, a key), fit to quote in an
/// event: control characters replaced, at most a few dozen characters.
pub fn quoted(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    clip(&clean, MAX_QUOTED)
}

/// `s` cut to at most `max` characters, an ellipsis marking the cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some(_) => {
            let cut: String = s.chars().take(max.saturating_sub(1)).collect();
            format!("{cut}…")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_rings_keep_only_the_newest_and_times_become_unix_seconds() {
        let t0 = Instant::now();
        let mut h = History::with_capacity(3, 2);
        for s in 1..=5u64 {
            h.step(s, Some(1.0 / s as f32), 10.0, t0 + Duration::from_secs(s));
        }
        h.event(EventKind::Registered, "a", t0);
        h.event(EventKind::Lost, "b", t0 + Duration::from_secs(1));
        h.event(EventKind::Epoch, "c", t0 + Duration::from_secs(2));
        let v = h.view(t0 + Duration::from_secs(10), 1000.0);
        assert_eq!(
            v.steps.iter().map(|p| p.step).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(v.steps[2].time, 995.0);
        assert_eq!(
            v.events.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        assert_eq!(v.events[1].time, 992.0);
    }

    #[test]
    fn a_rewind_drops_the_steps_to_be_trained_again() {
        let t0 = Instant::now();
        let mut h = History::default();
        for s in 1..=6 {
            h.step(s, None, 0.0, t0);
        }
        h.rewind(4);
        h.step(5, Some(2.0), f64::NAN, t0);
        let v = h.view(t0, 0.0);
        assert_eq!(
            v.steps.iter().map(|p| p.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(v.steps[4].tokens_per_second, 0.0);
    }

    #[test]
    fn a_repeated_event_is_counted_and_long_or_odd_text_is_clipped() {
        let t0 = Instant::now();
        let mut h = History::default();
        for i in 0..3 {
            h.event(EventKind::Refused, "same", t0 + Duration::from_secs(i));
        }
        h.event(EventKind::Refused, "x".repeat(10_000), t0);
        let v = h.view(t0 + Duration::from_secs(2), 2.0);
        assert_eq!(v.events.len(), 2);
        assert_eq!((v.events[0].count, v.events[0].time), (3, 2.0));
        assert_eq!(v.events[1].text.chars().count(), MAX_TEXT);
        assert!(v.events[1].text.ends_with('…'));
        assert_eq!(quoted("a\nb"), "a?b");
        assert_eq!(quoted(&"é".repeat(100)).chars().count(), MAX_QUOTED);
    }
}
