//! The first stage's word on a micro-batch's targets, carried to the last
//! stage through every stage in between.
//!
//! The first stage samples a micro-batch's tokens and its targets; every
//! later stage but the last only relays the targets. A relay signs the
//! frame it sends (`link::sign`), but that signature says only "I sent
//! this", not "this is what the first stage sampled". So every targets
//! frame also carries, after the target ids, the first stage's
//! [`Origin`]: the replica that sampled them, the hash of the tokens they
//! were sampled with, and that replica's signature in the domain
//! [`TARGETS_DOMAIN`] over [`origin_message`] (the epoch's run id, the
//! replica, the step, the micro-batch, the number of target ids, their
//! hash and the tokens' hash). A relay copies the origin unchanged; every
//! receiver checks it against the first-stage replica's public key.
//!
//! Targets altered on the way then fail the origin at the next hop, and
//! since an honest relay checks the origin before relaying, a frame whose
//! origin does not verify, signed by its relay's own key, proves that the
//! relay sent targets the first stage never signed (`coord`'s judgement of
//! a complaint about a targets frame).

use ed25519_dalek::VerifyingKey;

use super::frame::{content_hash, Digest, RunId};
use crate::identity::{self, Identity};

/// The signature domain of a first stage's origin of targets.
pub const TARGETS_DOMAIN: &str = "pipewright targets v1";

/// Bytes of an [`Origin`] on the wire: the tokens' hash (32), the
/// first-stage replica (4, little-endian), the signature (64).
pub const ORIGIN_LEN: usize = 100;

/// Length of [`origin_message`].
pub const ORIGIN_MESSAGE_LEN: usize = 108;

/// Who sampled a micro-batch's targets, and their signature over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The hash of the tokens the targets were sampled with (the
    /// `input_hash` of the first stage's activation of the micro-batch).
    pub input: Digest,
    /// The first-stage replica that sampled them.
    pub replica: u32,
    /// Its signature over [`origin_message`] (zeros: not signed, in a run
    /// whose frames are not signed).
    pub signature: [u8; 64],
}

/// What a first stage signs for the targets it samples, all integers
/// little-endian: `run_id (16) ‖ replica (4) ‖ step (8) ‖ micro_batch (8)
/// ‖ count of target ids (8) ‖ BLAKE3 of the target ids' bytes (32) ‖
/// tokens' hash (32)`.
pub fn origin_message(
    run_id: &RunId,
    replica: u32,
    step: u64,
    mb: u64,
    targets: &[u8],
    input: &Digest,
) -> [u8; ORIGIN_MESSAGE_LEN] {
    let mut m = [0u8; ORIGIN_MESSAGE_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        m[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&run_id.0);
    put(&replica.to_le_bytes());
    put(&step.to_le_bytes());
    put(&mb.to_le_bytes());
    put(&((targets.len() / 4) as u64).to_le_bytes());
    put(&content_hash(targets));
    put(input);
    debug_assert_eq!(at, ORIGIN_MESSAGE_LEN);
    m
}

impl Origin {
    /// The origin of `targets` (their little-endian bytes), sampled by
    /// first-stage replica `replica` at (`step`, `mb`) in the epoch whose
    /// frames carry `run_id`, from tokens hashing to `input`; signed with
    /// `identity` when there is one.
    pub fn new(
        identity: Option<&Identity>,
        run_id: &RunId,
        replica: u32,
        step: u64,
        mb: u64,
        targets: &[u8],
        input: Digest,
    ) -> Self {
        let signature = identity.map_or([0; 64], |id| {
            id.sign_bytes(
                TARGETS_DOMAIN,
                &origin_message(run_id, replica, step, mb, targets, &input),
            )
        });
        Origin {
            input,
            replica,
            signature,
        }
    }

    /// Whether `key` signed these `targets` as this origin says, at
    /// (`step`, `mb`) of the epoch whose frames carry `run_id`.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        run_id: &RunId,
        step: u64,
        mb: u64,
        targets: &[u8],
    ) -> bool {
        identity::verify_bytes(
            key,
            TARGETS_DOMAIN,
            &origin_message(run_id, self.replica, step, mb, targets, &self.input),
            &self.signature,
        )
    }

    /// Its wire bytes.
    pub fn to_bytes(&self) -> [u8; ORIGIN_LEN] {
        let mut b = [0u8; ORIGIN_LEN];
        b[..32].copy_from_slice(&self.input);
        b[32..36].copy_from_slice(&self.replica.to_le_bytes());
        b[36..].copy_from_slice(&self.signature);
        b
    }

    /// Splits a targets frame's payload into the target ids' bytes and
    /// their origin; `None` when it is too short to hold an origin or the
    /// ids are not whole 4-byte words.
    pub fn split(payload: &[u8]) -> Option<(&[u8], Origin)> {
        let at = payload.len().checked_sub(ORIGIN_LEN)?;
        if at % 4 != 0 {
            return None;
        }
        let (targets, o) = payload.split_at(at);
        let mut input = [0u8; 32];
        input.copy_from_slice(&o[..32]);
        let replica = u32::from_le_bytes([o[32], o[33], o[34], o[35]]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&o[36..]);
        Some((
            targets,
            Origin {
                input,
                replica,
                signature,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<u8> {
        (0..24u32)
            .flat_map(|t| (t * 37 + 5).to_le_bytes())
            .collect()
    }

    #[test]
    fn an_origin_verifies_for_its_own_targets_only() {
        let first = Identity::from_secret([4; 32]);
        let other = Identity::from_secret([5; 32]);
        let run = RunId([2; 16]);
        let targets = ids();
        let o = Origin::new(Some(&first), &run, 1, 6, 3, &targets, [8; 32]);
        let key = VerifyingKey::from_bytes(&first.public_key()).expect("key");
        assert!(o.verify(&key, &run, 6, 3, &targets));
        // Its wire bytes read back the same.
        let mut payload = targets.clone();
        payload.extend_from_slice(&o.to_bytes());
        assert_eq!(Origin::split(&payload), Some((&targets[..], o)));
        // One target changed, moved, or dropped; another step, micro-batch
        // or epoch; another replica named or another tokens' hash; another
        // key: none verifies.
        let mut altered = targets.clone();
        altered[0] ^= 1;
        assert!(!o.verify(&key, &run, 6, 3, &altered));
        let mut shifted = targets.clone();
        shifted.rotate_left(4);
        assert!(!o.verify(&key, &run, 6, 3, &shifted));
        assert!(!o.verify(&key, &run, 6, 3, &targets[4..]));
        assert!(!o.verify(&key, &run, 7, 3, &targets));
        assert!(!o.verify(&key, &run, 6, 2, &targets));
        assert!(!o.verify(&key, &RunId([3; 16]), 6, 3, &targets));
        let renamed = Origin { replica: 0, ..o };
        assert!(!renamed.verify(&key, &run, 6, 3, &targets));
        let retokened = Origin {
            input: [9; 32],
            ..o
        };
        assert!(!retokened.verify(&key, &run, 6, 3, &targets));
        assert!(!o.verify(
            &VerifyingKey::from_bytes(&other.public_key()).expect("key"),
            &run,
            6,
            3,
            &targets
        ));
        // Unsigned (a run whose frames are not signed): verifies nowhere.
        let unsigned = Origin::new(None, &run, 1, 6, 3, &targets, [8; 32]);
        assert_eq!(unsigned.signature, [0; 64]);
        assert!(!unsigned.verify(&key, &run, 6, 3, &targets));
    }

    #[test]
    fn payloads_that_cannot_hold_an_origin_do_not_split() {
        assert_eq!(Origin::split(&[0; ORIGIN_LEN - 1]), None);
        assert_eq!(Origin::split(&[0; ORIGIN_LEN + 3]), None);
        let (t, _) = Origin::split(&[0; ORIGIN_LEN]).expect("no ids, an origin");
        assert!(t.is_empty());
    }

    /// What an origin costs per micro-batch, printed (run with
    /// `--nocapture`): for the targets of 4 × 64 positions (1 KiB of ids,
    /// the attack suite's micro-batch), signing it on the first stage and
    /// verifying it on a later one (each hashing the ids once).
    #[test]
    fn origin_cost() {
        let first = Identity::from_secret([4; 32]);
        let key = VerifyingKey::from_bytes(&first.public_key()).expect("key");
        let run = RunId([2; 16]);
        let targets: Vec<u8> = (0..256u32).flat_map(|t| (t * 7).to_le_bytes()).collect();
        let o = Origin::new(Some(&first), &run, 0, 1, 0, &targets, [1; 32]);
        let n = 500;
        let time = |each: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            for _ in 0..n {
                each();
            }
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let sign = time(&mut || {
            std::hint::black_box(Origin::new(Some(&first), &run, 0, 1, 0, &targets, [1; 32]));
        });
        let check = time(&mut || {
            assert!(o.verify(&key, &run, 1, 0, &targets));
        });
        println!(
            "per micro-batch of 256 target ids: origin signed in {sign:.1} µs, verified in \
             {check:.1} µs, {ORIGIN_LEN} bytes on the wire"
        );
    }
}
