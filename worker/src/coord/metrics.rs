//! The coordinator's Prometheus metrics (prometheus-client): the run's
//! progress and every shard's standing, read from its status when scraped,
//! the ledger's contributions, and counts of API requests. Every metric is
//! listed in `docs/metrics.md`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use axum::http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::server::{lock, Shared};
use super::state::{Phase, Status};

type Labels = Vec<(String, String)>;

/// Every metric the coordinator exports, registered under `pipewright_`.
pub(super) struct Metrics {
    registry: Registry,
    step: Gauge,
    loss: Gauge<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
    steps: Gauge,
    checkpoint_step: Gauge,
    epoch: Gauge,
    reassignments: Counter,
    recoveries: Counter,
    recovery_seconds: Counter<f64, AtomicU64>,
    last_recovery: Gauge<f64, AtomicU64>,
    workers: Gauge,
    standby: Gauge,
    phase: Family<Labels, Gauge>,
    bubble: Family<Labels, Gauge<f64, AtomicU64>>,
    requests: Family<Labels, Counter>,
    rejected: Counter,
    panics: Counter,
    shard_micro_batches: Family<Labels, Gauge>,
    shard_live: Family<Labels, Gauge>,
    heartbeat_age: Family<Labels, Gauge<f64, AtomicU64>>,
    shard_step_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    seconds_per_micro_batch: Family<Labels, Gauge<f64, AtomicU64>>,
    reward_share: Family<Labels, Gauge<f64, AtomicU64>>,
    contribution_flops: Family<Labels, Counter<f64, AtomicU64>>,
    refused_reports: Family<Labels, Counter>,
    memory_refusals: Family<Labels, Counter>,
    digest_mismatches: Family<Labels, Counter>,
    audits: Family<Labels, Counter>,
    quarantined: Gauge,
    audit_seconds: Histogram,
    /// Audit decisions already observed in `audit_seconds`.
    audits_observed: AtomicU64,
    chain_mismatches: Family<Labels, Counter>,
    contribution_audits: Family<Labels, Counter>,
    contribution_suspicions: Family<Labels, Counter>,
    coordinator_recomputations: Family<Labels, Counter>,
    coordinator_recompute_seconds: Counter<f64, AtomicU64>,
}

/// The outcomes of an audit (the `outcome` label of
/// `pipewright_audits_total`).
const AUDIT_OUTCOMES: [&str; 4] = ["passed", "failed", "overturned", "unconfirmed"];

/// Why a replica reports another's contribution suspect (the `reason`
/// label of `pipewright_contribution_suspicions_total`).
const SUSPICION_REASONS: [&str; 2] = ["cosine", "norm_ratio"];

/// How the coordinator's own recomputation of a disputed micro-batch ended
/// (the `outcome` label of `pipewright_coordinator_recomputations_total`).
const RECOMPUTE_OUTCOMES: [&str; 7] = [
    "passed",
    "convicted",
    "overturned",
    "unconfirmed",
    "failed",
    "refused_weights",
    "wrong_update",
];

/// Upper bounds of `pipewright_audit_seconds`' buckets.
const AUDIT_SECONDS_BUCKETS: [f64; 11] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

/// Why a registration or step report is refused (the `reason` label of
/// `pipewright_refused_reports_total`): a bad registration proof, an
/// identity already holding a shard, no commitment, a step already
/// reported, micro-batches the route did not give, fewer than it gave, a
/// parameters' digest or contribution hash that is not one (or no
/// contribution hash under a robust aggregation), a digest its stage's majority
/// outvoted; audit evidence that does not match the commitments, a
/// recomputation that convicted the audited worker, a validator's verdict
/// overturned by a second validator, a malformed audit report, and a
/// micro-batch whose sender's output and receiver's input hashes differ;
/// a signed pipeline frame that fails the receiver's screen (its author
/// convicted), a complaint that is malformed or whose frame's signature
/// does not verify, one whose frame passes the screen, and a broken step's
/// signed activation that two validators' recheck does not reproduce;
/// parameters uploaded for the coordinator's recomputation that are not
/// the ones the stage's replicas committed; a signed targets frame whose
/// first stage's origin does not verify (its author convicted); an
/// optimizer update of a stage with one training replica that the
/// coordinator's replay does not reproduce (its worker convicted); a
/// contribution audit's proof of receipt that does not verify, and a
/// receipt claimed without one.
const REFUSAL_REASONS: [&str; 22] = [
    "signature",
    "identity",
    "unsigned",
    "replayed",
    "unrouted",
    "incomplete",
    "malformed_digest",
    "digest_mismatch",
    "bad_evidence",
    "failed_audit",
    "overturned_verdict",
    "audit_report",
    "chain_mismatch",
    "refused_frame",
    "complaint",
    "unfounded_complaint",
    "failed_recheck",
    "bad_weights",
    "altered_targets",
    "wrong_update",
    "bad_receipt",
    "unproven_receipt",
];

/// What a scrape adds to the status: the ledger's figures and the
/// coordinator's memory refusals.
#[derive(Default)]
pub(super) struct LedgerFigures {
    /// Verified FLOPs booked per identity fingerprint, the whole run.
    pub(super) flops: Vec<(String, f64)>,
    /// Reward share per identity fingerprint.
    pub(super) shares: Vec<(String, f64)>,
    /// Refused reports by reason.
    pub(super) refused: Vec<(String, u64)>,
    /// Not the ledger's: volunteers the coordinator kept from a stage for
    /// lack of memory, by stage.
    pub(super) memory_refusals: BTreeMap<usize, u64>,
    /// Not the ledger's: parameter digest disagreements, by stage.
    pub(super) digest_mismatches: BTreeMap<usize, u64>,
    /// Not the ledger's: audit decisions by stage and outcome.
    pub(super) audits: BTreeMap<(usize, &'static str), u64>,
    /// Not the ledger's: audits decided in all, and the seconds from draw
    /// to decision of those not yet observed.
    pub(super) audits_decided: u64,
    pub(super) audit_seconds: Vec<f64>,
    /// Not the ledger's: identities quarantined.
    pub(super) quarantined: usize,
    /// Not the ledger's: chain mismatches by receiving stage.
    pub(super) chain_mismatches: BTreeMap<usize, u64>,
    /// Not the ledger's: contribution audit decisions by stage and outcome.
    pub(super) contribution_audits: BTreeMap<(usize, &'static str), u64>,
    /// Not the ledger's: suspicions reported by suspected stage and reason.
    pub(super) contribution_suspicions: BTreeMap<(usize, &'static str), u64>,
    /// Not the ledger's: the coordinator's recomputations by stage and
    /// outcome, and their seconds in all.
    pub(super) coordinator_recomputations: BTreeMap<(usize, &'static str), u64>,
    pub(super) coordinator_recompute_seconds: f64,
}

impl Metrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("pipewright");
        let m = Metrics {
            registry: Registry::default(),
            step: Gauge::default(),
            loss: Gauge::default(),
            tokens_per_second: Gauge::default(),
            steps: Gauge::default(),
            checkpoint_step: Gauge::default(),
            epoch: Gauge::default(),
            reassignments: Counter::default(),
            recoveries: Counter::default(),
            recovery_seconds: Counter::default(),
            last_recovery: Gauge::default(),
            workers: Gauge::default(),
            standby: Gauge::default(),
            phase: Family::default(),
            bubble: Family::default(),
            requests: Family::default(),
            rejected: Counter::default(),
            panics: Counter::default(),
            shard_micro_batches: Family::default(),
            shard_live: Family::default(),
            heartbeat_age: Family::default(),
            shard_step_seconds: Family::default(),
            seconds_per_micro_batch: Family::default(),
            reward_share: Family::default(),
            contribution_flops: Family::default(),
            refused_reports: Family::default(),
            memory_refusals: Family::default(),
            digest_mismatches: Family::default(),
            audits: Family::default(),
            quarantined: Gauge::default(),
            audit_seconds: Histogram::new(AUDIT_SECONDS_BUCKETS),
            audits_observed: AtomicU64::new(0),
            chain_mismatches: Family::default(),
            contribution_audits: Family::default(),
            contribution_suspicions: Family::default(),
            coordinator_recomputations: Family::default(),
            coordinator_recompute_seconds: Counter::default(),
        };
        registry.register("step", "Steps completed by every worker", m.step.clone());
        registry.register(
            "loss",
            "Mean training loss of the last committed step",
            m.loss.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Training tokens per second over recent steps",
            m.tokens_per_second.clone(),
        );
        registry.register("run_steps", "Steps the run trains for", m.steps.clone());
        registry.register(
            "checkpoint_step",
            "Step of the last committed checkpoint (0: none yet)",
            m.checkpoint_step.clone(),
        );
        registry.register("epoch", "Wiring generation of the run", m.epoch.clone());
        registry.register(
            "reassignments",
            "Shards given to a new worker after theirs was lost",
            m.reassignments.clone(),
        );
        registry.register(
            "recoveries",
            "Recoveries from a lost shard: from the loss until the new epoch's first step committed",
            m.recoveries.clone(),
        );
        registry.register(
            "recovery_seconds",
            "Seconds the run spent recovering from lost shards",
            m.recovery_seconds.clone(),
        );
        registry.register(
            "last_recovery_seconds",
            "Seconds the last recovery took (NaN before the first)",
            m.last_recovery.clone(),
        );
        registry.register(
            "workers_live",
            "Shards with a live worker",
            m.workers.clone(),
        );
        registry.register(
            "standby_workers",
            "Volunteers waiting for a vacancy",
            m.standby.clone(),
        );
        registry.register("phase", "1 for the run's current phase", m.phase.clone());
        registry.register(
            "stage_bubble_ratio",
            "Fraction of its last step a stage's slowest worker waited",
            m.bubble.clone(),
        );
        registry.register("requests", "API requests by endpoint", m.requests.clone());
        registry.register(
            "rejected_requests",
            "Requests refused for a missing or wrong join token or a malformed body",
            m.rejected.clone(),
        );
        registry.register(
            "handler_panics",
            "API request handlers that panicked (answered 500; the coordinator goes on)",
            m.panics.clone(),
        );
        registry.register(
            "shard_micro_batches",
            "Micro-batches a shard ran in its last step (its share under routing: throughput)",
            m.shard_micro_batches.clone(),
        );
        registry.register(
            "shard_live",
            "1 while a shard has a live worker, 0 while it is vacant",
            m.shard_live.clone(),
        );
        registry.register(
            "shard_heartbeat_age_seconds",
            "Seconds since a shard's worker was last heard from",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "shard_last_step_seconds",
            "Wall time of a shard's last step, as its worker reported it",
            m.shard_step_seconds.clone(),
        );
        registry.register(
            "shard_seconds_per_micro_batch",
            "A shard's smoothed compute seconds per micro-batch, which routing weighs",
            m.seconds_per_micro_batch.clone(),
        );
        registry.register(
            "reward_share",
            "A contributor's share of the reward pool over the ledger's window (0..1)",
            m.reward_share.clone(),
        );
        registry.register(
            "contribution_flops",
            "Verified FLOPs booked in the ledger for a contributor",
            m.contribution_flops.clone(),
        );
        registry.register(
            "refused_reports",
            "Registrations and step reports refused (forged, replayed, unrouted, unsigned)",
            m.refused_reports.clone(),
        );
        registry.register(
            "memory_refusals",
            "Volunteers kept from a vacant shard of a stage whose planned memory exceeds what they have available",
            m.memory_refusals.clone(),
        );
        registry.register(
            "digest_mismatches",
            "Replicas of a stage whose parameters' digest differed from the majority's, and steps broken off for a disagreement without a majority",
            m.digest_mismatches.clone(),
        );
        registry.register(
            "audits",
            "Audits by recomputation decided, by the audited stage and outcome: passed, failed (the audited worker convicted), overturned (the first validator's verdict refuted by a second), unconfirmed (no second validator to decide)",
            m.audits.clone(),
        );
        registry.register(
            "quarantined_workers",
            "Identities convicted of dishonest work and barred from the run",
            m.quarantined.clone(),
        );
        registry.register(
            "audit_seconds",
            "Seconds from an audit's draw to its decision",
            m.audit_seconds.clone(),
        );
        registry.register(
            "chain_mismatches",
            "Micro-batches whose sending shard's committed output hash differs from the receiving shard's committed input hash, by receiving stage (the step is broken off and trained again)",
            m.chain_mismatches.clone(),
        );
        registry.register(
            "contribution_audits",
            "Contribution audits decided (a replica's whole step recomputed by its ring neighbours under a robust aggregation), by the audited stage and outcome: passed, failed (the audited worker convicted), overturned (the first validator's verdict refuted by the second), unconfirmed (no second validator, or the two disagree)",
            m.contribution_audits.clone(),
        );
        registry.register(
            "contribution_suspicions",
            "Replicas reported suspect by another replica of their stage, by the suspected stage and reason: cosine (its contribution points away from the aggregate), norm_ratio (its norm is far from the replicas' median); each one is contribution-audited while contribution audits are on",
            m.contribution_suspicions.clone(),
        );
        registry.register(
            "coordinator_recomputations",
            "Disputed micro-batch audits of a stage with no second validator (two replicas) that the coordinator recomputed itself, by stage and outcome: convicted (it agreed with the validator), overturned (it reproduced the commitment), unconfirmed (it agreed with neither), failed (it could not recompute, e.g. the first stage's corpus is unreadable here), refused_weights (an upload of parameters not matching the replicas' committed digest); and every audit of a stage with one training replica, which the coordinator validates alone: passed, convicted, failed, refused_weights, or wrong_update (the micro-batch reproduced, the replayed optimizer update did not)",
            m.coordinator_recomputations.clone(),
        );
        registry.register(
            "coordinator_recompute_seconds",
            "Seconds the coordinator spent on its own recomputations of disputed micro-batches (checking the uploaded parameters, building the stage, recomputing), all together",
            m.coordinator_recompute_seconds.clone(),
        );
        // Every reason shows as 0 until it happens, so a dashboard shows
        // a zero rather than no data.
        for reason in REFUSAL_REASONS {
            m.refused_reports
                .get_or_create(&vec![("reason".into(), reason.to_owned())])
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Counts one answered request to `path`. A body refused for its size
    /// is counted only as rejected: it was never read, so it reached no
    /// endpoint.
    pub(super) fn count(&self, path: &str, status: StatusCode) {
        if status != StatusCode::PAYLOAD_TOO_LARGE {
            self.requests
                .get_or_create(&vec![("path".into(), endpoint_label(path))])
                .inc();
        }
        if matches!(
            status,
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::PAYLOAD_TOO_LARGE
        ) {
            self.rejected.inc();
        }
    }

    /// Counts one request handler that panicked.
    pub(super) fn count_panic(&self) {
        self.panics.inc();
    }

    /// The metrics in Prometheus' text format, with the gauges set from `s`.
    pub(super) fn render(&self, s: &Status, ledger: &LedgerFigures) -> String {
        for (worker, flops) in &ledger.flops {
            let c = self
                .contribution_flops
                .get_or_create(&vec![("worker".into(), worker.clone())]);
            let add = flops - c.get();
            if add > 0.0 {
                c.inc_by(add);
            }
        }
        // Identities that left the window have no share any more.
        self.reward_share.clear();
        for (worker, share) in &ledger.shares {
            self.reward_share
                .get_or_create(&vec![("worker".into(), worker.clone())])
                .set(*share);
        }
        for (reason, n) in &ledger.refused {
            let c = self
                .refused_reports
                .get_or_create(&vec![("reason".into(), reason.clone())]);
            raise_to(&c, *n);
        }
        for st in &s.stages {
            let c = self
                .memory_refusals
                .get_or_create(&vec![("stage".into(), st.stage.to_string())]);
            let n = ledger.memory_refusals.get(&st.stage).copied().unwrap_or(0);
            raise_to(&c, n);
        }
        for st in &s.stages {
            let c = self
                .digest_mismatches
                .get_or_create(&vec![("stage".into(), st.stage.to_string())]);
            let n = ledger
                .digest_mismatches
                .get(&st.stage)
                .copied()
                .unwrap_or(0);
            raise_to(&c, n);
        }
        for st in &s.stages {
            for outcome in AUDIT_OUTCOMES {
                let c = self.audits.get_or_create(&vec![
                    ("stage".into(), st.stage.to_string()),
                    ("outcome".into(), outcome.to_owned()),
                ]);
                let n = ledger
                    .audits
                    .get(&(st.stage, outcome))
                    .copied()
                    .unwrap_or(0);
                raise_to(&c, n);
            }
            let c = self
                .chain_mismatches
                .get_or_create(&vec![("stage".into(), st.stage.to_string())]);
            let n = ledger.chain_mismatches.get(&st.stage).copied().unwrap_or(0);
            raise_to(&c, n);
            for outcome in AUDIT_OUTCOMES {
                let c = self.contribution_audits.get_or_create(&vec![
                    ("stage".into(), st.stage.to_string()),
                    ("outcome".into(), outcome.to_owned()),
                ]);
                let n = ledger
                    .contribution_audits
                    .get(&(st.stage, outcome))
                    .copied()
                    .unwrap_or(0);
                raise_to(&c, n);
            }
            for reason in SUSPICION_REASONS {
                let c = self.contribution_suspicions.get_or_create(&vec![
                    ("stage".into(), st.stage.to_string()),
                    ("reason".into(), reason.to_owned()),
                ]);
                let n = ledger
                    .contribution_suspicions
                    .get(&(st.stage, reason))
                    .copied()
                    .unwrap_or(0);
                raise_to(&c, n);
            }
        }
        for st in &s.stages {
            for outcome in RECOMPUTE_OUTCOMES {
                let c = self.coordinator_recomputations.get_or_create(&vec![
                    ("stage".into(), st.stage.to_string()),
                    ("outcome".into(), outcome.to_owned()),
                ]);
                let n = ledger
                    .coordinator_recomputations
                    .get(&(st.stage, outcome))
                    .copied()
                    .unwrap_or(0);
                raise_to(&c, n);
            }
        }
        let add = ledger.coordinator_recompute_seconds - self.coordinator_recompute_seconds.get();
        if add > 0.0 {
            self.coordinator_recompute_seconds.inc_by(add);
        }
        for secs in &ledger.audit_seconds {
            self.audit_seconds.observe(*secs);
        }
        self.audits_observed
            .store(ledger.audits_decided, std::sync::atomic::Ordering::Relaxed);
        self.quarantined.set(ledger.quarantined as i64);
        self.step.set(s.step as i64);
        self.steps.set(s.steps as i64);
        self.checkpoint_step
            .set(s.checkpoint_step.unwrap_or(0) as i64);
        self.loss.set(s.loss.map_or(f64::NAN, f64::from));
        self.tokens_per_second.set(s.tokens_per_second);
        self.epoch.set(s.epoch as i64);
        // The status holds the run's total, which survives a restart.
        raise_to(&self.reassignments, s.reassignments);
        raise_to(&self.recoveries, s.recoveries);
        let more = s.recovery_seconds_total - self.recovery_seconds.get();
        if more > 0.0 {
            self.recovery_seconds.inc_by(more);
        }
        self.last_recovery
            .set(s.last_recovery_seconds.unwrap_or(f64::NAN));
        self.workers
            .set(s.shards.iter().filter(|x| x.worker.is_some()).count() as i64);
        self.standby.set(s.standby as i64);
        for p in Phase::ALL {
            self.phase
                .get_or_create(&vec![("phase".into(), p.name().to_owned())])
                .set(i64::from(p == s.phase));
        }
        for st in &s.stages {
            self.bubble
                .get_or_create(&vec![("stage".into(), st.stage.to_string())])
                .set(st.bubble);
        }
        for sh in &s.shards {
            let shard = vec![
                ("stage".into(), sh.stage.to_string()),
                ("replica".into(), sh.replica.to_string()),
            ];
            self.shard_micro_batches
                .get_or_create(&shard)
                .set(sh.micro_batches as i64);
            self.shard_live
                .get_or_create(&shard)
                .set(i64::from(sh.worker.is_some()));
            self.shard_step_seconds
                .get_or_create(&shard)
                .set(sh.step_seconds);
            // A vacant shard has no heartbeat and no speed: no sample.
            match sh.seconds_since_heartbeat {
                Some(age) => {
                    self.heartbeat_age.get_or_create(&shard).set(age);
                }
                None => {
                    self.heartbeat_age.remove(&shard);
                }
            }
            match sh.seconds_per_micro_batch {
                Some(x) => {
                    self.seconds_per_micro_batch.get_or_create(&shard).set(x);
                }
                None => {
                    self.seconds_per_micro_batch.remove(&shard);
                }
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One scrape: the status now and the ledger's figures, rendered.
pub(super) fn scrape(shared: &Shared) -> String {
    let c = lock(&shared.coord);
    let status = c.status(std::time::Instant::now());
    let mut figures = LedgerFigures {
        shares: status
            .contributions
            .iter()
            .map(|x| (x.identity.clone(), x.share))
            .collect(),
        refused: c
            .refused()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        ..Default::default()
    };
    if let Some(l) = c.ledger() {
        match l.totals(1, u64::MAX) {
            Ok(totals) => {
                figures.flops = totals
                    .iter()
                    .map(|t| {
                        (
                            crate::identity::fingerprint_hex(&t.identity),
                            t.forward_flops
                                + t.input_grad_flops
                                + t.weight_grad_flops
                                + t.validation_flops,
                        )
                    })
                    .collect()
            }
            Err(e) => tracing::error!("reading the ledger for metrics: {e}"),
        }
    }
    figures.memory_refusals = c.memory_refusals().clone();
    figures.digest_mismatches = c.digest_mismatches().clone();
    figures.audits = c.audit_outcomes().clone();
    figures.audits_decided = c.audit_seconds().0;
    figures.audit_seconds = c.audit_seconds_since(
        shared
            .metrics
            .audits_observed
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    figures.quarantined = c.convictions().len();
    figures.chain_mismatches = c.chain_mismatches().clone();
    figures.contribution_audits = c.contribution_audit_outcomes().clone();
    figures.contribution_suspicions = c.contribution_suspicions().clone();
    figures.coordinator_recomputations = c.coordinator_recomputations().clone();
    figures.coordinator_recompute_seconds = c.coordinator_recompute_seconds().1;
    drop(c);
    shared.metrics.render(&status, &figures)
}

/// The `path` label of a request: the endpoint, without a stage number;
/// anything else is `other`, so strangers cannot grow the label set.
fn endpoint_label(path: &str) -> String {
    if path.starts_with("/v1/state/") {
        "/v1/state".into()
    } else if matches!(
        path,
        "/healthz"
            | "/status"
            | "/metrics"
            | "/v1/manifest"
            | "/v1/register"
            | "/v1/heartbeat"
            | "/v1/wiring"
            | "/v1/step"
            | "/v1/checkpoint"
            | "/v1/fail"
            | "/v1/challenge"
            | "/v1/ledger"
            | "/v1/audit"
    ) {
        path.into()
    } else if path.starts_with("/v1/audit/") && path.ends_with("/evidence") {
        "/v1/audit/evidence".into()
    } else if path.starts_with("/v1/audit/") && path.ends_with("/weights") {
        "/v1/audit/weights".into()
    } else if path.starts_with("/v1/audit/") && path.ends_with("/receipt") {
        "/v1/audit/receipt".into()
    } else {
        "other".into()
    }
}

/// Raises counter `c` to `total`, a running total kept elsewhere (the
/// state machine's or the ledger's): a counter only goes up, so a total
/// below it (never the case) leaves it as it is.
fn raise_to(c: &Counter, total: u64) {
    let add = total.saturating_sub(c.get());
    if add > 0 {
        c.inc_by(add);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented() {
        use pipewright_spec::coordinator::{Contribution, ShardStatus, StageStatus};
        let m = Metrics::new();
        m.count("/status", StatusCode::OK);
        let status = Status {
            run: "r".into(),
            phase: Phase::Training,
            reason: String::new(),
            step: 3,
            steps: 10,
            loss: Some(2.0),
            tokens_per_second: 100.0,
            epoch: 1,
            reassignments: 1,
            checkpoint_step: None,
            standby: 0,
            stages: vec![StageStatus {
                stage: 0,
                layers: [0, 2],
                desired: 1,
                ready: 1,
                bubble: 0.1,
            }],
            shards: vec![ShardStatus {
                stage: 0,
                replica: 0,
                worker: Some(1),
                name: Some("w".into()),
                address: None,
                state: "live".into(),
                completed: 3,
                seconds_since_heartbeat: Some(0.2),
                step_seconds: 1.0,
                busy_seconds: 0.8,
                mean_seconds: [1.0, 0.8, 0.1],
                mean_link_bytes: 0.0,
                rejected_frames: 0,
                micro_batches: 4,
                seconds_per_micro_batch: Some(0.2),
                identity: Some("00".into()),
            }],
            contributions: vec![Contribution {
                identity: "00".into(),
                name: "w".into(),
                flops: 1e9,
                micro_batches: 12,
                share: 1.0,
            }],
            refused_reports: 0,
            recoveries: 1,
            recovery_seconds_total: 2.5,
            last_recovery_seconds: Some(2.5),
            quarantined: Vec::new(),
        };
        let figures = LedgerFigures {
            flops: vec![("00".into(), 1e9)],
            shares: vec![("00".into(), 1.0)],
            refused: vec![],
            memory_refusals: [(0, 2)].into_iter().collect(),
            digest_mismatches: [(0, 1)].into_iter().collect(),
            audits: [((0, "failed"), 1)].into_iter().collect(),
            audits_decided: 2,
            audit_seconds: vec![0.5, 3.0],
            quarantined: 1,
            chain_mismatches: [(0, 2)].into_iter().collect(),
            contribution_audits: [((0, "failed"), 2)].into_iter().collect(),
            contribution_suspicions: [((0, "cosine"), 3)].into_iter().collect(),
            coordinator_recomputations: [((0, "convicted"), 1)].into_iter().collect(),
            coordinator_recompute_seconds: 0.25,
        };
        let text = m.render(&status, &figures);
        // Every family has a sample, so every family is listed below.
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, 35, "{text}");
        for line in [
            "pipewright_audits_total{stage=\"0\",outcome=\"failed\"} 1",
            "pipewright_audits_total{stage=\"0\",outcome=\"passed\"} 0",
            "pipewright_quarantined_workers 1",
            "pipewright_audit_seconds_count 2",
            "pipewright_audit_seconds_sum 3.5",
            "pipewright_chain_mismatches_total{stage=\"0\"} 2",
            "pipewright_contribution_audits_total{stage=\"0\",outcome=\"failed\"} 2",
            "pipewright_contribution_audits_total{stage=\"0\",outcome=\"unconfirmed\"} 0",
            "pipewright_contribution_suspicions_total{stage=\"0\",reason=\"cosine\"} 3",
            "pipewright_contribution_suspicions_total{stage=\"0\",reason=\"norm_ratio\"} 0",
            "pipewright_coordinator_recomputations_total{stage=\"0\",outcome=\"convicted\"} 1",
            "pipewright_coordinator_recomputations_total{stage=\"0\",outcome=\"failed\"} 0",
            "pipewright_coordinator_recompute_seconds_total 0.25",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        assert!(
            text.contains("pipewright_digest_mismatches_total{stage=\"0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pipewright_memory_refusals_total{stage=\"0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pipewright_recovery_seconds_total 2.5"),
            "{text}"
        );
        assert!(text.contains("pipewright_reassignments_total 1"), "{text}");
        let doc = include_str!("../../../docs/metrics.md");
        assert_eq!(
            crate::exposition::undocumented(&text, doc),
            Vec::<String>::new()
        );
    }
}
