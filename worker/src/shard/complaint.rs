//! Signed frames and complaints, a shard worker's part: each epoch it
//! signs its frames with its identity and checks its neighbours' against
//! the public keys of the wiring (`pipeline::authorship`); when a step
//! breaks off because it refused a signed frame (non-finite values, an
//! absurd norm), it shows that frame to the coordinator
//! (`POST /v1/complaint`, `coord::complaint`), which convicts the frame's
//! author when the frame is what it says.

use anyhow::{Context, Result};

use super::session::Session;
use crate::coord::api::Wiring;
use crate::link::frame::encode;
use crate::link::sign::PeerKeys;
use crate::pipeline::StageWorker;

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

/// After a step of `epoch` broke off: when `wk` refused a frame in it,
/// shows the frame to the coordinator and logs the verdict. A failure to
/// complain is logged; the step's failure is reported either way.
pub(super) fn lodge(session: &Session, wk: &mut StageWorker, epoch: u64) {
    let Some(frame) = wk.take_refused() else {
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
