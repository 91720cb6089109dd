//! One reconcile against a scripted fake API server: every request the
//! reconciler makes is checked in order, and the server answers as a real one
//! would.

use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use pipewright_operator::children::Settings;
use pipewright_operator::controller::{reconcile, Context};
use pipewright_spec::{parse_manifest, RunPhase, TrainingRunResource, TrainingRunStatus};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

const MANIFEST: &str = "\
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: demo}
spec:
  model: {dim: 64, layers: 4, heads: 4, ffnDim: 176, seqLen: 64}
  data: {sources: [corpus/]}
  training: {steps: 10, microBatchSize: 4, learningRate: 0.001}
  pipeline: {stages: 2, replicas: 1}
";

fn run() -> TrainingRunResource {
    let spec = parse_manifest(MANIFEST).expect("valid").spec;
    let mut run = TrainingRunResource::new("demo", spec);
    run.metadata.namespace = Some("ml".to_owned());
    run.metadata.uid = Some("uid-1".to_owned());
    run.metadata.generation = Some(1);
    run
}

type Fake = Handle<Request<Body>, Response<Body>>;

/// The next request, checked for method and path (query left out), with its
/// body as JSON (`Null` when empty).
async fn expect(
    fake: &mut Fake,
    method: Method,
    path: &str,
) -> (Request<()>, Value, SendResponse<Response<Body>>) {
    let (request, send) = fake.next_request().await.expect("a request");
    let (parts, body) = request.into_parts();
    assert_eq!(
        (&parts.method, parts.uri.path()),
        (&method, path),
        "unexpected request {} {}",
        parts.method,
        parts.uri
    );
    let bytes = body.collect_bytes().await.expect("request body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (Request::from_parts(parts, ()), value, send)
}

fn reply(send: SendResponse<Response<Body>>, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    send.send_response(
        Response::builder()
            .body(Body::from(bytes))
            .expect("response"),
    );
}

/// Expects a server-side apply of `path` by this operator and echoes the
/// object back, as the API server does.
async fn expect_apply(fake: &mut Fake, path: &str) -> Value {
    let (request, body, send) = expect(fake, Method::PATCH, path).await;
    let query = request.uri().query().unwrap_or_default();
    assert!(
        query.contains("fieldManager=pipewright-operator") && query.contains("force=true"),
        "{path}: not a forced apply: {query}"
    );
    assert_eq!(
        request.headers()["content-type"],
        "application/apply-patch+yaml",
        "{path}"
    );
    reply(send, &body);
    body
}

fn shard_pod(name: &str, stage: u32, phase: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "labels": {
            "pipewright.dev/run": "demo", "pipewright.dev/role": "shard",
            "pipewright.dev/stage": stage.to_string(), "pipewright.dev/replica": "0"}},
        "spec": {"containers": [], "nodeName": node},
        "status": {"phase": phase, "reason": if phase == "Failed" { "Evicted" } else { "" },
                   "conditions": [{"type": "Ready", "status": if phase == "Running" { "True" } else { "False" }}]}
    })
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
}

#[tokio::test]
async fn reconcile_applies_children_replaces_a_failed_shard_and_reports_status() {
    let (service, mut fake) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Arc::new(Context {
        client,
        settings: Settings {
            image: "pipewright:test".to_owned(),
            gpus_per_shard: 0,
        },
    });
    let task = tokio::spawn(reconcile(Arc::new(run()), ctx));

    // No key yet: one is generated and stored in the run's Secret.
    let (_, _, send) = expect(
        &mut fake,
        Method::GET,
        "/api/v1/namespaces/ml/secrets/demo-key",
    )
    .await;
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&not_found).expect("json")))
            .expect("response"),
    );
    let (_, secret, send) = expect(&mut fake, Method::POST, "/api/v1/namespaces/ml/secrets").await;
    let key = secret["stringData"]["runKey"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(key.len(), 64);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    reply(send, &secret);

    let cm = expect_apply(&mut fake, "/api/v1/namespaces/ml/configmaps/demo-manifest").await;
    assert!(cm["data"]["run.yaml"]
        .as_str()
        .is_some_and(|y| y.contains("stages: 2")));
    expect_apply(&mut fake, "/api/v1/namespaces/ml/services/demo-shards").await;
    expect_apply(&mut fake, "/api/v1/namespaces/ml/services/demo-coordinator").await;
    expect_apply(&mut fake, "/api/v1/namespaces/ml/pods/demo-coordinator").await;

    // The shard pods as they are: stage 1 was evicted.
    let (request, _, send) = expect(&mut fake, Method::GET, "/api/v1/namespaces/ml/pods").await;
    let query = request.uri().query().unwrap_or_default();
    assert!(
        query.contains("labelSelector=pipewright.dev%2Frun%3Ddemo%2Cpipewright.dev%2Frole%3Dshard"),
        "{query}"
    );
    reply(
        send,
        &pod_list(vec![
            shard_pod("demo-s0-r0", 0, "Running", "n1"),
            shard_pod("demo-s1-r0", 1, "Failed", "n2"),
        ]),
    );
    let (_, _, send) = expect(
        &mut fake,
        Method::DELETE,
        "/api/v1/namespaces/ml/pods/demo-s1-r0",
    )
    .await;
    reply(send, &shard_pod("demo-s1-r0", 1, "Failed", "n2"));

    let first = expect_apply(&mut fake, "/api/v1/namespaces/ml/pods/demo-s0-r0").await;
    assert_eq!(first["metadata"]["labels"]["pipewright.dev/stage"], "0");
    expect_apply(&mut fake, "/api/v1/namespaces/ml/pods/demo-s1-r0").await;

    // After the replacement: stage 1's new pod is not scheduled yet.
    let (_, _, send) = expect(&mut fake, Method::GET, "/api/v1/namespaces/ml/pods").await;
    reply(
        send,
        &pod_list(vec![shard_pod("demo-s0-r0", 0, "Running", "n1")]),
    );
    let (_, _, send) = expect(
        &mut fake,
        Method::GET,
        "/api/v1/namespaces/ml/pods/demo-coordinator",
    )
    .await;
    reply(
        send,
        &json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-coordinator", "namespace": "ml"},
        "status": {"phase": "Running"}}),
    );

    let (request, body, send) = expect(
        &mut fake,
        Method::PATCH,
        "/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/demo/status",
    )
    .await;
    assert!(request
        .uri()
        .query()
        .unwrap_or_default()
        .contains("fieldManager=pipewright-operator"));
    let status: TrainingRunStatus =
        serde_json::from_value(body["status"].clone()).expect("status body");
    assert_eq!(status.phase, Some(RunPhase::Pending));
    assert_eq!((status.ready_shards, status.desired_shards), (1, 2));
    assert_eq!(status.reassignments.len(), 1);
    assert_eq!(status.reassignments[0].from_pod, "demo-s1-r0");
    assert_eq!(status.reassignments[0].from_node.as_deref(), Some("n2"));
    assert_eq!(status.reassignments[0].reason, "Evicted");
    assert_eq!(status.shards[0].node.as_deref(), Some("n1"));
    let mut stored = serde_json::to_value(run()).expect("json");
    stored["status"] = body["status"].clone();
    reply(send, &stored);

    let action = task
        .await
        .expect("reconcile task")
        .expect("reconcile succeeds");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(pipewright_operator::controller::RESYNC)
    );
}

#[tokio::test]
async fn a_run_with_a_too_long_name_is_failed_without_children() {
    let (service, mut fake) = mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(Context {
        client: Client::new(service, "default"),
        settings: Settings {
            image: "pipewright:test".to_owned(),
            gpus_per_shard: 0,
        },
    });
    let mut long = run();
    let name = "r".repeat(60);
    long.metadata.name = Some(name.clone());
    let task = tokio::spawn(reconcile(Arc::new(long.clone()), ctx));
    // The first and only request is the status: nothing is created.
    let path = format!("/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/{name}/status");
    let (_, body, send) = expect(&mut fake, Method::PATCH, &path).await;
    assert_eq!(body["status"]["phase"], "Failed");
    assert_eq!(body["status"]["conditions"][0]["reason"], "InvalidSpec");
    reply(send, &serde_json::to_value(long).expect("json"));
    let action = task.await.expect("task").expect("reconcile succeeds");
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}
