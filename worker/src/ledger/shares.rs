//! Reward shares: a deterministic function of the ledger's entries.
//!
//! Over a window of booked steps (`spec.rewards.windowSteps` back from the
//! last, or every step), each identity's credit is
//!
//! ```text
//! credit = forward·F + inputGradient·I + weightGradient·W + validation·V
//!        + allReducePerByte·B
//! ```
//!
//! where F, I, W, V are the FLOPs of its entries in the window and B the
//! bytes it sent in the replicas' all-reduce. An entry whose audit failed
//! earns nothing, and an identity with a failed audit in the window
//! forfeits the window's whole credit. A convicted (quarantined) identity
//! forfeits its entries over the reward window that ended just before the
//! step it was caught at (`Ledger::quarantine` records that range); in any
//! window holding one of them it earns nothing and no share. An identity that booked work in
//! fewer than `minParticipation` of the window's steps earns no share. The
//! share is the credit over the sum of the eligible identities' credits.

use std::collections::{BTreeMap, BTreeSet};

use pipewright_spec::RewardsSpec;
use serde::Serialize;

use super::{Entry, Quarantined};

/// One identity's sums over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Public key (hex).
    pub identity: String,
    /// Forward FLOPs of entries without a failed audit.
    pub forward_flops: f64,
    /// Input-gradient FLOPs, likewise.
    pub input_grad_flops: f64,
    /// Weight-gradient FLOPs, likewise.
    pub weight_grad_flops: f64,
    /// Validation FLOPs, likewise.
    pub validation_flops: f64,
    /// All-reduce bytes, likewise.
    pub allreduce_bytes: u64,
    /// Steps it has entries in.
    pub steps: u64,
    /// Audits passed.
    pub audits_passed: u64,
    /// Audits failed.
    pub audits_failed: u64,
    /// Tokens.
    pub tokens: u64,
    /// Micro-batches.
    pub micro_batches: u64,
    /// Stages served.
    pub stages: BTreeSet<usize>,
    /// Entries forfeited by a conviction.
    pub forfeited: u64,
}

/// One identity's standing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Share {
    /// Public key (hex).
    pub identity: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Stages it served in the window.
    pub stages: Vec<usize>,
    /// Micro-batches booked.
    pub micro_batches: u64,
    /// Tokens booked.
    pub tokens: u64,
    /// Verified FLOPs (forward, input and weight gradient, validation).
    pub flops: f64,
    /// All-reduce bytes.
    pub allreduce_bytes: u64,
    /// Steps with work in the window.
    pub steps: u64,
    /// Audits passed.
    pub audits_passed: u64,
    /// Audits failed.
    pub audits_failed: u64,
    /// Entries in the window forfeited by a conviction.
    pub forfeited: u64,
    /// Its credit under the run's weights (0 when forfeited).
    pub credit: f64,
    /// Whether it participated enough and forfeited nothing.
    pub eligible: bool,
    /// Its share of the pool, 0..=1.
    pub share: f64,
}

/// The window of steps `[from, to]` shares are computed over, given the
/// last booked step: the last `windowSteps` (every step when 0).
pub fn window_of(last: u64, rewards: &RewardsSpec) -> (u64, u64) {
    let from = match rewards.window_steps {
        0 => 1,
        w => last.saturating_sub(w - 1).max(1),
    };
    (from, last)
}

/// Sums the raw entries per identity (the independent path `verify`
/// compares with SQLite's sums); an entry inside a conviction's forfeited
/// range earns nothing.
pub fn totals_of(entries: &[Entry], convictions: &[Quarantined]) -> Vec<Totals> {
    let mut by: BTreeMap<&str, (Totals, BTreeSet<u64>)> = BTreeMap::new();
    for e in entries {
        let (t, steps) = by.entry(&e.identity).or_insert_with(|| {
            (
                Totals {
                    identity: e.identity.clone(),
                    ..Totals::default()
                },
                BTreeSet::new(),
            )
        });
        let forfeited = convictions.iter().any(|q| q.forfeits(&e.identity, e.step));
        if forfeited {
            t.forfeited += 1;
        } else if e.audits_failed == 0 {
            t.forward_flops += e.forward_flops;
            t.input_grad_flops += e.input_grad_flops;
            t.weight_grad_flops += e.weight_grad_flops;
            t.validation_flops += e.validation_flops;
            t.allreduce_bytes += e.allreduce_bytes;
        }
        steps.insert(e.step);
        t.audits_passed += e.audits_passed as u64;
        t.audits_failed += e.audits_failed as u64;
        t.tokens += e.tokens;
        t.micro_batches += e.micro_batches.len() as u64;
        t.stages.insert(e.stage);
    }
    by.into_values()
        .map(|(mut t, steps)| {
            t.steps = steps.len() as u64;
            t
        })
        .collect()
}

/// The shares of identities with `totals` over a window of `window_steps`
/// booked steps, sorted by share (largest first), then identity.
pub fn shares(totals: &[Totals], window_steps: u64, rewards: &RewardsSpec) -> Vec<Share> {
    let w = &rewards.weights;
    let mut out: Vec<Share> = totals
        .iter()
        .map(|t| {
            let participation = if window_steps == 0 {
                0.0
            } else {
                t.steps as f64 / window_steps as f64
            };
            let clean = t.audits_failed == 0 && t.forfeited == 0;
            let eligible = clean && participation >= rewards.min_participation;
            let credit = if !clean {
                0.0
            } else {
                w.forward * t.forward_flops
                    + w.input_gradient * t.input_grad_flops
                    + w.weight_gradient * t.weight_grad_flops
                    + w.validation * t.validation_flops
                    + w.all_reduce_per_byte * t.allreduce_bytes as f64
            };
            Share {
                identity: t.identity.clone(),
                fingerprint: crate::identity::fingerprint_hex(&t.identity),
                stages: t.stages.iter().copied().collect(),
                micro_batches: t.micro_batches,
                tokens: t.tokens,
                flops: t.forward_flops
                    + t.input_grad_flops
                    + t.weight_grad_flops
                    + t.validation_flops,
                allreduce_bytes: t.allreduce_bytes,
                steps: t.steps,
                audits_passed: t.audits_passed,
                audits_failed: t.audits_failed,
                forfeited: t.forfeited,
                credit,
                eligible,
                share: 0.0,
            }
        })
        .collect();
    let pool: f64 = out.iter().filter(|s| s.eligible).map(|s| s.credit).sum();
    for s in &mut out {
        s.share = if s.eligible && pool > 0.0 {
            s.credit / pool
        } else {
            0.0
        };
    }
    out.sort_by(|a, b| {
        b.share
            .total_cmp(&a.share)
            .then_with(|| a.identity.cmp(&b.identity))
    });
    out
}
