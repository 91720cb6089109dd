//! The step loop of one epoch: each step trains the stage's micro-batches
//! ([`StageWorker::train_step`]), keeps the state from before it as the
//! snapshot, signs a commitment to what it computed, and reports at the
//! coordinator's barrier, whose answer says whether to go on, to write a
//! checkpoint, and which route the next step takes. A step that breaks off
//! is reported; one that would break on any worker fails the run. The
//! barrier's answer may carry audit orders ([`super::audit`]): they are
//! carried out before it is followed.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::session::Session;
use super::state::write_checkpoint;
use crate::coord::api::{
    step_message, Barrier, Commitment, Failure, MicroBatchCommit, StepClaim, StepDone,
    SuspectReport, Wiring,
};
use crate::coord::ClientError;
use crate::pipeline::{PipelineError, Snapshot, StageWorker, WorkerStep};
use crate::telemetry::{self, span};

/// Whether the epoch trains on after a step.
enum After {
    /// The next step, parented on the coordinator's span of it.
    Next(Option<String>),
    /// This epoch is over: ask for the next wiring.
    Stop,
}

/// Trains the steps of the epoch `w` wires until the run's last step, a
/// newer epoch, or a barrier that does not proceed. Errors end the worker.
pub(super) fn run(
    session: &Session,
    wk: &mut StageWorker,
    snapshot: &mut Snapshot,
    w: &Wiring,
) -> Result<()> {
    let steps = session.manifest.spec.training.steps;
    // The coordinator's span of the step to come: from the wiring for the
    // epoch's first step, then from each barrier's answer.
    let mut parent = w.traceparent.clone();
    while wk.steps_done() < steps {
        if session.epoch_seen.load(Ordering::Relaxed) > w.epoch {
            break;
        }
        match one(session, wk, snapshot, w, parent.take())? {
            After::Next(next) => parent = next,
            After::Stop => break,
        }
    }
    Ok(())
}

/// One step, traced as `shard step` under the coordinator's `parent`.
fn one(
    session: &Session,
    wk: &mut StageWorker,
    snapshot: &mut Snapshot,
    w: &Wiring,
    parent: Option<String>,
) -> Result<After> {
    let (stage, replica) = w.shard;
    let step = wk.steps_done() + 1;
    let step_span = span!("shard step", stage, replica, step, epoch = w.epoch);
    telemetry::parent_on(&step_span, parent.as_deref());
    let _in_step = step_span.enter();
    // The state before the step, kept in the snapshot's own buffers (or
    // file): after a failed step it holds the state the worker is still at.
    snapshot
        .keep(wk)
        .with_context(|| format!("keeping the state of step {}", wk.steps_done()))?;
    match wk.train_step() {
        Ok(s) => {
            session
                .metrics
                .record_step(w.shard, w.epoch, &s, wk.traffic());
            log_suspects(wk, stage, step);
            let Some(barrier) = report(session, wk, w.epoch, &s)? else {
                return Ok(After::Stop);
            };
            let Some(barrier) = super::audit::carry_out(session, wk, snapshot, w.epoch, barrier)?
            else {
                return Ok(After::Stop);
            };
            follow(session, wk, snapshot, barrier)
        }
        Err(e) => {
            if is_fatal(&e) {
                let _ = session.client.fail(&Failure {
                    worker: session.worker,
                    epoch: w.epoch,
                    error: e.to_string(),
                    fatal: true,
                });
                return Err(e).context(format!("step {}", wk.steps_done()));
            }
            session.metrics.record_links(w.shard, w.epoch, wk.traffic());
            tracing::warn!("step {} broke off: {e}", wk.steps_done());
            telemetry::fail(&step_span, e.to_string());
            super::complaint::lodge(session, wk, w.epoch, &e);
            report_failure(session, w.epoch, &e);
            Ok(After::Stop)
        }
    }
}

/// Reports the step `wk` just completed (`s`) at the coordinator's barrier
/// and waits for its answer; `None` when the coordinator no longer knows
/// this worker.
fn report(
    session: &Session,
    wk: &StageWorker,
    epoch: u64,
    s: &WorkerStep,
) -> Result<Option<Barrier>> {
    let shard = wk.shard();
    let (stage, replica, step) = (shard.stage, shard.replica, wk.steps_done());
    let commitment = commit(session, wk, epoch, s);
    let _barrier_span = span!("barrier", stage, replica, step).entered();
    let barrier = session.client.step(&StepDone {
        worker: session.worker,
        epoch,
        completed: wk.steps_done(),
        loss: s.loss,
        grad_norm: s.grad_norm,
        seconds: s.seconds,
        busy_seconds: s.busy_seconds,
        update_seconds: s.update_seconds,
        link_bytes: s.link_bytes,
        rejected_frames: wk.rejected_frames(),
        micro_batches: s.micro_batches,
        commitment: Some(commitment),
        suspects: suspects(wk),
    });
    match barrier {
        Ok(b) => Ok(Some(b)),
        Err(ClientError::Unknown) => Ok(None),
        Err(e) => Err(super::audit::client_error(e, "at the step barrier")),
    }
}

/// Does what the barrier's answer says: write this stage's part of a
/// checkpoint, take a new route, go on or stop.
fn follow(
    session: &Session,
    wk: &mut StageWorker,
    snapshot: &Snapshot,
    mut barrier: Barrier,
) -> Result<After> {
    let parent = barrier.traceparent.take();
    if barrier.checkpoint {
        let shard = wk.shard();
        let (stage, replica, step) = (shard.stage, shard.replica, wk.steps_done());
        let _s = span!("checkpoint upload", stage, replica, step).entered();
        if !write_checkpoint(session, wk, snapshot, wk.steps_done())? {
            return Ok(After::Stop);
        }
    }
    if let Some(route) = barrier.route {
        wk.set_route(route)
            .context("the coordinator's route does not fit this run")?;
    }
    Ok(if barrier.proceed {
        After::Next(parent)
    } else {
        After::Stop
    })
}

/// The signed commitment to the step `wk` just completed: the hashes of
/// what it computed for each of its micro-batches and the digest of its
/// parameters after the update.
fn commit(session: &Session, wk: &StageWorker, epoch: u64, s: &WorkerStep) -> Commitment {
    let micro_batches: Vec<MicroBatchCommit> = wk
        .step_hashes()
        .iter()
        .map(|(&mb, h)| MicroBatchCommit {
            mb,
            input: hex::encode(h.input),
            output: hex::encode(h.output),
            gradient: hex::encode(h.gradient),
        })
        .collect();
    // The parameters as the update left them, which every replica of the
    // stage must share (the coordinator compares them).
    let t = std::time::Instant::now();
    let digest = wk.params_digest();
    let update = wk.committed_update();
    tracing::debug!(
        "parameters' digest of step {} in {:.2} ms",
        s.step + 1,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut c = Commitment {
        micro_batches,
        signature: String::new(),
        params: Some(hex::encode(digest)),
        // What this worker sent in the replicas' gather (robust rules only).
        contribution: wk.committed_contribution().map(hex::encode),
        // A stage with one training replica under audits: its optimizer's
        // state and the gradient its update applied, which the coordinator
        // replays (`pipeline::update`).
        moments: update.map(|u| hex::encode(u.0)),
        applied: update.map(|u| hex::encode(u.1)),
    };
    // The `forge` drill signs with a key that is not its identity's.
    let forged;
    let signer = if wk.attack_now() == Some(crate::pipeline::AttackKind::Forge) {
        forged = crate::identity::Identity::generate();
        &forged
    } else {
        &session.identity
    };
    let indices = c.indices();
    let shard = wk.shard();
    let claim = StepClaim {
        run_id: &session.run_hex,
        worker: session.worker,
        epoch,
        completed: wk.steps_done(),
        shard: (shard.stage, shard.replica),
        loss: s.loss,
        micro_batches: &indices,
        root: c.root(),
    };
    c.signature = signer.sign(crate::identity::STEP_DOMAIN, &step_message(&claim));
    c
}

/// A step error that would happen again on any worker: the run fails.
fn is_fatal(e: &PipelineError) -> bool {
    matches!(
        e,
        PipelineError::Diverged { .. } | PipelineError::Data(_) | PipelineError::Schedule(_)
    )
}

/// Tells the coordinator this worker's step (or linking) in `epoch` broke
/// off, so it can rewire the run.
pub(super) fn report_failure(session: &Session, epoch: u64, e: &PipelineError) {
    let r = session.client.fail(&Failure {
        worker: session.worker,
        epoch,
        error: e.to_string(),
        fatal: false,
    });
    if let Err(e) = r {
        tracing::warn!("reporting a broken step: {e}");
    }
}

/// The replicas of this worker's stage whose contribution to its last
/// step's gather it found suspect, by replica index, with the reason
/// (`cosine` or `norm_ratio`); the coordinator audits each one's
/// contribution. Empty under `mean`.
fn suspects(wk: &StageWorker) -> Vec<SuspectReport> {
    let Some(report) = wk.contributions() else {
        return Vec::new();
    };
    report
        .suspects()
        .into_iter()
        .map(|(rank, why)| SuspectReport {
            replica: wk.replica_of_rank(rank).unwrap_or(rank),
            reason: why.name().to_string(),
        })
        .collect()
}

/// Logs each peer whose contribution to the step's robust aggregation this
/// worker finds suspect (`sync::contribution`: cosine with the aggregate
/// below 0, or a norm ratio beyond 30× either way). A suspicion convicts
/// no one; the line says what was seen.
fn log_suspects(wk: &StageWorker, stage: usize, step: u64) {
    let Some(report) = wk.contributions() else {
        return;
    };
    for (rank, why) in report.suspects() {
        let s = report.stats[rank];
        let peer = wk.replica_of_rank(rank).unwrap_or(rank);
        tracing::warn!(
            "step {step}: suspect contribution from stage {stage} replica {peer} ({why}): \
             cosine {:.3} and norm ratio {:.3} against the aggregate",
            s.cosine,
            s.norm_ratio
        );
    }
}
