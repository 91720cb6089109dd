//! A shard worker's own Prometheus metrics: its steps, how its time splits
//! into compute, waiting (the pipeline bubble and the all-reduce) and the
//! optimizer, the micro-batches it ran, and its links' traffic and refused
//! frames. Every series is a counter that survives epochs (new links, a new
//! shard), labelled by the shard it was earned on.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::link::{RejectReason, Traffic};
use crate::pipeline::WorkerStep;

type Labels = Vec<(String, String)>;

/// Where the link counters were at the last step, so each step adds only
/// what is new; reset when the links are replaced.
#[derive(Default)]
struct Baseline {
    epoch: Option<u64>,
    pipe: Traffic,
    ring: Traffic,
}

/// The worker's registry and its series.
pub struct ShardMetrics {
    registry: Registry,
    steps: Family<Labels, Counter>,
    step_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    busy: Family<Labels, Counter<f64, AtomicU64>>,
    idle: Family<Labels, Counter<f64, AtomicU64>>,
    update: Family<Labels, Counter<f64, AtomicU64>>,
    micro_batches: Family<Labels, Counter>,
    sent: Family<Labels, Counter>,
    received: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    loss: Family<Labels, Gauge<f64, AtomicU64>>,
    info: Family<Labels, Gauge>,
    baseline: Mutex<Baseline>,
}

fn step_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn shard_labels(stage: usize, replica: usize) -> Labels {
    vec![
        ("stage".into(), stage.to_string()),
        ("replica".into(), replica.to_string()),
    ]
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardMetrics {
    /// Every series registered under `pipewright_`, none with samples yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pipewright");
        let m = ShardMetrics {
            registry: Registry::default(),
            steps: Family::default(),
            step_seconds: Family::new_with_constructor(step_histogram),
            busy: Family::default(),
            idle: Family::default(),
            update: Family::default(),
            micro_batches: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            loss: Family::default(),
            info: Family::default(),
            baseline: Mutex::default(),
        };
        registry.register(
            "shard_steps",
            "Steps this worker completed",
            m.steps.clone(),
        );
        registry.register(
            "shard_step_seconds",
            "Wall time of this worker's steps (barrier round trip excluded)",
            m.step_seconds.clone(),
        );
        registry.register(
            "shard_busy_seconds",
            "Seconds this worker spent computing forwards and backwards",
            m.busy.clone(),
        );
        registry.register(
            "shard_idle_seconds",
            "Seconds of its steps this worker waited: on neighbouring stages (the bubble), the all-reduce and the norm exchange",
            m.idle.clone(),
        );
        registry.register(
            "shard_update_seconds",
            "Seconds this worker spent in the optimizer update",
            m.update.clone(),
        );
        registry.register(
            "shard_micro_batches",
            "Micro-batches this worker ran",
            m.micro_batches.clone(),
        );
        registry.register(
            "link_sent_bytes",
            "Encoded bytes this worker wrote to its links (link: pipeline or ring)",
            m.sent.clone(),
        );
        registry.register(
            "link_received_bytes",
            "Encoded bytes of valid frames this worker's links received (link: pipeline or ring)",
            m.received.clone(),
        );
        registry.register(
            "link_refused_frames",
            "Frames this worker's links refused (malformed, forged, wrong run or sender), by reason",
            m.refused.clone(),
        );
        registry.register(
            "shard_loss",
            "Training loss of this worker's last step (last stage only)",
            m.loss.clone(),
        );
        registry.register(
            "shard_info",
            "1 for the shard this worker holds, labelled with its name and identity",
            m.info.clone(),
        );
        ShardMetrics { registry, ..m }
    }

    /// Names the shard this worker now holds. Every refusal reason gets a
    /// zero sample, so a dashboard shows 0 rather than no data.
    pub fn hold(&self, stage: usize, replica: usize, name: &str, identity: &str) {
        self.info.clear();
        let mut labels = shard_labels(stage, replica);
        labels.push(("name".into(), name.to_owned()));
        labels.push(("identity".into(), identity.to_owned()));
        self.info.get_or_create(&labels).set(1);
        for reason in RejectReason::ALL {
            let mut l = shard_labels(stage, replica);
            l.push(("reason".into(), reason.name().to_owned()));
            self.refused.get_or_create(&l).inc_by(0);
        }
        for link in ["pipeline", "ring"] {
            let mut l = shard_labels(stage, replica);
            l.push(("link".into(), link.to_owned()));
            self.sent.get_or_create(&l).inc_by(0);
            self.received.get_or_create(&l).inc_by(0);
        }
    }

    /// Adds one completed step of shard (`stage`, `replica`) in `epoch`,
    /// with its links' counters now (`pipe`, `ring`, counted since the
    /// epoch's links were made).
    pub fn record_step(
        &self,
        (stage, replica): (usize, usize),
        epoch: u64,
        step: &WorkerStep,
        (pipe, ring): (Traffic, Traffic),
    ) {
        let labels = shard_labels(stage, replica);
        self.steps.get_or_create(&labels).inc();
        self.step_seconds
            .get_or_create(&labels)
            .observe(step.seconds);
        let busy = step.busy_seconds.max(0.0);
        let update = step.update_seconds.max(0.0);
        self.busy.get_or_create(&labels).inc_by(busy);
        self.update.get_or_create(&labels).inc_by(update);
        self.idle
            .get_or_create(&labels)
            .inc_by((step.seconds - busy - update).max(0.0));
        self.micro_batches
            .get_or_create(&labels)
            .inc_by(step.micro_batches as u64);
        if let Some(loss) = step.loss {
            self.loss.get_or_create(&labels).set(f64::from(loss));
        }
        self.record_links((stage, replica), epoch, (pipe, ring));
    }

    /// Adds what the links of shard (`stage`, `replica`) in `epoch` sent,
    /// received and refused since last counted (`pipe`, `ring`: their
    /// counters now). A step that broke off because a received tensor was
    /// refused counts its refusals here too.
    pub fn record_links(
        &self,
        (stage, replica): (usize, usize),
        epoch: u64,
        (pipe, ring): (Traffic, Traffic),
    ) {
        let labels = shard_labels(stage, replica);
        let mut base = match self.baseline.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if base.epoch != Some(epoch) {
            *base = Baseline {
                epoch: Some(epoch),
                ..Baseline::default()
            };
        }
        for (link, now, then) in [("pipeline", pipe, base.pipe), ("ring", ring, base.ring)] {
            let d = now.since(&then);
            let mut l = labels.clone();
            l.push(("link".into(), link.to_owned()));
            self.sent.get_or_create(&l).inc_by(d.bytes_sent);
            self.received.get_or_create(&l).inc_by(d.bytes_received);
            for reason in RejectReason::ALL {
                let n = d.rejected[reason as usize];
                if n > 0 {
                    let mut l = labels.clone();
                    l.push(("reason".into(), reason.name().to_owned()));
                    self.refused.get_or_create(&l).inc_by(n);
                }
            }
        }
        base.pipe = pipe;
        base.ring = ring;
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(seconds: f64, busy: f64, update: f64, mbs: usize) -> WorkerStep {
        WorkerStep {
            step: 0,
            loss: Some(2.5),
            grad_norm: 1.0,
            seconds,
            busy_seconds: busy,
            update_seconds: update,
            link_bytes: 0,
            micro_batches: mbs,
        }
    }

    fn traffic(sent: u64, received: u64, bad_tag: u64) -> Traffic {
        let mut t = Traffic {
            bytes_sent: sent,
            bytes_received: received,
            ..Traffic::default()
        };
        t.rejected[RejectReason::BadTag as usize] = bad_tag;
        t
    }

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
    }

    #[test]
    fn counters_add_per_step_and_survive_new_links() {
        let m = ShardMetrics::new();
        m.hold(1, 0, "pod-a", "00ff00ff00ff00ff");
        let text = m.render();
        // Every reason is there at zero before anything was refused.
        assert_eq!(
            sample(
                &text,
                "pipewright_link_refused_frames_total{stage=\"1\",replica=\"0\",reason=\"wrong_sender\"}"
            ),
            0.0
        );
        m.record_step(
            (1, 0),
            1,
            &step(1.0, 0.6, 0.1, 4),
            (traffic(1000, 800, 2), Traffic::default()),
        );
        m.record_step(
            (1, 0),
            1,
            &step(1.0, 0.7, 0.1, 4),
            (traffic(1500, 1000, 3), traffic(64, 64, 0)),
        );
        // Epoch 2: new links, whose counters start again from zero.
        m.record_step(
            (1, 0),
            2,
            &step(2.0, 1.0, 0.2, 8),
            (traffic(300, 200, 1), Traffic::default()),
        );
        let text = m.render();
        let shard = "{stage=\"1\",replica=\"0\"}";
        assert_eq!(
            sample(&text, &format!("pipewright_shard_steps_total{shard}")),
            3.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("pipewright_shard_micro_batches_total{shard}")
            ),
            16.0
        );
        let busy = sample(
            &text,
            &format!("pipewright_shard_busy_seconds_total{shard}"),
        );
        let idle = sample(
            &text,
            &format!("pipewright_shard_idle_seconds_total{shard}"),
        );
        assert!((busy - 2.3).abs() < 1e-9, "{busy}");
        assert!((idle - 1.3).abs() < 1e-9, "{idle}");
        assert_eq!(
            sample(
                &text,
                "pipewright_link_sent_bytes_total{stage=\"1\",replica=\"0\",link=\"pipeline\"}"
            ),
            1800.0
        );
        assert_eq!(
            sample(
                &text,
                "pipewright_link_received_bytes_total{stage=\"1\",replica=\"0\",link=\"ring\"}"
            ),
            64.0
        );
        assert_eq!(
            sample(
                &text,
                "pipewright_link_refused_frames_total{stage=\"1\",replica=\"0\",reason=\"bad_tag\"}"
            ),
            4.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("pipewright_shard_step_seconds_count{shard}")
            ),
            3.0
        );
        assert!(text.contains("identity=\"00ff00ff00ff00ff\""));
    }

    #[test]
    fn refusals_of_a_step_that_broke_off_are_counted() {
        let m = ShardMetrics::new();
        m.hold(1, 2, "pod-b", "00");
        let mut pipe = Traffic::default();
        pipe.rejected[RejectReason::NonFinite as usize] = 1;
        m.record_links((1, 2), 3, (pipe, Traffic::default()));
        let text = m.render();
        let series = |reason: &str| {
            format!(
                "pipewright_link_refused_frames_total{{stage=\"1\",replica=\"2\",reason=\"{reason}\"}}"
            )
        };
        assert_eq!(sample(&text, &series("non_finite")), 1.0);
        assert_eq!(sample(&text, &series("absurd_norm")), 0.0);
        // The step that follows on the same links does not count it again.
        m.record_step(
            (1, 2),
            3,
            &step(1.0, 0.5, 0.1, 2),
            (pipe, Traffic::default()),
        );
        assert_eq!(sample(&m.render(), &series("non_finite")), 1.0);
    }

    #[test]
    fn every_refusal_reason_is_documented() {
        let doc = include_str!("../../../docs/metrics.md");
        let missing: Vec<&str> = RejectReason::ALL
            .iter()
            .map(|r| r.name())
            .filter(|n| !doc.contains(&format!("`{n}`")))
            .collect();
        assert_eq!(missing, Vec::<&str>::new());
    }

    #[test]
    fn every_metric_is_documented() {
        let m = ShardMetrics::new();
        m.hold(0, 0, "a", "00");
        m.record_step((0, 0), 1, &step(1.0, 0.5, 0.1, 2), Default::default());
        let doc = include_str!("../../../docs/metrics.md");
        assert_eq!(
            crate::exposition::undocumented(&m.render(), doc),
            Vec::<String>::new()
        );
    }
}
