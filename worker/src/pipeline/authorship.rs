//! Who wrote what on the pipeline, a worker's part: it signs every frame it
//! sends with its identity ([`StageWorker::set_signer`]), checks the author
//! signature of every frame it takes against the public keys the
//! coordinator handed out ([`StageWorker::set_peer_keys`]) — its gradient
//! ring's frames too (`sync::ring`, `sync::gather`) —, never sends a
//! tensor of its own that a receiver would refuse
//! ([`StageWorker::screen_outgoing`]), and keeps the signed frame it
//! refused ([`StageWorker::take_refused`]) so that it can show it to the
//! coordinator (`shard::complaint`).
//!
//! Together these make a refusal attributable: an honest worker never sends
//! a tensor that fails the receiver's screen, so a frame that fails it and
//! carries a valid signature convicts its signer (`coord::complaint`).

use std::sync::Arc;

use super::{PipelineError, StageWorker};
use crate::data::sample_train;
use crate::identity::Identity;
use crate::link::codec::TensorWire;
use crate::link::frame::{content_hash, Digest};
use crate::link::sign::{PeerKeys, SignedHeader};
use crate::link::Frame;
use crate::model::{StageInput, StageOutput};
use crate::sync::screen_tensor;

impl StageWorker {
    /// Signs every frame this worker sends from now on with `identity`
    /// (none: frames go unsigned, as in a run without a coordinator).
    pub fn set_signer(&mut self, identity: Option<Identity>) {
        self.sender.signer = identity.map(Arc::new);
        if let Some(ring) = self.ring.as_mut() {
            ring.set_signer(self.sender.signer.clone());
        }
    }

    /// Checks the author signature of every frame taken from the current
    /// links against `keys` (none: no check). Call after
    /// [`StageWorker::link`]; the links of a later wiring start unchecked
    /// until it is called again. A frame that is unsigned, names another
    /// shard than its link's peer, or whose signature does not verify
    /// against that shard's key is refused (`bad_signature`, counted on
    /// the link) and breaks the step off.
    pub fn set_peer_keys(&mut self, keys: Option<PeerKeys>) {
        let keys = keys.map(Arc::new);
        let inboxes = self
            .prev
            .iter_mut()
            .chain(self.next.iter_mut())
            .flatten()
            .chain(self.tie.iter_mut());
        for inbox in inboxes {
            inbox.set_keys(keys.clone());
        }
        if let Some(ring) = self.ring.as_mut() {
            ring.set_keys(keys);
        }
    }

    /// The signed frame this worker refused in its current step (non-finite
    /// or absurd values), if any; taken, so it is handed out once.
    pub fn take_refused(&mut self) -> Option<Frame> {
        self.refused.take()
    }

    /// Keeps `frame`, just refused, for [`StageWorker::take_refused`].
    pub(super) fn keep_refused(&mut self, frame: Frame) {
        self.refused = Some(frame);
    }

    /// Refuses to send `frame`, this worker's own honest output, when its
    /// receiver would refuse it: the payload is decoded under `codec` as
    /// the receiver decodes it (`rows × cols`) and screened with the same
    /// bounds. The step breaks off instead ([`PipelineError::Unsendable`]),
    /// so an honest worker never sends, and never is the signer of, a
    /// frame that fails the screen.
    pub(super) fn screen_outgoing(
        frame: &Frame,
        codec: TensorWire,
        rows: usize,
        cols: usize,
    ) -> Result<(), PipelineError> {
        let values = codec.decode(&frame.payload, rows, cols)?;
        match screen_tensor(&values) {
            None => Ok(()),
            Some(reason) => {
                let h = &frame.header;
                Err(PipelineError::Unsendable {
                    what: format!(
                        "{:?} of step {} micro-batch {}",
                        h.kind, h.step, h.micro_batch
                    ),
                    reason: reason.name(),
                })
            }
        }
    }

    /// The signed headers of the tensor frames (activations, activation
    /// gradients, targets) this worker took in step `step` (0-based) from
    /// its current links, checked against the peers' keys (none without
    /// keys).
    pub fn received_headers(&self, step: u64) -> Vec<SignedHeader> {
        self.prev
            .iter()
            .chain(self.next.iter())
            .flatten()
            .chain(self.tie.iter())
            .flat_map(|inbox| inbox.taken(step).cloned())
            .collect()
    }

    /// A recheck: the forward of micro-batch `mb` of step `step` (0-based)
    /// as any replica of the first stage computes it with the weights this
    /// worker holds, which must be those of before that step (its state
    /// after a broken step was rolled back). Returns the hashes of the
    /// sampled tokens and of the output as the run's codec encodes it: what
    /// an honest author's signed activation frame carries as its
    /// `input_hash` and payload hash. Nothing of this worker's state
    /// changes (the micro-batch's cache is dropped).
    pub fn recheck_forward(
        &mut self,
        step: u64,
        mb: u64,
    ) -> Result<(Digest, Digest), PipelineError> {
        let refuse = |m: String| Err(PipelineError::Audit(format!("recheck: {m}")));
        if self.step != step {
            return refuse(format!(
                "this worker holds the weights of before step {}, not {}",
                self.step + 1,
                step + 1
            ));
        }
        let all = (self.replicas * self.micro_batches) as u64;
        if mb >= all {
            return refuse(format!("micro-batch {mb} is outside the step's {all}"));
        }
        if self.stage.in_flight() != 0 {
            return refuse("the stage has micro-batches in flight".into());
        }
        let (Some(corpus), false) = (&self.corpus, self.is_last()) else {
            return refuse("only a first stage that sends activations rechecks".into());
        };
        let (rows, seq) = (self.rows, self.model.seq_len);
        let m = self.micro_batches as u64;
        let b = sample_train(corpus, self.seed, step, mb % m, mb / m, rows, seq);
        let input = content_hash(bytemuck::cast_slice(&b.tokens));
        let width = self.stage.boundary_width_out();
        let out = self
            .stage
            .forward(mb, StageInput::Tokens(&b.tokens), None, rows, self.scale);
        self.stage.clear_in_flight();
        let output = match out? {
            StageOutput::Hidden(h) => content_hash(&self.codec.encode(&h, rows * seq, width)?),
            StageOutput::Loss(_) => return refuse("the first stage computed a loss".into()),
        };
        Ok((input, output))
    }
}
