//! What the coordinator's state-machine tests share: a small layout, a
//! run with every shard registered under an identity of its own, and the
//! signed frames and refusals of complaints.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use super::api::{IdentityProof, Register};
use super::state::CoordError;
use super::{Coordinator, Layout};
use crate::identity::Identity;
use crate::link::frame::{encode, Frame};
use crate::link::sign::sign_frame;
use crate::link::RunKey;

/// The lease of the test coordinators.
pub(super) const LEASE: Duration = Duration::from_secs(2);

/// `stages` × `replicas`, one layer per stage, 2 micro-batches per replica,
/// no checkpoints, untied.
pub(super) fn layout(stages: usize, replicas: usize) -> Layout {
    Layout {
        stages,
        replicas,
        steps: 10,
        tied: false,
        stage_layers: (0..stages).map(|s| s..s + 1).collect(),
        checkpoint_every: 0,
        tokens_per_step: 100,
        measured: false,
        micro_batches: 2,
        routed: false,
        cost: None,
        rewards: Default::default(),
        shard_bytes: Vec::new(),
    }
}

/// A registration for (`stage`, `replica`) under `key`.
pub(super) fn register(stage: Option<usize>, replica: Option<usize>, key: &Identity) -> Register {
    Register {
        stage,
        replica,
        pipe_addr: "w:1".into(),
        ring_addr: "w:2".into(),
        name: key.fingerprint(),
        identity: Some(IdentityProof {
            public_key: key.public_hex(),
            ..IdentityProof::default()
        }),
        ..Register::default()
    }
}

/// Registers every shard of `c`'s layout, stage major, shard `i` under the
/// identity of secret `[first + i; 32]`: the worker ids in that order and
/// each id's identity.
pub(super) fn seat_all(
    c: &mut Coordinator,
    first: u8,
    now: Instant,
) -> (Vec<u64>, BTreeMap<u64, Identity>) {
    let (stages, replicas) = (c.layout().stages, c.layout().replicas);
    let mut ids = Vec::new();
    let mut keys = BTreeMap::new();
    for s in 0..stages {
        for r in 0..replicas {
            let key = Identity::from_secret([first + (s * replicas + r) as u8; 32]);
            let (id, _) = c
                .register(register(Some(s), Some(r), &key), now)
                .expect("register");
            ids.push(id);
            keys.insert(id, key);
        }
    }
    (ids, keys)
}

/// Worker ids or identities by shard (stage, replica).
pub(super) type ByShard<T> = BTreeMap<(usize, usize), T>;

/// A run of `stages` × `replicas` (`layout`) with every shard seated as
/// `seat_all` seats them from secret `first`: the coordinator, the worker
/// ids by shard and the identities by shard.
pub(super) fn seated_by_shard(
    stages: usize,
    replicas: usize,
    first: u8,
    now: Instant,
) -> (Coordinator, ByShard<u64>, ByShard<Identity>) {
    let mut c = Coordinator::new("t", layout(stages, replicas), LEASE, None, None);
    let (list, mut by_id) = seat_all(&mut c, first, now);
    let (mut ids, mut keys) = (BTreeMap::new(), BTreeMap::new());
    for (i, id) in list.into_iter().enumerate() {
        let shard = (i / replicas, i % replicas);
        ids.insert(shard, id);
        keys.insert(shard, by_id.remove(&id).expect("a key per id"));
    }
    (c, ids, keys)
}

/// `f` signed by `by` and encoded with the run key `key`.
pub(super) fn signed(mut f: Frame, by: &Identity, key: &RunKey) -> Vec<u8> {
    sign_frame(&mut f, by);
    encode(&f, key)
}

/// The reason of a refusal; panics on anything else.
pub(super) fn refusal<T: Debug>(r: Result<T, CoordError>) -> &'static str {
    match r {
        Err(CoordError::Refused(reason, _)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The blake3 hash of `bytes`, in hex.
pub(super) fn hash(bytes: &[u8]) -> String {
    hex::encode(blake3::hash(bytes).as_bytes())
}
