//! Data-parallel gradient synchronisation between the replicas of a stage.
//!
//! - [`RingMember`]: ring all-reduce (mean) of f32 buffers over
//!   authenticated TCP links, bit-identical on every rank; and an
//!   all-gather of every rank's contribution over both directions of the
//!   same links ([`RingMember::allgather`]).
//! - [`BucketedAllReduce`]: the same ring fed bucket by bucket from a
//!   background thread, so gradients of late layers are on the wire while
//!   backward is still computing the early ones; each bucket combined as
//!   its [`Reduce`] says.
//! - [`aggregate()`]: the robust rules (median, trimmed mean, centered
//!   clipping) as pure functions of the gathered contributions.
//! - [`ContributionReport`]: under a robust rule, the hash of every
//!   replica's contribution to the step as this replica received it (its
//!   own: as it sent it) and each one's cosine and norm ratio against the
//!   aggregate, from which it names the suspect peers.
//! - [`receipt`]: the signed frames of the contributions a replica
//!   received from its ring neighbours, kept for the step, and the
//!   coordinator's check of them: a validator's proof of what it received.
//! - [`screen_tensor`], [`screen_contributions`]: the checks a tensor
//!   received from a peer passes before it is used.
//!
//! The algorithms are described in `docs/protocol.md`, what they defend
//! against in `docs/byzantine.md`.

pub mod aggregate;
mod bucketed;
pub mod contribution;
mod gather;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod receipt;
mod ring;
mod robust;

pub use aggregate::aggregate;
pub use bucketed::BucketedAllReduce;
pub use contribution::{ContributionReport, ContributionStats, Suspicion};
pub use ring::{
    loopback_listeners, on_loopback_ring, RefusedFrame, RingConfig, RingError, RingMember,
    SEGMENT_BYTES,
};
pub use robust::{
    agree, digest, screen_contributions, screen_tensor, Reduce, MAX_NORM_RATIO, MAX_TENSOR_RMS,
};
