//! Deriving a run's status from what a reconcile saw (its pods, the
//! coordinator's report) and did (the plan). Pure: no API calls.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Resource, ResourceExt};
use pipewright_spec::{
    Reassignment, RunPhase, ShardStatus, StageStatus, TrainingRunResource, TrainingRunStatus,
};

use super::plan::{index, label, pod_phase, PlannedShard, PodPlan};
use super::MAX_REASSIGNMENTS;
use crate::children::{shard_pod_name, ChildrenError, GPU_RESOURCE, LABEL_ROLE, ROLE_SHARD};
use crate::coordinator::CoordinatorReport;

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
    /// Why some stage's shard pods fit on no node for memory
    /// ([`super::plan::memory_shortfall`]), if so.
    pub memory_shortfall: Option<String>,
}

/// The status of a run that is not suspended, finished or refused.
pub fn observed_status(
    run: &TrainingRunResource,
    seen: Observation<'_>,
    now: Time,
) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let generation = run.meta().generation;
    let tally = Tally::of(run, &previous, &seen);
    let ready_shards: u32 = tally.stages.iter().map(|s| s.ready_replicas).sum();
    let desired_shards = index(run.spec.pipeline.stages).saturating_mul(tally.replicas);
    let conditions = Conditions {
        previous: &previous,
        generation,
        now: &now,
    };
    let (scheduled, scheduling) =
        conditions.scheduled(run, &tally, seen.memory_shortfall.as_deref());
    let started =
        scheduled || matches!(previous.phase, Some(RunPhase::Running | RunPhase::Degraded));
    let (degraded, degradation) = conditions.degraded(&tally.stages, started);
    let report = seen.report;
    let phase = run_phase(report, seen.coordinator_phase, degraded, started);
    let readiness = conditions.ready(&phase, ready_shards, desired_shards);
    let terminal = matches!(phase, RunPhase::Succeeded | RunPhase::Failed);
    let progress = Progress::of(report, &previous);
    TrainingRunStatus {
        phase: Some(phase),
        conditions: vec![readiness, scheduling, degradation],
        observed_generation: generation,
        ready_shards,
        desired_shards,
        stages: tally.stages,
        shards: tally.shards,
        reassignments: history(&previous, seen.new_reassignments, &now),
        step: progress.step,
        loss: progress.loss,
        tokens_per_second: progress.tokens_per_second,
        total_reassignments: seen.total_reassignments,
        failed_nodes: seen.failed_nodes,
        training_phase: progress.training_phase,
        completion_time: if terminal {
            previous.completion_time.clone().or(Some(now))
        } else {
            None
        },
        contributions: progress.contributions,
        gpus_per_shard: seen
            .pods
            .iter()
            .find(|p| label(p, LABEL_ROLE) == Some(ROLE_SHARD))
            .map(gpu_request)
            .or(previous.gpus_per_shard),
    }
}

/// The coordinator's figures, or the last ones known when it did not
/// answer.
struct Progress {
    step: Option<u64>,
    loss: Option<f64>,
    tokens_per_second: Option<f64>,
    training_phase: Option<String>,
    contributions: Vec<pipewright_spec::ContributorStatus>,
}

impl Progress {
    fn of(report: Option<&CoordinatorReport>, previous: &TrainingRunStatus) -> Self {
        Self {
            step: report.and_then(|r| r.step).or(previous.step),
            // Figures a person reads in `kubectl get`: four significant
            // digits of loss, whole tokens per second.
            loss: report
                .and_then(|r| r.loss)
                .map(significant4)
                .or(previous.loss),
            tokens_per_second: report
                .and_then(|r| r.tokens_per_second)
                .map(f64::round)
                .or(previous.tokens_per_second),
            training_phase: report
                .and_then(|r| r.phase.clone())
                .or_else(|| previous.training_phase.clone()),
            contributions: match report {
                Some(r) if !r.contributions.is_empty() => top_contributors(&r.contributions),
                _ => previous.contributions.clone(),
            },
        }
    }
}

/// The run's shards counted per stage.
struct Tally<'a> {
    /// Desired replicas of every stage.
    replicas: u32,
    /// One row per stage, with its ready replicas.
    stages: Vec<StageStatus>,
    /// Running replicas of each stage, in the order of `stages`.
    running: Vec<u32>,
    /// One row per shard.
    shards: Vec<ShardStatus>,
    /// Pods not running yet, to tell why the gang does not start.
    pending: Vec<&'a Pod>,
}

impl<'a> Tally<'a> {
    fn of(run: &TrainingRunResource, previous: &TrainingRunStatus, seen: &Observation<'a>) -> Self {
        let by_name: BTreeMap<&str, &Pod> = seen
            .pods
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
            .collect();
        let name = run.name_any();
        let mut tally = Tally {
            replicas: index(run.spec.pipeline.replicas),
            stages: Vec::new(),
            running: Vec::new(),
            shards: Vec::new(),
            pending: Vec::new(),
        };
        for shard in seen.shards {
            let stage = index(shard.stage);
            if tally.stages.last().is_none_or(|s| s.stage != stage) {
                tally.start_stage(stage, previous);
            }
            let pod_name = shard_pod_name(&name, shard.stage, shard.replica, shard.attempt);
            let pod = by_name.get(pod_name.as_str()).copied();
            tally.count(pod);
            tally.shards.push(ShardStatus {
                stage,
                replica: index(shard.replica),
                pod: pod.map(|p| p.name_any()),
                node: pod.and_then(|p| p.spec.as_ref()?.node_name.clone()),
                attempt: shard.attempt,
            });
        }
        tally
    }

    /// Opens the row of `stage`, keeping the layers the status had.
    fn start_stage(&mut self, stage: u32, previous: &TrainingRunStatus) {
        let layers = previous
            .stages
            .iter()
            .find(|s| s.stage == stage)
            .and_then(|s| s.layers.clone());
        self.stages.push(StageStatus {
            stage,
            desired_replicas: self.replicas,
            ready_replicas: 0,
            layers,
        });
        self.running.push(0);
    }

    /// Counts a shard's pod (`None`: not made yet) in the last stage.
    fn count(&mut self, pod: Option<&'a Pod>) {
        let (Some(row), Some(running)) = (self.stages.last_mut(), self.running.last_mut()) else {
            return;
        };
        if pod.is_some_and(is_ready) {
            row.ready_replicas += 1;
        }
        match pod.and_then(pod_phase) {
            Some("Running") => *running += 1,
            Some("Pending") | None => self.pending.extend(pod),
            _ => {}
        }
    }
}

/// Builds the conditions of one status.
struct Conditions<'a> {
    previous: &'a TrainingRunStatus,
    generation: Option<i64>,
    now: &'a Time,
}

impl Conditions<'_> {
    fn make(&self, type_: &str, ok: bool, reason: &str, message: String) -> Condition {
        condition(
            self.previous,
            type_,
            ok,
            reason,
            message,
            self.generation,
            self.now.clone(),
        )
    }

    /// `Scheduled`: whether every stage has its minimum of running replicas
    /// (the gang started), and if not, why. A stage that fits on no node
    /// (`memory_shortfall`) says so at once: no wait makes it fit.
    fn scheduled(
        &self,
        run: &TrainingRunResource,
        tally: &Tally<'_>,
        memory_shortfall: Option<&str>,
    ) -> (bool, Condition) {
        let replicas = tally.replicas;
        let min = index(run.spec.min_replicas());
        let short: Vec<String> = tally
            .stages
            .iter()
            .zip(&tally.running)
            .filter(|(_, n)| **n < min)
            .map(|(s, n)| format!("stage {}: {n} of {replicas} running", s.stage))
            .collect();
        if short.is_empty() {
            let message = format!("every stage has at least {min} of {replicas} replicas running");
            return (true, self.make("Scheduled", true, "GangRunning", message));
        }
        let waiting = format!("{} (need {min} per stage)", short.join(", "));
        let since = find_condition(self.previous, "Scheduled")
            .filter(|c| c.status == "False")
            .map_or_else(|| self.now.clone(), |c| c.last_transition_time.clone());
        let timeout =
            i64::try_from(run.spec.placement.schedule_timeout_seconds).unwrap_or(i64::MAX);
        let (reason, message) = if let Some(why) = memory_shortfall {
            (INSUFFICIENT_NODE_MEMORY, why.to_owned())
        } else if seconds_between(&since, self.now) < timeout {
            ("WaitingForPods", waiting)
        } else if let Some((pod, why)) = tally.pending.iter().find_map(|p| unschedulable(p)) {
            ("Unschedulable", format!("pod {pod}: {why}"))
        } else {
            (
                "ScheduleTimeout",
                format!("not running after {timeout}s: {waiting}"),
            )
        };
        (false, self.make("Scheduled", false, reason, message))
    }

    /// `Degraded`: whether a started run has a stage short of ready
    /// replicas.
    fn degraded(&self, stages: &[StageStatus], started: bool) -> (bool, Condition) {
        let below: Vec<String> = stages
            .iter()
            .filter(|s| s.ready_replicas < s.desired_replicas)
            .map(|s| {
                format!(
                    "stage {}: {} of {} replicas ready",
                    s.stage, s.ready_replicas, s.desired_replicas
                )
            })
            .collect();
        if started && !below.is_empty() {
            let message = below.join(", ");
            return (
                true,
                self.make("Degraded", true, "StageBelowDesiredReplicas", message),
            );
        }
        let (reason, message) = if started {
            ("AllReplicasReady", "every stage runs all its replicas")
        } else {
            ("NotStarted", "the run has not started")
        };
        (
            false,
            self.make("Degraded", false, reason, message.to_owned()),
        )
    }

    /// `Ready`: whether every shard has a ready pod, and the run's end.
    fn ready(&self, phase: &RunPhase, ready: u32, desired: u32) -> Condition {
        let (ok, reason, message) = match phase {
            RunPhase::Succeeded => (false, "Succeeded", "training finished".to_owned()),
            RunPhase::Failed => (
                false,
                "TrainingFailed",
                "the coordinator reported the run failed".to_owned(),
            ),
            _ if ready == desired => (
                true,
                "AllShardsReady",
                "every shard has a ready pod".to_owned(),
            ),
            _ => (
                false,
                "ShardsNotReady",
                format!("{ready} of {desired} shards ready"),
            ),
        };
        self.make("Ready", ok, reason, message)
    }
}

/// Name and scheduler's message of a pod the scheduler could not place.
fn unschedulable(pod: &Pod) -> Option<(String, String)> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    Some((pod.name_any(), c.message.clone().unwrap_or_default()))
}

/// The run's phase: the coordinator decides the end; before it, whether
/// the gang started and runs every replica.
fn run_phase(
    report: Option<&CoordinatorReport>,
    coordinator_phase: Option<&str>,
    degraded: bool,
    started: bool,
) -> RunPhase {
    let reported = report.and_then(|r| r.phase.as_deref());
    if reported == Some("Failed") {
        RunPhase::Failed
    } else if coordinator_phase == Some("Succeeded") || reported == Some("Succeeded") {
        RunPhase::Succeeded
    } else if degraded {
        RunPhase::Degraded
    } else if started {
        RunPhase::Running
    } else {
        RunPhase::Pending
    }
}

/// The status's reassignments with `moves` added (stamped `now`), the
/// oldest dropped past [`MAX_REASSIGNMENTS`].
fn history(
    previous: &TrainingRunStatus,
    moves: impl IntoIterator<Item = Reassignment>,
    now: &Time,
) -> Vec<Reassignment> {
    let mut reassignments = previous.reassignments.clone();
    reassignments.extend(moves.into_iter().map(|mut r| {
        r.time = Some(now.clone());
        r
    }));
    let excess = reassignments.len().saturating_sub(MAX_REASSIGNMENTS);
    reassignments.drain(..excess);
    reassignments
}

/// Whether a pod is ready and not being deleted.
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Reason of `Scheduled=False` when a stage's memory request exceeds every
/// node the run's pods may use.
pub const INSUFFICIENT_NODE_MEMORY: &str = "InsufficientNodeMemory";

/// Whether a `Scheduled` reason says the gang cannot start: its timeout
/// passed, or a stage fits on no node.
pub(super) fn is_unschedulable(reason: &str) -> bool {
    matches!(
        reason,
        "Unschedulable" | "ScheduleTimeout" | INSUFFICIENT_NODE_MEMORY
    )
}

/// The status's condition of type `type_`.
pub(super) fn find_condition<'a>(
    status: &'a TrainingRunStatus,
    type_: &str,
) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Whole seconds from `from` to `to`.
pub(super) fn seconds_between(from: &Time, to: &Time) -> i64 {
    to.0.as_second() - from.0.as_second()
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

/// Status of a suspended run: no pods, everything else kept. The
/// `Scheduled` condition is dropped so that the gang's timeout starts anew
/// on resume.
pub fn suspended_status(run: &TrainingRunResource, now: Time) -> TrainingRunStatus {
    let previous = run.status.clone().unwrap_or_default();
    let generation = run.meta().generation;
    let conditions = Conditions {
        previous: &previous,
        generation,
        now: &now,
    };
    let message = "spec.suspend is set; the run's pods are deleted".to_owned();
    let conditions = vec![
        conditions.make("Ready", false, "Suspended", message.clone()),
        conditions.make("Suspended", true, "Suspended", message),
    ];
    TrainingRunStatus {
        phase: Some(RunPhase::Suspended),
        conditions,
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
pub(super) fn failed_status(
    run: &TrainingRunResource,
    previous: &TrainingRunStatus,
    plan: &PodPlan,
    total: u32,
    message: String,
    now: Time,
) -> TrainingRunStatus {
    let generation = run.meta().generation;
    let moves = plan
        .reassignments
        .iter()
        .cloned()
        .map(|r| Reassignment { to_pod: None, ..r });
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
        reassignments: history(previous, moves, &now),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tests::{first_plan, replan, settled, status_of};
    use crate::fixtures::{at, coordinator, run, shard};

    #[test]
    fn a_gang_at_its_minimum_starts_degraded() {
        let mut run = run(2, 2);
        run.spec.placement.min_replicas = Some(1);
        let pods = vec![
            shard(&run, (0, 0, 0), "Running", "n1"),
            shard(&run, (0, 1, 0), "Pending", ""),
            shard(&run, (1, 0, 0), "Running", "n2"),
            shard(&run, (1, 1, 0), "Running", "n1"),
        ];
        let plan = first_plan(&run, &pods);
        let status = status_of(&run, &pods, &plan, None, at(10));
        assert_eq!(
            find_condition(&status, "Scheduled").map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(status.phase, Some(RunPhase::Degraded));
    }

    #[test]
    fn progress_comes_from_the_coordinator_and_survives_its_silence() {
        let (run, pods) = settled();
        let plan = replan(&run, &pods);
        let report = CoordinatorReport {
            phase: Some("Training".to_owned()),
            step: Some(40),
            loss: Some(3.25),
            tokens_per_second: Some(5120.0),
            contributions: Vec::new(),
        };
        let mut run = run;
        let status = status_of(&run, &pods, &plan, Some(&report), at(200));
        assert_eq!(
            (status.step, status.loss, status.tokens_per_second),
            (Some(40), Some(3.25), Some(5120.0))
        );
        assert_eq!(status.training_phase.as_deref(), Some("Training"));
        run.status = Some(status.clone());
        // Unreachable next time: the last figures stay.
        let silent = status_of(&run, &pods, &plan, None, at(210));
        assert_eq!(silent, status);
    }

    #[test]
    fn the_coordinator_decides_the_end() {
        let (run, mut pods) = settled();
        let plan = replan(&run, &pods);
        let failed = CoordinatorReport {
            phase: Some("Failed".to_owned()),
            ..CoordinatorReport::default()
        };
        let status = status_of(&run, &pods, &plan, Some(&failed), at(300));
        assert_eq!(status.phase, Some(RunPhase::Failed));
        assert_eq!(status.completion_time, Some(at(300)));
        pods[0] = coordinator(&run, "Succeeded", "n3");
        let status = status_of(&run, &pods, &plan, None, at(400));
        assert_eq!(status.phase, Some(RunPhase::Succeeded));
        assert_eq!(
            find_condition(&status, "Ready").map(|c| c.reason.as_str()),
            Some("Succeeded")
        );
    }

    #[test]
    fn an_unrunnable_spec_fails_the_run_with_the_reason() {
        let error = ChildrenError::NameTooLong {
            run: "demo".to_owned(),
            name: "x".repeat(70),
        };
        let status = refused_status(&run(2, 1), &error, at(1));
        assert_eq!(status.phase, Some(RunPhase::Failed));
        assert_eq!(status.conditions[0].reason, "InvalidSpec");
        assert!(status.conditions[0].message.contains("shorter run name"));
    }

    #[test]
    fn status_figures_are_rounded_for_people() {
        assert_eq!(significant4(2.345678), 2.346);
        assert_eq!(significant4(0.0123456), 0.01235);
        assert_eq!(significant4(11.0), 11.0);
        assert_eq!(significant4(12345.6), 12350.0);
        assert_eq!(significant4(0.0), 0.0);
    }
}
