//! The operator's logs and traces: logs go to stderr; spans also go to an
//! OTLP collector (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! the traces-specific variable) is set. The same variables are passed on
//! to the pods of every run, so that their traces reach the same
//! collector.

use std::io::IsTerminal;

use anyhow::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The variables naming the OTLP collector; the operator's pods get them
/// too.
pub const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// Service name of the operator's spans unless `OTEL_SERVICE_NAME` says
/// otherwise; also the tracer's name.
const SERVICE: &str = "pipewright-operator";

/// The installed subscriber's OTLP exporter, if any; [`Telemetry::shutdown`]
/// flushes it.
#[must_use = "shut telemetry down before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the span exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("flushing traces: {error}");
            }
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default
/// `info`) to stderr, and spans to the OTLP collector when one is named.
///
/// # Errors
/// When the OTLP exporter cannot be built.
pub fn init() -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in a pod's log.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if otlp_env(|k| std::env::var(k).ok()).is_empty() {
        tracing_subscriber::registry().with(filter).with(fmt).init();
        return Ok(Telemetry { provider: None });
    }
    use opentelemetry::trace::TracerProvider as _;
    let provider = provider()?;
    let tracer = provider.tracer(SERVICE);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// A tracer provider batching spans to the OTLP collector the environment
/// names.
fn provider() -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("building the OTLP span exporter")?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| SERVICE.to_owned());
    Ok(SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build(),
        )
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build())
}

/// The OTLP variables that `var` sets to something, as name and value: what
/// the operator passes on to the pods it makes.
pub fn otlp_env(var: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    OTLP_ENDPOINT_VARS
        .iter()
        .filter_map(|&k| {
            let v = var(k).filter(|v| !v.is_empty())?;
            Some((k.to_owned(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_set_collector_variables_are_passed_on() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://jaeger:4318".to_owned()),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some(String::new()),
            _ => Some("other".to_owned()),
        };
        assert_eq!(
            otlp_env(env),
            [(
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                "http://jaeger:4318".to_owned()
            )]
        );
        assert!(otlp_env(|_| None).is_empty());
    }
}
