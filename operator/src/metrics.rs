//! Prometheus metrics of the operator, served as text on `/metrics`:
//!
//! - `pipewright_operator_reconciles_total`
//! - `pipewright_operator_reconcile_errors_total`
//! - `pipewright_operator_reconcile_duration_seconds` (histogram)
//! - `pipewright_operator_runs{phase}`: runs by phase, counted when scraped
//! - `pipewright_operator_shard_reassignments_total`

use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::reflector::Store;
use pipewright_spec::{RunPhase, TrainingRunResource};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Label set of the runs gauge.
type PhaseLabel = Vec<(String, String)>;

/// Every phase a run can be in, as the gauge reports them.
const PHASES: [(RunPhase, &str); 6] = [
    (RunPhase::Pending, "Pending"),
    (RunPhase::Running, "Running"),
    (RunPhase::Degraded, "Degraded"),
    (RunPhase::Suspended, "Suspended"),
    (RunPhase::Succeeded, "Succeeded"),
    (RunPhase::Failed, "Failed"),
];

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that returned an error.
    pub reconcile_errors: Counter,
    /// How long reconciles take.
    pub reconcile_duration: Histogram,
    /// Runs by phase.
    pub runs: Family<PhaseLabel, Gauge>,
    /// Shards moved to a new pod.
    pub shard_reassignments: Counter,
    run_store: Mutex<Option<Store<TrainingRunResource>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pipewright_operator");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "Reconciles of TrainingRuns",
            reconciles.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried",
            reconcile_errors.clone(),
        );
        // 1 ms to about 16 s.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "reconcile_duration",
            "Time taken by one reconcile",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let runs = Family::<PhaseLabel, Gauge>::default();
        registry.register("runs", "TrainingRuns by phase", runs.clone());
        let shard_reassignments = Counter::default();
        registry.register(
            "shard_reassignments",
            "Shards moved to a new pod after their pod or node failed",
            shard_reassignments.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            runs,
            shard_reassignments,
            run_store: Mutex::new(None),
        }
    }

    /// Counts one reconcile that took `elapsed`.
    pub fn observe_reconcile(&self, elapsed: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.reconcile_errors.inc();
        }
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    /// The runs the gauge counts when scraped.
    pub fn set_run_store(&self, store: Store<TrainingRunResource>) {
        if let Ok(mut slot) = self.run_store.lock() {
            *slot = Some(store);
        }
    }

    /// Counts runs by phase (a run without a status yet is `Pending`).
    pub fn count_runs<'a>(&self, runs: impl IntoIterator<Item = &'a TrainingRunResource>) {
        let mut counts = [0i64; PHASES.len()];
        for run in runs {
            let phase = run
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(RunPhase::Pending);
            if let Some(i) = PHASES.iter().position(|(p, _)| *p == phase) {
                counts[i] += 1;
            }
        }
        for ((_, name), count) in PHASES.iter().zip(counts) {
            self.runs
                .get_or_create(&vec![("phase".to_owned(), (*name).to_owned())])
                .set(count);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let store = self.run_store.lock().ok().and_then(|s| s.clone());
        if let Some(store) = store {
            let runs = store.state();
            self.count_runs(runs.iter().map(AsRef::as_ref));
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::run;
    use pipewright_spec::TrainingRunStatus;

    #[test]
    fn renders_every_metric_with_its_prometheus_name() {
        let metrics = Metrics::new();
        metrics.observe_reconcile(Duration::from_millis(3), false);
        metrics.observe_reconcile(Duration::from_millis(5), true);
        metrics.shard_reassignments.inc_by(2);
        let mut running = run(2, 1);
        running.status = Some(TrainingRunStatus {
            phase: Some(RunPhase::Running),
            ..TrainingRunStatus::default()
        });
        metrics.count_runs([&running, &run(1, 1)]);
        let text = metrics.render();
        for line in [
            "pipewright_operator_reconciles_total 2",
            "pipewright_operator_reconcile_errors_total 1",
            "pipewright_operator_reconcile_duration_seconds_count 2",
            "pipewright_operator_shard_reassignments_total 2",
            "pipewright_operator_runs{phase=\"Running\"} 1",
            "pipewright_operator_runs{phase=\"Pending\"} 1",
            "pipewright_operator_runs{phase=\"Failed\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
    }

    #[test]
    fn every_metric_is_in_the_metrics_table() {
        let doc = include_str!("../../docs/metrics.md");
        let metrics = Metrics::new();
        metrics.count_runs([&run(1, 1)]);
        let text = metrics.render();
        let mut families = 0;
        for (name, kind) in text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
        {
            families += 1;
            let row = if kind == "counter" {
                format!("`{name}_total` | counter |")
            } else {
                format!("`{name}` | {kind} |")
            };
            assert!(doc.contains(&row), "docs/metrics.md lacks {row}");
        }
        assert_eq!(families, 5);
    }
}
