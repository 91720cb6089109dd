//! Authorship of pipeline frames.
//!
//! The tag of a frame proves only that its writer holds the run key, which
//! every member of the run holds. A pipeline frame (activations, activation
//! gradients, targets, the tied-embedding gradient, the norm's partial
//! sums) also carries its author's Ed25519 signature, made with the
//! worker's identity key (`crate::identity`) in the domain
//! [`FRAME_DOMAIN`] over [`frame_message`]: the run, the author's stage
//! and replica, the step, the micro-batch, the kind, the element type,
//! codec and shape, the payload's BLAKE3 hash and the hash of the input it
//! was computed from. Unlike the tag, the signature binds the frame to one
//! identity, so a receiver can show a frame to the coordinator and the
//! coordinator can tell who wrote it (`coord::complaint`).
//!
//! The element type, codec and shape are signed because they say how the
//! payload's bytes are read: without them, the holder of a signed frame
//! could present its bytes under another codec and make them mean
//! something its author never sent.
//!
//! Gradient ring frames (`AllReduce`: the ring all-reduce's partial sums
//! and finished chunks, the robust rules' gathered contributions) are
//! signed over the same fields in their own domain, [`RING_DOMAIN`], so a
//! signature made for one kind of frame can never be presented as the
//! other. A ring frame names its author (stage and replica), not the rank
//! that relays it, so a relay forwards it untouched and every receiver
//! checks it against the author's key (`sync::ring`, `sync::gather`).

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;

use super::frame::FrameKind;
use super::frame::{Digest, Frame, FrameHeader, RunId, SIGNATURE_LEN};
use crate::identity::{self, Identity, FRAME_DOMAIN, RING_DOMAIN};

/// The run id carried in the frames of epoch `epoch` of the run `run_id`:
/// links of different epochs cannot connect to each other, and a signed
/// frame names the epoch it was sent in.
pub fn epoch_run_id(run_id: &RunId, epoch: u64) -> RunId {
    let mut h = blake3::Hasher::new();
    h.update(b"pipewright epoch");
    h.update(&run_id.0);
    h.update(&epoch.to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    RunId(id)
}

/// Length of [`frame_message`].
pub const MESSAGE_LEN: usize = 124;

/// What the author of a frame signs: all integers little-endian,
/// `run_id (16) ‖ stage (4) ‖ replica (4) ‖ step (8) ‖ micro_batch (8) ‖
/// kind (1) ‖ dtype (1) ‖ codec (1) ‖ rank (1) ‖ dims (4 × 4) ‖
/// payload_hash (32) ‖ input_hash (32)`.
pub fn frame_message(h: &FrameHeader, payload_hash: &Digest) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        m[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&h.run_id.0);
    put(&h.stage.to_le_bytes());
    put(&h.replica.to_le_bytes());
    put(&h.step.to_le_bytes());
    put(&h.micro_batch.to_le_bytes());
    put(&[h.kind as u8, h.dtype as u8, h.codec as u8]);
    let dims = h.shape.dims();
    put(&[dims.len() as u8]);
    for i in 0..4 {
        put(&dims.get(i).copied().unwrap_or(0).to_le_bytes());
    }
    put(payload_hash);
    put(&h.input_hash);
    debug_assert_eq!(at, MESSAGE_LEN);
    m
}

/// The domain a frame of `kind` is signed in: [`RING_DOMAIN`] for gradient
/// ring frames, [`FRAME_DOMAIN`] for every pipeline frame.
pub fn domain_of(kind: FrameKind) -> &'static str {
    match kind {
        FrameKind::AllReduce => RING_DOMAIN,
        _ => FRAME_DOMAIN,
    }
}

/// Signs `frame` with `identity`: hashes its payload unless its hash is
/// already known (the hash is kept for sending, so the link does not hash
/// it again) and puts the signature in its header.
pub fn sign_frame(frame: &mut Frame, identity: &Identity) {
    let hash = frame.hash_payload();
    frame.header.signature = identity.sign_bytes(
        domain_of(frame.header.kind),
        &frame_message(&frame.header, &hash),
    );
}

/// Whether `frame` carries `key`'s signature over its signed fields and
/// its payload's hash.
pub fn verify_frame(frame: &Frame, key: &VerifyingKey) -> bool {
    let hash = frame.content_hash();
    identity::verify_bytes(
        key,
        domain_of(frame.header.kind),
        &frame_message(&frame.header, &hash),
        &frame.header.signature,
    )
}

/// A frame's header as its author signed it, without the payload: what a
/// receiver keeps of each frame it took and reports after a broken step
/// (`coord::complaint_api::BrokenStep`). Hashes and the signature in hex.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedHeader {
    /// The epoch's run id (32 hex digits).
    pub run_id: String,
    /// The author's stage.
    pub stage: u32,
    /// The author's replica.
    pub replica: u32,
    /// The step, 0-based.
    pub step: u64,
    /// The micro-batch.
    pub mb: u64,
    /// The frame's kind, dtype and codec as their wire bytes.
    pub kind: u8,
    /// Element type on the wire.
    pub dtype: u8,
    /// Codec.
    pub codec: u8,
    /// The tensor's dimensions, outermost first (at most 4).
    pub dims: Vec<u32>,
    /// BLAKE3 of the payload.
    pub payload_hash: String,
    /// BLAKE3 of the input it was computed from.
    pub input_hash: String,
    /// The author's signature.
    pub signature: String,
}

/// A [`SignedHeader`] read back: the header fields, the payload's hash.
pub type ParsedHeader = (FrameHeader, Digest);

impl SignedHeader {
    /// The signed header of `frame`.
    pub fn of(frame: &Frame) -> Self {
        let h = &frame.header;
        SignedHeader {
            run_id: hex::encode(h.run_id.0),
            stage: h.stage,
            replica: h.replica,
            step: h.step,
            mb: h.micro_batch,
            kind: h.kind as u8,
            dtype: h.dtype as u8,
            codec: h.codec as u8,
            dims: h.shape.dims().to_vec(),
            payload_hash: hex::encode(frame.content_hash()),
            input_hash: hex::encode(h.input_hash),
            signature: hex::encode(h.signature),
        }
    }

    /// The header it describes and the payload's hash; refused, saying
    /// which field, when a field is not what a frame can carry.
    pub fn parse(&self) -> Result<ParsedHeader, String> {
        fn hex_n<const N: usize>(what: &str, text: &str) -> Result<[u8; N], String> {
            let mut out = [0u8; N];
            hex::decode_to_slice(text, &mut out)
                .map_err(|_| format!("{what} is not {} hex digits", 2 * N))?;
            Ok(out)
        }
        let kind = super::FrameKind::from_byte(self.kind).ok_or("unknown frame kind")?;
        let dtype = super::DType::from_byte(self.dtype).ok_or("unknown dtype")?;
        let codec = super::Codec::from_byte(self.codec).ok_or("unknown codec")?;
        let shape = super::Shape::new(&self.dims).ok_or("more than 4 dimensions")?;
        let header = FrameHeader {
            run_id: RunId(hex_n("run id", &self.run_id)?),
            step: self.step,
            micro_batch: self.mb,
            stage: self.stage,
            replica: self.replica,
            kind,
            dtype,
            codec,
            shape,
            sender: super::WorkerId::default(),
            input_hash: hex_n("input hash", &self.input_hash)?,
            signature: hex_n("signature", &self.signature)?,
        };
        Ok((header, hex_n("payload hash", &self.payload_hash)?))
    }

    /// Whether its signature is `key`'s (false when it does not parse).
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        self.parse().is_ok_and(|(h, hash)| {
            identity::verify_bytes(
                key,
                domain_of(h.kind),
                &frame_message(&h, &hash),
                &h.signature,
            )
        })
    }
}

/// Why a frame's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The frame carries no signature (all zero).
    #[error("the frame is not signed")]
    Unsigned,
    /// No public key is known for the shard the frame names as its author.
    #[error("no public key is known for stage {0} replica {1}")]
    UnknownAuthor(u32, u32),
    /// The frame names another author than the link's peer.
    #[error("the frame names stage {0} replica {1}, not the link's peer")]
    NotThePeer(u32, u32),
    /// The signature does not verify against the author's key.
    #[error("the signature does not verify against the key of stage {0} replica {1}")]
    Invalid(u32, u32),
}

/// The registered public keys of a run's shards, by (stage, replica), as
/// the coordinator hands them out in a wiring.
#[derive(Clone, Debug, Default)]
pub struct PeerKeys {
    keys: HashMap<(u32, u32), VerifyingKey>,
}

impl PeerKeys {
    /// Keys from `(stage, replica, public key in hex)` entries; refused,
    /// naming the entry, when one is not a valid key or a shard is out of
    /// range.
    pub fn from_hex(entries: &[(usize, usize, String)]) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for (stage, replica, hex) in entries {
            let (Ok(s), Ok(r)) = (u32::try_from(*stage), u32::try_from(*replica)) else {
                return Err(format!("stage {stage} replica {replica} is out of range"));
            };
            let key = identity::public_key_from_hex(hex).ok_or_else(|| {
                format!("the public key of stage {stage} replica {replica} is not a valid key")
            })?;
            keys.insert((s, r), key);
        }
        Ok(PeerKeys { keys })
    }

    /// Number of shards with a key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key of the shard (`stage`, `replica`), if known.
    pub fn key(&self, stage: u32, replica: u32) -> Option<&VerifyingKey> {
        self.keys.get(&(stage, replica))
    }

    /// Checks that `frame` was signed by the shard `peer` = (stage, replica)
    /// it came from (for a relayed ring frame: its author, whom the
    /// receiver expects): the header must name that shard and carry a
    /// signature that verifies against its key.
    pub fn check(&self, frame: &Frame, peer: (u32, u32)) -> Result<(), SignatureError> {
        let h = &frame.header;
        let author = (h.stage, h.replica);
        if author != peer {
            return Err(SignatureError::NotThePeer(author.0, author.1));
        }
        if h.signature == [0; SIGNATURE_LEN] {
            return Err(SignatureError::Unsigned);
        }
        let key = self
            .keys
            .get(&author)
            .ok_or(SignatureError::UnknownAuthor(author.0, author.1))?;
        if verify_frame(frame, key) {
            Ok(())
        } else {
            Err(SignatureError::Invalid(author.0, author.1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::frame::{decode, encode, FrameLimits, RunKey};
    use crate::link::{Codec, DType, FrameKind, Shape, WorkerId};

    fn frame() -> Frame {
        let payload: Vec<u8> = (0..48u8).collect();
        Frame::new(
            FrameHeader {
                run_id: RunId([3; 16]),
                step: 7,
                micro_batch: 2,
                stage: 0,
                replica: 1,
                kind: FrameKind::Activation,
                dtype: DType::F32,
                codec: Codec::F32,
                shape: Shape::matrix(3, 4),
                sender: WorkerId([1; 16]),
                input_hash: [9; 32],
                signature: [0; SIGNATURE_LEN],
            },
            payload,
        )
    }

    fn keys(author: &Identity) -> PeerKeys {
        PeerKeys::from_hex(&[(0, 1, author.public_hex())]).expect("valid key")
    }

    #[test]
    fn a_signed_frame_verifies_after_the_wire_and_nothing_else_does() {
        let author = Identity::from_secret([1; 32]);
        let other = Identity::from_secret([2; 32]);
        let mut f = frame();
        sign_frame(&mut f, &author);
        let run_key = RunKey([5; 32]);
        let got = decode(&encode(&f, &run_key), &run_key, &FrameLimits::default()).expect("ok");
        assert_eq!(got.header.signature, f.header.signature);
        assert_eq!(keys(&author).check(&got, (0, 1)), Ok(()));

        // Signed by another identity than the shard's registered one.
        let mut forged = frame();
        sign_frame(&mut forged, &other);
        assert_eq!(
            keys(&author).check(&forged, (0, 1)),
            Err(SignatureError::Invalid(0, 1))
        );
        // Unsigned.
        assert_eq!(
            keys(&author).check(&frame(), (0, 1)),
            Err(SignatureError::Unsigned)
        );
        // Naming another shard than the link's peer.
        assert_eq!(
            keys(&author).check(&got, (0, 0)),
            Err(SignatureError::NotThePeer(0, 1))
        );
        // No key for the author.
        assert_eq!(
            PeerKeys::default().check(&got, (0, 1)),
            Err(SignatureError::UnknownAuthor(0, 1))
        );
    }

    #[test]
    fn every_signed_field_and_the_payload_are_bound() {
        let author = Identity::from_secret([1; 32]);
        let k = keys(&author);
        let mut signed = frame();
        sign_frame(&mut signed, &author);
        type Alter = fn(&mut Frame);
        let alterations: [(&str, Alter); 11] = [
            ("run", |f| f.header.run_id.0[0] ^= 1),
            ("step", |f| f.header.step += 1),
            ("micro-batch", |f| f.header.micro_batch += 1),
            ("kind", |f| f.header.kind = FrameKind::Gradient),
            ("dtype and codec", |f| {
                f.header.dtype = DType::I8;
                f.header.codec = Codec::Raw;
            }),
            ("shape", |f| f.header.shape = Shape::matrix(4, 3)),
            ("input", |f| f.header.input_hash[5] ^= 1),
            ("payload", |f| f.payload[0] ^= 1),
            ("signature", |f| f.header.signature[10] ^= 1),
            ("replica", |f| f.header.replica = 1 ^ 1),
            ("stage", |f| f.header.stage = 1),
        ];
        for (what, alter) in alterations {
            let mut f = signed.clone();
            f.verified_hash = None;
            alter(&mut f);
            // A changed author shard is judged against the shard named.
            let peer = (f.header.stage, f.header.replica);
            let verdict = k.check(&f, peer);
            assert!(verdict.is_err(), "altered {what} still verifies");
        }
    }

    /// A gradient ring frame as `sync::ring` writes it: stage 0 replica 1's
    /// segment 3 of operation 2 at training step 7.
    fn ring_frame() -> Frame {
        let mut f = frame();
        f.header.kind = FrameKind::AllReduce;
        f.header.micro_batch = (2 << 40) | 3;
        f.header.input_hash = [0; 32];
        f.header.shape = Shape::vector(12);
        f
    }

    #[test]
    fn ring_frames_are_signed_in_their_own_domain_over_every_field() {
        let author = Identity::from_secret([1; 32]);
        let k = keys(&author);
        let mut signed = ring_frame();
        sign_frame(&mut signed, &author);
        let run_key = RunKey([5; 32]);
        let got = decode(
            &encode(&signed, &run_key),
            &run_key,
            &FrameLimits::default(),
        );
        assert_eq!(k.check(&got.expect("decodes"), (0, 1)), Ok(()));
        // The same fields signed as a pipeline frame's are not a ring
        // frame's signature, and a ring frame's signature is no pipeline
        // frame's.
        let mut pipeline = ring_frame();
        let hash = pipeline.hash_payload();
        pipeline.header.signature =
            author.sign_bytes(FRAME_DOMAIN, &frame_message(&pipeline.header, &hash));
        assert_eq!(
            k.check(&pipeline, (0, 1)),
            Err(SignatureError::Invalid(0, 1))
        );
        let mut as_activation = signed.clone();
        as_activation.header.kind = FrameKind::Activation;
        assert!(k.check(&as_activation, (0, 1)).is_err());
        // Every field a relay or a forger could change.
        type Alter = fn(&mut Frame);
        let alterations: [(&str, Alter); 7] = [
            ("epoch", |f| f.header.run_id.0[15] ^= 1),
            ("training step", |f| f.header.step += 1),
            ("bucket", |f| f.header.micro_batch += 1 << 40),
            ("segment", |f| f.header.micro_batch += 1),
            ("length", |f| {
                f.header.shape = Shape::vector(11);
                f.payload.truncate(44);
            }),
            ("payload", |f| f.payload[7] ^= 0x80),
            ("stage", |f| f.header.stage = 2),
        ];
        for (what, alter) in alterations {
            let mut f = signed.clone();
            f.verified_hash = None;
            alter(&mut f);
            let peer = (f.header.stage, f.header.replica);
            assert!(k.check(&f, peer).is_err(), "altered {what} still verifies");
        }
        // A relay naming itself as the author is checked against its own
        // key, which did not sign.
        let other = Identity::from_secret([2; 32]);
        let both = PeerKeys::from_hex(&[(0, 1, author.public_hex()), (0, 2, other.public_hex())])
            .expect("keys");
        let mut relayed = signed.clone();
        relayed.header.replica = 2;
        assert_eq!(
            both.check(&relayed, (0, 2)),
            Err(SignatureError::Invalid(0, 2))
        );
    }

    #[test]
    fn malformed_keys_are_refused_with_their_shard() {
        let err = PeerKeys::from_hex(&[(1, 2, "zz".into())]).unwrap_err();
        assert!(err.contains("stage 1 replica 2"), "{err}");
        let err = PeerKeys::from_hex(&[(0, 0, "ab".repeat(31))]).unwrap_err();
        assert!(err.contains("stage 0 replica 0"), "{err}");
        assert!(PeerKeys::from_hex(&[]).expect("empty").is_empty());
    }

    /// What signing and checking add per frame, printed (run with
    /// `--nocapture`): for an activation block of 4 × 64 rows of 128 f32
    /// (128 KiB, the attack suite's), the payload's hash (paid with or
    /// without signatures), signing (hash included) and checking.
    #[test]
    fn signing_cost() {
        let author = Identity::from_secret([1; 32]);
        let k = keys(&author);
        let mut f = frame();
        f.header.shape = Shape::matrix(256, 128);
        f.payload = (0..256 * 128 * 4).map(|i| (i % 251) as u8).collect();
        let n = 200;
        let time = |mut each: Box<dyn FnMut()>| {
            let t = std::time::Instant::now();
            for _ in 0..n {
                each();
            }
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let payload = f.payload.clone();
        let hash = time(Box::new(move || {
            std::hint::black_box(crate::link::frame::content_hash(&payload));
        }));
        let mut g = f.clone();
        let sign = time(Box::new(move || {
            g.verified_hash = None;
            sign_frame(&mut g, &author);
        }));
        let mut signed = f.clone();
        sign_frame(&mut signed, &Identity::from_secret([1; 32]));
        let checked = signed.clone();
        let check = time(Box::new(move || {
            assert_eq!(k.check(&checked, (0, 1)), Ok(()));
        }));
        println!(
            "per 128 KiB frame: payload hash {hash:.1} µs; signing (hash included) {sign:.1} µs; \
             checking (hash known) {check:.1} µs"
        );
        // A gradient ring frame's hash is computed in the ring's own pass
        // over the segment, so signing and checking it add only the
        // signature's own cost, whatever the segment's size.
        let mut r = ring_frame();
        r.verified_hash = Some([4; 32]);
        let id = Identity::from_secret([1; 32]);
        let mut g = r.clone();
        let ring_sign = time(Box::new(move || sign_frame(&mut g, &id)));
        sign_frame(&mut r, &Identity::from_secret([1; 32]));
        let k = keys(&Identity::from_secret([1; 32]));
        let ring_check = time(Box::new(move || {
            assert_eq!(k.check(&r, (0, 1)), Ok(()));
        }));
        println!(
            "per gradient ring frame (hash known): signing {ring_sign:.1} µs; checking \
             {ring_check:.1} µs"
        );
    }
}
