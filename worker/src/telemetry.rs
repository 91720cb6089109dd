//! Logs, and distributed traces of training over OTLP.
//!
//! Every command logs to stderr (`RUST_LOG` filters it). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, the coordinator (`pipewright coordinator`, and the launcher of
//! `pipewright train --processes`) and the workers (`pipewright worker`,
//! `join`) also send spans to that collector over OTLP/HTTP (protobuf):
//! services `pipewright-coordinator` and `pipewright-worker`.
//!
//! The coordinator owns one trace per training step ([`StepTraces`]): a
//! root span `step N`, opened when the step starts and closed when its
//! barrier completes. Its W3C `traceparent` rides to the workers on the
//! wiring (the first step of an epoch) and on the barrier's answer (the
//! next step); each worker parents its own spans of the step (forward,
//! backward, all-reduce, barrier, ...) on it ([`parent_on`]).
//!
//! Training spans use the target [`TARGET`] at the `TRACE` level: without
//! a collector no layer enables them and they cost nothing; with one, only
//! the OTLP layer records them, so the logs read the same either way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The `tracing` target of every training span.
pub const TARGET: &str = "pipewright_trace";

/// The variables that turn tracing on (either one, non-empty).
pub const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// Longest a process waits at exit for its last spans to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether spans go to a collector in this process.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// A training span: `span!("forward", micro_batch = 3)`, on [`TARGET`] at
/// the `TRACE` level (recorded only when traces are exported).
#[macro_export]
#[doc(hidden)]
macro_rules! __pipewright_span {
    (parent: $parent:expr, $($args:tt)*) => {
        ::tracing::span!(
            target: $crate::telemetry::TARGET,
            parent: $parent,
            ::tracing::Level::TRACE,
            $($args)*
        )
    };
    ($($args:tt)*) => {
        ::tracing::span!(target: $crate::telemetry::TARGET, ::tracing::Level::TRACE, $($args)*)
    };
}
pub use crate::__pipewright_span as span;

/// Which process sends spans: its OTLP `service.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The run's coordinator (`pipewright-coordinator`).
    Coordinator,
    /// A shard's worker (`pipewright-worker`).
    Worker,
}

impl Service {
    /// Its `service.name`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Coordinator => "pipewright-coordinator",
            Service::Worker => "pipewright-worker",
        }
    }
}

/// Whether the environment names an OTLP collector.
pub fn otlp_configured() -> bool {
    ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the span exporter of the process; [`Telemetry::shutdown`] (or
/// dropping it) sends the spans still buffered, waiting at most a few
/// seconds.
#[must_use = "dropping it stops the span exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the buffered spans and stops the exporter, within
    /// [`FLUSH_TIMEOUT`].
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                eprintln!("sending the last spans: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the process's logger, and, for a `service` when a collector is
/// configured, the span exporter with `attributes` as resource attributes
/// (`pipewright.run`, `pipewright.stage`, ...). A second call (tests that
/// run several commands in one process) changes nothing.
pub fn init(service: Option<Service>, attributes: Vec<KeyValue>) -> Telemetry {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // Colour codes only on a terminal, not in log files or CI output.
    let fmt = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    };
    let provider = match service.filter(|_| otlp_configured()) {
        Some(service) => match provider(service, attributes) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("traces are off: {e}");
                None
            }
        },
        None => None,
    };
    let Some(provider) = provider else {
        let _ = tracing_subscriber::registry()
            .with(fmt().with_filter(filter()))
            .try_init();
        return Telemetry { provider: None };
    };
    // The collector gets the training spans and the warnings and errors
    // logged inside them (as span events).
    let spans = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::WARN)
        .with_target(TARGET, tracing::Level::TRACE);
    let tracer = provider.tracer("pipewright");
    let installed = tracing_subscriber::registry()
        .with(fmt().with_filter(filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
        .try_init()
        .is_ok();
    if !installed {
        let _ = provider.shutdown_with_timeout(Duration::ZERO);
        return Telemetry { provider: None };
    }
    ENABLED.store(true, Ordering::Relaxed);
    Telemetry {
        provider: Some(provider),
    }
}

fn provider(service: Service, attributes: Vec<KeyValue>) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    // The endpoint comes from the variables above (OTLP's rules: `/v1/traces`
    // is appended to the general one).
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(UreqClient::new())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    // A thread of its own sends batches (every few seconds, or when a batch
    // is full); spans beyond its queue are dropped, never waited for.
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.name())
        .with_attributes(attributes)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// OTLP over the same HTTP client the worker talks to its coordinator with
/// (blocking; the batch processor calls it from its own thread).
#[derive(Debug)]
struct UreqClient {
    agent: ureq::Agent,
}

impl UreqClient {
    fn new() -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(EXPORT_TIMEOUT))
            .build();
        UreqClient {
            agent: ureq::Agent::new_with_config(config),
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for UreqClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let mut response = self.agent.run(request.map(|b| b.to_vec()))?;
        let body = response
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_vec()?;
        let mut out = opentelemetry_http::Response::builder().status(response.status());
        if let Some(h) = out.headers_mut() {
            *h = response.headers().clone();
        }
        Ok(out.body(opentelemetry_http::Bytes::from(body))?)
    }
}

/// The W3C `traceparent` of `span` (`00-<trace>-<span>-<flags>`); `None`
/// when it is not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format_traceparent(&sc))
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{}",
        sc.trace_id(),
        sc.span_id(),
        hex::encode([sc.trace_flags().to_u8()])
    )
}

/// The span context a W3C `traceparent` names; `None` for anything
/// malformed (wrong length, version `ff`, upper case, zero ids).
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = text.trim().split('-').collect();
    let [version, trace, span, flags_hex, rest @ ..] = parts.as_slice() else {
        return None;
    };
    // W3C ids are lower-case hex of a fixed length.
    let lower_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four fields; a later version may add some.
    if !lower_hex(version, 2) || *version == "ff" || (*version == "00" && !rest.is_empty()) {
        return None;
    }
    if !(lower_hex(trace, 32) && lower_hex(span, 16) && lower_hex(flags_hex, 2)) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let mut flags = [0u8; 1];
    hex::decode_to_slice(flags_hex, &mut flags).ok()?;
    let flags = flags[0];
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Makes `traceparent` (from the coordinator) the parent of `span`; a
/// missing or malformed one leaves `span` the root of a trace of its own.
pub fn parent_on(span: &Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// Marks `span` failed with `why` (shown as its error status).
pub fn fail(span: &Span, why: impl Into<String>) {
    if enabled() {
        span.set_status(Status::error(why.into()));
    }
}

/// A step's root span on the coordinator.
struct OpenStep {
    epoch: u64,
    step: u64,
    span: Span,
    traceparent: Option<String>,
}

/// A recovery: from the loss that started a new epoch until a step
/// completes again.
struct Recovery {
    epoch: u64,
    span: Span,
}

#[derive(Default)]
struct Traces {
    /// Last epoch seen.
    epoch: u64,
    /// The step being trained.
    open: Option<OpenStep>,
    /// The trace of the step completed last, for its checkpoint.
    last: Option<(u64, Span)>,
    recovery: Option<Recovery>,
    /// Checkpoints ordered and not yet committed, by step.
    checkpoints: BTreeMap<u64, Span>,
}

/// The coordinator's step traces: one root span `step N` per step (opened
/// when the step starts, closed when its barrier completes), recoveries
/// and checkpoints. Does nothing when traces are not exported.
pub struct StepTraces {
    run: String,
    steps: u64,
    inner: Mutex<Traces>,
}

impl StepTraces {
    /// The traces of run `run` of `steps` steps.
    pub fn new(run: &str, steps: u64) -> Self {
        StepTraces {
            run: run.to_owned(),
            steps,
            inner: Mutex::new(Traces::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Traces> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The coordinator's state after a change: a new epoch after training
    /// began is a recovery (and abandons the step in flight); the end of
    /// the run closes every span.
    pub fn observe(&self, epoch: u64, committed: u64, finished: bool) {
        if !enabled() {
            return;
        }
        let mut t = self.lock();
        if epoch > t.epoch {
            let trained = t.open.is_some() || committed > 0;
            if let Some(open) = t.open.take() {
                fail(
                    &open.span,
                    format!("epoch {epoch} replaced the wiring before the barrier"),
                );
            }
            match &mut t.recovery {
                Some(r) => {
                    r.epoch = epoch;
                    r.span.record("epoch", epoch);
                }
                None if trained && !finished => {
                    let span = span!(
                        parent: None,
                        "recovery",
                        run = %self.run,
                        epoch,
                        from_step = committed,
                        to_step = tracing::field::Empty,
                    );
                    t.recovery = Some(Recovery { epoch, span });
                }
                None => {}
            }
            t.epoch = epoch;
        }
        if finished {
            if let Some(open) = t.open.take() {
                fail(&open.span, "the run ended before the barrier");
            }
            t.recovery = None;
            t.last = None;
            for (_, span) in std::mem::take(&mut t.checkpoints) {
                fail(&span, "the run ended before the checkpoint was committed");
            }
        }
    }

    /// The `traceparent` of step `step` of `epoch`, for a wiring: the span
    /// in flight, or a new one when this epoch has none yet.
    pub fn wiring(&self, epoch: u64, step: u64) -> Option<String> {
        if !enabled() || step > self.steps {
            return None;
        }
        let mut t = self.lock();
        match &t.open {
            Some(o) if o.epoch == epoch && o.step == step => return o.traceparent.clone(),
            Some(o) if o.epoch >= epoch => return None,
            _ => {}
        }
        Some(self.open(&mut t, epoch, step)).flatten()
    }

    /// Step `completed` of `epoch` passed its barrier: its span closes (the
    /// first call), a recovery in progress ends, and the next step's span
    /// opens; returns the next step's `traceparent` (`None` after the
    /// last step).
    pub fn barrier_passed(&self, epoch: u64, completed: u64) -> Option<String> {
        if !enabled() {
            return None;
        }
        let mut t = self.lock();
        if epoch < t.epoch {
            return None;
        }
        let next = completed + 1;
        if let Some(o) = &t.open {
            if o.epoch == epoch && o.step == next {
                return o.traceparent.clone();
            }
            if o.epoch > epoch {
                return None;
            }
        }
        if let Some(open) = t.open.take() {
            if open.epoch == epoch && open.step == completed {
                t.last = Some((completed, open.span));
            } else {
                fail(&open.span, "another step completed instead");
            }
        }
        if t.recovery.as_ref().is_some_and(|r| r.epoch <= epoch) {
            if let Some(r) = t.recovery.take() {
                r.span.record("to_step", completed);
            }
        }
        if next > self.steps {
            return None;
        }
        self.open(&mut t, epoch, next)
    }

    fn open(&self, t: &mut Traces, epoch: u64, step: u64) -> Option<String> {
        if let Some(old) = t.open.take() {
            fail(
                &old.span,
                format!("epoch {epoch} started step {step} instead"),
            );
        }
        let span = span!(
            parent: None,
            "step",
            otel.name = %format!("step {step}"),
            run = %self.run,
            step,
            epoch,
        );
        if let Some(r) = &t.recovery {
            if let Some(sc) = span_context(&r.span) {
                span.add_link(sc);
            }
        }
        let traceparent = traceparent(&span);
        t.open = Some(OpenStep {
            epoch,
            step,
            span,
            traceparent: traceparent.clone(),
        });
        traceparent
    }

    /// The checkpoint of `step` was ordered (at its barrier): a span in
    /// that step's trace until it is committed.
    pub fn checkpoint_ordered(&self, step: u64) {
        if !enabled() {
            return;
        }
        let mut t = self.lock();
        if t.checkpoints.contains_key(&step) {
            return;
        }
        let parent = match &t.last {
            Some((s, span)) if *s == step => span.id(),
            _ => None,
        };
        let span = span!(parent: parent, "checkpoint", run = %self.run, step);
        t.checkpoints.insert(step, span);
    }

    /// The checkpoint of `step` was committed (`Ok`: its directory) or
    /// failed.
    pub fn checkpoint_done(&self, step: u64, result: Result<&str, &str>) {
        if !enabled() {
            return;
        }
        let Some(span) = self.lock().checkpoints.remove(&step) else {
            return;
        };
        match result {
            Ok(dir) => span.set_attribute("dir", dir.to_owned()),
            Err(e) => fail(&span, e.to_owned()),
        }
    }
}

fn span_context(span: &Span) -> Option<SpanContext> {
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_malformed_ones_are_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(text).expect("a valid traceparent");
        assert_eq!(format_traceparent(&sc), text);
        assert!(sc.is_remote() && sc.is_sampled());
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(unsampled).expect("valid").is_sampled());
        // A later version may append fields.
        assert!(parse_traceparent(&format!("01-{}-extra", &text[3..])).is_some());
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47\u{e9}6-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_a_collector_nothing_is_traced() {
        let traces = StepTraces::new("demo", 10);
        traces.observe(1, 0, false);
        assert_eq!(traces.wiring(1, 1), None);
        assert_eq!(traces.barrier_passed(1, 1), None);
        traces.checkpoint_ordered(1);
        traces.checkpoint_done(1, Ok("dir"));
        assert_eq!(traceparent(&Span::current()), None);
        // Parenting on anything, malformed or not, is harmless.
        parent_on(&Span::current(), Some("not a traceparent"));
    }
}
