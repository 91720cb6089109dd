//! Distributed traces of a real multi-process run: an OTLP/HTTP receiver
//! in this process decodes what the coordinator and the four workers of a
//! 2 × 2 `pipewright train --processes` run send, and every step must be
//! one trace holding every shard's forward, backward, all-reduce and
//! barrier spans under the coordinator's `step N` span.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message;

use common::procs::{serial, write_inputs};
use common::{pipewright, succeed};

/// One span as received, with its service.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// An OTLP/HTTP (protobuf) receiver on a free loopback port: its
/// address and the spans it has received.
fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    let kept = spans.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let kept = kept.clone();
                    async move {
                        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                            return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                        };
                        let mut out = kept.lock().unwrap_or_else(|e| e.into_inner());
                        for rs in request.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .map(text)
                                .unwrap_or_default();
                            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                                out.push(Received {
                                    service: service.clone(),
                                    name: span.name,
                                    trace: span.trace_id,
                                    id: span.span_id,
                                    parent: span.parent_span_id,
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|kv| (kv.key.clone(), text(kv)))
                                        .collect(),
                                });
                            }
                        }
                        // An empty ExportTraceServiceResponse.
                        (axum::http::StatusCode::OK, Vec::new())
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    (format!("http://{addr}"), spans)
}

#[test]
fn every_step_is_one_trace_covering_every_shard() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = write_inputs(dir.path(), "traced", 2, 2, 4);
    // A checkpoint at step 2 and at the end.
    let yaml = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, yaml.replace("every: 25", "every: 2")).expect("manifest");
    let (endpoint, spans) = receiver();
    succeed(
        pipewright()
            .args(["train", "--processes", "--quiet", "--out"])
            .arg(dir.path().join("run"))
            .arg(&manifest)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    );
    // Every process flushed its spans before it exited.
    let spans = spans.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let coordinator: Vec<&Received> = spans
        .iter()
        .filter(|s| s.service == "pipewright-coordinator")
        .collect();
    let shards: BTreeSet<(String, String)> = (0..2)
        .flat_map(|s| (0..2).map(move |r| (s.to_string(), r.to_string())))
        .collect();
    for step in 1..=4u64 {
        let root = coordinator
            .iter()
            .find(|s| s.name == format!("step {step}"))
            .unwrap_or_else(|| {
                let names: BTreeSet<&str> = coordinator.iter().map(|s| s.name.as_str()).collect();
                panic!("no coordinator span `step {step}`; it sent {names:?}")
            });
        assert!(
            root.parent.is_empty(),
            "step {step} is the root of its trace"
        );
        let in_trace: Vec<&Received> = spans
            .iter()
            .filter(|s| s.trace == root.trace && s.service == "pipewright-worker")
            .collect();
        // Each worker's step span hangs under the coordinator's.
        let under_root: BTreeSet<(String, String)> = in_trace
            .iter()
            .filter(|s| s.name == "shard step" && s.parent == root.id)
            .map(|s| {
                (
                    s.attributes["stage"].clone(),
                    s.attributes["replica"].clone(),
                )
            })
            .collect();
        assert_eq!(
            under_root, shards,
            "step {step}: shard step spans under `step {step}`"
        );
        for kind in ["forward", "backward", "all-reduce", "barrier"] {
            let seen: BTreeSet<(String, String)> = in_trace
                .iter()
                .filter(|s| s.name == kind)
                .map(|s| {
                    (
                        s.attributes.get("stage").cloned().unwrap_or_default(),
                        s.attributes.get("replica").cloned().unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(seen, shards, "step {step}: `{kind}` spans of every shard");
        }
        // One forward and one backward per micro-batch: 2 replicas × 4
        // micro-batches on each of the two stages.
        for kind in ["forward", "backward"] {
            let n = in_trace.iter().filter(|s| s.name == kind).count();
            assert_eq!(n, 16, "step {step}: `{kind}` spans");
            assert!(in_trace
                .iter()
                .filter(|s| s.name == kind)
                .all(|s| s.attributes.contains_key("micro_batch")));
        }
    }
    // The last step's checkpoint, in that step's trace.
    let last = coordinator
        .iter()
        .find(|s| s.name == "step 4")
        .expect("step 4");
    assert!(
        coordinator
            .iter()
            .any(|s| s.name == "checkpoint" && s.trace == last.trace),
        "the checkpoint of step 4 in its trace"
    );
}
