//! Signed frames and complaints, a shard worker's part: each epoch it
//! signs its frames (its gradient ring's too) with its identity and checks
//! its neighbours' and its replicas' against the public keys of the wiring
//! (`pipeline::authorship`); when a step breaks off because it refused a
//! signed frame (non-finite values, an absurd norm; in the gradient ring,
//! non-finite values), it shows that frame to the coordinator
//! (`POST /v1/complaint`, `coord::complaint`), which convicts the frame's
//! author when the frame is what it says. After any broken step it
//! reports the signed headers of the frames it took and its suspects
//! (`POST /v1/broken`); the rechecks the coordinator orders in a wiring
//! it carries out before linking (`POST /v1/recheck`).

use anyhow::{Context, Result};

use super::session::Session;
use crate::coord::api::Wiring;
use crate::coord::complaint_api::{recheck_message, BrokenStep, RecheckReport};
use crate::identity::RECHECK_DOMAIN;
use crate::link::frame::encode;
use crate::link::sign::PeerKeys;
use crate::pipeline::{PipelineError, StageWorker};
use crate::sync::RingError;

/// Signs `wk`'s frames with this worker's identity and checks its linked
/// neighbours' frames against the public keys `w` hands out (none in the
/// wiring: no check). A key that is not one fails the epoch's start.
pub(super) fn authorship(session: &Session, wk: &mut StageWorker, w: &Wiring) -> Result<()> {
    wk.set_signer(Some(session.identity.clone()));
    let keys = if w.keys.is_empty() {
        None
    } else {
        let keys = PeerKeys::from_hex(&w.keys)
            .map_err(anyhow::Error::msg)
            .context("the coordinator's public keys of the shards")?;
        Some(keys)
    };
    wk.set_peer_keys(keys);
    Ok(())
}

/// After a step of `epoch` broke off with `e`: when `wk` refused a frame
/// in it, shows the frame to the coordinator; then reports the signed
/// headers of the frames it took in the step and its suspects (the author
/// of a gradient contribution its ring refused; itself and the authors of
/// its inputs when its own output would have been refused). Failures to
/// report are logged; the step's failure is reported either way.
pub(super) fn lodge(session: &Session, wk: &mut StageWorker, epoch: u64, e: &PipelineError) {
    // A ring frame refused for its values travels in the ring's error.
    let ring_frame = match e {
        PipelineError::Ring(RingError::Refused { frame: Some(f), .. }) => {
            Some(f.0.as_ref().clone())
        }
        _ => None,
    };
    complain(session, wk.take_refused().or(ring_frame), epoch);
    let step = wk.steps_done();
    let frames = wk.received_headers(step);
    let shard = wk.shard();
    let suspects: Vec<(usize, usize)> = match e {
        // A frame whose author signature does not verify was written by
        // whoever sent it over the link, not by the author it names.
        PipelineError::Ring(RingError::Refused {
            peer,
            reason: "bad_signature",
            ..
        }) => wk
            .replica_of_rank(*peer)
            .map(|r| vec![(shard.stage, r)])
            .unwrap_or_default(),
        PipelineError::Ring(RingError::Refused { origin, .. }) => wk
            .replica_of_rank(*origin)
            .map(|r| vec![(shard.stage, r)])
            .unwrap_or_default(),
        PipelineError::Unsendable { .. } | PipelineError::Ring(RingError::Unsendable { .. }) => {
            let mut s: Vec<(usize, usize)> = frames
                .iter()
                .map(|f| (f.stage as usize, f.replica as usize))
                .collect();
            s.push((shard.stage, shard.replica));
            s.sort_unstable();
            s.dedup();
            s
        }
        _ => Vec::new(),
    };
    if frames.is_empty() && suspects.is_empty() {
        return;
    }
    let report = BrokenStep {
        worker: session.worker,
        epoch,
        step,
        suspects,
        frames,
    };
    match session.client.broken(&report) {
        Ok(answer) => tracing::info!("reported broken step {}: {answer}", step + 1),
        Err(e) => tracing::warn!("reporting broken step {}: {e}", step + 1),
    }
}

/// When this worker refused a signed frame in its step (`refused`: a
/// pipeline frame, or a gradient ring frame), shows it to the coordinator
/// and logs the verdict.
fn complain(session: &Session, refused: Option<crate::link::Frame>, epoch: u64) {
    let Some(frame) = refused else {
        return;
    };
    let h = &frame.header;
    let what = format!(
        "{:?} of stage {} replica {}, step {} micro-batch {}",
        h.kind,
        h.stage,
        h.replica,
        h.step + 1,
        h.micro_batch
    );
    let bytes = encode(&frame, &session.key);
    match session.client.complain(session.worker, epoch, &bytes) {
        Ok(verdict) => tracing::warn!("complained about the refused {what}: {verdict}"),
        Err(e) => tracing::warn!("complaining about the refused {what}: {e}"),
    }
}

/// Carries out the rechecks `w` orders: recomputes each micro-batch's
/// forward with the state `wk` holds (rolled back to before the broken
/// step), signs the hashes and reports them. A recheck this worker cannot
/// do (it holds another step's weights) is reported as such, signed; the
/// coordinator leaves it unconfirmed.
pub(super) fn carry_out_rechecks(session: &Session, wk: &mut StageWorker, w: &Wiring) {
    for o in &w.rechecks {
        let (input, output, error) = match wk.recheck_forward(o.step, o.mb) {
            Ok((i, o)) => (hex::encode(i), hex::encode(o), None),
            Err(e) => {
                tracing::warn!("recheck {}: {e}", o.recheck);
                (String::new(), String::new(), Some(e.to_string()))
            }
        };
        let message = recheck_message(&session.run_hex, o, &input, &output);
        let report = RecheckReport {
            worker: session.worker,
            recheck: o.recheck,
            signature: session.identity.sign(RECHECK_DOMAIN, &message),
            input,
            output,
            error,
        };
        if let Err(e) = session.client.recheck(&report) {
            tracing::warn!("reporting recheck {}: {e}", o.recheck);
        }
    }
}
