//! Reconciles against a scripted fake API server: every request the
//! reconciler makes is checked in order, and the server answers as a real
//! one would.

mod common;

use std::sync::Arc;

use common::{fake_api, Fake};
use http::Method;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::Action;
use pipewright_operator::children::Blueprint;
use pipewright_operator::controller::{reconcile, POLL};
use pipewright_operator::coordinator::CoordinatorReport;
use pipewright_operator::fixtures::{at, context, coordinator, node, run, settings, shard};
use pipewright_spec::{RunPhase, TrainingRunResource, TrainingRunStatus};
use serde_json::{json, Value};

const PODS: &str = "/api/v1/namespaces/ml/pods";
const SELECTOR: &str = "pipewright.dev/run=demo";
const STATUS: &str = "/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/demo/status";

fn report() -> CoordinatorReport {
    CoordinatorReport {
        phase: Some("Training".to_owned()),
        step: Some(12),
        loss: Some(4.5),
        tokens_per_second: Some(2048.0),
    }
}

fn nodes() -> Vec<Node> {
    vec![node("n1", true), node("n2", true), node("n3", true)]
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("json")
}

/// The pods of a settled 2×2 run: coordinator on n3, shards at attempt 0
/// on n1 (replica 0) and n2 (replica 1).
fn settled_pods(run: &TrainingRunResource) -> Vec<Value> {
    let mut pods = vec![to_json(&coordinator(run, "Running", "n3"))];
    for stage in 0..2 {
        for (replica, node) in [(0, "n1"), (1, "n2")] {
            pods.push(to_json(&shard(run, (stage, replica, 0), "Running", node)));
        }
    }
    pods
}

/// Answers the children sync of a run whose children all exist as they
/// should: nothing is written.
async fn children_in_place(fake: &mut Fake, run: &TrainingRunResource) {
    let settings = settings(0);
    let blueprint = Blueprint::new(run, &settings).expect("buildable");
    let children = blueprint.children().expect("children");
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "demo-key", "namespace": "ml"},
        "data": {"runKey": "YWJj", "joinToken": "ZGVm"}});
    fake.expect_get("/api/v1/namespaces/ml/secrets/demo-key", Some(secret))
        .await;
    fake.expect_get(
        "/api/v1/namespaces/ml/configmaps/demo-manifest",
        Some(to_json(&children.manifest)),
    )
    .await;
    // What the API server adds (a protocol, a session affinity) is no
    // difference.
    let mut shards = to_json(&children.shard_service);
    shards["spec"]["ports"][0]["protocol"] = json!("TCP");
    shards["spec"]["sessionAffinity"] = json!("None");
    fake.expect_get("/api/v1/namespaces/ml/services/demo-shards", Some(shards))
        .await;
    fake.expect_get(
        "/api/v1/namespaces/ml/services/demo-coordinator",
        Some(to_json(&children.coordinator_service)),
    )
    .await;
    fake.expect_list(
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets",
        SELECTOR,
        "PodDisruptionBudgetList",
        children.disruption_budgets.iter().map(to_json).collect(),
    )
    .await;
}

/// Expects the status write and returns the status written.
async fn expect_status(fake: &mut Fake, run: &TrainingRunResource) -> TrainingRunStatus {
    let call = fake.expect(Method::PATCH, STATUS).await;
    assert!(call.query().contains("fieldManager=pipewright-operator"));
    let status: TrainingRunStatus =
        serde_json::from_value(call.body["status"].clone()).expect("status body");
    let mut stored = to_json(run);
    stored["status"] = call.body["status"].clone();
    call.reply(&stored);
    status
}

/// Reconciles a settled 2×2 run once, so that it carries the status a real
/// reconcile writes.
async fn settle() -> TrainingRunResource {
    let mut run = run(2, 2);
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    fake.expect_list(PODS, SELECTOR, "PodList", settled_pods(&run))
        .await;
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    assert_eq!(status.phase, Some(RunPhase::Running));
    run.status = Some(status);
    run
}

#[tokio::test]
async fn a_new_run_gets_its_secret_children_and_pods() {
    let run = run(2, 2);
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), None),
    ));

    fake.expect_get("/api/v1/namespaces/ml/secrets/demo-key", None)
        .await;
    let secret = fake.expect_create("/api/v1/namespaces/ml/secrets").await;
    let key = secret["stringData"]["runKey"].as_str().expect("key");
    assert_eq!(key.len(), 64);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
    let token = secret["stringData"]["joinToken"].as_str().expect("token");
    assert_eq!(token.len(), 32);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-1");

    fake.expect_get("/api/v1/namespaces/ml/configmaps/demo-manifest", None)
        .await;
    let cm = fake
        .expect_apply("/api/v1/namespaces/ml/configmaps/demo-manifest")
        .await;
    assert!(cm["data"]["run.yaml"]
        .as_str()
        .is_some_and(|y| y.contains("stages: 2")));
    for service in ["demo-shards", "demo-coordinator"] {
        let path = format!("/api/v1/namespaces/ml/services/{service}");
        fake.expect_get(&path, None).await;
        fake.expect_apply(&path).await;
    }
    fake.expect_list(
        "/apis/policy/v1/namespaces/ml/poddisruptionbudgets",
        SELECTOR,
        "PodDisruptionBudgetList",
        vec![],
    )
    .await;
    for stage in 0..2 {
        let budget = fake
            .expect_apply(&format!(
                "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/demo-s{stage}"
            ))
            .await;
        assert_eq!(budget["spec"]["minAvailable"], 1);
    }
    fake.expect_list(PODS, SELECTOR, "PodList", vec![]).await;
    let coordinator = fake.expect_create(PODS).await;
    assert_eq!(coordinator["metadata"]["name"], "demo-coordinator");
    assert_eq!(
        coordinator["spec"]["containers"][0]["args"][0],
        "coordinator"
    );
    for name in ["demo-s0-r0", "demo-s0-r1", "demo-s1-r0", "demo-s1-r1"] {
        let pod = fake.expect_create(PODS).await;
        assert_eq!(pod["metadata"]["name"], name);
        assert_eq!(
            pod["spec"]["containers"][0]["args"],
            json!(["worker", "/etc/pipewright/run.yaml"])
        );
    }
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.phase, Some(RunPhase::Pending));
    assert_eq!((status.ready_shards, status.desired_shards), (0, 4));
    let scheduled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled")
        .expect("Scheduled");
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("False", "WaitingForPods")
    );
    assert_eq!(status.shards[3].pod.as_deref(), Some("demo-s1-r1"));

    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_second_reconcile_of_an_unchanged_run_writes_nothing() {
    let run = settle().await;
    let status = run.status.clone().expect("status");
    assert_eq!((status.step, status.loss), (Some(12), Some(4.5)));
    assert_eq!(status.tokens_per_second, Some(2048.0));

    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    fake.expect_list(PODS, SELECTOR, "PodList", settled_pods(&run))
        .await;
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_failed_shard_is_reassigned_with_an_event() {
    let run = settle().await;
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    let mut pods = settled_pods(&run);
    pods[3]["status"]["phase"] = json!("Failed");
    pods[3]["status"]["reason"] = json!("Evicted");
    fake.expect_list(PODS, SELECTOR, "PodList", pods).await;
    fake.expect_delete(&format!("{PODS}/demo-s1-r0")).await;
    let replacement = fake.expect_create(PODS).await;
    assert_eq!(replacement["metadata"]["name"], "demo-s1-r0-a1");
    assert_eq!(
        replacement["metadata"]["labels"]["pipewright.dev/attempt"],
        "1"
    );
    assert_eq!(
        replacement["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchFields"],
        json!([{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}])
    );
    let (type_, reason, note, _) = fake.expect_event().await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Warning", "ShardReassigned")
    );
    assert_eq!(
        note,
        "stage 1 replica 0: pod demo-s1-r0 on node n1 -> pod demo-s1-r0-a1 (Evicted)"
    );
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.phase, Some(RunPhase::Degraded));
    assert_eq!(status.total_reassignments, 1);
    assert_eq!(status.failed_nodes, ["n1"]);
    assert_eq!(
        status.reassignments[0].to_pod.as_deref(),
        Some("demo-s1-r0-a1")
    );
    assert_eq!(status.shards[2].attempt, 1);
    assert!(status
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True"));
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn shards_on_a_node_that_is_not_ready_move_elsewhere() {
    let run = settle().await;
    let (client, mut fake) = fake_api();
    let nodes = vec![node("n1", true), node("n2", false), node("n3", true)];
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes, Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    fake.expect_list(PODS, SELECTOR, "PodList", settled_pods(&run))
        .await;
    fake.expect_delete(&format!("{PODS}/demo-s0-r1")).await;
    fake.expect_delete(&format!("{PODS}/demo-s1-r1")).await;
    for name in ["demo-s0-r1-a1", "demo-s1-r1-a1"] {
        let pod = fake.expect_create(PODS).await;
        assert_eq!(pod["metadata"]["name"], name);
    }
    for from in ["demo-s0-r1", "demo-s1-r1"] {
        let (_, reason, note, related) = fake.expect_event().await;
        assert_eq!(reason, "ShardReassigned");
        assert_eq!(related, from);
        assert_eq!(
            note,
            format!(
                "stage {} replica 1: pod {from} on node n2 -> pod {from}-a1 (NodeNotReady)",
                &from[6..7]
            )
        );
    }
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.total_reassignments, 2);
    assert_eq!(status.failed_nodes, ["n2"]);
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn too_many_reassignments_fail_the_run_and_free_its_nodes() {
    let mut run = settle().await;
    run.spec.placement.max_reassignments = 0;
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    let mut pods = settled_pods(&run);
    pods[1]["status"]["phase"] = json!("Failed");
    fake.expect_list(PODS, SELECTOR, "PodList", pods).await;
    for name in [
        "demo-coordinator",
        "demo-s0-r0",
        "demo-s0-r1",
        "demo-s1-r0",
        "demo-s1-r1",
    ] {
        fake.expect_delete(&format!("{PODS}/{name}")).await;
    }
    let (type_, reason, note, _) = fake.expect_event().await;
    assert_eq!((type_.as_str(), reason.as_str()), ("Warning", "RunFailed"));
    assert!(
        note.starts_with("1 shard reassignments exceed spec.placement.maxReassignments (0)"),
        "{note}"
    );
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.phase, Some(RunPhase::Failed));
    assert_eq!(status.conditions[0].reason, "TooManyReassignments");
    assert!(status.completion_time.is_some());
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::await_change()
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn suspending_deletes_pods_and_resuming_makes_them_again() {
    let mut run = settle().await;
    run.spec.suspend = true;
    run.metadata.generation = Some(2);
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    fake.expect_list(PODS, SELECTOR, "PodList", settled_pods(&run))
        .await;
    for name in [
        "demo-coordinator",
        "demo-s0-r0",
        "demo-s0-r1",
        "demo-s1-r0",
        "demo-s1-r1",
    ] {
        fake.expect_delete(&format!("{PODS}/{name}")).await;
    }
    let (_, reason, _, _) = fake.expect_event().await;
    assert_eq!(reason, "Suspended");
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.phase, Some(RunPhase::Suspended));
    assert!(status.shards.iter().all(|s| s.pod.is_none()));
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::await_change()
    );
    fake.expect_nothing_more().await;

    // Resume.
    run.status = Some(status);
    run.spec.suspend = false;
    run.metadata.generation = Some(3);
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), Some(report())),
    ));
    children_in_place(&mut fake, &run).await;
    fake.expect_list(PODS, SELECTOR, "PodList", vec![]).await;
    let (_, reason, _, _) = fake.expect_event().await;
    assert_eq!(reason, "Resumed");
    for name in [
        "demo-coordinator",
        "demo-s0-r0",
        "demo-s0-r1",
        "demo-s1-r0",
        "demo-s1-r1",
    ] {
        let pod = fake.expect_create(PODS).await;
        assert_eq!(pod["metadata"]["name"], name);
    }
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(
        status.phase,
        Some(RunPhase::Pending),
        "a resumed gang starts anew"
    );
    assert_eq!(status.total_reassignments, 0, "suspending moves no shard");
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::requeue(POLL)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_run_being_deleted_is_left_to_the_garbage_collector() {
    let mut run = settle().await;
    run.metadata.deletion_timestamp = Some(at(1000));
    let (client, fake) = fake_api();
    let action = reconcile(Arc::new(run), context(client, &nodes(), None))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_finished_run_is_deleted_after_its_time_to_live() {
    let mut run = settle().await;
    run.spec.ttl_seconds_after_finished = Some(60);
    if let Some(status) = run.status.as_mut() {
        status.phase = Some(RunPhase::Succeeded);
        status.completion_time = Some(at(100));
    }
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(run.clone()),
        context(client, &nodes(), None),
    ));
    fake.expect_delete("/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/demo")
        .await;
    assert_eq!(
        task.await.expect("task").expect("reconcile"),
        Action::await_change()
    );
    fake.expect_nothing_more().await;

    // Without a time to live it is kept, and nothing is asked.
    run.spec.ttl_seconds_after_finished = None;
    let (client, fake) = fake_api();
    let action = reconcile(Arc::new(run), context(client, &nodes(), None))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_bad_spec_fails_the_run_without_children() {
    for (name, change) in [("long name", 0), ("minReplicas above replicas", 1)] {
        let mut bad = run(2, 2);
        let mut path = STATUS.to_owned();
        if change == 0 {
            let long = "r".repeat(60);
            path = path.replace("/demo/", &format!("/{long}/"));
            bad.metadata.name = Some(long);
        } else {
            bad.spec.placement.min_replicas = Some(3);
        }
        let (client, mut fake) = fake_api();
        let task = tokio::spawn(reconcile(
            Arc::new(bad.clone()),
            context(client, &nodes(), None),
        ));
        // The first and only request is the status: nothing is created.
        let call = fake.expect(Method::PATCH, &path).await;
        let body = call.body.clone();
        call.reply(&to_json(&bad));
        assert_eq!(body["status"]["phase"], "Failed", "{name}");
        assert_eq!(
            body["status"]["conditions"][0]["reason"], "InvalidSpec",
            "{name}"
        );
        let message = body["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default();
        if change == 1 {
            assert!(
                message.contains("spec.placement.minReplicas: 3 exceeds"),
                "{message}"
            );
        }
        assert_eq!(
            task.await.expect("task").expect("reconcile"),
            Action::await_change()
        );
        fake.expect_nothing_more().await;
    }
}
