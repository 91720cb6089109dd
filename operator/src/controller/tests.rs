//! Tests of the controller's planning and status together, over several
//! reconciles, and the fixtures its modules' tests share.

use k8s_openapi::api::core::v1::PodCondition;

use super::plan::{label, pod_phase};
use super::*;
use crate::children::{LABEL_ROLE, ROLE_COORDINATOR};
use crate::fixtures::{at, coordinator, run, shard};

/// Every node is ready.
pub(super) fn all_ready(_: &str) -> Option<bool> {
    Some(true)
}

/// A 2×2 run whose four shards run at attempt 0 on nodes n1/n2, with the
/// status a reconcile of exactly that would have written.
pub(super) fn settled() -> (TrainingRunResource, Vec<Pod>) {
    let mut run = run(2, 2);
    let pods = vec![
        coordinator(&run, "Running", "n3"),
        shard(&run, (0, 0, 0), "Running", "n1"),
        shard(&run, (0, 1, 0), "Running", "n2"),
        shard(&run, (1, 0, 0), "Running", "n1"),
        shard(&run, (1, 1, 0), "Running", "n2"),
    ];
    let plan = first_plan(&run, &pods);
    let status = status_of(&run, &pods, &plan, None, at(100));
    run.status = Some(status);
    (run, pods)
}

pub(super) fn status_of(
    run: &TrainingRunResource,
    pods: &[Pod],
    plan: &PodPlan,
    report: Option<&CoordinatorReport>,
    now: Time,
) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let coordinator_phase = pods
        .iter()
        .find(|p| label(p, LABEL_ROLE) == Some(ROLE_COORDINATOR))
        .and_then(pod_phase);
    observed_status(
        run,
        Observation {
            pods,
            shards: &plan.shards,
            coordinator_phase,
            report,
            new_reassignments: plan.reassignments.clone(),
            failed_nodes: plan.failed_nodes.clone(),
            total_reassignments: previous.total_reassignments
                + u32::try_from(plan.reassignments.len()).expect("few"),
            memory_shortfall: None,
        },
        now,
    )
}

/// Plans the pods of `run`, which has no status yet, with `pods` as they
/// are and every node ready.
pub(super) fn first_plan(run: &TrainingRunResource, pods: &[Pod]) -> PodPlan {
    plan_pods(run, &TrainingRunStatus::default(), pods, &all_ready)
}

/// The pod made for attempt `attempt` of shard (`stage`, `replica`) of
/// `run`, kept off `failed_nodes`.
pub(super) fn replacement(
    run: &TrainingRunResource,
    (stage, replica, attempt): (usize, usize, u32),
    failed_nodes: &[String],
) -> Pod {
    let settings = crate::fixtures::settings(0);
    let blueprint = Blueprint::new(run, &settings).expect("buildable");
    blueprint.shard_pod(stage, replica, attempt, failed_nodes)
}

/// Plans the pods of `run` from the status it carries, with `pods` as
/// they are and `node_ready` telling each node's state.
pub(super) fn replan_with(
    run: &TrainingRunResource,
    pods: &[Pod],
    node_ready: &dyn Fn(&str) -> Option<bool>,
) -> PodPlan {
    plan_pods(run, run.status.as_ref().expect("status"), pods, node_ready)
}

/// [`replan_with`] with every node ready.
pub(super) fn replan(run: &TrainingRunResource, pods: &[Pod]) -> PodPlan {
    replan_with(run, pods, &all_ready)
}

pub(super) fn planned(stage: usize, replica: usize, attempt: u32) -> PlannedShard {
    PlannedShard {
        stage,
        replica,
        attempt,
    }
}

#[test]
fn a_settled_run_needs_nothing() {
    let (run, pods) = settled();
    let plan = replan(&run, &pods);
    assert!(!plan.create_coordinator);
    assert!(plan.create.is_empty() && plan.delete.is_empty());
    assert!(plan.reassignments.is_empty());
    let status = run.status.clone().expect("status");
    assert_eq!(status.phase, Some(RunPhase::Running));
    assert_eq!((status.ready_shards, status.desired_shards), (4, 4));
    assert_eq!(status.shards[3].pod.as_deref(), Some("demo-s1-r1"));
    assert_eq!(status.shards[3].node.as_deref(), Some("n2"));
    // Looking again later changes nothing, transition times included.
    let again = status_of(&run, &pods, &plan, None, at(500));
    assert_eq!(again, status);
}

#[test]
fn a_failed_shard_moves_to_the_next_attempt_off_its_node() {
    let (run, mut pods) = settled();
    let mut evicted = shard(&run, (1, 0, 0), "Failed", "n1");
    evicted.status.as_mut().expect("status").reason = Some("Evicted".to_owned());
    pods[3] = evicted;
    let plan = replan(&run, &pods);
    assert_eq!(plan.delete, [("demo-s1-r0".to_owned(), None)]);
    assert_eq!(plan.create, [planned(1, 0, 1)]);
    assert_eq!(plan.failed_nodes, ["n1"]);
    let moved = &plan.reassignments[0];
    assert_eq!((moved.stage, moved.replica), (1, 0));
    assert_eq!(moved.from_pod, "demo-s1-r0");
    assert_eq!(moved.from_node.as_deref(), Some("n1"));
    assert_eq!(moved.to_pod.as_deref(), Some("demo-s1-r0-a1"));
    assert_eq!(moved.reason, "Evicted");
    assert_eq!(
        describe(moved),
        "stage 1 replica 0: pod demo-s1-r0 on node n1 -> pod demo-s1-r0-a1 (Evicted)"
    );

    // The replacement exists but is not running yet: the stage is short.
    pods.remove(3);
    pods.push(replacement(&run, (1, 0, 1), &plan.failed_nodes));
    let status = status_of(&run, &pods, &plan, None, at(200));
    assert_eq!(status.phase, Some(RunPhase::Degraded));
    assert_eq!(status.total_reassignments, 1);
    assert_eq!(status.failed_nodes, ["n1"]);
    assert_eq!(status.reassignments[0].time, Some(at(200)));
    assert_eq!(status.shards[2].attempt, 1);
    assert_eq!(status.shards[2].pod.as_deref(), Some("demo-s1-r0-a1"));
    let degraded = find_condition(&status, "Degraded").expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "StageBelowDesiredReplicas")
    );
    assert_eq!(degraded.message, "stage 1: 1 of 2 replicas ready");
    // Ready flipped to False, so its transition time moves.
    let ready = find_condition(&status, "Ready").expect("Ready");
    assert_eq!(ready.last_transition_time, at(200));
}

#[test]
fn a_deleted_or_vanished_shard_pod_counts_once() {
    let (mut run, mut pods) = settled();
    // Deleted by someone else: terminating, so nothing to delete.
    pods[4].metadata.deletion_timestamp = Some(at(150));
    let plan = replan(&run, &pods);
    assert_eq!(plan.reassignments.len(), 1);
    assert_eq!(plan.reassignments[0].reason, "PodDeleted");
    assert!(plan.delete.is_empty());
    assert_eq!(plan.create, [planned(1, 1, 1)]);
    run.status = Some(status_of(&run, &pods, &plan, None, at(160)));
    // Next look: the old pod still terminates, the new one exists.
    pods.push(replacement(&run, (1, 1, 1), &plan.failed_nodes));
    let again = replan(&run, &pods);
    assert!(again.reassignments.is_empty() && again.create.is_empty());
    assert!(
        again.delete.is_empty(),
        "a terminating pod is not deleted again"
    );

    assert!(
        run.status.as_ref().expect("status").failed_nodes.is_empty(),
        "a deleted pod is no fault of its node"
    );

    // Vanished without a trace while its node is fine: deleted, moved as
    // well, and its node stays usable.
    let (run, mut pods) = settled();
    pods.remove(1);
    let plan = replan(&run, &pods);
    assert_eq!(plan.reassignments[0].from_pod, "demo-s0-r0");
    assert_eq!(plan.reassignments[0].from_node.as_deref(), Some("n1"));
    assert_eq!(plan.reassignments[0].reason, "PodDeleted");
    assert!(plan.failed_nodes.is_empty());
    // Vanished with its node: the node is failed.
    let n1_gone = |node: &str| (node != "n1").then_some(true);
    let plan = replan_with(&run, &pods, &n1_gone);
    assert_eq!(plan.reassignments[0].reason, "NodeLost");
    assert_eq!(plan.failed_nodes, ["n1"]);
}

#[test]
fn the_gang_waits_then_says_why_it_does_not_schedule() {
    let mut run = run(2, 2);
    run.spec.placement.schedule_timeout_seconds = 60;
    run.spec.placement.min_replicas = Some(1);
    let mut unschedulable = shard(&run, (1, 0, 0), "Pending", "");
    unschedulable
        .status
        .as_mut()
        .and_then(|s| s.conditions.as_mut())
        .expect("conditions")
        .push(PodCondition {
            type_: "PodScheduled".to_owned(),
            status: "False".to_owned(),
            reason: Some("Unschedulable".to_owned()),
            message: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".to_owned()),
            ..PodCondition::default()
        });
    let pods = vec![
        shard(&run, (0, 0, 0), "Running", "n1"),
        shard(&run, (0, 1, 0), "Pending", ""),
        unschedulable,
        shard(&run, (1, 1, 0), "Pending", ""),
    ];
    let plan = first_plan(&run, &pods);
    let status = status_of(&run, &pods, &plan, None, at(1000));
    assert_eq!(status.phase, Some(RunPhase::Pending));
    let scheduled = find_condition(&status, "Scheduled").expect("Scheduled");
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("False", "WaitingForPods")
    );
    assert_eq!(
        scheduled.message,
        "stage 1: 0 of 2 running (need 1 per stage)"
    );
    assert_eq!(next_look(&run, &status, &at(1000)), Action::requeue(POLL));
    run.status = Some(status);
    // 55 s later: 5 s of the timeout left, so the next look is then.
    let status = status_of(&run, &pods, &plan, None, at(1055));
    assert_eq!(
        next_look(&run, &status, &at(1055)),
        Action::requeue(Duration::from_secs(5))
    );
    let status = status_of(&run, &pods, &plan, None, at(1060));
    let scheduled = find_condition(&status, "Scheduled").expect("Scheduled");
    assert_eq!(scheduled.reason, "Unschedulable");
    assert_eq!(
        scheduled.message,
        "pod demo-s1-r0: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    );
    assert_eq!(scheduled.last_transition_time, at(1000));

    // Without a scheduler's word, the timeout itself is the reason.
    let pods: Vec<Pod> = pods
        .into_iter()
        .map(|mut p| {
            if let Some(c) = p.status.as_mut().and_then(|s| s.conditions.as_mut()) {
                c.retain(|c| c.type_ != "PodScheduled");
            }
            p
        })
        .collect();
    let status = status_of(&run, &pods, &plan, None, at(1060));
    let scheduled = find_condition(&status, "Scheduled").expect("Scheduled");
    assert_eq!(scheduled.reason, "ScheduleTimeout");
    assert!(scheduled
        .message
        .starts_with("not running after 60s: stage 1"));
}

#[test]
fn a_stage_that_fits_no_node_is_unschedulable_at_once() {
    let mut run = run(2, 1);
    run.spec.placement.memory_per_worker = Some("24Gi".to_owned());
    let pods = vec![
        coordinator(&run, "Running", "n1"),
        shard(&run, (0, 0, 0), "Pending", ""),
        shard(&run, (1, 0, 0), "Pending", ""),
    ];
    let plan = first_plan(&run, &pods);
    let why = "stage 1 requests 24Gi (25769803776 bytes) of memory; ...";
    let seen = |shortfall: Option<&str>| Observation {
        pods: &pods,
        shards: &plan.shards,
        coordinator_phase: Some("Running"),
        report: None,
        new_reassignments: Vec::new(),
        failed_nodes: Vec::new(),
        total_reassignments: 0,
        memory_shortfall: shortfall.map(str::to_owned),
    };
    // Long before the gang's timeout.
    let status = observed_status(&run, seen(Some(why)), at(100));
    assert_eq!(status.phase, Some(RunPhase::Pending));
    let scheduled = find_condition(&status, "Scheduled").expect("Scheduled");
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("False", INSUFFICIENT_NODE_MEMORY)
    );
    assert_eq!(scheduled.message, why);
    assert!(is_unschedulable(&scheduled.reason));
    // Once a node that holds it joins, the gang waits as usual.
    run.status = Some(status);
    let status = observed_status(&run, seen(None), at(110));
    let scheduled = find_condition(&status, "Scheduled").expect("Scheduled");
    assert_eq!(scheduled.reason, "WaitingForPods");
    assert_eq!(scheduled.last_transition_time, at(100));
}

#[test]
fn a_failed_run_stays_failed_until_its_spec_changes() {
    let (mut run, _) = settled();
    let status = run.status.as_mut().expect("status");
    status.phase = Some(RunPhase::Failed);
    assert!(is_finished(&run, run.status.as_ref().expect("status")));
    run.metadata.generation = Some(2);
    assert!(!is_finished(&run, run.status.as_ref().expect("status")));
}

#[test]
fn suspending_forgets_pods_but_keeps_attempts_and_history() {
    let (mut run, _) = settled();
    if let Some(status) = run.status.as_mut() {
        status.shards[1].attempt = 2;
        status.total_reassignments = 2;
    }
    let status = suspended_status(&run, at(500));
    assert_eq!(status.phase, Some(RunPhase::Suspended));
    assert!(status
        .shards
        .iter()
        .all(|s| s.pod.is_none() && s.node.is_none()));
    assert_eq!(status.shards[1].attempt, 2);
    assert_eq!(status.total_reassignments, 2);
    assert_eq!(status.ready_shards, 0);
    assert!(find_condition(&status, "Scheduled").is_none());
    assert_eq!(
        find_condition(&status, "Suspended").map(|c| c.status.as_str()),
        Some("True")
    );
    // Resuming: nothing counts as lost, every shard is made again.
    run.status = Some(status);
    let plan = replan(&run, &[]);
    assert!(plan.reassignments.is_empty());
    assert_eq!(plan.create.len(), 4);
    assert_eq!(plan.create[1], planned(0, 1, 2));
}

#[test]
fn reassignment_history_is_bounded_but_the_total_is_not() {
    let (mut run, mut pods) = settled();
    let one = Reassignment {
        stage: 0,
        replica: 0,
        from_pod: "old".to_owned(),
        from_node: None,
        to_pod: None,
        reason: "PodDeleted".to_owned(),
        time: None,
    };
    if let Some(status) = run.status.as_mut() {
        status.reassignments = vec![one; MAX_REASSIGNMENTS];
        status.total_reassignments = 70;
    }
    pods[1] = shard(&run, (0, 0, 0), "Failed", "n1");
    let plan = replan(&run, &pods);
    let status = status_of(&run, &pods, &plan, None, at(1));
    assert_eq!(status.reassignments.len(), MAX_REASSIGNMENTS);
    assert_eq!(
        status.reassignments.last().map(|r| r.from_pod.as_str()),
        Some("demo-s0-r0")
    );
    assert_eq!(status.total_reassignments, 71);
}
