//! Contribution audits, the coordinator's part (a child of the audits'
//! module, on the same open steps, orders, deadlines and convictions).
//!
//! Under a robust aggregation (`median`, `trimmedMean`, `centeredClip`)
//! the replicas of a stage all-gather each other's whole gradient
//! contribution, and each worker signs, in its step commitment, the hash of
//! the contribution it sent. A contribution audit checks that claim:
//!
//! * **Draw.** Once every report of a step is in and the digests agree,
//!   each training shard of a stage with another training replica is
//!   audited with probability `contributionAuditRate` (from the same
//!   coordinator-only stream as micro-batch audits), and so is every
//!   replica that another replica of its stage reported as suspect in that
//!   step (at most one contribution audit per shard and step). A rate of 0
//!   turns them off, suspicions included.
//! * **Validators.** The audited replica's two ring neighbours, the ones
//!   that receive its contribution straight from it: the first drawn at
//!   random, the other one the second validator. With two replicas there
//!   is one neighbour only.
//! * **Evidence.** The audited worker uploads the payloads of every
//!   micro-batch it ran in one set; each micro-batch is checked as for a
//!   micro-batch audit, and the set must be exactly the audit's scope.
//! * **Verdict.** A validator reports the hash of the contribution it
//!   recomputed from the evidence and the hash of the one it received in
//!   the gather, signed. Both equal to the committed hash pass.
//! * **Receipts need proof.** A validator that says it received another
//!   contribution than the committed one must first show the coordinator
//!   the frames it received (`PUT /v1/audit/{audit}/receipt`,
//!   `sync::receipt`): each signed by the audited replica for this step
//!   and epoch, together its whole contribution. A proved receipt of
//!   another contribution convicts at once: the replica signed one
//!   contribution's frames and committed to another, and its own
//!   signatures say so. A receipt claimed without proof is refused and
//!   counted (`unproven_receipt`) and struck from the verdict, so two
//!   colluding neighbours cannot convict an honest replica by saying it
//!   sent them something else.
//! * **Recomputations.** Otherwise the second validator reports: its
//!   recomputation equal to the commitment passes the audit where the
//!   first one's was too (a receipt struck or not kept leaves nothing
//!   disputed) and overturns the first verdict where it was not. The two
//!   recomputed hashes equal to each other and not to the commitment say
//!   the worker signed a contribution its work does not give; two
//!   colluding neighbours could say so of an honest worker, so the
//!   coordinator (where it validates) recomputes the step itself from the
//!   uploaded parameters of before the step (checked against the digest
//!   the replicas agreed on) and the evidence: equal to the commitment,
//!   both validators are refused (`overturned_verdict`); equal to theirs,
//!   the worker is convicted; where it cannot recompute, the two verdicts
//!   convict. Anything else leaves the audit unconfirmed and the step is
//!   trained again. With two replicas (one neighbour) the coordinator is
//!   the second validator: a recomputation equal to the commitment passes
//!   (nothing proved otherwise), the coordinator's recomputation equal to
//!   the validator's convicts, equal to the commitment overturns a
//!   disputed recomputation.

use std::collections::BTreeMap;

use super::{draw, short, unit, Audit, Check, Kind, Next, Outcome, Verdict};
use crate::coord::api::MicroBatchCommit;
use crate::coord::state::Coordinator;
use crate::pipeline::Evidence;

/// The hash a validator reports for what it could not recompute, or for
/// what it did not receive (no report of the gather).
pub(super) const NO_REPORT: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What one contribution audit covers.
#[derive(Clone, Debug)]
pub(super) struct Scope {
    /// The audited replica's micro-batches with their committed hashes, in
    /// its commitment's order.
    pub(super) micro_batches: Vec<MicroBatchCommit>,
    /// The contribution hash it committed to (64 lowercase hex digits).
    pub(super) committed: String,
    /// Its other ring neighbour, the second validator (`None`: the stage
    /// has two training replicas, so one neighbour only).
    pub(super) second: Option<usize>,
    /// The replicas that reported it suspect in the step, with the reason
    /// (empty: drawn at random).
    pub(super) suspected_by: Vec<(usize, &'static str)>,
}

impl Scope {
    /// The micro-batch indices, in the commitment's order.
    pub(super) fn indices(&self) -> Vec<u64> {
        self.micro_batches.iter().map(|m| m.mb).collect()
    }

    /// The first micro-batch (an order's `mb` field; 0 when none).
    pub(super) fn first_mb(&self) -> u64 {
        self.micro_batches.first().map_or(0, |m| m.mb)
    }

    /// A conviction's evidence: what was committed, what each validator
    /// recomputed and received (with the frames it proved receiving), and
    /// who they are; with `redone`, the hash
    /// the coordinator recomputed.
    pub(super) fn evidence_json(
        &self,
        audit: u64,
        checks: &[Check],
        validators: &[&str],
        redone: Option<&str>,
    ) -> serde_json::Value {
        let (mut recomputed, mut received) = (Vec::new(), Vec::new());
        // How many signed frames each validator showed of what it received
        // (none: it proved no receipt).
        let proved: Vec<Option<usize>> = checks
            .iter()
            .map(|c| c.receipt.as_ref().map(|r| r.frames))
            .collect();
        for c in checks {
            match &c.verdict {
                Some(Verdict::Contribution {
                    recomputed: r,
                    received: x,
                }) => {
                    recomputed.push(Some(r.clone()));
                    received.push(Some(x.clone()));
                }
                _ => {
                    recomputed.push(None);
                    received.push(None);
                }
            }
        }
        let suspected_by: Vec<serde_json::Value> = self
            .suspected_by
            .iter()
            .map(|(replica, reason)| serde_json::json!({"replica": replica, "reason": reason}))
            .collect();
        let mut j = serde_json::json!({
            "audit": audit,
            "contribution": self.committed,
            "micro_batches": self.indices(),
            "recomputed": recomputed,
            "received": received,
            "receipt_frames": proved,
            "validators": validators,
            "suspected_by": suspected_by,
        });
        if let Some(h) = redone {
            let role = if checks.len() == 1 {
                "second_validator"
            } else {
                "confirmed_by"
            };
            j[role] = "coordinator".into();
            j["coordinator"] = h.into();
        }
        j
    }
}

impl Audit {
    /// The verdict rule of a contribution audit (see the module's
    /// documentation).
    pub(super) fn decide_contribution(&self, step: u64, scope: &Scope) -> Next {
        let c = scope.committed.as_str();
        // A receipt of another contribution than the committed one counts
        // only with its proof (the frames, signed by the audited replica);
        // without, it is struck.
        let verdict = |k: usize| {
            let check = self.checks.get(k)?;
            match &check.verdict {
                Some(Verdict::Contribution {
                    recomputed,
                    received,
                }) => Some((recomputed.as_str(), check.received(received, c))),
                _ => None,
            }
        };
        // The coordinator's own recomputation: `None` none asked for,
        // `Some(None)` under way, `Some(Some(None))` it could not.
        let redone = self.referee.as_ref().map(|r| match &r.result {
            None => None,
            Some(Ok(Verdict::Contribution { recomputed, .. })) => Some(Some(recomputed.as_str())),
            Some(_) => Some(None),
        });
        let Some((r1, x1)) = verdict(0) else {
            return Next::Wait;
        };
        if r1 == c && x1 == c {
            return Next::Decided(Outcome::Passed);
        }
        let head = format!(
            "stage {} replica {} signed contribution {} for step {step}",
            self.stage,
            self.replica,
            short(c)
        );
        let fingerprint = |k: usize| crate::identity::fingerprint_hex(&self.checks[k].identity);
        // A proved receipt of another contribution: the replica signed the
        // frames of one contribution and committed to another. The
        // signatures are the proof; no second opinion is needed.
        let proved = |k: usize, x: &str| {
            let frames = self.checks[k].receipt.as_ref().map_or(0, |r| r.frames);
            Next::Decided(Outcome::Convicted(
                "failed_audit",
                format!(
                    "{head}, but sent another one: validator {} showed the {frames} frames it \
                     received of it, signed by it, and they make {}",
                    fingerprint(k),
                    short(x)
                ),
            ))
        };
        if x1 != c && x1 != NO_REPORT {
            return proved(0, x1);
        }
        if self.checks.len() == 1 {
            // With two ring neighbours, the other one is called (where it
            // is gone, the coordinator is, as with one).
            if scope.second.is_some() && redone.is_none() {
                return Next::Second;
            }
            // One ring neighbour only (two replicas): the coordinator is
            // the second validator where it can recompute. A recomputation
            // that gives the commitment, with no receipt (none kept, or an
            // unproved one struck), leaves nothing to dispute.
            if r1 == c {
                return Next::Decided(Outcome::Passed);
            }
            return match redone {
                None => Next::Second,
                Some(None) => Next::Wait,
                Some(Some(None)) => Next::Decided(Outcome::Unconfirmed),
                // Its recomputation gives the commitment: the validator's
                // recomputed hash is refuted.
                Some(Some(Some(h))) if h == c => Next::Decided(Outcome::Overturned),
                Some(Some(Some(h))) if h == r1 && r1 != NO_REPORT => {
                    Next::Decided(Outcome::Convicted(
                        "failed_audit",
                        format!(
                            "{head}, but its work does not give it: validator {} and the \
                             coordinator both recomputed {} from its evidence",
                            fingerprint(0),
                            short(r1)
                        ),
                    ))
                }
                Some(Some(Some(_))) => Next::Decided(Outcome::Unconfirmed),
            };
        }
        let Some((r2, x2)) = verdict(1) else {
            return Next::Wait;
        };
        if x2 != c && x2 != NO_REPORT {
            return proved(1, x2);
        }
        // The second recomputation gives the commitment and neither
        // validator proved a receipt of anything else: the first verdict's
        // recomputation, if it disputed the commitment, is refuted.
        if r2 == c {
            return Next::Decided(if r1 == c {
                Outcome::Passed
            } else {
                Outcome::Overturned
            });
        }
        let validators = format!("validators {} and {}", fingerprint(0), fingerprint(1));
        // A validator that could not recompute, or has no report of the
        // gather, says 64 zeros: two of them agreeing on that prove nothing.
        if r1 == r2 && r1 != c && r1 != NO_REPORT {
            // Two validators agree the work does not give the commitment.
            // Two colluding neighbours could agree on a lie, so the
            // coordinator recomputes the step too before anyone is
            // convicted, where it can.
            let convict = |confirmed: &str| {
                Outcome::Convicted(
                    "failed_audit",
                    format!(
                        "{head}, but its work does not give it: {validators} both recomputed \
                         {} from its evidence{confirmed}",
                        short(r1)
                    ),
                )
            };
            return match redone {
                None => Next::Confirm(convict("")),
                Some(None) => Next::Wait,
                // It cannot recompute here: the two validators' word stands.
                Some(Some(None)) => Next::Decided(convict("")),
                Some(Some(Some(h))) if h == c => Next::Decided(Outcome::Overturned),
                Some(Some(Some(h))) if h == r1 => {
                    Next::Decided(convict("; the coordinator's recomputation agrees"))
                }
                Some(Some(Some(_))) => Next::Decided(Outcome::Unconfirmed),
            };
        }
        Next::Decided(Outcome::Unconfirmed)
    }
}

impl Coordinator {
    /// Sets the probability a shard's contribution is audited at each step
    /// (the effective `spec.validation.contributionAuditRate`: 0, the state
    /// machine's default, turns contribution audits off, suspicions
    /// included). It matters only with [`Coordinator::with_robust_aggregation`].
    pub fn with_contribution_audit_rate(mut self, rate: f64) -> Self {
        self.audits.contribution_rate = if rate.is_finite() {
            rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Says whether the replicas combine gradients by a robust rule
    /// (`spec.pipeline.aggregation` other than `mean`): every step report
    /// of a stage with two or more training replicas must then commit to
    /// its contribution, and contributions can be audited.
    pub fn with_robust_aggregation(mut self, robust: bool) -> Self {
        self.audits.robust = robust;
        self
    }

    /// Whether the replicas combine gradients by a robust rule.
    pub(in crate::coord) fn robust_aggregation(&self) -> bool {
        self.audits.robust
    }

    /// Contribution audit decisions by stage and outcome (`passed`,
    /// `failed`, `overturned`, `unconfirmed`).
    pub fn contribution_audit_outcomes(&self) -> &BTreeMap<(usize, &'static str), u64> {
        &self.audits.contribution_outcomes
    }

    /// Suspicions reported by the replicas, by suspected stage and reason
    /// (`cosine`, `norm_ratio`): one per reporting replica, suspected
    /// replica and step whose reports all came in.
    pub fn contribution_suspicions(&self) -> &BTreeMap<(usize, &'static str), u64> {
        &self.audits.suspicions
    }

    /// Counts the suspicions reported for `step` and draws its contribution
    /// audits (ids not yet given).
    pub(super) fn draw_contribution_audits(&mut self, step: u64) -> Vec<Audit> {
        let r = self.layout.replicas;
        let lanes: Vec<usize> = self
            .plan
            .as_ref()
            .filter(|p| p.epoch == self.epoch)
            .map(|p| p.lanes.clone())
            .unwrap_or_default();
        let rate = self.audits.contribution_rate;
        let mut list = Vec::new();
        for stage in 0..self.layout.stages {
            // The ring joins the stage's training replicas in replica order
            // (as the wiring's `ring_next` does).
            let ring: Vec<usize> = lanes
                .iter()
                .copied()
                .filter(|&x| x < r && self.slots[self.idx(stage, x)].is_some())
                .collect();
            let mut suspected: BTreeMap<usize, Vec<(usize, &'static str)>> = BTreeMap::new();
            for &x in &ring {
                let Some(c) = self.commit_of(stage, x, step) else {
                    continue;
                };
                for &(y, reason) in &c.suspects {
                    if y != x && ring.contains(&y) {
                        suspected.entry(y).or_default().push((x, reason));
                    }
                }
            }
            for by in suspected.values() {
                for &(_, reason) in by {
                    *self.audits.suspicions.entry((stage, reason)).or_default() += 1;
                }
            }
            if !self.audits.robust || rate <= 0.0 || ring.len() < 2 {
                continue;
            }
            for (at, &replica) in ring.iter().enumerate() {
                let Some((worker, c)) = self
                    .slots
                    .get(self.idx(stage, replica))
                    .and_then(Option::as_ref)
                    .and_then(|s| Some((s.worker, self.commit_of(stage, replica, step)?)))
                else {
                    continue;
                };
                let Some(committed) = c.contribution.clone() else {
                    continue;
                };
                let key = &self.audits.secret;
                let pick = |what| draw(key, self.epoch, step, stage, replica, what);
                let suspected_by = suspected.remove(&replica).unwrap_or_default();
                if suspected_by.is_empty() && unit(pick("contribution")) >= rate {
                    continue;
                }
                let n = ring.len();
                let (next, prev) = (ring[(at + 1) % n], ring[(at + n - 1) % n]);
                let neighbours = if next == prev {
                    vec![next]
                } else {
                    vec![next, prev]
                };
                let k = (pick("contribution validator") % neighbours.len() as u64) as usize;
                let first = neighbours[k];
                let second = neighbours
                    .get(1 - k)
                    .copied()
                    .filter(|_| neighbours.len() == 2);
                let Some(v) = self.slots[self.idx(stage, first)].as_ref() else {
                    continue;
                };
                list.push(Audit {
                    id: 0,
                    stage,
                    replica,
                    worker,
                    kind: Kind::Contribution(Scope {
                        micro_batches: c.hashes.clone(),
                        committed,
                        second,
                        suspected_by,
                    }),
                    evidence: None,
                    bad_uploads: 0,
                    referee: None,
                    checks: vec![Check {
                        worker: v.worker,
                        identity: v.identity.clone(),
                        verdict: None,
                        receipt: None,
                    }],
                    outcome: None,
                });
            }
        }
        list
    }

    /// What is wrong with `bytes` as the evidence set of an audit of
    /// `micro_batches` (with their commitments) at `stage` in `step`
    /// (`None`: nothing): not a set of at most `max` bytes per micro-batch,
    /// not exactly those micro-batches, or a micro-batch whose payloads do
    /// not match its own and its neighbours' commitments.
    pub(super) fn evidence_set_problem(
        &self,
        stage: usize,
        step: u64,
        micro_batches: &[MicroBatchCommit],
        bytes: &[u8],
        max: usize,
    ) -> Option<String> {
        let limit = max.saturating_mul(micro_batches.len().max(1));
        let set = match Evidence::decode_set(bytes, limit) {
            Ok(set) => set,
            Err(e) => return Some(e.to_string()),
        };
        let mut want: Vec<u64> = micro_batches.iter().map(|m| m.mb).collect();
        want.sort_unstable();
        let got: Vec<u64> = set.keys().copied().collect();
        if got != want {
            return Some(format!(
                "the set holds micro-batches {got:?}, the audit covers {want:?}"
            ));
        }
        micro_batches.iter().find_map(|m| {
            let ev = set.get(&m.mb)?;
            self.evidence_problem(stage, m.mb, step, &super::Hashes::of(m), ev)
                .map(|p| format!("micro-batch {}: {p}", m.mb))
        })
    }
}
