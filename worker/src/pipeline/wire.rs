//! Frames a stage worker exchanges with its pipeline neighbours, and the
//! inbox that hands them out by (kind, step, micro-batch) whatever order
//! they arrive in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::identity::Identity;
use crate::link::codec::TensorWire;
use crate::link::frame::{Digest, Frame, FrameHeader};
use crate::link::origin::{Origin, ORIGIN_LEN};
use crate::link::sign::{sign_frame, PeerKeys, SignedHeader};
use crate::link::{Codec, DType, FrameKind, Link, LinkError, RejectReason, RunId, Shape, WorkerId};

use super::PipelineError;

/// Micro-batch slot of the frame carrying a tied embedding or head
/// gradient between the first and the last stage.
pub(crate) const TIE_SLOT: u64 = u64::MAX;
/// Micro-batch slot of the gradient sum of squares travelling up the
/// pipeline (partial sums) and back down (the total).
pub(crate) const NORM_SLOT: u64 = u64::MAX - 1;

/// Who is sending: the fields every outgoing frame shares, and the
/// identity that signs every frame (none: frames go unsigned).
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    pub run_id: RunId,
    pub worker_id: WorkerId,
    pub stage: u32,
    pub replica: u32,
    pub signer: Option<Arc<Identity>>,
}

impl Sender {
    /// Signs `frame` with this worker's identity, when it has one.
    fn signed(&self, mut frame: Frame) -> Frame {
        if let Some(id) = &self.signer {
            sign_frame(&mut frame, id);
        }
        frame
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &self,
        step: u64,
        mb: u64,
        kind: FrameKind,
        dtype: DType,
        codec: Codec,
        shape: Shape,
        input: Digest,
    ) -> FrameHeader {
        FrameHeader {
            run_id: self.run_id,
            step,
            micro_batch: mb,
            stage: self.stage,
            replica: self.replica,
            kind,
            dtype,
            codec,
            shape,
            sender: self.worker_id,
            input_hash: input,
            signature: [0; crate::link::frame::SIGNATURE_LEN],
        }
    }

    /// A `[rows, cols]` f32 tensor (activations, gradients) under `codec`,
    /// computed from the input whose content hash is `input`.
    #[allow(clippy::too_many_arguments)]
    pub fn matrix(
        &self,
        step: u64,
        mb: u64,
        kind: FrameKind,
        data: &[f32],
        rows: usize,
        cols: usize,
        codec: TensorWire,
        input: Digest,
    ) -> Result<Frame, PipelineError> {
        let shape = matrix_shape(rows, cols)?;
        let payload = codec.encode(data, rows, cols)?;
        Ok(self.signed(Frame {
            header: self.header(step, mb, kind, codec.dtype, codec.codec, shape, input),
            payload,
            verified_hash: None,
        }))
    }

    /// The first stage's targets frame: the target token ids of
    /// (`step`, `mb`), `rows × seq` of them, sampled with the tokens whose
    /// content hash is `input`, followed by their [`Origin`] signed by this
    /// worker (see [`Sender::targets_frame`]).
    pub fn targets(
        &self,
        step: u64,
        mb: u64,
        targets: &[u32],
        rows: usize,
        seq: usize,
        input: Digest,
    ) -> Result<Frame, PipelineError> {
        if targets.len() != rows * seq {
            return Err(PipelineError::Layout(format!(
                "{} target ids, expected {rows} × {seq}",
                targets.len()
            )));
        }
        let bytes: Vec<u8> = targets.iter().flat_map(|t| t.to_le_bytes()).collect();
        let origin = Origin::new(
            self.signer.as_deref(),
            &self.run_id,
            self.replica,
            step,
            mb,
            &bytes,
            input,
        );
        self.targets_frame(step, mb, bytes, &origin, input)
    }

    /// A middle stage's targets frame: the target ids it received for
    /// (`step`, `mb`) and their first stage's `origin`, relayed unchanged,
    /// under its own signature; `input` is the content hash of the targets
    /// frame it received.
    pub fn relay_targets(
        &self,
        step: u64,
        mb: u64,
        targets: &[u32],
        origin: &Origin,
        input: Digest,
    ) -> Result<Frame, PipelineError> {
        let bytes = targets.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.targets_frame(step, mb, bytes, origin, input)
    }

    /// A targets frame: a `[n + 25]` vector of u32 words, the `n` target ids
    /// (`targets`, little-endian) then the 100 bytes of their `origin`.
    fn targets_frame(
        &self,
        step: u64,
        mb: u64,
        mut payload: Vec<u8>,
        origin: &Origin,
        input: Digest,
    ) -> Result<Frame, PipelineError> {
        payload.extend_from_slice(&origin.to_bytes());
        let words = u32::try_from(payload.len() / 4).map_err(|_| {
            PipelineError::Layout(format!(
                "{} target bytes do not fit a frame shape",
                payload.len()
            ))
        })?;
        Ok(self.signed(Frame {
            header: self.header(
                step,
                mb,
                FrameKind::Targets,
                DType::U32,
                Codec::Raw,
                Shape::vector(words),
                input,
            ),
            payload,
            verified_hash: None,
        }))
    }

    /// One f64 (a sum of squares), as two little-endian u32 words so the
    /// frame's dtype and length stay consistent.
    pub fn scalar(&self, step: u64, value: f64) -> Frame {
        self.signed(Frame {
            header: self.header(
                step,
                NORM_SLOT,
                FrameKind::Control,
                DType::U32,
                Codec::Raw,
                Shape::vector(2),
                [0; 32],
            ),
            payload: value.to_le_bytes().to_vec(),
            verified_hash: None,
        })
    }
}

fn matrix_shape(rows: usize, cols: usize) -> Result<Shape, PipelineError> {
    let too_large = || {
        PipelineError::Layout(format!(
            "tensor [{rows}, {cols}] does not fit a frame shape"
        ))
    };
    let r = u32::try_from(rows).map_err(|_| too_large())?;
    let c = u32::try_from(cols).map_err(|_| too_large())?;
    Ok(Shape::matrix(r, c))
}

/// Checks that `frame` holds a `[rows, cols]` tensor with the expected
/// dtype and codec; a peer that disagrees is refused, never trusted.
fn check_matrix(
    frame: &Frame,
    dtype: DType,
    codec: Codec,
    rows: usize,
    cols: usize,
) -> Result<(), PipelineError> {
    check_dims(frame, dtype, codec, &[rows, cols])
}

/// Checks that `frame` holds a `[len]` vector with the expected dtype and
/// codec.
fn check_vector(
    frame: &Frame,
    dtype: DType,
    codec: Codec,
    len: usize,
) -> Result<(), PipelineError> {
    check_dims(frame, dtype, codec, &[len])
}

fn check_dims(
    frame: &Frame,
    dtype: DType,
    codec: Codec,
    want: &[usize],
) -> Result<(), PipelineError> {
    let h = &frame.header;
    let dims = h.shape.dims();
    let ok = h.dtype == dtype
        && h.codec == codec
        && dims.len() == want.len()
        && dims.iter().zip(want).all(|(&d, &w)| d as usize == w);
    if ok {
        Ok(())
    } else {
        Err(PipelineError::Protocol(format!(
            "{:?} frame of micro-batch {} is {:?}/{:?} {:?}, expected {dtype:?}/{codec:?} {want:?}",
            h.kind, h.micro_batch, h.dtype, h.codec, dims
        )))
    }
}

/// Decodes a `[rows, cols]` tensor frame that must use `codec`.
pub(crate) fn decode_f32(
    frame: &Frame,
    rows: usize,
    cols: usize,
    codec: TensorWire,
) -> Result<Vec<f32>, PipelineError> {
    check_matrix(frame, codec.dtype, codec.codec, rows, cols)?;
    Ok(codec.decode(&frame.payload, rows, cols)?)
}

/// Decodes a targets frame of `rows × seq` target ids (ids are
/// range-checked by the stage that consumes them): the ids and their
/// first stage's origin, which [`Inbox::check_origin`] checks.
pub(crate) fn decode_targets(
    frame: &Frame,
    rows: usize,
    seq: usize,
) -> Result<(Vec<u32>, Origin), PipelineError> {
    let words = rows * seq + ORIGIN_LEN / 4;
    check_vector(frame, DType::U32, Codec::Raw, words)?;
    let split = Origin::split(&frame.payload).filter(|(t, _)| t.len() == rows * seq * 4);
    let Some((targets, origin)) = split else {
        return Err(PipelineError::Protocol(format!(
            "targets payload has {} bytes, expected {}",
            frame.payload.len(),
            words * 4
        )));
    };
    let ids = targets
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((ids, origin))
}

/// Decodes a frame built by [`Sender::scalar`].
pub(crate) fn decode_scalar(frame: &Frame) -> Result<f64, PipelineError> {
    let bytes: [u8; 8] = frame.payload.as_slice().try_into().map_err(|_| {
        PipelineError::Protocol(format!(
            "scalar frame has {} bytes, expected 8",
            frame.payload.len()
        ))
    })?;
    let v = f64::from_le_bytes(bytes);
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PipelineError::Protocol(format!("scalar frame holds {v}")))
    }
}

/// One neighbour link plus the frames that arrived before they were asked
/// for (a neighbour may run ahead by its schedule).
#[derive(Debug)]
pub(crate) struct Inbox {
    pub link: Link,
    name: &'static str,
    early: HashMap<(u8, u64, u64), Frame>,
    max_early: usize,
    abort: Option<Arc<AtomicBool>>,
    /// The public keys every frame's author signature is checked against
    /// (none: frames are not checked).
    keys: Option<Arc<PeerKeys>>,
    /// The signed headers of the tensor frames (activations, gradients,
    /// targets) taken for the newest step seen, for a report after the
    /// step broke off.
    taken: Vec<SignedHeader>,
}

impl Inbox {
    pub fn new(
        link: Link,
        name: &'static str,
        max_early: usize,
        abort: Option<Arc<AtomicBool>>,
    ) -> Self {
        Inbox {
            link,
            name,
            early: HashMap::new(),
            max_early,
            abort,
            keys: None,
            taken: Vec::new(),
        }
    }

    /// The signed headers of the tensor frames taken for `step`.
    pub fn taken(&self, step: u64) -> impl Iterator<Item = &SignedHeader> {
        self.taken.iter().filter(move |h| h.step == step)
    }

    /// Keeps `frame`'s signed header (a tensor frame), forgetting those of
    /// older steps.
    fn keep_header(&mut self, frame: &Frame) {
        let h = &frame.header;
        if !matches!(
            h.kind,
            FrameKind::Activation | FrameKind::Gradient | FrameKind::Targets
        ) {
            return;
        }
        self.taken.retain(|t| t.step >= h.step);
        self.taken.push(SignedHeader::of(frame));
    }

    /// Checks the author signature of every frame taken from now on
    /// against `keys` (none: no check).
    pub fn set_keys(&mut self, keys: Option<Arc<PeerKeys>>) {
        self.keys = keys;
    }

    /// The shard at the other end, as its link id names it.
    fn peer_shard(&self) -> Option<(u32, u32)> {
        let id = self.link.peer().0;
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8]));
        Some((
            u32::try_from(word(&id[..8])).ok()?,
            u32::try_from(word(&id[8..])).ok()?,
        ))
    }

    /// `frame` when its author signature verifies (or no keys are set);
    /// otherwise the refusal, counted on the link as `bad_signature`.
    fn authored(&mut self, frame: Frame) -> Result<Frame, PipelineError> {
        let Some(keys) = &self.keys else {
            return Ok(frame);
        };
        let peer = self.peer_shard().unwrap_or((u32::MAX, u32::MAX));
        match keys.check(&frame, peer) {
            Ok(()) => {
                self.keep_header(&frame);
                Ok(frame)
            }
            Err(e) => {
                self.link
                    .stats()
                    .record_rejected(RejectReason::BadSignature);
                let h = &frame.header;
                Err(PipelineError::Refused {
                    peer: self.name,
                    what: format!(
                        "{:?} of step {} micro-batch {} ({e})",
                        h.kind, h.step, h.micro_batch
                    ),
                    reason: RejectReason::BadSignature.name(),
                })
            }
        }
    }

    /// Checks the first stage's `origin` of the targets `frame` carries
    /// (as [`decode_targets`] read it): it must name
    /// `replica`, the first-stage replica the route gives the micro-batch,
    /// and carry that replica's signature over these ids at the frame's
    /// step and micro-batch in this epoch (no keys set: no check). A
    /// refusal is counted on the link as `bad_signature`.
    pub fn check_origin(
        &self,
        frame: &Frame,
        origin: &Origin,
        replica: u32,
    ) -> Result<(), PipelineError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let h = &frame.header;
        let bytes = Origin::split(&frame.payload).map_or(&[][..], |(t, _)| t);
        let why = if origin.replica != replica {
            Some(format!(
                "they name first-stage replica {}, not {replica} which sampled them",
                origin.replica
            ))
        } else {
            match keys.key(0, replica) {
                None => Some(format!(
                    "no public key is known for stage 0 replica {replica}"
                )),
                Some(k) if !origin.verify(k, &h.run_id, h.step, h.micro_batch, bytes) => {
                    Some(format!(
                        "the first stage's signature over them does not verify against stage 0 replica {replica}"
                    ))
                }
                Some(_) => None,
            }
        };
        let Some(why) = why else {
            return Ok(());
        };
        self.link
            .stats()
            .record_rejected(RejectReason::BadSignature);
        Err(PipelineError::Refused {
            peer: self.name,
            what: format!(
                "Targets of step {} micro-batch {} ({why})",
                h.step, h.micro_batch
            ),
            reason: RejectReason::BadSignature.name(),
        })
    }

    /// Which neighbour this link reaches, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The next frame, waiting at most `timeout`, in slices so that a
    /// raised abort flag ends the wait within a fifth of a second.
    fn recv(&self, timeout: Duration) -> Result<Frame, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.recv_timeout(left.min(Duration::from_millis(200))) {
                Err(LinkError::Timeout(_)) if !left.is_zero() => {
                    if self
                        .abort
                        .as_ref()
                        .is_some_and(|a| a.load(Ordering::Relaxed))
                    {
                        return Err(LinkError::Closed("the wiring changed".into()));
                    }
                }
                Err(LinkError::Timeout(_)) => return Err(LinkError::Timeout(timeout)),
                other => return other,
            }
        }
    }

    pub fn send(&self, frame: Frame) -> Result<(), PipelineError> {
        self.link.send(frame).map_err(|e| PipelineError::Link {
            peer: self.name,
            source: e,
        })
    }

    /// Sends what is queued and closes the sending half.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        self.link.finish().map_err(|e| PipelineError::Link {
            peer: self.name,
            source: e,
        })
    }

    /// The frame of `kind` for (`step`, `mb`), waiting at most `timeout`
    /// for each arriving frame.
    pub fn take(
        &mut self,
        kind: FrameKind,
        step: u64,
        mb: u64,
        timeout: Duration,
    ) -> Result<Frame, PipelineError> {
        let key = (kind as u8, step, mb);
        if let Some(f) = self.early.remove(&key) {
            return self.authored(f);
        }
        loop {
            let f = self.recv(timeout).map_err(|e| PipelineError::Link {
                peer: self.name,
                source: e,
            })?;
            let h = &f.header;
            let got = (h.kind as u8, h.step, h.micro_batch);
            if got == key {
                return self.authored(f);
            }
            // Neighbours never lag behind this worker: a step boundary
            // needs the whole pipeline, so an older frame is a broken peer.
            if h.step < step || self.early.len() >= self.max_early || self.early.contains_key(&got)
            {
                return Err(PipelineError::Protocol(format!(
                    "{} sent {:?} for step {} micro-batch {} while step {step} micro-batch {mb} {kind:?} was expected",
                    self.name, h.kind, h.step, h.micro_batch
                )));
            }
            self.early.insert(got, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Sender {
        Sender {
            run_id: RunId([1; 16]),
            worker_id: WorkerId([2; 16]),
            stage: 1,
            replica: 0,
            signer: None,
        }
    }

    #[test]
    fn a_first_stage_signs_the_origin_of_its_targets() {
        let id = Identity::from_secret([3; 32]);
        let s = Sender {
            stage: 0,
            replica: 1,
            signer: Some(Arc::new(id.clone())),
            ..sender()
        };
        let targets: Vec<u32> = (0..6).collect();
        let f = s.targets(4, 2, &targets, 2, 3, [7; 32]).expect("encode");
        let (ids, origin) = decode_targets(&f, 2, 3).expect("decode");
        let key = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key()).expect("key");
        let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(origin.replica, 1);
        assert!(origin.verify(&key, &s.run_id, 4, 2, &bytes));
        assert!(crate::link::sign::verify_frame(&f, &key), "and the frame");
        // Targets of another shape than the run's are refused.
        assert!(matches!(
            decode_targets(&f, 2, 4),
            Err(PipelineError::Protocol(_))
        ));
        assert!(matches!(
            s.targets(4, 2, &targets, 2, 4, [7; 32]),
            Err(PipelineError::Layout(_))
        ));
    }

    #[test]
    fn tensors_targets_and_scalars_round_trip_exactly() {
        let s = sender();
        let data: Vec<f32> = (0..12).map(|i| i as f32 * -0.37 + 1e-8).collect();
        let f = s
            .matrix(
                3,
                1,
                FrameKind::Activation,
                &data,
                3,
                4,
                TensorWire::F32,
                [5; 32],
            )
            .expect("encode");
        assert_eq!(decode_f32(&f, 3, 4, TensorWire::F32).expect("decode"), data);
        assert_eq!(f.header.input_hash, [5; 32], "the input it came from");
        assert_eq!(f.header.sender, WorkerId([2; 16]), "and its author");
        let targets: Vec<u32> = (0..8).map(|i| i * 1000 + 7).collect();
        let f = s.targets(3, 1, &targets, 2, 4, [6; 32]).expect("encode");
        let (ids, origin) = decode_targets(&f, 2, 4).expect("decode");
        assert_eq!(ids, targets);
        assert_eq!(f.header.input_hash, [6; 32]);
        assert_eq!(f.header.shape.dims(), &[8 + 25], "ids and origin");
        // Unsigned sender: the origin names it and the tokens, unsigned.
        assert_eq!((origin.replica, origin.input), (0, [6; 32]));
        assert_eq!(origin.signature, [0; 64]);
        // A relay passes ids and origin on byte for byte, under its own
        // header.
        let relay = Sender {
            stage: 2,
            ..sender()
        };
        let r = relay
            .relay_targets(3, 1, &ids, &origin, f.content_hash())
            .expect("relay");
        assert_eq!(r.payload, f.payload);
        assert_eq!((r.header.stage, r.header.input_hash), (2, f.content_hash()));
        let v = 12_345.678_901_234_5_f64;
        assert_eq!(decode_scalar(&s.scalar(3, v)).expect("decode"), v);
    }

    #[test]
    fn frames_that_do_not_fit_the_expected_tensor_are_refused() {
        let s = sender();
        let data = vec![0.5f32; 12];
        let f = s
            .matrix(
                0,
                0,
                FrameKind::Activation,
                &data,
                3,
                4,
                TensorWire::F32,
                [0; 32],
            )
            .expect("encode");
        // Same element count, other shape: a peer with another model.
        assert!(matches!(
            decode_f32(&f, 4, 3, TensorWire::F32),
            Err(PipelineError::Protocol(_))
        ));
        // A plain f32 frame where a low-rank one is expected, and the
        // reverse: the codec is part of what both ends agreed on.
        let lowrank = TensorWire::lowrank(DType::F32).expect("lowrank");
        assert!(matches!(
            decode_f32(&f, 3, 4, lowrank),
            Err(PipelineError::Protocol(_))
        ));
        let g = s
            .matrix(0, 0, FrameKind::Activation, &data, 3, 4, lowrank, [0; 32])
            .expect("encode");
        assert_eq!(
            (g.header.codec, g.header.dtype),
            (Codec::Lowrank, DType::F32)
        );
        assert_eq!(decode_f32(&g, 3, 4, lowrank).expect("decode"), data);
        assert!(matches!(
            decode_f32(&g, 3, 4, TensorWire::F32),
            Err(PipelineError::Protocol(_))
        ));
        // Tensor bytes offered as token ids.
        assert!(matches!(
            decode_targets(&f, 3, 4),
            Err(PipelineError::Protocol(_))
        ));
        let mut short = s
            .targets(0, 0, &[1, 2, 3, 4], 2, 2, [0; 32])
            .expect("encode");
        short.payload.pop();
        assert!(matches!(
            decode_targets(&short, 2, 2),
            Err(PipelineError::Protocol(_))
        ));
        let mut bad = s.scalar(0, 1.0);
        bad.payload = f64::NAN.to_le_bytes().to_vec();
        assert!(matches!(
            decode_scalar(&bad),
            Err(PipelineError::Protocol(_))
        ));
        bad.payload.truncate(4);
        assert!(matches!(
            decode_scalar(&bad),
            Err(PipelineError::Protocol(_))
        ));
    }
}
