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
//!    `spec.placement.maxReassignments` fail the run. A shard whose worker
//!    the coordinator quarantined (it exited with code 3, or its termination
//!    message starts `quarantined:`) moves for `FailedValidation`, with a
//!    `ShardQuarantined` warning naming the shard, the pod and the message;
//!    its new pod starts with a new identity;
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

//! The work is split three ways: [`plan`] decides the moves from the
//! observed world, [`status`] derives the status from what was seen and
//! done, and [`apply`] makes the API calls and publishes the events; this
//! module runs them in order and watches what wakes a run.

mod apply;
mod plan;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DeleteParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use pipewright_spec::{Reassignment, RunPhase, TrainingRunResource, TrainingRunStatus};

pub use apply::covers;
pub use plan::{
    memory_shortfall, plan_pods, PlannedShard, PodPlan, Quarantined, EXIT_QUARANTINED,
    FAILED_VALIDATION, QUARANTINED_PREFIX,
};
pub use status::{
    observed_status, refused_status, suspended_status, Observation, INSUFFICIENT_NODE_MEMORY,
};

use apply::{
    announce_moves, announce_quarantines, apply_plan, delete_live_pods, ensure_children, list_pods,
    node_readiness_of, publish, write_status, Apis,
};
use plan::{describe, is_node_ready, label, pod_phase};
use status::{failed_status, find_condition, is_unschedulable, seconds_between};

use crate::children::{
    coordinator_name, coordinator_url, Blueprint, ChildrenError, Settings, LABEL_RUN,
};
use crate::coordinator::{CoordinatorProbe, CoordinatorReport};
use crate::metrics::Metrics;

/// Field manager of every write this operator makes.
pub const MANAGER: &str = "pipewright-operator";

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
    let children = ensure_children(&apis, &blueprint, &name).await?;
    let pods = list_pods(&apis.pods, &name).await?;
    if run.spec.suspend {
        return suspend(ctx, run, &apis, &pods, now).await;
    }
    if previous.phase == Some(RunPhase::Suspended) {
        let note = "spec.suspend cleared; starting the run's pods".to_owned();
        publish(ctx, run, EventType::Normal, "Resumed", note).await;
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
    if total > run.spec.placement.max_reassignments {
        return fail_for_moves(ctx, run, &apis, &pods, &plan, total, now).await;
    }

    let live = apply_plan(&apis.pods, &plan, &blueprint, &children.coordinator, pods).await?;
    announce_moves(ctx, run, &namespace, &plan).await;
    announce_quarantines(ctx, run, &namespace, &plan).await;
    if plan.restart_coordinator {
        let note = format!("pod {} failed or lost its node", coordinator_name(&name));
        publish(ctx, run, EventType::Warning, "CoordinatorReplaced", note).await;
    }
    let coordinator_phase = live
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(coordinator_name(&name).as_str()))
        .and_then(pod_phase)
        .map(str::to_owned);
    let report = coordinator_report(ctx, coordinator_phase.as_deref(), &name, &namespace).await;
    let stage_pods: Vec<Pod> = (0..run.spec.pipeline.stages)
        .map(|stage| blueprint.shard_pod(stage, 0, 0, &[]))
        .collect();
    let cluster = ctx.nodes.state();
    let cluster: Vec<&Node> = cluster.iter().map(AsRef::as_ref).collect();
    let observation = Observation {
        pods: &live,
        shards: &plan.shards,
        coordinator_phase: coordinator_phase.as_deref(),
        report: report.as_ref(),
        new_reassignments: plan.reassignments,
        failed_nodes: plan.failed_nodes,
        total_reassignments: total,
        memory_shortfall: memory_shortfall(&stage_pods, &cluster),
    };
    let status = observed_status(run, observation, now.clone());
    announce_unschedulable(ctx, run, &previous, &status).await;
    write_status(&apis.runs, run, &status).await?;
    if matches!(status.phase, Some(RunPhase::Failed)) {
        delete_live_pods(&apis.pods, &live).await?;
    }
    Ok(next_look(run, &status, &now))
}

/// Deletes a suspended run's pods and records it suspended.
async fn suspend(
    ctx: &Context,
    run: &TrainingRunResource,
    apis: &Apis,
    pods: &[Pod],
    now: Time,
) -> Result<Action, ReconcileError> {
    delete_live_pods(&apis.pods, pods).await?;
    let was_suspended =
        run.status.as_ref().and_then(|s| s.phase.as_ref()) == Some(&RunPhase::Suspended);
    let status = suspended_status(run, now);
    if !was_suspended {
        let note = "the run's pods are deleted until spec.suspend is cleared".to_owned();
        publish(ctx, run, EventType::Normal, "Suspended", note).await;
    }
    write_status(&apis.runs, run, &status).await?;
    Ok(Action::await_change())
}

/// Fails a run whose moves, `total` with those of `plan`, exceed
/// `spec.placement.maxReassignments`: its pods are deleted.
async fn fail_for_moves(
    ctx: &Context,
    run: &TrainingRunResource,
    apis: &Apis,
    pods: &[Pod],
    plan: &PodPlan,
    total: u32,
    now: Time,
) -> Result<Action, ReconcileError> {
    delete_live_pods(&apis.pods, pods).await?;
    if let Some(namespace) = run.namespace() {
        announce_quarantines(ctx, run, &namespace, plan).await;
    }
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
    let limit = run.spec.placement.max_reassignments;
    let message = format!(
        "{total} shard reassignments exceed spec.placement.maxReassignments ({limit}); last: {last}"
    );
    publish(ctx, run, EventType::Warning, "RunFailed", message.clone()).await;
    let previous = run.status.clone().unwrap_or_default();
    let status = failed_status(run, &previous, plan, total, message, now);
    write_status(&apis.runs, run, &status).await?;
    Ok(Action::await_change())
}

/// What the coordinator reports, when its pod runs and it answers; the
/// status keeps its last figures otherwise.
async fn coordinator_report(
    ctx: &Context,
    coordinator_phase: Option<&str>,
    run: &str,
    namespace: &str,
) -> Option<CoordinatorReport> {
    if coordinator_phase != Some("Running") {
        return None;
    }
    match ctx.probe.status(&coordinator_url(run, namespace)).await {
        Ok(report) => Some(report),
        Err(error) => {
            tracing::debug!(%error, "coordinator status unavailable; keeping the last figures");
            None
        }
    }
}

/// Publishes a warning when the `Scheduled` condition newly says the gang
/// did not start in time or cannot start.
async fn announce_unschedulable(
    ctx: &Context,
    run: &TrainingRunResource,
    previous: &TrainingRunStatus,
    status: &TrainingRunStatus,
) {
    let scheduled = find_condition(status, "Scheduled");
    let was = find_condition(previous, "Scheduled");
    if let Some(c) = scheduled.filter(|c| is_unschedulable(&c.reason)) {
        if was.map(|w| w.reason.as_str()) != Some(c.reason.as_str()) {
            publish(ctx, run, EventType::Warning, &c.reason, c.message.clone()).await;
        }
    }
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
        return match apis.runs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => Ok(Action::await_change()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Action::await_change()),
            Err(e) => Err(e.into()),
        };
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

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
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
        .watches_stream(node_events, move |node| runs_on_node(&pod_store, &node))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move { log_outcome(result) })
        .await;
}

/// The runs with a pod on `node`: a node changing readiness wakes them.
fn runs_on_node(
    pods: &Store<Pod>,
    node: &Node,
) -> std::collections::HashSet<ObjectRef<TrainingRunResource>> {
    let node = node.name_any();
    pods.state()
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .filter_map(|p| {
            Some(
                ObjectRef::<TrainingRunResource>::new(label(p, LABEL_RUN)?).within(&p.namespace()?),
            )
        })
        .collect()
}

/// Logs what one reconcile of the controller came to.
fn log_outcome(
    result: Result<
        (ObjectRef<TrainingRunResource>, Action),
        kube::runtime::controller::Error<ReconcileError, watcher::Error>,
    >,
) {
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
}

#[cfg(test)]
mod tests;
