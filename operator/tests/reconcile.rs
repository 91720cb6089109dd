//! Reconciles against a scripted fake API server: every request the
//! reconciler makes is checked in order, and the server answers as a real
//! one would.

mod common;

use std::sync::Arc;

use common::{fake_api, Fake};
use http::Method;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::controller::Action;
use pipewright_operator::children::Blueprint;
use pipewright_operator::controller::{error_policy, reconcile, ReconcileError, POLL, RETRY_STALE};
use pipewright_operator::coordinator::CoordinatorReport;
use pipewright_operator::fixtures::{at, context, coordinator, node, run, settings, shard};
use pipewright_spec::coordinator::Contribution;
use pipewright_spec::{RunPhase, TrainingRunResource, TrainingRunStatus};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const PODS: &str = "/api/v1/namespaces/ml/pods";
const SELECTOR: &str = "pipewright.dev/run=demo";
const CLAIM: &str = "/api/v1/namespaces/ml/persistentvolumeclaims/demo-state";
const RUN: &str = "/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/demo";
const STATUS: &str = "/apis/pipewright.dev/v1alpha1/namespaces/ml/trainingruns/demo/status";

fn report() -> CoordinatorReport {
    CoordinatorReport {
        phase: Some("Training".to_owned()),
        step: Some(12),
        loss: Some(4.5),
        tokens_per_second: Some(2048.0),
        contributions: (0..7)
            .map(|i| Contribution {
                identity: format!("{i:016x}"),
                name: format!("demo-s{}-r{}", i % 2, i / 2),
                flops: 1.23456e12 * (7 - i) as f64,
                micro_batches: 10 * (7 - i),
                share: (7 - i) as f64 / 28.0,
            })
            .collect(),
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
    if let Some(claim) = &children.state_claim {
        fake.expect_get(CLAIM, Some(to_json(claim))).await;
    }
}

/// Expects the status write and returns the status written.
async fn expect_status(fake: &mut Fake, run: &TrainingRunResource) -> TrainingRunStatus {
    let call = fake.expect(Method::PATCH, STATUS).await;
    assert!(call.query().contains("fieldManager=pipewright-operator"));
    assert_eq!(
        call.body["metadata"]["resourceVersion"],
        json!(run.metadata.resource_version),
        "a status write names the version it was planned from"
    );
    let status: TrainingRunStatus =
        serde_json::from_value(call.body["status"].clone()).expect("status body");
    let mut stored = to_json(run);
    stored["status"] = call.body["status"].clone();
    call.reply(&stored);
    status
}

/// A reconcile running in the background against a fake API server.
type Reconciling = JoinHandle<Result<Action, ReconcileError>>;

/// Starts reconciling `cached` (the run as the controller's cache holds it)
/// against a new fake API server, with `nodes` in the node cache and the
/// coordinator answering `report`.
fn start(
    cached: &TrainingRunResource,
    nodes: &[Node],
    report: Option<CoordinatorReport>,
) -> (Reconciling, Fake) {
    let (client, fake) = fake_api();
    let task = tokio::spawn(reconcile(
        Arc::new(cached.clone()),
        context(client, nodes, report),
    ));
    (task, fake)
}

/// Answers what every reconcile of a live run asks first: the fresh read of
/// the run (answered with `stored`), the children of `cached` (all in
/// place), and the run's pods (answered with `pods`).
async fn opening(
    fake: &mut Fake,
    stored: &TrainingRunResource,
    cached: &TrainingRunResource,
    pods: Vec<Value>,
) {
    fake.expect_get(RUN, Some(to_json(stored))).await;
    children_in_place(fake, cached).await;
    fake.expect_list(PODS, SELECTOR, "PodList", pods).await;
}

/// Starts reconciling `run` with `nodes` in the node cache and the
/// coordinator reporting, and answers the opening with `pods` as its pods.
async fn reconcile_on(
    nodes: &[Node],
    run: &TrainingRunResource,
    pods: Vec<Value>,
) -> (Reconciling, Fake) {
    let (task, mut fake) = start(run, nodes, Some(report()));
    opening(&mut fake, run, run, pods).await;
    (task, fake)
}

/// [`reconcile_on`] with every node ready.
async fn reconcile_with(run: &TrainingRunResource, pods: Vec<Value>) -> (Reconciling, Fake) {
    reconcile_on(&nodes(), run, pods).await
}

/// Waits for the reconcile to end, checks that it asked nothing more, and
/// returns what it asked the controller to do next.
async fn finish(task: Reconciling, fake: Fake) -> Action {
    let action = task.await.expect("task").expect("reconcile");
    fake.expect_nothing_more().await;
    action
}

/// Every pod of a 2×2 run, coordinator first.
const ALL_PODS: [&str; 5] = [
    "demo-coordinator",
    "demo-s0-r0",
    "demo-s0-r1",
    "demo-s1-r0",
    "demo-s1-r1",
];

/// Reconciles a settled 2×2 run once, so that it carries the status a real
/// reconcile writes.
async fn settle() -> TrainingRunResource {
    let mut run = run(2, 2);
    let (task, mut fake) = reconcile_with(&run, settled_pods(&run)).await;
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
    let (task, mut fake) = start(&run, &nodes(), None);

    fake.expect_get(RUN, Some(to_json(&run))).await;
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
            json!([
                "worker",
                "/etc/pipewright/run.yaml",
                "--identity",
                "/var/lib/pipewright-identity/identity"
            ])
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

    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_second_reconcile_of_an_unchanged_run_writes_nothing() {
    let run = settle().await;
    let status = run.status.clone().expect("status");
    assert_eq!((status.step, status.loss), (Some(12), Some(4.5)));
    assert_eq!(status.tokens_per_second, Some(2048.0));
    // The five largest contributors, as `kubectl describe` shows them.
    assert_eq!(status.contributions.len(), 5);
    let top = &status.contributions[0];
    assert_eq!(
        (top.identity.as_str(), top.name.as_str(), top.micro_batches),
        ("0000000000000000", "demo-s0-r0", 70)
    );
    assert_eq!((top.teraflops, top.share_percent), (8.642, 25.0));

    let (task, fake) = reconcile_with(&run, settled_pods(&run)).await;
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_failed_shard_is_reassigned_with_an_event() {
    let run = settle().await;
    let mut pods = settled_pods(&run);
    pods[3]["status"]["phase"] = json!("Failed");
    pods[3]["status"]["reason"] = json!("Evicted");
    let (task, mut fake) = reconcile_with(&run, pods).await;
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
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn shards_on_a_node_that_is_not_ready_move_elsewhere() {
    let run = settle().await;
    let nodes = vec![node("n1", true), node("n2", false), node("n3", true)];
    let (task, mut fake) = reconcile_on(&nodes, &run, settled_pods(&run)).await;
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
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn too_many_reassignments_fail_the_run_and_free_its_nodes() {
    let mut run = settle().await;
    run.spec.placement.max_reassignments = 0;
    let mut pods = settled_pods(&run);
    pods[1]["status"]["phase"] = json!("Failed");
    let (task, mut fake) = reconcile_with(&run, pods).await;
    for name in ALL_PODS {
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
    assert_eq!(finish(task, fake).await, Action::await_change());
}

#[tokio::test]
async fn suspending_deletes_pods_and_resuming_makes_them_again() {
    let mut run = settle().await;
    run.spec.suspend = true;
    run.metadata.generation = Some(2);
    let (task, mut fake) = reconcile_with(&run, settled_pods(&run)).await;
    for name in ALL_PODS {
        fake.expect_delete(&format!("{PODS}/{name}")).await;
    }
    let (_, reason, _, _) = fake.expect_event().await;
    assert_eq!(reason, "Suspended");
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.phase, Some(RunPhase::Suspended));
    assert!(status.shards.iter().all(|s| s.pod.is_none()));
    assert_eq!(finish(task, fake).await, Action::await_change());

    // Resume.
    run.status = Some(status);
    run.spec.suspend = false;
    run.metadata.generation = Some(3);
    let (task, mut fake) = reconcile_with(&run, vec![]).await;
    let (_, reason, _, _) = fake.expect_event().await;
    assert_eq!(reason, "Resumed");
    for name in ALL_PODS {
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
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_run_being_deleted_is_left_to_the_garbage_collector() {
    let mut run = settle().await;
    run.metadata.deletion_timestamp = Some(at(1000));
    let (task, fake) = start(&run, &nodes(), None);
    assert_eq!(finish(task, fake).await, Action::await_change());
}

#[tokio::test]
async fn a_finished_run_is_deleted_after_its_time_to_live() {
    let mut run = settle().await;
    run.spec.ttl_seconds_after_finished = Some(60);
    if let Some(status) = run.status.as_mut() {
        status.phase = Some(RunPhase::Succeeded);
        status.completion_time = Some(at(100));
    }
    let (task, mut fake) = start(&run, &nodes(), None);
    fake.expect_get(RUN, Some(to_json(&run))).await;
    fake.expect_delete(RUN).await;
    assert_eq!(finish(task, fake).await, Action::await_change());

    // Without a time to live it is kept, and nothing else is asked.
    run.spec.ttl_seconds_after_finished = None;
    let (task, mut fake) = start(&run, &nodes(), None);
    fake.expect_get(RUN, Some(to_json(&run))).await;
    assert_eq!(finish(task, fake).await, Action::await_change());
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
        let (task, mut fake) = start(&bad, &nodes(), None);
        // The run is read, then its status written: nothing is created.
        fake.expect_get(path.trim_end_matches("/status"), Some(to_json(&bad)))
            .await;
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
        assert_eq!(finish(task, fake).await, Action::await_change());
    }
}

/// The run as stored after `settle` plus one move: shard (1, 0) evicted from
/// n1 and replaced by attempt 1 on n3, with the pods that go with it.
async fn after_eviction() -> (TrainingRunResource, TrainingRunResource, Vec<Value>) {
    let cached = settle().await;
    let mut pods = settled_pods(&cached);
    pods[3]["status"]["phase"] = json!("Failed");
    pods[3]["status"]["reason"] = json!("Evicted");
    let (task, mut fake) = reconcile_with(&cached, pods.clone()).await;
    fake.expect_delete(&format!("{PODS}/demo-s1-r0")).await;
    fake.expect_create(PODS).await;
    fake.expect_event().await;
    let status = expect_status(&mut fake, &cached).await;
    finish(task, fake).await;
    assert_eq!(status.reassignments[0].reason, "Evicted");
    let mut stored = cached.clone();
    stored.status = Some(status);
    stored.metadata.resource_version = Some("2".to_owned());
    // The evicted pod is terminating; its replacement runs on n3.
    pods[3]["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
    pods.push(to_json(&shard(&cached, (1, 0, 1), "Running", "n3")));
    (cached, stored, pods)
}

#[tokio::test]
async fn a_reconcile_plans_from_a_fresh_read_not_the_cached_run() {
    // The deletion of the evicted pod wakes the run again while the
    // controller's cache still holds the status from before the move.
    let (cached, stored, pods) = after_eviction().await;
    let (task, mut fake) = start(&cached, &nodes(), Some(report()));
    opening(&mut fake, &stored, &cached, pods).await;
    // No second move, no second event: the status only learns where the
    // replacement runs, and the move keeps its reason.
    let status = expect_status(&mut fake, &stored).await;
    assert_eq!(status.total_reassignments, 1);
    assert_eq!(status.reassignments.len(), 1);
    assert_eq!(status.reassignments[0].reason, "Evicted");
    assert_eq!(status.shards[2].node.as_deref(), Some("n3"));
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_stale_status_write_is_refused_and_redone() {
    // Were the fresh read to race a write it cannot see, the API server
    // refuses the write made from the older version; the reconcile fails
    // without overwriting, and the error policy redoes it soon.
    let (cached, stored, pods) = after_eviction().await;
    let mut gone = pods.clone();
    gone.remove(3);
    let (client, mut fake) = fake_api();
    let ctx = context(client, &nodes(), Some(report()));
    let task = tokio::spawn(reconcile(Arc::new(cached.clone()), ctx.clone()));
    opening(&mut fake, &cached, &cached, gone).await;
    // The stale plan moves the shard once more (its pod is gone)...
    let call = fake.expect(Method::POST, PODS).await;
    call.reply_with(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "AlreadyExists", "code": 409}),
    );
    fake.expect_event().await;
    // ...but its status write names version 1, which is no longer current.
    let call = fake.expect(Method::PATCH, STATUS).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "1");
    assert_eq!(
        call.body["status"]["reassignments"][0]["reason"],
        "PodDeleted"
    );
    call.reply_with(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "the object has been modified"}),
    );
    // The run is read again: its status is not the one planned from.
    fake.expect_get(RUN, Some(to_json(&stored))).await;
    let error = task.await.expect("task").expect_err("a stale write fails");
    assert!(matches!(error, ReconcileError::StaleStatus), "{error}");
    assert_eq!(
        error_policy(Arc::new(cached), &error, ctx),
        Action::requeue(RETRY_STALE)
    );
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_status_write_that_conflicts_outside_the_status_is_repeated() {
    // A label was added between the read and the write: the status is still
    // the one planned from, so the write goes again with the new version.
    let run = settle().await;
    let mut pods = settled_pods(&run);
    pods[1]["status"]["phase"] = json!("Failed");
    let (task, mut fake) = reconcile_with(&run, pods).await;
    fake.expect_delete(&format!("{PODS}/demo-s0-r0")).await;
    fake.expect_create(PODS).await;
    fake.expect_event().await;
    let call = fake.expect(Method::PATCH, STATUS).await;
    let first = call.body["status"].clone();
    call.reply_with(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Conflict", "code": 409}),
    );
    let mut labelled = to_json(&run);
    labelled["metadata"]["labels"] = json!({"team": "ml"});
    labelled["metadata"]["resourceVersion"] = json!("7");
    fake.expect_get(RUN, Some(labelled.clone())).await;
    let call = fake.expect(Method::PATCH, STATUS).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "7");
    assert_eq!(call.body["status"], first, "the same status, once more");
    call.reply(&labelled);
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_pod_deleted_by_hand_moves_its_shard_but_keeps_its_node() {
    for (disruption, node_caused) in [
        (None, false),
        (Some("EvictionByEvictionAPI"), false),
        (Some("PreemptionByScheduler"), false),
        (Some("DeletionByTaintManager"), true),
    ] {
        let run = settle().await;
        let mut pods = settled_pods(&run);
        pods[2]["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        if let Some(reason) = disruption {
            pods[2]["status"]["conditions"]
                .as_array_mut()
                .expect("conditions")
                .push(json!({"type": "DisruptionTarget", "status": "True", "reason": reason}));
        }
        let (task, mut fake) = reconcile_with(&run, pods).await;
        let replacement = fake.expect_create(PODS).await;
        assert_eq!(replacement["metadata"]["name"], "demo-s0-r1-a1");
        let (_, _, note, _) = fake.expect_event().await;
        let reason = disruption.unwrap_or("PodDeleted");
        assert!(note.ends_with(&format!("({reason})")), "{note}");
        let status = expect_status(&mut fake, &run).await;
        assert_eq!(status.reassignments[0].reason, reason);
        assert_eq!(status.total_reassignments, 1);
        let failed: &[&str] = if node_caused { &["n2"] } else { &[] };
        assert_eq!(status.failed_nodes, failed, "{reason}");
        finish(task, fake).await;
    }
}

#[tokio::test]
async fn a_shard_whose_node_was_deleted_moves_and_its_node_is_failed() {
    // The node is gone from the cache; asking the API server confirms it.
    let run = settle().await;
    let nodes = vec![node("n1", true), node("n3", true)];
    let mut pods = settled_pods(&run);
    pods.remove(4);
    let (task, mut fake) = reconcile_on(&nodes, &run, pods).await;
    fake.expect_get("/api/v1/nodes/n2", None).await;
    fake.expect_delete(&format!("{PODS}/demo-s0-r1")).await;
    for _ in 0..2 {
        fake.expect_create(PODS).await;
    }
    for _ in 0..2 {
        let (_, _, note, _) = fake.expect_event().await;
        assert!(note.ends_with("(NodeLost)"), "{note}");
    }
    let status = expect_status(&mut fake, &run).await;
    assert_eq!(status.failed_nodes, ["n2"]);
    finish(task, fake).await;

    // A node merely missing from a lagging cache is no loss.
    let (task, mut fake) = reconcile_on(&nodes, &run, settled_pods(&run)).await;
    fake.expect_get("/api/v1/nodes/n2", Some(to_json(&node("n2", true))))
        .await;
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}

#[tokio::test]
async fn a_run_with_storage_gets_its_volume_claim_once() {
    let mut run = run(2, 2);
    run.spec.storage = Some(pipewright_spec::StorageSpec {
        size: "20Gi".to_owned(),
        storage_class_name: None,
    });
    let (task, mut fake) = start(&run, &nodes(), Some(report()));
    fake.expect_get(RUN, Some(to_json(&run))).await;
    let mut without = run.clone();
    without.spec.storage = None;
    // Everything else is in place; the claim is not.
    children_in_place(&mut fake, &without).await;
    fake.expect_get(CLAIM, None).await;
    let claim = fake
        .expect_create("/api/v1/namespaces/ml/persistentvolumeclaims")
        .await;
    assert_eq!(claim["metadata"]["name"], "demo-state");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "20Gi");
    assert_eq!(claim["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    fake.expect_list(PODS, SELECTOR, "PodList", settled_pods(&run))
        .await;
    expect_status(&mut fake, &run).await;
    finish(task, fake).await;
}

#[tokio::test]
async fn a_stage_larger_than_every_node_is_reported_and_its_pods_still_made() {
    let mut run = run(2, 1);
    run.spec.placement.memory_per_worker = Some("24Gi".to_owned());
    let small: Vec<Node> = ["n1", "n2"]
        .into_iter()
        .map(|name| {
            let mut n = node(name, true);
            if let Some(status) = n.status.as_mut() {
                status.allocatable = Some(
                    [("memory".to_owned(), Quantity("16Gi".to_owned()))]
                        .into_iter()
                        .collect(),
                );
            }
            n
        })
        .collect();
    let (task, mut fake) = reconcile_on(&small, &run, vec![]).await;
    let coordinator = fake.expect_create(PODS).await;
    assert_eq!(coordinator["metadata"]["name"], "demo-coordinator");
    for name in ["demo-s0-r0", "demo-s1-r0"] {
        let pod = fake.expect_create(PODS).await;
        assert_eq!(pod["metadata"]["name"], name);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"]["memory"],
            "24Gi"
        );
    }
    let (type_, reason, note, _) = fake.expect_event().await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Warning", "InsufficientNodeMemory")
    );
    assert!(note.starts_with("stage 0 requests 24Gi"), "{note}");
    let status = expect_status(&mut fake, &run).await;
    let scheduled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled")
        .expect("Scheduled");
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("False", "InsufficientNodeMemory")
    );
    assert!(
        scheduled
            .message
            .contains("has 16Gi (17179869184 bytes) allocatable"),
        "{}",
        scheduled.message
    );
    assert_eq!(finish(task, fake).await, Action::requeue(POLL));
}
