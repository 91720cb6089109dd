//! The coordinator's Prometheus metrics (prometheus-client): the run's
//! progress, read from its status when scraped, and counts of API requests.

use std::sync::atomic::AtomicU64;

use axum::http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::state::{Phase, Status};

type Labels = Vec<(String, String)>;

/// Every metric the coordinator exports, registered under `pipewright_`.
pub(super) struct Metrics {
    registry: Registry,
    step: Gauge,
    loss: Gauge<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
    epoch: Gauge,
    reassignments: Gauge,
    workers: Gauge,
    phase: Family<Labels, Gauge>,
    bubble: Family<Labels, Gauge<f64, AtomicU64>>,
    requests: Family<Labels, Counter>,
    rejected: Counter,
    rejected_frames: Gauge,
    shard_micro_batches: Family<Labels, Gauge>,
    reward_share: Family<Labels, Gauge<f64, AtomicU64>>,
    contribution_flops: Family<Labels, Counter<f64, AtomicU64>>,
    refused_reports: Family<Labels, Counter>,
}

/// What the ledger adds to a scrape.
#[derive(Default)]
pub(super) struct LedgerFigures {
    /// Verified FLOPs booked per identity fingerprint, the whole run.
    pub(super) flops: Vec<(String, f64)>,
    /// Reward share per identity fingerprint.
    pub(super) shares: Vec<(String, f64)>,
    /// Refused reports by reason.
    pub(super) refused: Vec<(String, u64)>,
}

impl Metrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("pipewright");
        let m = Metrics {
            registry: Registry::default(),
            step: Gauge::default(),
            loss: Gauge::default(),
            tokens_per_second: Gauge::default(),
            epoch: Gauge::default(),
            reassignments: Gauge::default(),
            workers: Gauge::default(),
            phase: Family::default(),
            bubble: Family::default(),
            requests: Family::default(),
            rejected: Counter::default(),
            rejected_frames: Gauge::default(),
            shard_micro_batches: Family::default(),
            reward_share: Family::default(),
            contribution_flops: Family::default(),
            refused_reports: Family::default(),
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
        registry.register("epoch", "Wiring generation of the run", m.epoch.clone());
        registry.register(
            "reassignments",
            "Shards given to a new worker after theirs was lost",
            m.reassignments.clone(),
        );
        registry.register(
            "workers_live",
            "Shards with a live worker",
            m.workers.clone(),
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
            "rejected_frames",
            "Frames the live workers' links refused (malformed, forged, wrong sender) in this epoch",
            m.rejected_frames.clone(),
        );
        registry.register(
            "shard_micro_batches",
            "Micro-batches a shard ran in its last step (its share under routing: throughput)",
            m.shard_micro_batches.clone(),
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
            let add = n.saturating_sub(c.get());
            if add > 0 {
                c.inc_by(add);
            }
        }
        self.step.set(s.step as i64);
        self.loss.set(s.loss.map_or(f64::NAN, f64::from));
        self.tokens_per_second.set(s.tokens_per_second);
        self.epoch.set(s.epoch as i64);
        self.reassignments.set(s.reassignments as i64);
        self.workers
            .set(s.shards.iter().filter(|x| x.worker.is_some()).count() as i64);
        self.rejected_frames
            .set(s.shards.iter().map(|x| x.rejected_frames as i64).sum());
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
            self.shard_micro_batches
                .get_or_create(&vec![
                    ("stage".into(), sh.stage.to_string()),
                    ("replica".into(), sh.replica.to_string()),
                ])
                .set(sh.micro_batches as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
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
    ) {
        path.into()
    } else {
        "other".into()
    }
}
