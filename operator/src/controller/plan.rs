//! Planning a run's pods: which to create, delete or replace, decided from
//! the run's previous status, its pods and the state of their nodes. Pure,
//! so that every failure case is tested without an API server.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::ResourceExt;
use pipewright_spec::{Reassignment, ShardStatus, TrainingRunResource, TrainingRunStatus};

use crate::children::{
    coordinator_name, shard_pod_name, LABEL_ROLE, LABEL_STAGE, MEMORY_RESOURCE, ROLE_COORDINATOR,
    ROLE_SHARD,
};
use crate::quantity;

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
    /// The moves of this plan whose pod's worker was quarantined (reason
    /// [`FAILED_VALIDATION`]), with what its termination message says.
    pub quarantined: Vec<Quarantined>,
}

/// Reassignment reason of a shard whose worker the run's coordinator
/// quarantined: it failed validation (an audit convicted it, or its
/// evidence or parameters' digest did not hold up).
pub const FAILED_VALIDATION: &str = "FailedValidation";

/// Exit code of a worker that the coordinator quarantined (the worker's
/// `EXIT_QUARANTINED`).
pub const EXIT_QUARANTINED: i32 = 3;

/// Prefix of the termination message a quarantined worker writes.
pub const QUARANTINED_PREFIX: &str = "quarantined:";

/// A shard pod whose worker was quarantined.
#[derive(Clone, Debug, PartialEq)]
pub struct Quarantined {
    /// Pipeline stage of the shard.
    pub stage: u32,
    /// Replica of the shard.
    pub replica: u32,
    /// The pod whose worker was quarantined.
    pub pod: String,
    /// The worker container's termination message (empty when it wrote
    /// none).
    pub message: String,
}

/// Decides which pods to make and delete, given the run's previous status,
/// its pods and the state of their nodes (`node_ready`: `Some(ready)`, or
/// `None` for a node that no longer exists).
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
    let mut plan = PodPlan {
        failed_nodes: previous.failed_nodes.clone(),
        ..PodPlan::default()
    };
    let recorded: BTreeMap<(u32, u32), &ShardStatus> = previous
        .shards
        .iter()
        .map(|s| ((s.stage, s.replica), s))
        .collect();
    // Names of the pods the shards have now, and of those they move to.
    let mut current = BTreeSet::new();
    for stage in 0..run.spec.pipeline.stages {
        for replica in 0..run.spec.pipeline.replicas {
            let shard = ShardAt {
                run: &name,
                stage,
                replica,
                recorded: recorded.get(&(index(stage), index(replica))).copied(),
            };
            let next = plan_shard(&mut plan, &shard, pods, node_ready);
            current.insert(shard_pod_name(&name, stage, replica, next.attempt));
            current.insert(shard.pod_name());
            plan.shards.push(next);
        }
    }
    plan.delete.extend(stale_shard_pods(pods, &current));
    plan_coordinator(&mut plan, &name, pods, node_ready);
    plan
}

/// One shard of a run, with what the previous status recorded of it.
struct ShardAt<'a> {
    run: &'a str,
    stage: usize,
    replica: usize,
    recorded: Option<&'a ShardStatus>,
}

impl ShardAt<'_> {
    /// The attempt recorded, 0 for a shard never placed.
    fn attempt(&self) -> u32 {
        self.recorded.map_or(0, |s| s.attempt)
    }

    /// Name of the pod of the recorded attempt.
    fn pod_name(&self) -> String {
        shard_pod_name(self.run, self.stage, self.replica, self.attempt())
    }
}

/// Plans one shard into `plan`: nothing, a first pod, or a move to the next
/// attempt. Returns the shard as it is after the plan.
fn plan_shard(
    plan: &mut PodPlan,
    shard: &ShardAt<'_>,
    pods: &[Pod],
    node_ready: &dyn Fn(&str) -> Option<bool>,
) -> PlannedShard {
    let attempt = shard.attempt();
    let pod_name = shard.pod_name();
    let pod = pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(pod_name.as_str()));
    // Placed before and gone now: deleted, or lost with its node.
    let vanished =
        pod.is_none() && shard.recorded.and_then(|s| s.pod.as_deref()) == Some(pod_name.as_str());
    let failure = match pod {
        Some(pod) => failure_of(pod, node_ready),
        None if vanished => Some(vanished_failure(
            shard.recorded.and_then(|s| s.node.as_deref()),
            node_ready,
        )),
        None => None,
    };
    let mut next = PlannedShard {
        stage: shard.stage,
        replica: shard.replica,
        attempt,
    };
    let Some(Failure {
        reason,
        node_caused,
        quarantine,
    }) = failure
    else {
        if pod.is_none() {
            plan.create.push(next.clone());
        }
        return next;
    };
    let from_node = pod
        .and_then(|p| p.spec.as_ref()?.node_name.clone())
        .or_else(|| shard.recorded.and_then(|s| s.node.clone()));
    if let (Some(node), true) = (&from_node, node_caused) {
        if !plan.failed_nodes.contains(node) {
            plan.failed_nodes.push(node.clone());
        }
    }
    next.attempt = attempt.saturating_add(1);
    if let Some(message) = quarantine {
        plan.quarantined.push(Quarantined {
            stage: index(shard.stage),
            replica: index(shard.replica),
            pod: pod_name.clone(),
            message,
        });
    }
    plan.reassignments.push(Reassignment {
        stage: index(shard.stage),
        replica: index(shard.replica),
        from_pod: pod_name.clone(),
        from_node,
        to_pod: Some(shard_pod_name(
            shard.run,
            shard.stage,
            shard.replica,
            next.attempt,
        )),
        reason,
        time: None,
    });
    if pod.is_some_and(|p| p.metadata.deletion_timestamp.is_none()) {
        plan.delete.push((pod_name, None));
    }
    plan.create.push(next.clone());
    next
}

/// Shard pods of earlier attempts, or of shards the spec no longer has:
/// every live shard pod whose name is not in `current`.
fn stale_shard_pods<'a>(
    pods: &'a [Pod],
    current: &'a BTreeSet<String>,
) -> impl Iterator<Item = (String, Option<u32>)> + 'a {
    pods.iter()
        .filter(|pod| {
            label(pod, LABEL_ROLE) == Some(ROLE_SHARD)
                && pod.metadata.deletion_timestamp.is_none()
                && !current.contains(&pod.name_any())
        })
        .map(|pod| (pod.name_any(), None))
}

/// Plans the coordinator pod into `plan`: made when missing, replaced when
/// it failed or its node is not ready or gone.
fn plan_coordinator(
    plan: &mut PodPlan,
    run: &str,
    pods: &[Pod],
    node_ready: &dyn Fn(&str) -> Option<bool>,
) {
    let coordinator = pods.iter().find(|p| {
        label(p, LABEL_ROLE) == Some(ROLE_COORDINATOR)
            && p.metadata.name.as_deref() == Some(coordinator_name(run).as_str())
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
}

/// A count or index as the status writes it.
pub(super) fn index(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// The value of label `key` of `pod`.
pub(super) fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// The pod's phase (`Pending`, `Running`, `Succeeded`, `Failed`).
pub(super) fn pod_phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Whether a node's `Ready` condition is `True`.
pub(super) fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
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
    /// The termination message of a worker that was quarantined; `None`
    /// for any other failure.
    quarantine: Option<String>,
}

impl Failure {
    fn new(reason: &str, node_caused: bool) -> Self {
        Self {
            reason: reason.to_owned(),
            node_caused,
            quarantine: None,
        }
    }
}

/// The termination message of the first container of `pod` that ended
/// quarantined: exit code [`EXIT_QUARANTINED`], or a termination message
/// starting with [`QUARANTINED_PREFIX`]. `None` when no container did.
fn quarantined_container(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| {
            t.exit_code == EXIT_QUARANTINED
                || t.message
                    .as_deref()
                    .is_some_and(|m| m.trim_start().starts_with(QUARANTINED_PREFIX))
        })
        .map(|t| t.message.as_deref().unwrap_or_default().trim().to_owned())
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
/// leave the node usable. A failed pod whose worker was quarantined by the
/// coordinator (see [`quarantined_container`]) moves for
/// [`FAILED_VALIDATION`], carrying the termination message.
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
    if pod_phase(pod) != Some("Failed") {
        return None;
    }
    if let Some(message) = quarantined_container(pod) {
        // The worker was convicted, not the node: its replacement gets a
        // fresh identity, and the node stays usable.
        return Some(Failure {
            reason: FAILED_VALIDATION.to_owned(),
            node_caused: by_node,
            quarantine: Some(message),
        });
    }
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
    Some(Failure {
        reason,
        node_caused,
        quarantine: None,
    })
}

/// Why a shard pod that is gone without a trace lost its shard: its node
/// went away or is not ready, or else it was deleted.
fn vanished_failure(node: Option<&str>, node_ready: &dyn Fn(&str) -> Option<bool>) -> Failure {
    node.and_then(|n| node_state_failure(n, node_ready))
        .unwrap_or_else(|| Failure::new("PodDeleted", false))
}

/// Why the shard pods of some stage cannot be placed for memory, if they
/// cannot: `stage_pods` holds one shard pod per stage as the blueprint makes
/// it, `nodes` every node of the cluster. A pod may run on a node that is not
/// cordoned, carries its `nodeSelector` labels and has no `NoSchedule` or
/// `NoExecute` taint it does not tolerate; a stage whose memory request
/// exceeds the allocatable memory of every such node cannot run anywhere.
/// The message names each such stage with its request and the largest node
/// it may run on (or says that none matches).
///
/// An empty `nodes` says nothing (the node watch has not filled its cache
/// yet), and neither does a pod without a memory request or a matching
/// node that reports no allocatable memory.
pub fn memory_shortfall(stage_pods: &[Pod], nodes: &[&Node]) -> Option<String> {
    if nodes.is_empty() {
        return None;
    }
    let mut short = Vec::new();
    let mut largest_matching = None;
    for pod in stage_pods {
        let Some((request, bytes)) = memory_request(pod) else {
            continue;
        };
        let admitting: Vec<&Node> = nodes.iter().copied().filter(|n| admits(n, pod)).collect();
        let sized: Vec<_> = admitting
            .iter()
            .filter_map(|node| Some((allocatable_memory(node)?, *node)))
            .collect();
        if sized.len() < admitting.len() {
            continue; // a node that does not say what it has may hold it
        }
        let largest = sized
            .into_iter()
            .max_by_key(|(allocatable, _)| allocatable.1);
        if largest
            .as_ref()
            .is_some_and(|((_, allocatable), _)| bytes <= *allocatable)
        {
            continue;
        }
        let stage = label(pod, LABEL_STAGE).unwrap_or("?");
        short.push(format!(
            "stage {stage} requests {request} ({bytes} bytes) of memory"
        ));
        largest_matching.get_or_insert(largest);
    }
    let largest = largest_matching?;
    let nodes_part = match largest {
        Some(((quantity, bytes), node)) => format!(
            "the largest node the run's pods may use (nodeSelector, tolerations, not cordoned), \
             {}, has {quantity} ({bytes} bytes) allocatable",
            node.name_any()
        ),
        None => format!(
            "none of the {} nodes matches the run's nodeSelector and tolerations and is \
             schedulable",
            nodes.len()
        ),
    };
    Some(format!(
        "{}; {nodes_part}; lower spec.placement.memoryPerWorker or use more stages \
         (spec.pipeline.stages)",
        short.join(", ")
    ))
}

/// The memory a pod's containers request, as written and in bytes.
fn memory_request(pod: &Pod) -> Option<(String, u64)> {
    let containers = &pod.spec.as_ref()?.containers;
    let quantities: Vec<&str> = containers
        .iter()
        .filter_map(|c| {
            c.resources
                .as_ref()?
                .requests
                .as_ref()?
                .get(MEMORY_RESOURCE)
        })
        .map(|q| q.0.as_str())
        .collect();
    let bytes = quantities
        .iter()
        .filter_map(|q| quantity::bytes(q))
        .fold(0u64, u64::saturating_add);
    (!quantities.is_empty()).then(|| (quantities.join(" + "), bytes))
}

/// A node's allocatable memory, as written and in bytes.
fn allocatable_memory(node: &Node) -> Option<(String, u64)> {
    let q = node
        .status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get(MEMORY_RESOURCE)?;
    Some((q.0.clone(), quantity::bytes(&q.0)?))
}

/// Whether the scheduler may put `pod` on `node` as far as cordons, node
/// labels and taints go.
fn admits(node: &Node, pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let node_spec = node.spec.as_ref();
    if node_spec.and_then(|s| s.unschedulable) == Some(true) {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    let selected = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value));
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let tolerated = node_spec
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| tolerations.iter().any(|t| tolerates(t, taint)));
    selected && tolerated
}

/// Whether toleration `t` tolerates `taint`, as the scheduler decides: the
/// same effect (or none named), the same key (or none, with `Exists`), and
/// with `Equal` (the default operator) the same value.
fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = t.key.as_deref().unwrap_or_default();
    let exists = t.operator.as_deref() == Some("Exists");
    if !effect || (key.is_empty() && !exists) {
        return false;
    }
    if !key.is_empty() && key != taint.key {
        return false;
    }
    exists || t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
}

/// "stage S replica R: pod A on node X -> pod B (reason)".
pub(super) fn describe(moved: &Reassignment) -> String {
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

/// "stage S replica R: the worker of pod P failed validation: MESSAGE".
pub(super) fn quarantine_note(q: &Quarantined) -> String {
    let message = if q.message.is_empty() {
        "(no termination message)"
    } else {
        q.message.as_str()
    };
    format!(
        "stage {} replica {}: the worker of pod {} failed validation: {message}",
        q.stage, q.replica, q.pod
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, PodCondition};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde_json::json;

    use super::*;
    use crate::children::Blueprint;
    use crate::controller::tests::{first_plan, planned, replan, replan_with, settled, status_of};
    use crate::fixtures::{at, coordinator, node, run, settings, shard};

    #[test]
    fn a_new_run_gets_every_shard_and_the_coordinator() {
        let run = run(2, 2);
        let plan = first_plan(&run, &[]);
        assert!(plan.create_coordinator);
        assert_eq!(
            plan.create,
            [
                planned(0, 0, 0),
                planned(0, 1, 0),
                planned(1, 0, 0),
                planned(1, 1, 0)
            ]
        );
        assert!(plan.delete.is_empty() && plan.reassignments.is_empty());
    }

    #[test]
    fn a_shard_on_a_node_that_is_not_ready_moves() {
        let (run, pods) = settled();
        let n2_down = |node: &str| Some(node != "n2");
        let plan = replan_with(&run, &pods, &n2_down);
        let reasons: Vec<(&str, &str)> = plan
            .reassignments
            .iter()
            .map(|r| (r.from_pod.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("demo-s0-r1", "NodeNotReady"),
                ("demo-s1-r1", "NodeNotReady")
            ]
        );
        assert_eq!(plan.create, [planned(0, 1, 1), planned(1, 1, 1)]);
        assert_eq!(plan.failed_nodes, ["n2"]);
        // A node that no longer exists loses its pods, and counts as failed.
        let n1_gone = |node: &str| (node != "n1").then_some(true);
        let plan = replan_with(&run, &pods, &n1_gone);
        let reasons: Vec<&str> = plan
            .reassignments
            .iter()
            .map(|r| r.reason.as_str())
            .collect();
        assert_eq!(reasons, ["NodeLost", "NodeLost"]);
        assert_eq!(plan.failed_nodes, ["n1"]);
    }

    #[test]
    fn a_coordinator_that_failed_or_lost_its_node_is_replaced() {
        let (run, mut pods) = settled();
        let n3_down = |node: &str| Some(node != "n3");
        let plan = replan_with(&run, &pods, &n3_down);
        assert_eq!(plan.delete, [("demo-coordinator".to_owned(), Some(0))]);
        assert!(plan.restart_coordinator && !plan.create_coordinator);
        pods[0] = coordinator(&run, "Failed", "n3");
        let plan = replan(&run, &pods);
        assert_eq!(plan.delete, [("demo-coordinator".to_owned(), None)]);
        // Once gone, it is made again.
        pods.remove(0);
        let plan = replan(&run, &pods);
        assert!(plan.create_coordinator);
    }

    /// A shard pod of `run` at (1, 0, 0) on n1 that failed with the pod
    /// reason, container reason and disruption given.
    fn failed_shard(
        run: &TrainingRunResource,
        pod_reason: Option<&str>,
        container_reason: Option<&str>,
        disrupted: Option<&str>,
    ) -> Pod {
        let mut failed = shard(run, (1, 0, 0), "Failed", "n1");
        let status = failed.status.as_mut().expect("status");
        status.reason = pod_reason.map(str::to_owned);
        if let Some(why) = container_reason {
            status.container_statuses = Some(vec![serde_json::from_value(json!({
                "name": "worker", "image": "pipewright:test", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": why}}
            }))
            .expect("container status")]);
        }
        if let Some(why) = disrupted {
            status
                .conditions
                .get_or_insert_with(Vec::new)
                .push(PodCondition {
                    type_: "DisruptionTarget".to_owned(),
                    status: "True".to_owned(),
                    reason: Some(why.to_owned()),
                    ..PodCondition::default()
                });
        }
        failed
    }

    #[test]
    fn only_failures_of_the_node_count_against_it() {
        let (run, pods) = settled();
        // (pod reason, container reason, disruption, expected reason, node-caused)
        let cases = [
            (
                Some("Evicted"),
                None,
                Some("TerminationByKubelet"),
                "Evicted",
                true,
            ),
            (Some("Evicted"), None, None, "Evicted", true),
            (
                Some("OutOfnvidia.com/gpu"),
                None,
                None,
                "OutOfnvidia.com/gpu",
                true,
            ),
            (
                Some("UnexpectedAdmissionError"),
                None,
                None,
                "UnexpectedAdmissionError",
                true,
            ),
            (
                Some("Terminated"),
                None,
                Some("TerminationByKubelet"),
                "Terminated",
                true,
            ),
            (None, Some("OOMKilled"), None, "OOMKilled", false),
            (None, Some("Error"), None, "Error", false),
            (None, None, None, "PodFailed", false),
        ];
        for (pod_reason, container_reason, disrupted, reason, node_caused) in cases {
            let mut pods = pods.clone();
            pods[3] = failed_shard(&run, pod_reason, container_reason, disrupted);
            let plan = replan(&run, &pods);
            assert_eq!(plan.reassignments.len(), 1, "{reason}");
            assert_eq!(plan.reassignments[0].reason, reason);
            let expected: &[&str] = if node_caused { &["n1"] } else { &[] };
            assert_eq!(plan.failed_nodes, expected, "{reason}");
        }
    }

    /// A shard pod of `run` at (1, 0, 0) on n1 whose worker container
    /// terminated with `exit_code` and termination `message`.
    fn terminated_shard(run: &TrainingRunResource, exit_code: i32, message: Option<&str>) -> Pod {
        let mut failed = shard(run, (1, 0, 0), "Failed", "n1");
        let status = failed.status.as_mut().expect("status");
        status.container_statuses = Some(vec![serde_json::from_value(json!({
            "name": "worker", "image": "pipewright:test", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}
        }))
        .expect("container status")]);
        failed
    }

    #[test]
    fn a_quarantined_worker_moves_for_failed_validation_to_a_fresh_pod() {
        let (run, pods) = settled();
        let message = "quarantined: failed_audit at step 7 (stage 1, replica 0)";
        let mut quarantined = pods.clone();
        quarantined[3] = terminated_shard(&run, EXIT_QUARANTINED, Some(message));
        let plan = replan(&run, &quarantined);
        assert_eq!(plan.reassignments.len(), 1);
        let moved = &plan.reassignments[0];
        assert_eq!(moved.reason, FAILED_VALIDATION);
        assert_eq!((moved.stage, moved.replica), (1, 0));
        assert_eq!(moved.to_pod.as_deref(), Some("demo-s1-r0-a1"));
        // The replacement is a new pod (a new identity volume), as for any
        // lost shard, and the old one is deleted; the node is not blamed.
        assert_eq!(plan.create, [planned(1, 0, 1)]);
        assert_eq!(plan.delete, [("demo-s1-r0".to_owned(), None)]);
        assert!(plan.failed_nodes.is_empty());
        assert_eq!(
            plan.quarantined,
            [Quarantined {
                stage: 1,
                replica: 0,
                pod: "demo-s1-r0".to_owned(),
                message: message.to_owned(),
            }]
        );
        assert_eq!(
            quarantine_note(&plan.quarantined[0]),
            "stage 1 replica 0: the worker of pod demo-s1-r0 failed validation: \
             quarantined: failed_audit at step 7 (stage 1, replica 0)"
        );
        assert_eq!(
            describe(moved),
            "stage 1 replica 0: pod demo-s1-r0 on node n1 -> pod demo-s1-r0-a1 (FailedValidation)"
        );
        // The status records the move with its reason, as `kubectl
        // describe` shows it.
        let status = status_of(&run, &quarantined, &plan, None, at(200));
        let recorded = status.reassignments.last().expect("recorded");
        assert_eq!(recorded.reason, FAILED_VALIDATION);
        assert_eq!(recorded.from_pod, "demo-s1-r0");
        assert_eq!(status.total_reassignments, 1);

        // Either sign is enough: the exit code without a message (no
        // termination log could be written), or the message under another
        // exit code.
        let mut silent = pods.clone();
        silent[3] = terminated_shard(&run, EXIT_QUARANTINED, None);
        let plan = replan(&run, &silent);
        assert_eq!(plan.reassignments[0].reason, FAILED_VALIDATION);
        assert_eq!(plan.quarantined[0].message, "");
        assert!(quarantine_note(&plan.quarantined[0]).ends_with("(no termination message)"));
        let mut by_message = pods.clone();
        by_message[3] = terminated_shard(&run, 1, Some(message));
        assert_eq!(
            replan(&run, &by_message).reassignments[0].reason,
            FAILED_VALIDATION
        );
    }

    #[test]
    fn a_worker_that_failed_otherwise_is_not_failed_validation() {
        let (run, pods) = settled();
        for (code, message) in [
            (
                1,
                Some("error: the coordinator at http://c:7070 does not answer"),
            ),
            (1, None),
            (2, Some("a message that mentions quarantined: later on")),
            (137, None),
        ] {
            let mut failed = pods.clone();
            failed[3] = terminated_shard(&run, code, message);
            let plan = replan(&run, &failed);
            assert_eq!(plan.reassignments.len(), 1, "{code} {message:?}");
            assert_eq!(plan.reassignments[0].reason, "Error", "{code} {message:?}");
            assert!(plan.quarantined.is_empty(), "{code} {message:?}");
            assert_eq!(plan.create, [planned(1, 0, 1)]);
        }
        // A running pod is never read as quarantined, whatever an earlier
        // container said.
        let mut running = pods.clone();
        running[3] = terminated_shard(&run, EXIT_QUARANTINED, Some("quarantined: x"));
        running[3].status.as_mut().expect("status").phase = Some("Running".to_owned());
        assert!(replan(&run, &running).reassignments.is_empty());
    }

    /// `node(name)` with `memory` allocatable, `labels` and `taints`
    /// (key, effect).
    fn sized_node(
        name: &str,
        memory: &str,
        labels: &[(&str, &str)],
        taints: &[(&str, &str)],
    ) -> Node {
        let mut n = node(name, true);
        if let Some(l) = n.metadata.labels.as_mut() {
            l.extend(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            );
        }
        if let Some(status) = n.status.as_mut() {
            status.allocatable = Some(BTreeMap::from([(
                MEMORY_RESOURCE.to_owned(),
                Quantity(memory.to_owned()),
            )]));
        }
        let taints = taints
            .iter()
            .map(|(key, effect)| Taint {
                key: (*key).to_owned(),
                effect: (*effect).to_owned(),
                ..Taint::default()
            })
            .collect();
        n.spec = Some(NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        });
        n
    }

    /// One shard pod per stage of `run`, as the reconcile checks them.
    fn stage_pods(run: &TrainingRunResource) -> Vec<Pod> {
        let settings = settings(0);
        let blueprint = Blueprint::new(run, &settings).expect("buildable");
        (0..run.spec.pipeline.stages)
            .map(|stage| blueprint.shard_pod(stage, 0, 0, &[]))
            .collect()
    }

    #[test]
    fn a_stage_larger_than_every_node_it_may_use_is_named() {
        let mut run = run(2, 1);
        run.spec.placement.memory_per_worker = Some("24Gi".to_owned());
        let pods = stage_pods(&run);
        let small = sized_node("n1", "16Gi", &[], &[]);
        let big = sized_node("n2", "32Gi", &[], &[]);
        assert_eq!(memory_shortfall(&pods, &[&small, &big]), None);
        let message = memory_shortfall(&pods, &[&small]).expect("too small");
        assert!(
            message.starts_with(
                "stage 0 requests 24Gi (25769803776 bytes) of memory, \
                 stage 1 requests 24Gi (25769803776 bytes) of memory; the largest node"
            ),
            "{message}"
        );
        assert!(
            message.contains("n1, has 16Gi (17179869184 bytes) allocatable"),
            "{message}"
        );
        // Exactly the allocatable memory fits; kibibytes as kubelets report them.
        let exact = sized_node("n3", "25165824Ki", &[], &[]);
        assert_eq!(memory_shortfall(&pods, &[&exact]), None);
        // Nothing known about nodes or requests: nothing said.
        assert_eq!(memory_shortfall(&pods, &[]), None);
        let silent = node("n4", true);
        assert_eq!(memory_shortfall(&pods, &[&small, &silent]), None);
        run.spec.placement.memory_per_worker = None;
        assert_eq!(memory_shortfall(&stage_pods(&run), &[&small]), None);
    }

    #[test]
    fn only_nodes_the_pods_may_use_count() {
        let mut run = run(1, 1);
        run.spec.placement.memory_per_worker = Some("24Gi".to_owned());
        run.spec.placement.node_selector =
            BTreeMap::from([("pool".to_owned(), "train".to_owned())]);
        let small = sized_node("small", "16Gi", &[("pool", "train")], &[]);
        let other_pool = sized_node("other", "64Gi", &[("pool", "serve")], &[]);
        let tainted = sized_node(
            "tainted",
            "64Gi",
            &[("pool", "train")],
            &[("dedicated", "NoSchedule")],
        );
        let evicting = sized_node(
            "evicting",
            "64Gi",
            &[("pool", "train")],
            &[("spot", "NoExecute")],
        );
        let preferred = sized_node(
            "preferred",
            "48Gi",
            &[("pool", "train")],
            &[("busy", "PreferNoSchedule")],
        );
        let mut cordoned = sized_node("cordoned", "64Gi", &[("pool", "train")], &[]);
        if let Some(spec) = cordoned.spec.as_mut() {
            spec.unschedulable = Some(true);
        }
        let nodes = [&small, &other_pool, &tainted, &evicting, &cordoned];
        let message = memory_shortfall(&stage_pods(&run), &nodes).expect("no room");
        assert!(message.contains("small, has 16Gi"), "{message}");
        // A PreferNoSchedule taint does not keep a pod off.
        let with_preferred = [&small, &preferred];
        assert_eq!(memory_shortfall(&stage_pods(&run), &with_preferred), None);
        // Tolerating the taints opens those nodes.
        run.spec.placement.tolerations = vec![pipewright_spec::Toleration {
            key: Some("dedicated".to_owned()),
            operator: pipewright_spec::TolerationOperator::Exists,
            value: None,
            effect: None,
            toleration_seconds: None,
        }];
        assert_eq!(memory_shortfall(&stage_pods(&run), &nodes), None);
        // No node matching at all is said too.
        run.spec.placement.node_selector = BTreeMap::from([("pool".to_owned(), "none".to_owned())]);
        let message = memory_shortfall(&stage_pods(&run), &nodes).expect("no node");
        assert!(message.contains("none of the 5 nodes matches"), "{message}");
    }

    #[test]
    fn tolerations_match_taints_as_the_scheduler_does() {
        let taint = Taint {
            key: "gpu".to_owned(),
            value: Some("a100".to_owned()),
            effect: "NoSchedule".to_owned(),
            ..Taint::default()
        };
        let t = |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| {
            Toleration {
                key: key.map(str::to_owned),
                operator: op.map(str::to_owned),
                value: value.map(str::to_owned),
                effect: effect.map(str::to_owned),
                toleration_seconds: None,
            }
        };
        for (toleration, matches) in [
            (t(None, Some("Exists"), None, None), true),
            (
                t(Some("gpu"), Some("Exists"), None, Some("NoSchedule")),
                true,
            ),
            (t(Some("gpu"), None, Some("a100"), None), true),
            (t(Some("gpu"), Some("Equal"), Some("h100"), None), false),
            (
                t(Some("gpu"), Some("Exists"), None, Some("NoExecute")),
                false,
            ),
            (t(Some("cpu"), Some("Exists"), None, None), false),
            (t(None, Some("Equal"), Some("a100"), None), false),
        ] {
            assert_eq!(tolerates(&toleration, &taint), matches, "{toleration:?}");
        }
    }

    #[test]
    fn pods_of_old_attempts_and_dropped_shards_are_deleted() {
        let (mut run, mut pods) = settled();
        pods.push(shard(&run, (0, 0, 3), "Running", "n4"));
        run.spec.pipeline.replicas = 1;
        let plan = replan(&run, &pods);
        let deleted: Vec<&str> = plan.delete.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(deleted, ["demo-s0-r1", "demo-s1-r1", "demo-s0-r0-a3"]);
    }
}
