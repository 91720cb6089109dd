//! A shard worker's stage state between epochs: restored from where the
//! epoch's plan says (held here, fresh, a live replica, a checkpoint),
//! handed over to a new replica, encoded in checkpoint form (the current
//! state or the snapshot one step back), and delivered to the coordinator
//! as this stage's part of a checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::session::Session;
use crate::coord::api::{StateSource, Wiring};
use crate::coord::ClientError;
use crate::pipeline::{Snapshot, StageWorker, StatePart};

/// Brings `worker` to the plan of the epoch `w` wires: restores its state,
/// hands it to a new replica when asked to (the snapshot is then dropped)
/// and writes the checkpoint the plan asks for. `false` when the plan
/// moved on before that was done; an error when this worker cannot take
/// part in the plan (a fresh worker should).
pub(super) fn bring_to_plan(
    session: &Session,
    worker: &mut StageWorker,
    snapshot: &mut Snapshot,
    w: &Wiring,
) -> Result<bool> {
    match restore(worker, snapshot, w, session) {
        Ok(true) => {}
        Ok(false) => return Ok(false),
        Err(e) => {
            // Cannot take part in this plan: leave it to a fresh worker.
            return Err(e.context(format!(
                "restoring stage {} at step {}",
                worker.shard().stage,
                w.step
            )));
        }
    }
    if w.upload {
        let part = part_at(worker, snapshot, w.step)?;
        session
            .client
            .put_state(worker.shard().stage, w.epoch, &part)
            .context("handing the stage's state to a new replica")?;
    }
    snapshot.clear();
    if w.checkpoint && !write_checkpoint(session, worker, snapshot, w.step)? {
        return Ok(false);
    }
    Ok(true)
}

/// Brings `worker` to the wiring's step from where the wiring says;
/// `false` when the plan moved on before that could be done.
fn restore(
    worker: &mut StageWorker,
    snapshot: &Snapshot,
    w: &Wiring,
    session: &Session,
) -> Result<bool> {
    let stage = worker.shard().stage;
    match &w.state {
        StateSource::Held => {
            if worker.steps_done() == w.step {
                return Ok(true);
            }
            match snapshot.step() {
                Some(s) if s == w.step => snapshot.restore_into(worker)?,
                _ => bail!(
                    "the coordinator expects state at step {} here, but this worker holds step {}",
                    w.step,
                    worker.steps_done()
                ),
            }
        }
        StateSource::Init => {
            *worker = session.new_stage(worker.shard(), w.layers[0]..w.layers[1])?;
        }
        StateSource::Replica => {
            let bytes = match session.client.get_state(stage, w.epoch) {
                Ok(b) => b,
                // The plan moved on (a restarted coordinator, another
                // loss) before the state arrived: ask for the next one.
                Err(ClientError::Refused { code: 409, .. }) | Err(ClientError::Unknown) => {
                    return Ok(false)
                }
                Err(e) => return Err(e).context("receiving the stage's state from a live replica"),
            };
            restore_bytes(worker, &bytes, w.step, format!("replica of stage {stage}"))?;
        }
        StateSource::Checkpoint { dir } => {
            let bytes = session
                .client
                .get_checkpoint(stage, w.step)
                .with_context(|| format!("fetching stage {stage} of checkpoint {dir}"))?;
            restore_bytes(
                worker,
                &bytes,
                w.step,
                format!("{dir}/stage-{stage}.safetensors"),
            )?;
        }
    }
    Ok(true)
}

/// Restores the stage from a state in checkpoint form (`source` names it
/// in errors); refused, changing nothing, when it does not fit the stage.
fn restore_bytes(worker: &mut StageWorker, bytes: &[u8], step: u64, source: String) -> Result<()> {
    worker.restore_part(bytes, step, &PathBuf::from(source))?;
    Ok(())
}

/// This worker's state at `step` (current or snapshot) in checkpoint form,
/// encoded from the tensors as it is sent (or read from the snapshot's
/// file): no copy of the state is made.
fn part_at<'a>(
    worker: &'a StageWorker,
    snapshot: &'a Snapshot,
    step: u64,
) -> Result<StatePart<'a>> {
    let part = if worker.steps_done() == step {
        worker.part()
    } else if snapshot.step() == Some(step) {
        snapshot
            .part(worker)
            .and_then(|p| p.ok_or_else(|| "the snapshot is gone".to_string()))
    } else {
        bail!("no state at step {step} to hand over")
    };
    part.map_err(|e| anyhow::anyhow!("encoding the stage's state: {e}"))
}

/// Delivers this stage's part of the checkpoint at `step` to the
/// coordinator, which keeps the run directory. `false` when the
/// coordinator no longer knows this worker (it restarted): the caller
/// registers again and is told what to do.
pub(super) fn write_checkpoint(
    session: &Session,
    worker: &StageWorker,
    snapshot: &Snapshot,
    step: u64,
) -> Result<bool> {
    let part = part_at(worker, snapshot, step)?;
    match session
        .client
        .put_checkpoint(session.worker, worker.shard().stage, step, &part)
    {
        Ok(()) => Ok(true),
        Err(ClientError::Unknown) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("delivering the checkpoint of step {step}")),
    }
}
