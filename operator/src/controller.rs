//! The reconciler. For each `TrainingRun` it:
//!
//! 1. refuses a spec that cannot run ([`Blueprint::new`]) in the status;
//! 2. makes the Secret (run key, join token) once;
//! 3. brings the manifest ConfigMap, the Services and the disruption budgets
//!    to what the run asks for, writing only what differs, and makes the
//!    coordinator's volume claim once when the run sets `spec.storage`;
//! 4. while suspended, deletes the run's pods and stops there;
//! 5. plans the shard pods ([`plan_pods`]): a shard whose pod failed, was
//!    evicted or deleted, or whose node is not ready or gone moves to a new
//!    pod (the next attempt name) kept off every node that caused a move of
//!    this run (`status.failedNodes`: a node not ready or gone, a node-pressure
//!    eviction, a node that refused the pod; never a pod deleted by a person
//!    or a drain, nor a container's own failure); more moves than
//!    `spec.placement.maxReassignments` fail the run;
//! 6. asks the coordinator for progress ([`CoordinatorProbe`]);
//! 7. writes the status ([`observed_status`]) when it changed.
//!
//! Each reconcile plans from a fresh read of the run, not the watch's cached
//! copy, and its status write is refused when the run changed meanwhile (see
//! [`write_status`]), so a move is never recorded twice nor its reason
//! overwritten.
//!
//! It keeps no state between calls: what it must remember (each shard's
//! attempt and pod, failed nodes, reassignments) lives in the run's status,
//! so a restarted or newly elected operator carries on where the last one
//! stopped. A reconcile of a run whose children and pods are as they should
//! be writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, ObjectReference, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use pipewright_spec::{
    Reassignment, RunPhase, ShardStatus, StageStatus, TrainingRunResource, TrainingRunStatus,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::children::{
    coordinator_name, coordinator_url, run_key_name, shard_pod_name, Blueprint, ChildrenError,
    Settings, GPU_RESOURCE, JOIN_TOKEN_FIELD, LABEL_ROLE, LABEL_RUN, ROLE_COORDINATOR, ROLE_SHARD,
};
use crate::coordinator::{CoordinatorProbe, CoordinatorReport};
use crate::metrics::Metrics;

/// Field manager of every write this operator makes.
pub const MANAGER: &str = "pipewright-operator";

/// Pod creations in flight at once.
const CREATE_CONCURRENCY: usize = 16;
/// How often a settled run is looked at again without any event, to pick up
/// changes no watch reports.
pub const RESYNC: Duration = Duration::from_secs(60);
/// How often a running run is looked at: the coordinator's progress is read
/// then, and a gang waiting to start is checked against its timeout.
pub const POLL: Duration = Duration::from_secs(10);
/// Delay before a failed reconcile is retried.
pub const RETRY: Duration = Duration::from_secs(15);
/// Delay before a reconcile whose status write lost to a newer status is
/// redone from a fresh read.
pub const RETRY_STALE: Duration = Duration::from_secs(1);
/// Reassignments kept in the status; older ones are dropped so the object
/// stays small on a long run with many failures (the total is kept apart).
pub const MAX_REASSIGNMENTS: usize = 50;

/// What every reconcile needs.
pub struct Context {
    /// Client of the API server.
    pub client: Client,
    /// Operator-wide settings for the children.
    pub settings: Settings,
    /// Nodes as last seen, to tell whether a shard's node is ready.
    pub nodes: Store<Node>,
    /// Publishes events about runs.
    pub recorder: Recorder,
    /// Asks coordinators for their progress.
    pub probe: Arc<dyn CoordinatorProbe>,
    /// Counters and timings of this operator.
    pub metrics: Arc<Metrics>,
}

/// Why a reconcile failed; it is retried after [`RETRY`].
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API server refused or failed a request.
    #[error("API request: {0}")]
    Kube(#[from] kube::Error),
    /// The run arrived without a namespace.
    #[error("run {0:?} has no namespace")]
    NoNamespace(String),
    /// The operating system's random source failed.
    #[error("generating a run secret: {0}")]
    Random(String),
    /// A child could not be built (a defect: the blueprint was checked).
    #[error("building children: {0}")]
    Children(#[from] ChildrenError),
    /// The run's status changed between this reconcile's read and its write
    /// (another writer); the reconcile is redone from a fresh read.
    #[error("the run's status changed while it was reconciled")]
    StaleStatus,
}

/// Reconciles one run; see the module documentation.
///
/// # Errors
/// [`ReconcileError`] when an API request fails.
#[tracing::instrument(skip_all, fields(run = %run.name_any(), namespace = run.namespace().unwrap_or_default()))]
pub async fn reconcile(
    run: Arc<TrainingRunResource>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = match fresh(&run, &ctx.client).await {
        Ok(Some(fresh)) => reconcile_run(&fresh, &ctx).await,
        Ok(None) => Ok(Action::await_change()),
        Err(error) => Err(error),
    };
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.is_err());
    result
}

/// The run as the API server has it now, or `None` when it is gone or being
/// deleted.
///
/// The controller hands over its cached copy, which can lag behind this
/// operator's own last status write: a reconcile woken by the deletion of a
/// pod that the previous reconcile replaced would otherwise plan from the
/// status before that move, and move the shard a second time under another
/// reason. Every reconcile therefore plans from a fresh read, and its status
/// write carries that read's `resourceVersion` (see [`write_status`]).
async fn fresh(
    cached: &TrainingRunResource,
    client: &Client,
) -> Result<Option<TrainingRunResource>, ReconcileError> {
    if cached.meta().deletion_timestamp.is_some() {
        // Children carry owner references; the garbage collector removes them.
        return Ok(None);
    }
    let name = cached.name_any();
    let namespace = cached
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let runs: Api<TrainingRunResource> = Api::namespaced(client.clone(), &namespace);
    let run = runs.get_opt(&name).await?;
    if run.is_none() {
        tracing::debug!("the run is gone");
    }
    Ok(run.filter(|r| r.meta().deletion_timestamp.is_none()))
}

/// The API endpoints of one namespace.
struct Apis {
    runs: Api<TrainingRunResource>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    services: Api<Service>,
    budgets: Api<PodDisruptionBudget>,
    claims: Api<PersistentVolumeClaim>,
}

impl Apis {
    fn new(client: &Client, namespace: &str) -> Self {
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

async fn reconcile_run(run: &TrainingRunResource, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = run.name_any();
    let namespace = run
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let apis = Apis::new(&ctx.client, &namespace);
    let previous = run.status.clone().unwrap_or_default();
    let now = now();

    if is_finished(run, &previous) {
        return finished(run, &apis, &previous, &now).await;
    }
    let blueprint = match Blueprint::new(run, &ctx.settings) {
        Ok(blueprint) => blueprint,
        Err(error) => {
            // The spec itself cannot be run; say so and wait for the user to
            // change it rather than retrying forever.
            let status = refused_status(run, &error, now);
            write_status(&apis.runs, run, &status).await?;
            return Ok(Action::await_change());
        }
    };

    ensure_secret(&apis.secrets, &blueprint, &name).await?;
    let children = blueprint.children()?;
    ensure(&apis.config_maps, &children.manifest).await?;
    ensure(&apis.services, &children.shard_service).await?;
    ensure(&apis.services, &children.coordinator_service).await?;
    ensure_budgets(&apis.budgets, &name, &children.disruption_budgets).await?;
    if let Some(claim) = &children.state_claim {
        ensure_claim(&apis.claims, claim).await?;
    }

    let selector = format!("{LABEL_RUN}={name}");
    let pods = apis
        .pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;

    if run.spec.suspend {
        delete_live_pods(&apis.pods, &pods).await?;
        let status = suspended_status(run, now);
        if previous.phase != Some(RunPhase::Suspended) {
            publish(
                ctx,
                run,
                EventType::Normal,
                "Suspended",
                "the run's pods are deleted until spec.suspend is cleared".to_owned(),
            )
            .await;
        }
        write_status(&apis.runs, run, &status).await?;
        return Ok(Action::await_change());
    }
    if previous.phase == Some(RunPhase::Suspended) {
        publish(
            ctx,
            run,
            EventType::Normal,
            "Resumed",
            "spec.suspend cleared; starting the run's pods".to_owned(),
        )
        .await;
    }

    let nodes = node_readiness_of(&ctx.client, &ctx.nodes, &previous, &pods).await?;
    let node_ready = |node: &str| nodes.get(node).copied().flatten();
    let plan = plan_pods(run, &previous, &pods, &node_ready);
    let total = previous
        .total_reassignments
        .saturating_add(u32::try_from(plan.reassignments.len()).unwrap_or(u32::MAX));
    if !plan.reassignments.is_empty() {
        ctx.metrics
            .shard_reassignments
            .inc_by(plan.reassignments.len() as u64);
    }
    let limit = run.spec.placement.max_reassignments;
    if total > limit {
        delete_live_pods(&apis.pods, &pods).await?;
        let last = plan
            .reassignments
            .last()
            .map(|r| {
                describe(&Reassignment {
                    to_pod: None,
                    ..r.clone()
                })
            })
            .unwrap_or_default();
        let message = format!(
            "{total} shard reassignments exceed spec.placement.maxReassignments ({limit}); last: {last}"
        );
        publish(ctx, run, EventType::Warning, "RunFailed", message.clone()).await;
        let status = failed_status(run, &previous, &plan, total, message, now);
        write_status(&apis.runs, run, &status).await?;
        return Ok(Action::await_change());
    }

    let mut live: Vec<Pod> = pods;
    for (pod, grace) in &plan.delete {
        let params = match grace {
            Some(seconds) => DeleteParams::default().grace_period(*seconds),
            None => DeleteParams::background(),
        };
        match apis.pods.delete(pod, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        live.retain(|p| p.metadata.name.as_deref() != Some(pod.as_str()));
    }
    let mut to_create: Vec<Pod> = plan
        .create
        .iter()
        .map(|s| blueprint.shard_pod(s.stage, s.replica, s.attempt, &plan.failed_nodes))
        .collect();
    if plan.create_coordinator {
        to_create.insert(0, children.coordinator.clone());
    }
    // Pods are created CREATE_CONCURRENCY at a time (a run of a thousand
    // shards would otherwise wait on a thousand round trips in a row);
    // results are taken in order.
    let params = PostParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PostParams::default()
    };
    let mut creations = Vec::with_capacity(to_create.len());
    for pod in &to_create {
        let (pods, params) = (&apis.pods, &params);
        creations.push(async move { (pod, pods.create(params, pod).await) });
    }
    let results: Vec<_> = futures::stream::iter(creations)
        .buffered(CREATE_CONCURRENCY)
        .collect()
        .await;
    for (pod, result) in results {
        match result {
            Ok(created) => live.push(created),
            // Made by an earlier reconcile whose status write was lost.
            Err(kube::Error::Api(e)) if e.code == 409 => live.push(pod.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    for moved in &plan.reassignments {
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(moved.from_pod.clone()),
            namespace: Some(namespace.clone()),
            ..ObjectReference::default()
        };
        publish_about(
            ctx,
            run,
            EventType::Warning,
            "ShardReassigned",
            describe(moved),
            Some(pod),
        )
        .await;
    }
    if plan.restart_coordinator {
        publish(
            ctx,
            run,
            EventType::Warning,
            "CoordinatorReplaced",
            format!("pod {} failed or lost its node", coordinator_name(&name)),
        )
        .await;
    }

    let coordinator = live
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(coordinator_name(&name).as_str()));
    let coordinator_phase = coordinator.and_then(pod_phase).map(str::to_owned);
    let report = if coordinator_phase.as_deref() == Some("Running") {
        match ctx.probe.status(&coordinator_url(&name, &namespace)).await {
            Ok(report) => Some(report),
            Err(error) => {
                tracing::debug!(%error, "coordinator status unavailable; keeping the last figures");
                None
            }
        }
    } else {
        None
    };
    let observation = Observation {
        pods: &live,
        shards: &plan.shards,
        coordinator_phase: coordinator_phase.as_deref(),
        report: report.as_ref(),
        new_reassignments: plan.reassignments,
        failed_nodes: plan.failed_nodes,
        total_reassignments: total,
    };
    let status = observed_status(run, observation, now.clone());
    let scheduled = find_condition(&status, "Scheduled");
    let was = find_condition(&previous, "Scheduled");
    if let Some(c) = scheduled.filter(|c| is_timeout(&c.reason)) {
        if was.map(|w| w.reason.as_str()) != Some(c.reason.as_str()) {
            publish(ctx, run, EventType::Warning, &c.reason, c.message.clone()).await;
        }
    }
    write_status(&apis.runs, run, &status).await?;
    if matches!(status.phase, Some(RunPhase::Failed)) {
        delete_live_pods(&apis.pods, &live).await?;
    }
    Ok(next_look(run, &status, &now))
}

/// Whether the run is done: succeeded, or failed for the spec it has now
/// (a failed run resumes when its spec changes).
fn is_finished(run: &TrainingRunResource, status: &TrainingRunStatus) -> bool {
    match status.phase {
        Some(RunPhase::Succeeded) => true,
        Some(RunPhase::Failed) => status.observed_generation == run.meta().generation,
        _ => false,
    }
}

/// A finished run waits for its time to live, then is deleted.
async fn finished(
    run: &TrainingRunResource,
    apis: &Apis,
    status: &TrainingRunStatus,
    now: &Time,
) -> Result<Action, ReconcileError> {
    let Some(ttl) = run.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let name = run.name_any();
    let Some(done) = status.completion_time.clone() else {
        let mut stamped = status.clone();
        stamped.completion_time = Some(now.clone());
        write_status(&apis.runs, run, &stamped).await?;
        return Ok(Action::requeue(Duration::from_secs(ttl)));
    };
    let age = seconds_between(&done, now);
    let ttl_signed = i64::try_from(ttl).unwrap_or(i64::MAX);
    if age >= ttl_signed {
        tracing::info!(ttl, "deleting a finished run past its time to live");
        match apis.runs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(
        u64::try_from(ttl_signed - age).unwrap_or(1),
    )))
}

/// When to look at the run again.
fn next_look(run: &TrainingRunResource, status: &TrainingRunStatus, now: &Time) -> Action {
    match status.phase {
        Some(RunPhase::Running | RunPhase::Degraded) => Action::requeue(POLL),
        Some(RunPhase::Pending) => {
            let timeout = run.spec.placement.schedule_timeout_seconds;
            let waited = find_condition(status, "Scheduled")
                .filter(|c| c.status == "False")
                .map_or(0, |c| seconds_between(&c.last_transition_time, now));
            let left = i64::try_from(timeout).unwrap_or(i64::MAX) - waited;
            if left > 0 {
                Action::requeue(POLL.min(Duration::from_secs(left.unsigned_abs())))
            } else {
                Action::requeue(POLL)
            }
        }
        Some(RunPhase::Succeeded | RunPhase::Failed) => match run.spec.ttl_seconds_after_finished {
            Some(ttl) => Action::requeue(Duration::from_secs(ttl)),
            None => Action::await_change(),
        },
        _ => Action::requeue(RESYNC),
    }
}

/// Creates the run's Secret when it is missing, and adds a join token to one
/// made before join tokens existed; never replaces a value.
async fn ensure_secret(
    secrets: &Api<Secret>,
    blueprint: &Blueprint<'_>,
    name: &str,
) -> Result<(), ReconcileError> {
    match secrets.get_opt(&run_key_name(name)).await? {
        None => {
            let secret = blueprint.secret(random_hex(32)?, random_hex(16)?);
            let params = PostParams {
                field_manager: Some(MANAGER.to_owned()),
                ..PostParams::default()
            };
            match secrets.create(&params, &secret).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Some(secret) => {
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
        }
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
    let params = PostParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PostParams::default()
    };
    match claims.create(&params, claim).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

fn random_hex(bytes: usize) -> Result<String, ReconcileError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ReconcileError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
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

/// Deletes every pod in `pods` that is not already being deleted.
async fn delete_live_pods(api: &Api<Pod>, pods: &[Pod]) -> Result<(), kube::Error> {
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        match api
            .delete(&pod.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Attempts at a status write whose only conflict is with changes outside
/// the status (the spec, labels, annotations).
const STATUS_WRITE_ATTEMPTS: usize = 3;

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
async fn write_status(
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
async fn publish(
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

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn seconds_between(from: &Time, to: &Time) -> i64 {
    to.0.as_second() - from.0.as_second()
}

/// Readiness of every node that holds one of `pods` or held a shard in
/// `previous`: `Some(ready)`, or `None` for a node that no longer exists.
/// Nodes come from the watch's cache; one the cache does not hold (not seen
/// yet, or deleted) is asked for, so that a lagging cache never passes for a
/// lost node.
async fn node_readiness_of(
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

/// Whether a node's `Ready` condition is `True`.
fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// One shard's pod as planned.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedShard {
    /// Pipeline stage.
    pub stage: usize,
    /// Replica within the stage.
    pub replica: usize,
    /// Moves so far; names the pod.
    pub attempt: u32,
}

/// What to do about a run's pods.
#[derive(Debug, Default, PartialEq)]
pub struct PodPlan {
    /// Pods to delete, each with a grace period (`None`: the pod's own).
    pub delete: Vec<(String, Option<u32>)>,
    /// Shard pods to create.
    pub create: Vec<PlannedShard>,
    /// Whether the coordinator pod must be created.
    pub create_coordinator: bool,
    /// Whether the coordinator pod is being replaced (it failed or its node
    /// is not ready).
    pub restart_coordinator: bool,
    /// Every shard with the attempt it is at after this plan, stage-major.
    pub shards: Vec<PlannedShard>,
    /// The shards this plan moves.
    pub reassignments: Vec<Reassignment>,
    /// Nodes to keep shard pods off: the run's failed nodes, with those
    /// that caused this plan's moves.
    pub failed_nodes: Vec<String>,
}

/// Decides which pods to make and delete, given the run's previous status,
/// its pods and the state of their nodes (`node_ready`: `Some(ready)`, or
/// `None` for a node that no longer exists). Pure, so every failure case is
/// tested without an API server.
///
/// A shard moves when its pod failed, is being deleted or is gone, or its
/// node is not ready or gone. Its node joins `failed_nodes` only when the
/// node caused the move (see [`failure_of`]).
pub fn plan_pods(
    run: &TrainingRunResource,
    previous: &TrainingRunStatus,
    pods: &[Pod],
    node_ready: &dyn Fn(&str) -> Option<bool>,
) -> PodPlan {
    let name = run.name_any();
    let stages = run.spec.pipeline.stages;
    let replicas = run.spec.pipeline.replicas;
    let mut plan = PodPlan {
        failed_nodes: previous.failed_nodes.clone(),
        ..PodPlan::default()
    };
    let attempts: BTreeMap<(u32, u32), &ShardStatus> = previous
        .shards
        .iter()
        .map(|s| ((s.stage, s.replica), s))
        .collect();
    let mut current = BTreeSet::new();
    for stage in 0..stages {
        for replica in 0..replicas {
            let key = (index(stage), index(replica));
            let recorded = attempts.get(&key);
            let attempt = recorded.map_or(0, |s| s.attempt);
            let pod_name = shard_pod_name(&name, stage, replica, attempt);
            let pod = pods
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(pod_name.as_str()));
            // Placed before and gone now: deleted, or lost with its node.
            let vanished =
                pod.is_none() && recorded.and_then(|s| s.pod.as_deref()) == Some(pod_name.as_str());
            let failure = match pod {
                Some(pod) => failure_of(pod, node_ready),
                None if vanished => Some(vanished_failure(
                    recorded.and_then(|s| s.node.as_deref()),
                    node_ready,
                )),
                None => None,
            };
            let mut next = PlannedShard {
                stage,
                replica,
                attempt,
            };
            if let Some(Failure {
                reason,
                node_caused,
            }) = failure
            {
                let from_node = pod
                    .and_then(|p| p.spec.as_ref()?.node_name.clone())
                    .or_else(|| recorded.and_then(|s| s.node.clone()));
                if let (Some(node), true) = (&from_node, node_caused) {
                    if !plan.failed_nodes.contains(node) {
                        plan.failed_nodes.push(node.clone());
                    }
                }
                next.attempt = attempt.saturating_add(1);
                plan.reassignments.push(Reassignment {
                    stage: key.0,
                    replica: key.1,
                    from_pod: pod_name.clone(),
                    from_node,
                    to_pod: Some(shard_pod_name(&name, stage, replica, next.attempt)),
                    reason,
                    time: None,
                });
                if pod.is_some_and(|p| p.metadata.deletion_timestamp.is_none()) {
                    plan.delete.push((pod_name.clone(), None));
                }
                plan.create.push(next.clone());
            } else if pod.is_none() {
                plan.create.push(next.clone());
            }
            current.insert(shard_pod_name(&name, stage, replica, next.attempt));
            current.insert(pod_name);
            plan.shards.push(next);
        }
    }
    // Pods of earlier attempts, or of shards the spec no longer has.
    for pod in pods {
        let role = label(pod, LABEL_ROLE);
        let pod_name = pod.name_any();
        if role == Some(ROLE_SHARD)
            && pod.metadata.deletion_timestamp.is_none()
            && !current.contains(&pod_name)
        {
            plan.delete.push((pod_name, None));
        }
    }
    let coordinator = pods.iter().find(|p| {
        label(p, LABEL_ROLE) == Some(ROLE_COORDINATOR)
            && p.metadata.name.as_deref() == Some(coordinator_name(&name).as_str())
    });
    match coordinator {
        None => plan.create_coordinator = true,
        Some(pod) if pod.metadata.deletion_timestamp.is_some() => {}
        Some(pod) if pod_phase(pod) == Some("Failed") => {
            plan.delete.push((pod.name_any(), None));
            plan.restart_coordinator = true;
        }
        Some(pod) if on_unready_node(pod, node_ready) => {
            // Its kubelet cannot confirm a graceful deletion; the name is
            // freed at once so the replacement can take it.
            plan.delete.push((pod.name_any(), Some(0)));
            plan.restart_coordinator = true;
        }
        Some(_) => {}
    }
    plan
}

fn index(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn pod_phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Whether `pod` is bound to a node that is not ready or no longer exists.
fn on_unready_node(pod: &Pod, node_ready: &dyn Fn(&str) -> Option<bool>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|node| node_ready(node) != Some(true))
}

/// Why a shard's pod lost its shard, and whether its node is to blame.
#[derive(Clone, Debug, PartialEq)]
struct Failure {
    /// Reason recorded in the reassignment and its event.
    reason: String,
    /// Whether the node goes into `status.failedNodes`, keeping later shard
    /// pods of the run off it.
    node_caused: bool,
}

impl Failure {
    fn new(reason: &str, node_caused: bool) -> Self {
        Self {
            reason: reason.to_owned(),
            node_caused,
        }
    }
}

/// `DisruptionTarget` reasons set when the node, not a person or the
/// scheduler, ends a pod: the node's `NoExecute` taint (not ready,
/// unreachable), the pod garbage collector (node deleted), the kubelet
/// (node-pressure eviction, node shutdown).
const NODE_DISRUPTIONS: [&str; 3] = [
    "DeletionByTaintManager",
    "DeletionByPodGC",
    "TerminationByKubelet",
];

/// Reasons the kubelet or node lifecycle give a failed pod when the node,
/// not the pod's own containers, ended it: eviction for node pressure, a
/// lost or shutting-down node, a pod the node refused to admit (`OutOf…`,
/// `NodeAffinity`, `UnexpectedAdmissionError`).
fn node_failure_reason(reason: &str) -> bool {
    matches!(
        reason,
        "Evicted"
            | "NodeLost"
            | "Shutdown"
            | "Terminated"
            | "NodeShutdown"
            | "NodeAffinity"
            | "UnexpectedAdmissionError"
    ) || reason.starts_with("OutOf")
}

/// Reason of the pod's `DisruptionTarget` condition, when it has one.
fn disruption(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?
        .reason
        .as_deref()
        .filter(|r| !r.is_empty())
}

/// What failed when a node that is not ready, or gone, held a pod.
fn node_state_failure(node: &str, node_ready: &dyn Fn(&str) -> Option<bool>) -> Option<Failure> {
    match node_ready(node) {
        Some(true) => None,
        Some(false) => Some(Failure::new("NodeNotReady", true)),
        None => Some(Failure::new("NodeLost", true)),
    }
}

/// Why a shard pod no longer holds its shard, if it does not.
///
/// Only the node's doing counts against the node (see [`Failure`]): its
/// readiness lost, the node gone, a node-initiated disruption or eviction.
/// A pod deleted by a person, drained off its node (the eviction API) or
/// preempted, and a container that failed on its own, move the shard but
/// leave the node usable.
fn failure_of(pod: &Pod, node_ready: &dyn Fn(&str) -> Option<bool>) -> Option<Failure> {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if let Some(failure) = node.and_then(|n| node_state_failure(n, node_ready)) {
        return Some(failure);
    }
    let disrupted = disruption(pod);
    let by_node = disrupted.is_some_and(|r| NODE_DISRUPTIONS.contains(&r));
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(Failure::new(disrupted.unwrap_or("PodDeleted"), by_node));
    }
    if pod_phase(pod) == Some("Failed") {
        let status = pod.status.as_ref();
        let pod_reason = status
            .and_then(|s| s.reason.clone())
            .filter(|r| !r.is_empty());
        let node_caused = by_node || pod_reason.as_deref().is_some_and(node_failure_reason);
        let reason = pod_reason
            .or_else(|| {
                status
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.reason.clone())
            })
            .unwrap_or_else(|| "PodFailed".to_owned());
        return Some(Failure {
            reason,
            node_caused,
        });
    }
    None
}

/// Why a shard pod that is gone without a trace lost its shard: its node
/// went away or is not ready, or else it was deleted.
fn vanished_failure(node: Option<&str>, node_ready: &dyn Fn(&str) -> Option<bool>) -> Failure {
    node.and_then(|n| node_state_failure(n, node_ready))
        .unwrap_or_else(|| Failure::new("PodDeleted", false))
}

/// "stage S replica R: pod A on node X -> pod B (reason)".
fn describe(moved: &Reassignment) -> String {
    let node = moved
        .from_node
        .as_deref()
        .map_or_else(|| "no node".to_owned(), |n| format!("node {n}"));
    let to = moved.to_pod.as_deref().unwrap_or("none");
    format!(
        "stage {} replica {}: pod {} on {node} -> pod {to} ({})",
        moved.stage, moved.replica, moved.from_pod, moved.reason
    )
}

/// What a reconcile saw and did, for [`observed_status`].
pub struct Observation<'a> {
    /// The run's pods after this reconcile's deletions and creations.
    pub pods: &'a [Pod],
    /// Every shard with its current attempt.
    pub shards: &'a [PlannedShard],
    /// Phase of the coordinator pod.
    pub coordinator_phase: Option<&'a str>,
    /// What the coordinator reported, when it answered.
    pub report: Option<&'a CoordinatorReport>,
    /// Moves made by this reconcile.
    pub new_reassignments: Vec<Reassignment>,
    /// Nodes where shards of the run failed.
    pub failed_nodes: Vec<String>,
    /// Moves over the whole run, these included.
    pub total_reassignments: u32,
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_timeout(reason: &str) -> bool {
    matches!(reason, "Unschedulable" | "ScheduleTimeout")
}

fn find_condition<'a>(status: &'a TrainingRunStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// The status of a run that is not suspended, finished or refused.
pub fn observed_status(
    run: &TrainingRunResource,
    seen: Observation<'_>,
    now: Time,
) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let generation = run.meta().generation;
    let replicas = index(run.spec.pipeline.replicas);
    let min = index(run.spec.min_replicas());
    let by_name: BTreeMap<&str, &Pod> = seen
        .pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
        .collect();

    let mut stage_rows: Vec<StageStatus> = Vec::new();
    let mut running: Vec<u32> = Vec::new();
    let mut shard_rows = Vec::new();
    let mut pending_pods: Vec<&Pod> = Vec::new();
    let name = run.name_any();
    for shard in seen.shards {
        let stage = index(shard.stage);
        if stage_rows.last().is_none_or(|s| s.stage != stage) {
            let layers = previous
                .stages
                .iter()
                .find(|s| s.stage == stage)
                .and_then(|s| s.layers.clone());
            stage_rows.push(StageStatus {
                stage,
                desired_replicas: replicas,
                ready_replicas: 0,
                layers,
            });
            running.push(0);
        }
        let pod_name = shard_pod_name(&name, shard.stage, shard.replica, shard.attempt);
        let pod = by_name.get(pod_name.as_str()).copied();
        if let (Some(row), Some(count)) = (stage_rows.last_mut(), running.last_mut()) {
            if pod.is_some_and(is_ready) {
                row.ready_replicas += 1;
            }
            match pod.and_then(pod_phase) {
                Some("Running") => *count += 1,
                Some("Pending") | None => pending_pods.extend(pod),
                _ => {}
            }
        }
        shard_rows.push(ShardStatus {
            stage,
            replica: index(shard.replica),
            pod: pod.map(|p| p.name_any()),
            node: pod.and_then(|p| p.spec.as_ref()?.node_name.clone()),
            attempt: shard.attempt,
        });
    }
    let ready_shards: u32 = stage_rows.iter().map(|s| s.ready_replicas).sum();
    let desired_shards = index(run.spec.pipeline.stages).saturating_mul(replicas);

    let mut conditions = Vec::new();
    // Gang start: every stage has its minimum of running replicas.
    let short: Vec<String> = stage_rows
        .iter()
        .zip(&running)
        .filter(|(_, n)| **n < min)
        .map(|(s, n)| format!("stage {}: {n} of {replicas} running", s.stage))
        .collect();
    let scheduled = short.is_empty();
    if scheduled {
        conditions.push(condition(
            &previous,
            "Scheduled",
            true,
            "GangRunning",
            format!("every stage has at least {min} of {replicas} replicas running"),
            generation,
            now.clone(),
        ));
    } else {
        let waiting = format!("{} (need {min} per stage)", short.join(", "));
        let since = find_condition(&previous, "Scheduled")
            .filter(|c| c.status == "False")
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        let timeout =
            i64::try_from(run.spec.placement.schedule_timeout_seconds).unwrap_or(i64::MAX);
        let (reason, message) = if seconds_between(&since, &now) < timeout {
            ("WaitingForPods", waiting)
        } else if let Some((pod, why)) = pending_pods.iter().find_map(|p| {
            let c = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            Some((p.name_any(), c.message.clone().unwrap_or_default()))
        }) {
            ("Unschedulable", format!("pod {pod}: {why}"))
        } else {
            (
                "ScheduleTimeout",
                format!("not running after {timeout}s: {waiting}"),
            )
        };
        conditions.push(condition(
            &previous,
            "Scheduled",
            false,
            reason,
            message,
            generation,
            now.clone(),
        ));
    }

    let started =
        scheduled || matches!(previous.phase, Some(RunPhase::Running | RunPhase::Degraded));
    let below: Vec<String> = stage_rows
        .iter()
        .filter(|s| s.ready_replicas < s.desired_replicas)
        .map(|s| {
            format!(
                "stage {}: {} of {} replicas ready",
                s.stage, s.ready_replicas, s.desired_replicas
            )
        })
        .collect();
    let degraded = started && !below.is_empty();
    conditions.push(if degraded {
        condition(
            &previous,
            "Degraded",
            true,
            "StageBelowDesiredReplicas",
            below.join(", "),
            generation,
            now.clone(),
        )
    } else {
        condition(
            &previous,
            "Degraded",
            false,
            if started {
                "AllReplicasReady"
            } else {
                "NotStarted"
            },
            if started {
                "every stage runs all its replicas".to_owned()
            } else {
                "the run has not started".to_owned()
            },
            generation,
            now.clone(),
        )
    });

    let report = seen.report;
    let reported = report.and_then(|r| r.phase.as_deref());
    let phase = if reported == Some("Failed") {
        RunPhase::Failed
    } else if seen.coordinator_phase == Some("Succeeded") || reported == Some("Succeeded") {
        RunPhase::Succeeded
    } else if degraded {
        RunPhase::Degraded
    } else if started {
        RunPhase::Running
    } else {
        RunPhase::Pending
    };
    let (ready, reason, message) = match phase {
        RunPhase::Succeeded => (false, "Succeeded", "training finished".to_owned()),
        RunPhase::Failed => (
            false,
            "TrainingFailed",
            "the coordinator reported the run failed".to_owned(),
        ),
        _ if ready_shards == desired_shards => (
            true,
            "AllShardsReady",
            "every shard has a ready pod".to_owned(),
        ),
        _ => (
            false,
            "ShardsNotReady",
            format!("{ready_shards} of {desired_shards} shards ready"),
        ),
    };
    conditions.insert(
        0,
        condition(
            &previous,
            "Ready",
            ready,
            reason,
            message,
            generation,
            now.clone(),
        ),
    );

    let mut reassignments = previous.reassignments.clone();
    reassignments.extend(seen.new_reassignments.into_iter().map(|mut r| {
        r.time = Some(now.clone());
        r
    }));
    let excess = reassignments.len().saturating_sub(MAX_REASSIGNMENTS);
    reassignments.drain(..excess);
    let terminal = matches!(phase, RunPhase::Succeeded | RunPhase::Failed);
    TrainingRunStatus {
        phase: Some(phase),
        conditions,
        observed_generation: generation,
        ready_shards,
        desired_shards,
        stages: stage_rows,
        shards: shard_rows,
        reassignments,
        step: report.and_then(|r| r.step).or(previous.step),
        // Figures a person reads in `kubectl get`: four significant digits
        // of loss, whole tokens per second.
        loss: report
            .and_then(|r| r.loss)
            .map(significant4)
            .or(previous.loss),
        tokens_per_second: report
            .and_then(|r| r.tokens_per_second)
            .map(f64::round)
            .or(previous.tokens_per_second),
        total_reassignments: seen.total_reassignments,
        failed_nodes: seen.failed_nodes,
        training_phase: report
            .and_then(|r| r.phase.clone())
            .or(previous.training_phase),
        completion_time: if terminal {
            previous.completion_time.or(Some(now))
        } else {
            None
        },
        contributions: match report {
            Some(r) if !r.contributions.is_empty() => top_contributors(&r.contributions),
            _ => previous.contributions.clone(),
        },
        gpus_per_shard: seen
            .pods
            .iter()
            .find(|p| label(p, LABEL_ROLE) == Some(ROLE_SHARD))
            .map(gpu_request)
            .or(previous.gpus_per_shard),
    }
}

/// GPUs a pod's containers request (`nvidia.com/gpu`), 0 when none.
fn gpu_request(pod: &Pod) -> u32 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get(GPU_RESOURCE))
        .filter_map(|q| q.0.parse::<u32>().ok())
        .sum()
}

/// Status of a suspended run: no pods, everything else kept. The
/// `Scheduled` condition is dropped so that the gang's timeout starts anew
/// on resume.
/// Contributors shown in `status.contributions` (and `kubectl describe`).
const TOP_CONTRIBUTORS: usize = 5;

/// The coordinator's contributors (largest share first) as the run's
/// status shows them: the first [`TOP_CONTRIBUTORS`], rounded for reading.
fn top_contributors(
    all: &[pipewright_spec::coordinator::Contribution],
) -> Vec<pipewright_spec::ContributorStatus> {
    all.iter()
        .take(TOP_CONTRIBUTORS)
        .map(|c| pipewright_spec::ContributorStatus {
            identity: c.identity.clone(),
            name: c.name.clone(),
            micro_batches: c.micro_batches,
            teraflops: significant4(c.flops / 1e12),
            share_percent: significant4(100.0 * c.share),
        })
        .collect()
}

/// `x` rounded to four significant digits (2.345678 → 2.346, 0.0123456 → 0.01235).
fn significant4(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

pub fn suspended_status(run: &TrainingRunResource, now: Time) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let generation = run.meta().generation;
    let message = "spec.suspend is set; the run's pods are deleted".to_owned();
    TrainingRunStatus {
        phase: Some(RunPhase::Suspended),
        conditions: vec![
            condition(
                &previous,
                "Ready",
                false,
                "Suspended",
                message.clone(),
                generation,
                now.clone(),
            ),
            condition(
                &previous,
                "Suspended",
                true,
                "Suspended",
                message,
                generation,
                now,
            ),
        ],
        observed_generation: generation,
        ready_shards: 0,
        stages: previous
            .stages
            .iter()
            .map(|s| StageStatus {
                ready_replicas: 0,
                ..s.clone()
            })
            .collect(),
        shards: previous
            .shards
            .iter()
            .map(|s| ShardStatus {
                pod: None,
                node: None,
                ..s.clone()
            })
            .collect(),
        completion_time: None,
        ..previous
    }
}

/// Status of a run failed for moving shards too often; its pods are deleted.
fn failed_status(
    run: &TrainingRunResource,
    previous: &TrainingRunStatus,
    plan: &PodPlan,
    total: u32,
    message: String,
    now: Time,
) -> TrainingRunStatus {
    let generation = run.meta().generation;
    let mut reassignments = previous.reassignments.clone();
    reassignments.extend(plan.reassignments.iter().cloned().map(|mut r| {
        r.time = Some(now.clone());
        r.to_pod = None;
        r
    }));
    let excess = reassignments.len().saturating_sub(MAX_REASSIGNMENTS);
    reassignments.drain(..excess);
    TrainingRunStatus {
        phase: Some(RunPhase::Failed),
        conditions: vec![condition(
            previous,
            "Ready",
            false,
            "TooManyReassignments",
            message,
            generation,
            now.clone(),
        )],
        observed_generation: generation,
        ready_shards: 0,
        shards: plan
            .shards
            .iter()
            .map(|s| ShardStatus {
                stage: index(s.stage),
                replica: index(s.replica),
                pod: None,
                node: None,
                attempt: s.attempt,
            })
            .collect(),
        reassignments,
        total_reassignments: total,
        failed_nodes: plan.failed_nodes.clone(),
        completion_time: Some(now),
        ..previous.clone()
    }
}

/// Status of a run whose children cannot be built from its spec.
pub fn refused_status(
    run: &TrainingRunResource,
    error: &ChildrenError,
    now: Time,
) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let generation = run.meta().generation;
    TrainingRunStatus {
        phase: Some(RunPhase::Failed),
        conditions: vec![condition(
            &previous,
            "Ready",
            false,
            "InvalidSpec",
            error.to_string(),
            generation,
            now.clone(),
        )],
        observed_generation: generation,
        completion_time: previous.completion_time.clone().or(Some(now)),
        ..previous
    }
}

/// A condition that keeps its last transition time while its status holds.
fn condition(
    previous: &TrainingRunStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(now, |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Retry policy for failed reconciles.
pub fn error_policy(
    run: Arc<TrainingRunResource>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    match error {
        ReconcileError::StaleStatus => {
            tracing::debug!(run = %run.name_any(), %error, "reconciling again");
            Action::requeue(RETRY_STALE)
        }
        ReconcileError::Kube(kube::Error::Api(e)) if e.code == 404 => {
            // A child or the run itself went away under the reconcile (the
            // run is being deleted); the next event tells what is left.
            tracing::debug!(run = %run.name_any(), %error, "reconcile found something gone");
            Action::requeue(RETRY)
        }
        _ => {
            tracing::warn!(run = %run.name_any(), %error, "reconcile failed");
            Action::requeue(RETRY)
        }
    }
}

/// Readiness of a node, hashed, so that node watch events that change only
/// heartbeats do not wake any run.
fn node_readiness(node: &Node) -> Option<u64> {
    Some(u64::from(is_node_ready(node)))
}

/// Watches runs, their children and nodes, and reconciles until `shutdown`
/// completes; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    settings: Settings,
    recorder: Recorder,
    probe: Arc<dyn CoordinatorProbe>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let runs = Api::<TrainingRunResource>::all(client.clone());
    // Only children carry the run label; watching just those keeps the
    // operator's caches small on a busy cluster.
    let children = watcher::Config::default().labels(LABEL_RUN);

    let (pod_store, pod_writer) = reflector::store();
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), children.clone()),
    )
    .default_backoff()
    .touched_objects();
    let (node_store, node_writer) = reflector::store();
    let node_events = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(node_readiness, Default::default());

    // A node changing readiness wakes every run with a pod on it.
    let pods_by_node = pod_store.clone();
    let node_to_runs = move |node: Node| {
        let node = node.name_any();
        pods_by_node
            .state()
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
            .filter_map(|p| {
                Some(
                    ObjectRef::<TrainingRunResource>::new(label(p, LABEL_RUN)?)
                        .within(&p.namespace()?),
                )
            })
            .collect::<std::collections::HashSet<_>>()
    };

    let controller = Controller::new(runs, watcher::Config::default());
    metrics.set_run_store(controller.store());
    let context = Arc::new(Context {
        client: client.clone(),
        settings,
        nodes: node_store,
        recorder,
        probe,
        metrics,
    });
    controller
        .owns_stream(pod_events)
        .owns(Api::<Service>::all(client.clone()), children.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), children.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), children)
        .watches_stream(node_events, node_to_runs)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((run, _)) => tracing::debug!(run = %run.name, "reconciled"),
                // A child's event after its run was deleted; or a failed
                // reconcile, which the error policy has logged at its level.
                Err(
                    error @ (kube::runtime::controller::Error::ObjectNotFound(_)
                    | kube::runtime::controller::Error::ReconcilerFailed(..)),
                ) => {
                    tracing::debug!(%error, "controller");
                }
                Err(error) => tracing::warn!(%error, "controller"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
