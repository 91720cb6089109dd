//! Complaints about refused frames, the coordinator's part.
//!
//! A worker that refuses a tensor a neighbour sent it (a NaN or an
//! infinity, an absurd norm; `sync::screen_tensor`) breaks its step off.
//! The step never reaches its barrier, so no audit is drawn for it. The
//! worker therefore shows the coordinator the frame it refused
//! (`POST /v1/complaint`), signed by its author (`link::sign`). An honest
//! worker screens its own tensors with the same bounds before it sends them
//! and breaks its step off instead of sending one that fails
//! (`pipeline::authorship`), so a frame that fails the screen and carries
//! the valid signature of a shard's registered identity is proof that this
//! identity sent what the protocol forbids: the coordinator convicts it
//! (`refused_frame`) through the audits' conviction (quarantine, the
//! ledger, its slot vacated, the step trained again).
//!
//! The coordinator judges the frame itself, not the complainer's word:
//! it decodes the frame (tag with the run key, payload hash), checks that
//! it belongs to an epoch of this run, verifies the author's signature
//! against the identity that holds the shard the frame names, decodes the
//! payload under the signed codec and shape and screens it with the
//! receiver's bounds. A complaint that fails any check is refused and
//! counted (`complaint`); one whose frame passes the screen convicts no
//! one and is counted (`unfounded_complaint`). Neither is held against the
//! complainer beyond the count: the complaint is not signed, so anyone
//! holding the join token could send one in a worker's name.

use std::time::Instant;

use super::{CoordError, Coordinator};
use crate::identity::public_key_from_hex;
use crate::ledger::Refusal;
use crate::link::codec::TensorWire;
use crate::link::frame::{decode, FrameLimits};
use crate::link::sign::{epoch_run_id, verify_frame};
use crate::link::{Codec, FrameKind, RunId, RunKey};
use crate::sync::screen_tensor;

/// What a complaint came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComplaintVerdict {
    /// The frame's author, the worker holding (stage, replica), was
    /// convicted (`refused_frame`).
    Convicted {
        /// The author's shard.
        shard: (usize, usize),
        /// Its worker id.
        worker: u64,
    },
    /// The frame is signed by an identity convicted before (another
    /// receiver complained first).
    AlreadyConvicted,
}

impl Coordinator {
    /// The registered public key of every worker holding a shard, for the
    /// wiring: `(stage, replica, key in hex)`.
    pub(super) fn shard_keys(&self) -> Vec<(usize, usize, String)> {
        (0..self.slots.len())
            .filter_map(|i| {
                let slot = self.slots[i].as_ref()?;
                let (s, r) = self.shard_of(i);
                Some((s, r, slot.identity.clone()))
            })
            .collect()
    }

    /// Judges the complaint of `worker`, in `epoch`, about the frame
    /// `body` (as its link received it, encoded with the run key `key`):
    /// see the module's documentation. `run_id` is the run's id (frames
    /// carry the id of their epoch, derived from it).
    pub fn complaint(
        &mut self,
        worker: u64,
        epoch: u64,
        body: &[u8],
        key: &RunKey,
        run_id: &RunId,
        now: Instant,
    ) -> Result<ComplaintVerdict, CoordError> {
        if let Some(e) = self.barred_worker(worker) {
            return Err(e);
        }
        let Some(i) = self.find(worker) else {
            return Err(CoordError::UnknownWorker(worker));
        };
        let complainer = self.slots[i].as_ref().map(|s| s.identity.clone());
        let refuse = |c: &mut Self, reason: &'static str, detail: String| {
            Err(c.refuse(
                Refusal {
                    worker: Some(worker),
                    identity: complainer.clone(),
                    reason,
                    detail: format!("complaint: {detail}"),
                },
                now,
            ))
        };
        if epoch > self.epoch {
            let detail = format!("epoch {epoch} is ahead of the run's {}", self.epoch);
            return refuse(self, "complaint", detail);
        }
        let limits = FrameLimits {
            max_payload: body.len() as u64,
        };
        let frame = match decode(body, key, &limits) {
            Ok(f) => f,
            Err(e) => return refuse(self, "complaint", format!("the frame does not decode: {e}")),
        };
        let h = &frame.header;
        if h.run_id != epoch_run_id(run_id, epoch) {
            let detail = format!("the frame is not of epoch {epoch} of this run");
            return refuse(self, "complaint", detail);
        }
        let (stage, replica) = (h.stage as usize, h.replica as usize);
        let what = format!(
            "{:?} of stage {stage} replica {replica}, step {} micro-batch {}",
            h.kind,
            h.step + 1,
            h.micro_batch
        );
        let wire = match (h.kind, h.codec) {
            (FrameKind::Activation | FrameKind::Gradient, Codec::Lowrank) => {
                TensorWire::lowrank(h.dtype).ok()
            }
            (FrameKind::Activation | FrameKind::Gradient, c) => {
                TensorWire::plain(c).ok().filter(|w| w.dtype == h.dtype)
            }
            _ => None,
        };
        let dims = h.shape.dims();
        let (Some(wire), [rows, cols]) = (wire, dims) else {
            let detail = format!("the {what} is not a tensor a receiver screens");
            return refuse(self, "complaint", detail);
        };
        let (rows, cols) = (*rows as usize, *cols as usize);
        // A signature of an identity convicted before: another receiver's
        // complaint (or an audit) came first.
        let earlier = self
            .convictions()
            .into_iter()
            .any(|c| public_key_from_hex(&c.identity).is_some_and(|k| verify_frame(&frame, &k)));
        if earlier {
            return Ok(ComplaintVerdict::AlreadyConvicted);
        }
        if stage >= self.layout.stages || replica >= self.layout.replicas {
            let detail = format!("the {what} names a shard outside the run");
            return refuse(self, "complaint", detail);
        }
        let author = self.idx(stage, replica);
        let Some(slot) = self.slots[author].as_ref() else {
            let detail = format!("no worker holds the shard of the {what}");
            return refuse(self, "complaint", detail);
        };
        let (author_worker, identity) = (slot.worker, slot.identity.clone());
        let signed = public_key_from_hex(&identity).is_some_and(|k| verify_frame(&frame, &k));
        if !signed {
            let detail = format!(
                "the {what} is not signed by the identity {} holding that shard",
                crate::identity::fingerprint_hex(&identity)
            );
            return refuse(self, "complaint", detail);
        }
        let values = match wire.decode(&frame.payload, rows, cols) {
            Ok(v) => v,
            Err(e) => {
                return refuse(
                    self,
                    "complaint",
                    format!("the {what} does not decode: {e}"),
                )
            }
        };
        let Some(reason) = screen_tensor(&values) else {
            let detail = format!("the {what} passes the receivers' screen");
            return refuse(self, "unfounded_complaint", detail);
        };
        let detail = format!(
            "signed a {what} that every receiver refuses ({}), reported by worker {worker}",
            reason.name()
        );
        let evidence = serde_json::json!({
            "kind": format!("{:?}", h.kind),
            "step": h.step + 1,
            "mb": h.micro_batch,
            "screen": reason.name(),
            "payload_hash": hex::encode(frame.content_hash()),
            "input_hash": hex::encode(h.input_hash),
            "signature": hex::encode(h.signature),
            "complainer": worker,
        })
        .to_string();
        self.convict(author, h.step + 1, "refused_frame", detail, evidence, now);
        Ok(ComplaintVerdict::Convicted {
            shard: (stage, replica),
            worker: author_worker,
        })
    }
}

#[cfg(test)]
#[path = "complaint_tests.rs"]
mod tests;
