//! Fixtures shared by the tests of this crate: a small run, operator
//! settings, and pods and nodes as the API server reports them. Public so
//! that the integration tests under `tests/` use the same ones.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use pipewright_spec::{parse_manifest, TrainingRunResource};

use std::sync::Arc;

use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::Client;

use crate::children::{Blueprint, Settings};
use crate::controller::Context;
use crate::coordinator::{CoordinatorReport, StaticProbe};
use crate::metrics::Metrics;

/// A valid manifest of a small model with four layers.
pub const MANIFEST: &str = "\
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: demo}
spec:
  model: {dim: 64, layers: 4, heads: 4, ffnDim: 176, seqLen: 64}
  data: {sources: [corpus/]}
  training: {steps: 10, microBatchSize: 4, learningRate: 0.001}
";

/// Run `demo` in namespace `ml` (uid `uid-1`, generation 1) as the API
/// server stores it, with `stages` × `replicas` shards.
pub fn run(stages: usize, replicas: usize) -> TrainingRunResource {
    let mut spec = parse_manifest(MANIFEST)
        .expect("the fixture manifest is valid")
        .spec;
    spec.pipeline.stages = stages;
    spec.pipeline.replicas = replicas;
    let mut run = TrainingRunResource::new("demo", spec);
    run.metadata.namespace = Some("ml".to_owned());
    run.metadata.uid = Some("uid-1".to_owned());
    run.metadata.generation = Some(1);
    run.metadata.resource_version = Some("1".to_owned());
    run
}

/// Operator settings with a test image and `gpus` GPUs per shard.
pub fn settings(gpus: u32) -> Settings {
    Settings {
        image: "pipewright:test".to_owned(),
        gpus_per_shard: gpus,
        pass_env: Vec::new(),
    }
}

/// A point in time, `seconds` after the epoch.
pub fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("in range"))
}

/// `pod` as observed: bound to `node` (none when empty), in `phase`, with
/// its Ready condition `ready`.
pub fn observed(mut pod: Pod, phase: &str, ready: bool, node: &str) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = (!node.is_empty()).then(|| node.to_owned());
    }
    pod.status = Some(PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".to_owned(),
            status: if ready { "True" } else { "False" }.to_owned(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

/// The pod the operator makes for shard (`stage`, `replica`, `attempt`) of
/// `run`, observed as in [`observed`].
pub fn shard(
    run: &TrainingRunResource,
    (stage, replica, attempt): (usize, usize, u32),
    phase: &str,
    node: &str,
) -> Pod {
    let settings = settings(0);
    let blueprint = Blueprint::new(run, &settings).expect("the fixture run is buildable");
    let pod = blueprint.shard_pod(stage, replica, attempt, &[]);
    observed(pod, phase, phase == "Running", node)
}

/// The coordinator pod the operator makes for `run`, in `phase` on `node`.
pub fn coordinator(run: &TrainingRunResource, phase: &str, node: &str) -> Pod {
    let settings = settings(0);
    let blueprint = Blueprint::new(run, &settings).expect("the fixture run is buildable");
    let pod = blueprint.children().expect("children").coordinator;
    observed(pod, phase, phase == "Running", node)
}

/// A node whose Ready condition is `ready`.
pub fn node(name: &str, ready: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_owned(),
                name.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_owned(),
                status: if ready { "True" } else { "Unknown" }.to_owned(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// A node store holding `nodes`, as the node watch fills it.
pub fn node_store(nodes: &[Node]) -> Store<Node> {
    let (store, mut writer) = reflector::store();
    for node in nodes {
        writer.apply_watcher_event(&watcher::Event::Apply(node.clone()));
    }
    store
}

/// A reconcile context on `client` (settings from [`settings`] without
/// GPUs), knowing `nodes`, whose coordinators answer with `report` (or are
/// unreachable).
pub fn context(client: Client, nodes: &[Node], report: Option<CoordinatorReport>) -> Arc<Context> {
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "pipewright-operator".to_owned(),
                instance: None,
            },
        ),
        client,
        settings: settings(0),
        nodes: node_store(nodes),
        probe: Arc::new(StaticProbe(report)),
        metrics: Arc::new(Metrics::new()),
    })
}
