//! The reconciler: for each `TrainingRun`, compute its children
//! ([`desired_children`]), apply them by server-side apply, replace shard pods
//! that failed, and write the observed state into the status subresource.
//!
//! It keeps no state between calls: what it must remember (placement of each
//! shard, past reassignments) lives in the run's status, so a restarted or
//! newly elected operator carries on where the last one stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use pipewright_spec::{
    Reassignment, RunPhase, ShardStatus, StageStatus, TrainingRunResource, TrainingRunStatus,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::children::{
    desired_children, run_key_name, run_key_secret, ChildrenError, Settings, LABEL_REPLICA,
    LABEL_ROLE, LABEL_RUN, LABEL_STAGE, ROLE_SHARD,
};

/// Field manager of every server-side apply this operator makes.
pub const MANAGER: &str = "pipewright-operator";
/// How often a healthy run is looked at again without any event, to pick up
/// changes no watch reports (a node going silent, say).
pub const RESYNC: Duration = Duration::from_secs(60);
/// Delay before a failed reconcile is retried.
pub const RETRY: Duration = Duration::from_secs(15);
/// Reassignments kept in the status; older ones are dropped so the object
/// stays small on a long run with many failures.
pub const MAX_REASSIGNMENTS: usize = 50;

/// What every reconcile needs.
pub struct Context {
    /// Client of the API server.
    pub client: Client,
    /// Operator-wide settings for the children.
    pub settings: Settings,
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
    #[error("generating a run key: {0}")]
    Random(String),
}

/// Reconciles one run; see the module documentation.
///
/// # Errors
/// [`ReconcileError`] when an API request fails.
pub async fn reconcile(
    run: Arc<TrainingRunResource>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let name = run.name_any();
    let namespace = run
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let runs: Api<TrainingRunResource> = Api::namespaced(ctx.client.clone(), &namespace);
    let children = match desired_children(&run, &ctx.settings) {
        Ok(children) => children,
        Err(error) => {
            // The spec itself cannot be run; say so in the status and wait
            // for the user to change it rather than retrying forever.
            let status = refused_status(&run, &error, now());
            patch_status(&runs, &name, &status).await?;
            return Ok(Action::await_change());
        }
    };

    let client = &ctx.client;
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    if secrets.get_opt(&run_key_name(&name)).await?.is_none() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| ReconcileError::Random(e.to_string()))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        // desired_children succeeded, so the run has a namespace and uid.
        if let Ok(secret) = run_key_secret(&run, hex) {
            secrets.create(&PostParams::default(), &secret).await?;
        }
    }
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &namespace),
        &children.manifest,
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), &namespace);
    apply(&services, &children.shard_service).await?;
    apply(&services, &children.coordinator_service).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    apply(&pods, &children.coordinator).await?;

    let selector = format!("{LABEL_RUN}={name},{LABEL_ROLE}={ROLE_SHARD}");
    let observed = pods.list(&ListParams::default().labels(&selector)).await?;
    let previous = run.status.clone().unwrap_or_default();
    let plan = plan_shards(&previous, &observed.items);
    for pod in &plan.replace {
        // The pod keeps its name (and so its DNS name); applying it again
        // below creates the replacement once the failed one is gone.
        pods.delete(pod, &DeleteParams::background()).await?;
    }
    for pod in &children.shards {
        apply(&pods, pod).await?;
    }

    let current = pods.list(&ListParams::default().labels(&selector)).await?;
    let coordinator_phase = pods
        .get_opt(&crate::children::coordinator_name(&name))
        .await?
        .and_then(|p| p.status)
        .and_then(|s| s.phase);
    let status = observed_status(
        &run,
        &current.items,
        coordinator_phase.as_deref(),
        plan.reassignments,
        now(),
    );
    patch_status(&runs, &name, &status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Retry policy for failed reconciles.
pub fn error_policy(
    run: Arc<TrainingRunResource>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(run = %run.name_any(), %error, "reconcile failed");
    Action::requeue(RETRY)
}

/// Watches runs and their children until a termination signal arrives.
pub async fn run(client: Client, settings: Settings) {
    let runs = Api::<TrainingRunResource>::all(client.clone());
    // Only children carry the run label; watching just those keeps the
    // operator's caches small on a busy cluster.
    let children = watcher::Config::default().labels(LABEL_RUN);
    Controller::new(runs, watcher::Config::default())
        .owns(Api::<Pod>::all(client.clone()), children.clone())
        .owns(Api::<Service>::all(client.clone()), children.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), children)
        .shutdown_on_signal()
        .run(
            reconcile,
            error_policy,
            Arc::new(Context { client, settings }),
        )
        .for_each(|result| async move {
            match result {
                Ok((run, _)) => tracing::debug!(run = %run.name, "reconciled"),
                Err(error) => tracing::warn!(%error, "controller"),
            }
        })
        .await;
}

async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

async fn patch_status(
    runs: &Api<TrainingRunResource>,
    name: &str,
    status: &TrainingRunStatus,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": pipewright_spec::API_VERSION,
        "kind": pipewright_spec::KIND,
        "status": status,
    });
    runs.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// What to do about the shard pods that exist.
#[derive(Debug, Default, PartialEq)]
pub struct ShardPlan {
    /// Pods to delete so that their shard is placed anew.
    pub replace: Vec<String>,
    /// The moves this makes, and moves of shards whose pod vanished, to add
    /// to the status.
    pub reassignments: Vec<Reassignment>,
}

/// Decides which shards move: a shard pod that failed is replaced, and a
/// shard whose recorded pod is gone or terminating (deleted, or lost with its
/// node) is recorded as moved, since applying the children places it again.
pub fn plan_shards(previous: &TrainingRunStatus, pods: &[Pod]) -> ShardPlan {
    let mut plan = ShardPlan::default();
    let mut seen = BTreeMap::new();
    for pod in pods {
        // A terminating pod no longer holds its shard: one deleted with its
        // node counts as lost below, one this operator deleted was already
        // recorded when it was replaced (and left out of the status since).
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(shard) = shard_of(pod) else {
            continue;
        };
        seen.insert(shard, ());
        let status = pod.status.as_ref();
        if status.and_then(|s| s.phase.as_deref()) == Some("Failed") {
            let name = pod.name_any();
            let reason = status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "PodFailed".to_owned());
            plan.reassignments.push(Reassignment {
                stage: shard.0,
                replica: shard.1,
                from_pod: name.clone(),
                from_node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                reason,
                time: None,
            });
            plan.replace.push(name);
        }
    }
    for placed in &previous.shards {
        let (Some(pod), Some(node)) = (&placed.pod, &placed.node) else {
            continue;
        };
        if !seen.contains_key(&(placed.stage, placed.replica)) {
            plan.reassignments.push(Reassignment {
                stage: placed.stage,
                replica: placed.replica,
                from_pod: pod.clone(),
                from_node: Some(node.clone()),
                reason: "PodLost".to_owned(),
                time: None,
            });
        }
    }
    plan
}

/// (stage, replica) of a shard pod, from its labels.
fn shard_of(pod: &Pod) -> Option<(u32, u32)> {
    let labels = pod.metadata.labels.as_ref()?;
    Some((
        labels.get(LABEL_STAGE)?.parse().ok()?,
        labels.get(LABEL_REPLICA)?.parse().ok()?,
    ))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status of `run` given its shard pods, the coordinator pod's phase and
/// the reassignments just made; progress figures reported by the
/// coordinator (step, loss, tokens/s) are carried over from the old status.
pub fn observed_status(
    run: &TrainingRunResource,
    shard_pods: &[Pod],
    coordinator_phase: Option<&str>,
    new_reassignments: Vec<Reassignment>,
    now: Time,
) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let stages = u32::try_from(run.spec.pipeline.stages).unwrap_or(u32::MAX);
    let replicas = u32::try_from(run.spec.pipeline.replicas).unwrap_or(u32::MAX);
    let by_shard: BTreeMap<(u32, u32), &Pod> = shard_pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((shard_of(p)?, p)))
        .collect();

    let mut stage_rows = Vec::new();
    let mut shard_rows = Vec::new();
    for stage in 0..stages {
        let mut ready = 0;
        for replica in 0..replicas {
            let pod = by_shard.get(&(stage, replica));
            if pod.is_some_and(|p| pod_ready(p)) {
                ready += 1;
            }
            shard_rows.push(ShardStatus {
                stage,
                replica,
                pod: pod.map(|p| p.name_any()),
                node: pod.and_then(|p| p.spec.as_ref()?.node_name.clone()),
                attempt: 0,
            });
        }
        let layers = previous
            .stages
            .iter()
            .find(|s| s.stage == stage)
            .and_then(|s| s.layers.clone());
        stage_rows.push(StageStatus {
            stage,
            desired_replicas: replicas,
            ready_replicas: ready,
            layers,
        });
    }
    let ready_shards: u32 = stage_rows.iter().map(|s| s.ready_replicas).sum();
    let desired_shards = stages.saturating_mul(replicas);

    let mut reassignments = previous.reassignments.clone();
    reassignments.extend(new_reassignments.into_iter().map(|mut r| {
        r.time = Some(now.clone());
        r
    }));
    let excess = reassignments.len().saturating_sub(MAX_REASSIGNMENTS);
    reassignments.drain(..excess);

    let phase = match coordinator_phase {
        Some("Succeeded") => RunPhase::Succeeded,
        Some("Failed") => RunPhase::Failed,
        _ if ready_shards == desired_shards => RunPhase::Running,
        _ if matches!(previous.phase, Some(RunPhase::Running | RunPhase::Degraded)) => {
            RunPhase::Degraded
        }
        _ => RunPhase::Pending,
    };
    let (ready, reason, message) = match phase {
        RunPhase::Running => (
            true,
            "AllShardsReady",
            "every shard has a ready pod".to_owned(),
        ),
        RunPhase::Succeeded => (false, "Succeeded", "training finished".to_owned()),
        RunPhase::Failed => (
            false,
            "CoordinatorFailed",
            "the coordinator pod failed".to_owned(),
        ),
        _ => (
            false,
            "ShardsNotReady",
            format!("{ready_shards} of {desired_shards} shards ready"),
        ),
    };
    let generation = run.meta().generation;
    TrainingRunStatus {
        phase: Some(phase),
        conditions: vec![condition(
            &previous, "Ready", ready, reason, message, generation, now,
        )],
        observed_generation: generation,
        ready_shards,
        desired_shards,
        stages: stage_rows,
        shards: shard_rows,
        reassignments,
        step: previous.step,
        loss: previous.loss,
        tokens_per_second: previous.tokens_per_second,
        ..previous
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
            now,
        )],
        observed_generation: generation,
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pipewright_spec::parse_manifest;

    const MANIFEST: &str = "\
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: demo}
spec:
  model: {dim: 64, layers: 4, heads: 4, ffnDim: 176, seqLen: 64}
  data: {sources: [corpus/]}
  training: {steps: 10, microBatchSize: 4, learningRate: 0.001}
  pipeline: {stages: 2, replicas: 2}
";

    fn run() -> TrainingRunResource {
        let spec = parse_manifest(MANIFEST).expect("valid").spec;
        let mut run = TrainingRunResource::new("demo", spec);
        run.metadata.namespace = Some("ml".to_owned());
        run.metadata.uid = Some("uid-1".to_owned());
        run.metadata.generation = Some(3);
        run
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("in range"))
    }

    fn pod(stage: u32, replica: u32, phase: &str, ready: bool, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("demo-s{stage}-r{replica}")),
                labels: Some(BTreeMap::from([
                    (LABEL_RUN.to_owned(), "demo".to_owned()),
                    (LABEL_ROLE.to_owned(), ROLE_SHARD.to_owned()),
                    (LABEL_STAGE.to_owned(), stage.to_string()),
                    (LABEL_REPLICA.to_owned(), replica.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn all_ready() -> Vec<Pod> {
        vec![
            pod(0, 0, "Running", true, "n1"),
            pod(0, 1, "Running", true, "n2"),
            pod(1, 0, "Running", true, "n1"),
            pod(1, 1, "Running", true, "n2"),
        ]
    }

    #[test]
    fn all_ready_shards_make_a_running_run() {
        let status = observed_status(&run(), &all_ready(), Some("Running"), vec![], at(100));
        assert_eq!(status.phase, Some(RunPhase::Running));
        assert_eq!((status.ready_shards, status.desired_shards), (4, 4));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.stages.len(), 2);
        assert_eq!(status.stages[1].ready_replicas, 2);
        assert_eq!(status.shards[3].pod.as_deref(), Some("demo-s1-r1"));
        assert_eq!(status.shards[3].node.as_deref(), Some("n2"));
        assert_eq!(status.conditions[0].status, "True");
    }

    #[test]
    fn a_lost_shard_degrades_a_running_run_and_is_recorded() {
        let mut run = run();
        run.status = Some(observed_status(&run, &all_ready(), None, vec![], at(100)));
        let mut pods = all_ready();
        pods.remove(2); // demo-s1-r0 vanished with node n1
        let plan = plan_shards(run.status.as_ref().expect("status"), &pods);
        assert!(plan.replace.is_empty());
        assert_eq!(plan.reassignments.len(), 1);
        assert_eq!(plan.reassignments[0].from_pod, "demo-s1-r0");
        assert_eq!(plan.reassignments[0].from_node.as_deref(), Some("n1"));
        assert_eq!(plan.reassignments[0].reason, "PodLost");
        let status = observed_status(&run, &pods, None, plan.reassignments, at(200));
        assert_eq!(status.phase, Some(RunPhase::Degraded));
        assert_eq!(status.ready_shards, 3);
        assert_eq!(status.reassignments[0].time, Some(at(200)));
        assert_eq!(status.shards[2].pod, None);
        // Ready flipped to False, so its transition time moves.
        assert_eq!(status.conditions[0].last_transition_time, at(200));
    }

    #[test]
    fn a_pod_terminating_with_its_node_is_counted_once() {
        let mut run = run();
        run.status = Some(observed_status(&run, &all_ready(), None, vec![], at(100)));
        let mut pods = all_ready();
        pods[3].metadata.deletion_timestamp = Some(at(150));
        let plan = plan_shards(run.status.as_ref().expect("status"), &pods);
        assert_eq!(plan.reassignments.len(), 1);
        assert_eq!(plan.reassignments[0].from_pod, "demo-s1-r1");
        let status = observed_status(&run, &pods, None, plan.reassignments, at(160));
        assert_eq!(status.shards[3].pod, None);
        run.status = Some(status);
        // Still terminating at the next look: not counted again.
        let again = plan_shards(run.status.as_ref().expect("status"), &pods);
        assert!(again.reassignments.is_empty());
    }

    #[test]
    fn failed_shard_pods_are_replaced() {
        let mut pods = all_ready();
        pods[1] = pod(0, 1, "Failed", false, "n2");
        let plan = plan_shards(&TrainingRunStatus::default(), &pods);
        assert_eq!(plan.replace, ["demo-s0-r1"]);
        assert_eq!(plan.reassignments[0].reason, "PodFailed");
        assert_eq!(
            (plan.reassignments[0].stage, plan.reassignments[0].replica),
            (0, 1)
        );
    }

    #[test]
    fn a_new_run_is_pending_until_every_shard_is_ready() {
        let mut pods = all_ready();
        pods[0] = pod(0, 0, "Pending", false, "n1");
        let status = observed_status(&run(), &pods, None, vec![], at(5));
        assert_eq!(status.phase, Some(RunPhase::Pending));
        assert_eq!(status.conditions[0].message, "3 of 4 shards ready");
    }

    #[test]
    fn coordinator_outcome_decides_the_final_phase() {
        let done = observed_status(&run(), &all_ready(), Some("Succeeded"), vec![], at(9));
        assert_eq!(done.phase, Some(RunPhase::Succeeded));
        let failed = observed_status(&run(), &all_ready(), Some("Failed"), vec![], at(9));
        assert_eq!(failed.phase, Some(RunPhase::Failed));
    }

    #[test]
    fn unchanged_condition_keeps_its_transition_time() {
        let mut run = run();
        run.status = Some(observed_status(&run, &all_ready(), None, vec![], at(100)));
        let later = observed_status(&run, &all_ready(), None, vec![], at(500));
        assert_eq!(later.conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn reassignment_history_is_bounded() {
        let mut run = run();
        let one = Reassignment {
            stage: 0,
            replica: 0,
            from_pod: "demo-s0-r0".to_owned(),
            from_node: None,
            reason: "PodLost".to_owned(),
            time: None,
        };
        run.status = Some(TrainingRunStatus {
            reassignments: vec![one.clone(); MAX_REASSIGNMENTS],
            ..TrainingRunStatus::default()
        });
        let mut newest = one;
        newest.from_pod = "newest".to_owned();
        let status = observed_status(&run, &all_ready(), None, vec![newest], at(1));
        assert_eq!(status.reassignments.len(), MAX_REASSIGNMENTS);
        assert_eq!(
            status.reassignments.last().map(|r| r.from_pod.as_str()),
            Some("newest")
        );
    }

    #[test]
    fn unrunnable_spec_fails_the_run_with_the_reason() {
        let error = ChildrenError::NameTooLong {
            run: "demo".to_owned(),
            name: "x".repeat(70),
        };
        let status = refused_status(&run(), &error, at(1));
        assert_eq!(status.phase, Some(RunPhase::Failed));
        assert_eq!(status.conditions[0].reason, "InvalidSpec");
        assert!(status.conditions[0].message.contains("shorter run name"));
    }
}
