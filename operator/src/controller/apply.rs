//! Applying to the API server: the run's children, its pods as planned, its
//! status, and events about it. Every write here is idempotent, so a
//! reconcile that failed halfway is simply done again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, ObjectReference, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use pipewright_spec::{TrainingRunResource, TrainingRunStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::plan::{describe, is_node_ready, quarantine_note, PodPlan};
use super::{Context, ReconcileError, MANAGER};
use crate::children::{run_key_name, Blueprint, Children, JOIN_TOKEN_FIELD, LABEL_RUN};

/// Pod creations in flight at once.
const CREATE_CONCURRENCY: usize = 16;

/// Attempts at a status write whose only conflict is with changes outside
/// the status (the spec, labels, annotations).
const STATUS_WRITE_ATTEMPTS: usize = 3;

/// The API endpoints of one namespace.
pub(super) struct Apis {
    pub(super) runs: Api<TrainingRunResource>,
    pub(super) pods: Api<Pod>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    services: Api<Service>,
    budgets: Api<PodDisruptionBudget>,
    claims: Api<PersistentVolumeClaim>,
}

impl Apis {
    pub(super) fn new(client: &Client, namespace: &str) -> Self {
        Self {
            runs: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client.clone(), namespace),
            budgets: Api::namespaced(client.clone(), namespace),
            claims: Api::namespaced(client.clone(), namespace),
        }
    }
}

/// Makes the Secret once, brings the manifest ConfigMap, the Services and
/// the disruption budgets to what the run asks for, and makes the
/// coordinator's volume claim once; returns the children built.
pub(super) async fn ensure_children(
    apis: &Apis,
    blueprint: &Blueprint<'_>,
    run: &str,
) -> Result<Children, ReconcileError> {
    ensure_secret(&apis.secrets, blueprint, run).await?;
    let children = blueprint.children()?;
    ensure(&apis.config_maps, &children.manifest).await?;
    ensure(&apis.services, &children.shard_service).await?;
    ensure(&apis.services, &children.coordinator_service).await?;
    ensure_budgets(&apis.budgets, run, &children.disruption_budgets).await?;
    if let Some(claim) = &children.state_claim {
        ensure_claim(&apis.claims, claim).await?;
    }
    Ok(children)
}

/// Creates the run's Secret when it is missing, and adds a join token to one
/// made before join tokens existed; never replaces a value.
async fn ensure_secret(
    secrets: &Api<Secret>,
    blueprint: &Blueprint<'_>,
    name: &str,
) -> Result<(), ReconcileError> {
    let Some(secret) = secrets.get_opt(&run_key_name(name)).await? else {
        let secret = blueprint.secret(random_hex(32)?, random_hex(16)?);
        return match secrets.create(&post_params(), &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        };
    };
    let has_token = secret
        .data
        .as_ref()
        .is_some_and(|d| d.contains_key(JOIN_TOKEN_FIELD));
    if !has_token {
        let patch = json!({"stringData": {JOIN_TOKEN_FIELD: random_hex(16)?}});
        secrets
            .patch(
                &run_key_name(name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    Ok(())
}

/// Creates the coordinator's volume claim when it is missing. An existing
/// claim is left as it is: most of a claim's spec cannot change, and its
/// data outlives any edit of `spec.storage`.
async fn ensure_claim(
    claims: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
) -> Result<(), kube::Error> {
    let name = claim.metadata.name.clone().unwrap_or_default();
    if claims.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    match claims.create(&post_params(), claim).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creations name this operator as their field manager.
fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PostParams::default()
    }
}

/// `bytes` random bytes from the operating system, as lowercase hex.
fn random_hex(bytes: usize) -> Result<String, ReconcileError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ReconcileError::Random(e.to_string()))?;
    Ok(hex::encode(buf))
}

/// Applies `desired` unless the stored object already has every field of it
/// with the same value (fields the API server added are not differences).
async fn ensure<K>(api: &Api<K>, desired: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    if let Some(current) = api.get_opt(&name).await? {
        if covers(&to_json(&current), &to_json(desired)) {
            return Ok(());
        }
    }
    apply(api, desired).await
}

/// The disruption budgets of a run: apply what differs, delete what the
/// run no longer has (a stage dropped to one replica, fewer stages).
async fn ensure_budgets(
    api: &Api<PodDisruptionBudget>,
    run: &str,
    desired: &[PodDisruptionBudget],
) -> Result<(), kube::Error> {
    let existing = api
        .list(&ListParams::default().labels(&format!("{LABEL_RUN}={run}")))
        .await?
        .items;
    for budget in desired {
        let found = existing
            .iter()
            .find(|e| e.metadata.name == budget.metadata.name);
        if !found.is_some_and(|e| covers(&to_json(e), &to_json(budget))) {
            apply(api, budget).await?;
        }
    }
    for stale in &existing {
        if !desired
            .iter()
            .any(|d| d.metadata.name == stale.metadata.name)
        {
            api.delete(&stale.name_any(), &DeleteParams::background())
                .await?;
        }
    }
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Whether `have` contains every field of `want` with an equal value; lists
/// must have the same length and cover element by element.
pub fn covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(have), Value::Object(want)) => want
            .iter()
            .all(|(k, w)| w.is_null() || have.get(k).is_some_and(|h| covers(h, w))),
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len() && have.iter().zip(want).all(|(h, w)| covers(h, w))
        }
        (have, want) => have == want,
    }
}

/// Server-side applies `object` as this operator, taking over its fields.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// The run's pods (every pod carrying its run label).
pub(super) async fn list_pods(api: &Api<Pod>, run: &str) -> Result<Vec<Pod>, kube::Error> {
    let selector = format!("{LABEL_RUN}={run}");
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Deletes pod `name`; one already gone is not an error.
async fn delete_pod(api: &Api<Pod>, name: &str, params: &DeleteParams) -> Result<(), kube::Error> {
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes every pod in `pods` that is not already being deleted.
pub(super) async fn delete_live_pods(api: &Api<Pod>, pods: &[Pod]) -> Result<(), kube::Error> {
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        delete_pod(api, &pod.name_any(), &DeleteParams::background()).await?;
    }
    Ok(())
}

/// Carries out the pod deletions and creations of `plan`; returns the run's
/// pods afterwards (`pods` less those deleted, with those created).
pub(super) async fn apply_plan(
    api: &Api<Pod>,
    plan: &PodPlan,
    blueprint: &Blueprint<'_>,
    coordinator: &Pod,
    mut pods: Vec<Pod>,
) -> Result<Vec<Pod>, kube::Error> {
    for (pod, grace) in &plan.delete {
        let params = match grace {
            Some(seconds) => DeleteParams::default().grace_period(*seconds),
            None => DeleteParams::background(),
        };
        delete_pod(api, pod, &params).await?;
        pods.retain(|p| p.metadata.name.as_deref() != Some(pod.as_str()));
    }
    let mut to_create: Vec<Pod> = plan
        .create
        .iter()
        .map(|s| blueprint.shard_pod(s.stage, s.replica, s.attempt, &plan.failed_nodes))
        .collect();
    if plan.create_coordinator {
        to_create.insert(0, coordinator.clone());
    }
    pods.extend(create_pods(api, &to_create).await?);
    Ok(pods)
}

/// Creates `to_create`, [`CREATE_CONCURRENCY`] at a time (a run of a
/// thousand shards would otherwise wait on a thousand round trips in a
/// row); returns them as created, in order. A pod that exists already was
/// made by an earlier reconcile whose status write was lost.
async fn create_pods(api: &Api<Pod>, to_create: &[Pod]) -> Result<Vec<Pod>, kube::Error> {
    let params = post_params();
    let mut creations = Vec::with_capacity(to_create.len());
    for pod in to_create {
        let params = &params;
        creations.push(async move { (pod, api.create(params, pod).await) });
    }
    let results: Vec<_> = futures::stream::iter(creations)
        .buffered(CREATE_CONCURRENCY)
        .collect()
        .await;
    let mut created = Vec::with_capacity(results.len());
    for (pod, result) in results {
        match result {
            Ok(made) => created.push(made),
            Err(kube::Error::Api(e)) if e.code == 409 => created.push(pod.clone()),
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Writes `status` when it differs from the status of `run`, the copy this
/// reconcile planned from.
///
/// The write is a server-side apply that names `run`'s `resourceVersion`, so
/// the API server refuses it (409 Conflict) when the run changed since it
/// was read. A run whose status is still the one planned from (its spec or
/// metadata changed) is read again and the write repeated; a run whose
/// status changed fails the reconcile with [`ReconcileError::StaleStatus`],
/// so that it is planned again from the newer status instead of
/// overwriting it. A run deleted meanwhile needs no status.
pub(super) async fn write_status(
    runs: &Api<TrainingRunResource>,
    run: &TrainingRunResource,
    status: &TrainingRunStatus,
) -> Result<(), ReconcileError> {
    let previous = run.status.clone().unwrap_or_default();
    if *status == previous {
        return Ok(());
    }
    let name = run.name_any();
    let mut version = run.meta().resource_version.clone();
    for _ in 0..STATUS_WRITE_ATTEMPTS {
        let body = json!({
            "apiVersion": pipewright_spec::API_VERSION,
            "kind": pipewright_spec::KIND,
            "metadata": {"name": name, "resourceVersion": version},
            "status": status,
        });
        let result = runs
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await;
        match result {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let Some(now) = runs.get_opt(&name).await? else {
                    return Ok(());
                };
                if now.status.clone().unwrap_or_default() != previous {
                    return Err(ReconcileError::StaleStatus);
                }
                tracing::debug!("the run changed outside its status; writing the status again");
                version = now.meta().resource_version.clone();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ReconcileError::StaleStatus)
}

/// Publishes an event about `run`; a failure is logged, never fatal.
pub(super) async fn publish(
    ctx: &Context,
    run: &TrainingRunResource,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_about(ctx, run, type_, reason, note, None).await;
}

/// Publishes an event about `run` and a `related` object; events about
/// different objects are never folded into one series.
async fn publish_about(
    ctx: &Context,
    run: &TrainingRunResource,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: related,
    };
    if let Err(error) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
        tracing::warn!(%error, reason, "publishing an event failed");
    }
}

/// One `ShardReassigned` event per move of `plan`, about the pod left.
pub(super) async fn announce_moves(
    ctx: &Context,
    run: &TrainingRunResource,
    namespace: &str,
    plan: &PodPlan,
) {
    for moved in &plan.reassignments {
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(moved.from_pod.clone()),
            namespace: Some(namespace.to_owned()),
            ..ObjectReference::default()
        };
        let note = describe(moved);
        publish_about(
            ctx,
            run,
            EventType::Warning,
            "ShardReassigned",
            note,
            Some(pod),
        )
        .await;
    }
}

/// One `ShardQuarantined` warning per shard of `plan` whose worker was
/// quarantined, about the pod left: it names the shard, the pod and the
/// worker's termination message (the coordinator's reason and step).
pub(super) async fn announce_quarantines(
    ctx: &Context,
    run: &TrainingRunResource,
    namespace: &str,
    plan: &PodPlan,
) {
    for q in &plan.quarantined {
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(q.pod.clone()),
            namespace: Some(namespace.to_owned()),
            ..ObjectReference::default()
        };
        publish_about(
            ctx,
            run,
            EventType::Warning,
            "ShardQuarantined",
            quarantine_note(q),
            Some(pod),
        )
        .await;
    }
}

/// Readiness of every node that holds one of `pods` or held a shard in
/// `previous`: `Some(ready)`, or `None` for a node that no longer exists.
/// Nodes come from the watch's cache; one the cache does not hold (not seen
/// yet, or deleted) is asked for, so that a lagging cache never passes for a
/// lost node.
pub(super) async fn node_readiness_of(
    client: &Client,
    cache: &Store<Node>,
    previous: &TrainingRunStatus,
    pods: &[Pod],
) -> Result<BTreeMap<String, Option<bool>>, kube::Error> {
    let names: BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.as_deref())
        .chain(previous.shards.iter().filter_map(|s| s.node.as_deref()))
        .collect();
    let api: Api<Node> = Api::all(client.clone());
    let mut readiness = BTreeMap::new();
    for name in names {
        let node = match cache.get(&ObjectRef::new(name)) {
            Some(node) => Some(node),
            None => api.get_opt(name).await?.map(Arc::new),
        };
        readiness.insert(name.to_owned(), node.as_deref().map(is_node_ready));
    }
    Ok(readiness)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_lowercase_hex_of_the_length_asked() {
        let key = random_hex(32).expect("random");
        assert_eq!(key.len(), 64);
        assert!(key
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(key, random_hex(32).expect("random"));
    }

    #[test]
    fn covers_ignores_fields_the_api_server_adds() {
        let want =
            json!({"spec": {"ports": [{"name": "link", "port": 7071}], "clusterIP": "None"}});
        let have = json!({"spec": {"ports": [{"name": "link", "port": 7071, "protocol": "TCP"}],
            "clusterIP": "None", "sessionAffinity": "None"}, "status": {}});
        assert!(covers(&have, &want));
        let changed =
            json!({"spec": {"ports": [{"name": "link", "port": 7000}], "clusterIP": "None"}});
        assert!(!covers(&have, &changed));
        let more = json!({"spec": {"ports": [{"name": "link", "port": 7071}, {"name": "ring"}]}});
        assert!(!covers(&have, &more));
    }
}
