//! Leader election against a scripted fake API server.

mod common;

use std::time::Duration;

use common::{fake_api, Fake};
use http::Method;
use pipewright_operator::leader::{LeaderElector, LeaseConfig};
use serde_json::{json, Value};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pipewright-operator";

fn elector(client: kube::Client, lease_duration: Duration) -> LeaderElector {
    let mut config = LeaseConfig::new(
        "pipewright-operator".to_owned(),
        "ops".to_owned(),
        "op-a".to_owned(),
    );
    config.lease_duration = lease_duration;
    LeaderElector::new(client, config)
}

fn lease(holder: Option<&str>, duration: i32, transitions: i32) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": duration,
        "acquireTime": "2026-01-01T00:00:00.000000Z",
        "renewTime": "2026-01-01T00:00:05.000000Z",
        "leaseTransitions": transitions,
    });
    if let Some(holder) = holder {
        spec["holderIdentity"] = json!(holder);
    }
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "pipewright-operator", "namespace": "ops", "resourceVersion": "41"},
        "spec": spec})
}

async fn expect_replace(fake: &mut Fake) -> Value {
    let call = fake.expect(Method::PUT, LEASE).await;
    // The resource version read is sent back: a concurrent writer makes
    // this write fail instead of being overwritten.
    assert_eq!(call.body["metadata"]["resourceVersion"], "41");
    call.echo()["spec"].clone()
}

#[tokio::test]
async fn the_first_replica_creates_the_lease() {
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(async move {
        elector(client, Duration::from_secs(15))
            .try_acquire_or_renew()
            .await
    });
    fake.expect_get(LEASE, None).await;
    let created = fake.expect_create(LEASES).await;
    assert_eq!(created["spec"]["holderIdentity"], "op-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    assert!(task.await.expect("task").expect("acquired"));
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn a_lease_held_by_another_replica_is_left_alone_until_it_expires() {
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(async move {
        elector(client, Duration::from_secs(15))
            .try_acquire_or_renew()
            .await
    });
    fake.expect_get(LEASE, Some(lease(Some("op-b"), 15, 3)))
        .await;
    assert!(!task.await.expect("task").expect("no error"));
    fake.expect_nothing_more().await;

    // A record unchanged for its whole duration (0 s here) is taken over.
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(async move {
        elector(client, Duration::from_secs(15))
            .try_acquire_or_renew()
            .await
    });
    fake.expect_get(LEASE, Some(lease(Some("op-b"), 0, 3)))
        .await;
    let spec = expect_replace(&mut fake).await;
    assert_eq!(spec["holderIdentity"], "op-a");
    assert_eq!(spec["leaseTransitions"], 4);
    assert_ne!(spec["acquireTime"], "2026-01-01T00:00:00.000000Z");
    assert!(task.await.expect("task").expect("taken over"));
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn the_holder_renews_without_a_new_transition() {
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(async move {
        elector(client, Duration::from_secs(15))
            .try_acquire_or_renew()
            .await
    });
    fake.expect_get(LEASE, Some(lease(Some("op-a"), 15, 3)))
        .await;
    let spec = expect_replace(&mut fake).await;
    assert_eq!(spec["holderIdentity"], "op-a");
    assert_eq!(spec["leaseTransitions"], 3);
    assert_eq!(spec["acquireTime"], "2026-01-01T00:00:00.000000Z");
    assert_ne!(spec["renewTime"], "2026-01-01T00:00:05.000000Z");
    assert!(task.await.expect("task").expect("renewed"));
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn losing_a_race_for_the_lease_is_not_leading() {
    let (client, mut fake) = fake_api();
    let task = tokio::spawn(async move {
        elector(client, Duration::from_secs(15))
            .try_acquire_or_renew()
            .await
    });
    fake.expect_get(LEASE, Some(lease(None, 15, 3))).await;
    fake.expect(Method::PUT, LEASE).await.reply_with(
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    );
    assert!(!task.await.expect("task").expect("no error"));
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn release_hands_the_lease_over_at_once() {
    let (client, mut fake) = fake_api();
    let task =
        tokio::spawn(async move { elector(client, Duration::from_secs(15)).release().await });
    fake.expect_get(LEASE, Some(lease(Some("op-a"), 15, 3)))
        .await;
    let spec = expect_replace(&mut fake).await;
    assert_eq!(spec.get("holderIdentity"), None);
    assert_eq!(spec["leaseDurationSeconds"], 1);
    task.await.expect("task").expect("released");
    fake.expect_nothing_more().await;

    // Another replica's lease is not touched.
    let (client, mut fake) = fake_api();
    let task =
        tokio::spawn(async move { elector(client, Duration::from_secs(15)).release().await });
    fake.expect_get(LEASE, Some(lease(Some("op-b"), 15, 3)))
        .await;
    task.await.expect("task").expect("nothing to release");
    fake.expect_nothing_more().await;
}

#[tokio::test]
async fn the_holder_stops_when_another_replica_took_the_lease() {
    let (client, mut fake) = fake_api();
    let mut config = LeaseConfig::new(
        "pipewright-operator".to_owned(),
        "ops".to_owned(),
        "op-a".to_owned(),
    );
    config.retry_period = Duration::from_millis(10);
    let elector = LeaderElector::new(client, config);
    let stop = tokio_util::sync::CancellationToken::new();
    let watched = stop.clone();
    let task = tokio::spawn(async move { elector.keep(&watched).await });
    // One renewal goes through, then the lease belongs to op-b.
    fake.expect_get(LEASE, Some(lease(Some("op-a"), 15, 3)))
        .await;
    expect_replace(&mut fake).await;
    fake.expect_get(LEASE, Some(lease(Some("op-b"), 15, 4)))
        .await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("keep returns once the lease is lost")
        .expect("task");
    assert!(!stop.is_cancelled(), "returned on its own, not stopped");
}
