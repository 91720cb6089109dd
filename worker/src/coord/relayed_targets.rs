//! Complaints about refused targets frames, the coordinator's part.
//!
//! Every targets frame carries, after the target ids, their first stage's
//! origin: the first-stage replica that sampled them and its signature
//! over them (`link::origin`). Each stage after the first checks the
//! origin of the targets it takes against that replica's key and refuses
//! the frame when it does not verify; an honest relay checks it before it
//! relays and copies ids and origin unchanged, and an honest first stage
//! signs the ids it sends. So a targets frame whose origin does not verify,
//! carrying the valid signature of the shard that sent it, proves that this
//! shard's identity sent targets that the first stage did not sample (or,
//! on the first stage, did not sign what it sent): its author is convicted
//! (`altered_targets`). The run key's tag alone could not say so: the
//! receiver holds that key too and could have made the frame itself, but
//! not the sender's signature.

use std::time::Instant;

use super::{ComplaintVerdict, CoordError, Coordinator};
use crate::identity::public_key_from_hex;
use crate::ledger::Refusal;
use crate::link::origin::Origin;
use crate::link::sign::verify_frame;
use crate::link::{Codec, DType, Frame};

impl Coordinator {
    /// Judges the complaint of `worker` (holding the identity
    /// `complainer`) about the targets frame `frame` of `epoch`, already
    /// decoded with the run key and checked to belong to that epoch of
    /// this run: see the module's documentation.
    pub(super) fn targets_complaint(
        &mut self,
        worker: u64,
        complainer: Option<String>,
        epoch: u64,
        frame: &Frame,
        now: Instant,
    ) -> Result<ComplaintVerdict, CoordError> {
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
        let h = &frame.header;
        let (stage, replica) = (h.stage as usize, h.replica as usize);
        let what = format!(
            "targets of stage {stage} replica {replica}, step {} micro-batch {}",
            h.step + 1,
            h.micro_batch
        );
        let words = h.shape.dims();
        let split = Origin::split(&frame.payload).filter(|_| {
            h.dtype == DType::U32
                && h.codec == Codec::Raw
                && words.len() == 1
                && words[0] as usize * 4 == frame.payload.len()
        });
        let Some((targets, origin)) = split else {
            let detail = format!("the {what} are not target ids and their origin");
            return refuse(self, "complaint", detail);
        };
        let earlier = self
            .convictions()
            .into_iter()
            .any(|c| public_key_from_hex(&c.identity).is_some_and(|k| verify_frame(frame, &k)));
        if earlier {
            return Ok(ComplaintVerdict::AlreadyConvicted);
        }
        if stage >= self.layout.stages || replica >= self.layout.replicas {
            let detail = format!("the {what} name a shard outside the run");
            return refuse(self, "complaint", detail);
        }
        let author = self.idx(stage, replica);
        let Some(slot) = self.slots[author].as_ref() else {
            let detail = format!("no worker holds the shard of the {what}");
            return refuse(self, "complaint", detail);
        };
        let (author_worker, identity) = (slot.worker, slot.identity.clone());
        let signed = public_key_from_hex(&identity).is_some_and(|k| verify_frame(frame, &k));
        let older = epoch < self.epoch;
        if !signed && older {
            return Err(CoordError::Invalid(format!(
                "complaint: the {what} of epoch {epoch} are not signed by the shard's holder of \
                 epoch {}; their author may have left",
                self.epoch
            )));
        }
        if !signed {
            let detail = format!(
                "the {what} are not signed by the identity {} holding that shard",
                crate::identity::fingerprint_hex(&identity)
            );
            return refuse(self, "complaint", detail);
        }
        // Whose word the origin claims: a first-stage replica of the run,
        // whose holder's key must have signed these ids.
        let sampler = origin.replica as usize;
        let why = if sampler >= self.layout.replicas {
            format!("name first-stage replica {sampler}, outside the run")
        } else {
            let Some(first) = self.slots[self.idx(0, sampler)].as_ref() else {
                let detail =
                    format!("no worker holds the first-stage replica {sampler} the {what} name");
                return refuse(self, "complaint", detail);
            };
            let verifies = public_key_from_hex(&first.identity)
                .is_some_and(|k| origin.verify(&k, &h.run_id, h.step, h.micro_batch, targets));
            if verifies {
                let detail = format!("the {what} carry first-stage replica {sampler}'s signature");
                return refuse(self, "unfounded_complaint", detail);
            }
            if older {
                return Err(CoordError::Invalid(format!(
                    "complaint: the origin of the {what} of epoch {epoch} is not signed by the \
                     holder of first-stage replica {sampler} of epoch {}; it may have left",
                    self.epoch
                )));
            }
            format!("carry an origin that first-stage replica {sampler} did not sign")
        };
        let detail = format!("signed {what} that {why}, reported by worker {worker}");
        let evidence = serde_json::json!({
            "kind": "Targets",
            "step": h.step + 1,
            "mb": h.micro_batch,
            "origin_replica": origin.replica,
            "origin_input_hash": hex::encode(origin.input),
            "origin_signature": hex::encode(origin.signature),
            "targets_hash": hex::encode(crate::link::frame::content_hash(targets)),
            "payload_hash": hex::encode(frame.content_hash()),
            "signature": hex::encode(h.signature),
            "complainer": worker,
        })
        .to_string();
        self.convict(author, h.step + 1, "altered_targets", detail, evidence, now);
        Ok(ComplaintVerdict::Convicted {
            shard: (stage, replica),
            worker: author_worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::{ComplaintVerdict, Coordinator};
    use crate::coord::test_support::{refusal, seated_by_shard, ByShard};
    use crate::identity::Identity;
    use crate::link::frame::{encode, Frame, FrameHeader, SIGNATURE_LEN};
    use crate::link::origin::{Origin, ORIGIN_LEN};
    use crate::link::sign::{epoch_run_id, sign_frame};
    use crate::link::{Codec, DType, FrameKind, RunId, RunKey, Shape, WorkerId};

    const RUN: RunId = RunId([6; 16]);
    const KEY: RunKey = RunKey([8; 32]);
    const STEP: u64 = 4;
    const MB: u64 = 1;

    /// A 3 × 2 run, every shard registered under its own identity.
    fn setup(now: Instant) -> (Coordinator, ByShard<u64>, ByShard<Identity>) {
        seated_by_shard(3, 2, 40, now)
    }

    fn ids() -> Vec<u32> {
        (0..16).map(|i| (i * 13 + 2) % 97).collect()
    }

    fn bytes(ids: &[u32]) -> Vec<u8> {
        ids.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    /// The origin first-stage replica `replica` signs (with `by`) for `ids`
    /// in `epoch`.
    fn origin(epoch: u64, replica: u32, ids: &[u32], by: &Identity) -> Origin {
        let run = epoch_run_id(&RUN, epoch);
        Origin::new(Some(by), &run, replica, STEP, MB, &bytes(ids), [5; 32])
    }

    /// A targets frame of shard (`stage`, `replica`) carrying `ids` and
    /// `origin`, signed by `by` (none: unsigned), encoded with the run key.
    fn frame(
        epoch: u64,
        (stage, replica): (u32, u32),
        ids: &[u32],
        origin: &Origin,
        by: Option<&Identity>,
    ) -> Vec<u8> {
        let mut payload = bytes(ids);
        payload.extend_from_slice(&origin.to_bytes());
        let mut f = Frame::new(
            FrameHeader {
                run_id: epoch_run_id(&RUN, epoch),
                step: STEP,
                micro_batch: MB,
                stage,
                replica,
                kind: FrameKind::Targets,
                dtype: DType::U32,
                codec: Codec::Raw,
                shape: Shape::vector((ids.len() + ORIGIN_LEN / 4) as u32),
                sender: WorkerId([stage as u8; 16]),
                input_hash: [7; 32],
                signature: [0; SIGNATURE_LEN],
            },
            payload,
        );
        if let Some(by) = by {
            sign_frame(&mut f, by);
        }
        encode(&f, &KEY)
    }

    #[test]
    fn a_relay_that_signed_targets_its_first_stage_did_not_is_convicted_once() {
        let now = Instant::now();
        let (mut c, ids_of, keys) = setup(now);
        let e = c.epoch();
        let true_ids = ids();
        let o = origin(e, 1, &true_ids, &keys[&(0, 1)]);
        let mut shifted = true_ids.clone();
        shifted.rotate_left(1);
        let body = frame(e, (1, 1), &shifted, &o, Some(&keys[&(1, 1)]));
        let verdict = c.complaint(ids_of[&(2, 1)], e, &body, &KEY, &RUN, now);
        assert_eq!(
            verdict.expect("convicted"),
            ComplaintVerdict::Convicted {
                shard: (1, 1),
                worker: ids_of[&(1, 1)]
            }
        );
        let convicted = c.convictions();
        assert_eq!(convicted.len(), 1);
        assert_eq!(convicted[0].identity, keys[&(1, 1)].public_hex());
        assert_eq!(
            (convicted[0].step, convicted[0].reason.as_str()),
            (STEP + 1, "altered_targets")
        );
        assert!(convicted[0].evidence.contains("origin_signature"));
        assert!(c.barred_worker(ids_of[&(1, 1)]).is_some(), "quarantined");
        assert_eq!(c.refused().get("altered_targets"), Some(&1));
        // Shown again: already convicted, nothing more.
        let again = c.complaint(ids_of[&(2, 1)], e, &body, &KEY, &RUN, now);
        assert_eq!(again.expect("known"), ComplaintVerdict::AlreadyConvicted);
        assert_eq!(c.convictions().len(), 1);
    }

    #[test]
    fn a_first_stage_whose_origin_does_not_verify_is_convicted() {
        let now = Instant::now();
        let (mut c, ids_of, keys) = setup(now);
        let e = c.epoch();
        let t = ids();
        // Signed by a stranger in replica 0's name; naming a replica outside
        // the run.
        let stranger = Identity::from_secret([99; 32]);
        for (o, author) in [
            (origin(e, 0, &t, &stranger), (0, 0)),
            (origin(e, 7, &t, &keys[&(0, 1)]), (0, 1)),
        ] {
            let body = frame(
                e,
                author,
                &t,
                &o,
                Some(&keys[&(author.0 as usize, author.1 as usize)]),
            );
            let verdict = c.complaint(ids_of[&(1, 0)], e, &body, &KEY, &RUN, now);
            assert!(
                matches!(verdict, Ok(ComplaintVerdict::Convicted { shard, .. }) if shard == (author.0 as usize, author.1 as usize)),
                "{verdict:?}"
            );
        }
        assert_eq!(c.refused().get("altered_targets"), Some(&2));
    }

    #[test]
    fn honest_targets_forged_frames_and_malformed_complaints_convict_no_one() {
        let now = Instant::now();
        let (mut c, ids_of, keys) = setup(now);
        let e = c.epoch();
        let t = ids();
        let o = origin(e, 1, &t, &keys[&(0, 1)]);
        // The true targets, as the first stage sent them and as a relay
        // passed them on: the complaint is unfounded.
        for author in [(0, 1), (1, 1)] {
            let by = &keys[&(author.0 as usize, author.1 as usize)];
            let body = frame(e, author, &t, &o, Some(by));
            let r = c.complaint(ids_of[&(2, 1)], e, &body, &KEY, &RUN, now);
            assert_eq!(refusal(r), "unfounded_complaint");
        }
        let mut shifted = t.clone();
        shifted.rotate_left(1);
        let stranger = Identity::from_secret([98; 32]);
        let mut cases = vec![
            // Altered targets in the relay's name, but not signed by it
            // (the complainer made them, or a stranger): no proof.
            (
                "signed by the complainer",
                frame(e, (1, 1), &shifted, &o, Some(&keys[&(2, 1)])),
            ),
            (
                "signed by a stranger",
                frame(e, (1, 1), &shifted, &o, Some(&stranger)),
            ),
            ("unsigned", frame(e, (1, 1), &shifted, &o, None)),
            (
                "another epoch",
                frame(e + 3, (1, 1), &shifted, &o, Some(&keys[&(1, 1)])),
            ),
        ];
        // Shorter than an origin: not target ids and an origin.
        let mut short = Frame::new(
            FrameHeader {
                run_id: epoch_run_id(&RUN, e),
                step: STEP,
                micro_batch: MB,
                stage: 1,
                replica: 1,
                kind: FrameKind::Targets,
                dtype: DType::U32,
                codec: Codec::Raw,
                shape: Shape::vector(4),
                sender: WorkerId([1; 16]),
                input_hash: [7; 32],
                signature: [0; SIGNATURE_LEN],
            },
            vec![1; 16],
        );
        sign_frame(&mut short, &keys[&(1, 1)]);
        cases.push(("no origin", encode(&short, &KEY)));
        for (what, body) in &cases {
            let r = c.complaint(ids_of[&(2, 1)], e, body, &KEY, &RUN, now);
            assert_eq!(refusal(r), "complaint", "{what}");
        }
        assert!(c.convictions().is_empty(), "nobody convicted");
        assert_eq!(c.refused().get("complaint"), Some(&(cases.len() as u64)));
        assert_eq!(c.refused().get("unfounded_complaint"), Some(&2));
        assert_eq!(c.refused().get("altered_targets"), None);
    }
}
