//! Data-parallel gradient synchronisation between the replicas of a stage.
//!
//! - [`RingMember`]: ring all-reduce (mean) of f32 buffers over
//!   authenticated TCP links, bit-identical on every rank.
//! - [`BucketedAllReduce`]: the same ring fed bucket by bucket from a
//!   background thread, so gradients of late layers are on the wire while
//!   backward is still computing the early ones.
//!
//! The algorithm is described in `docs/protocol.md`.

mod bucketed;
#[cfg(feature = "cuda")]
pub mod nccl;
mod ring;

pub use bucketed::BucketedAllReduce;
pub use ring::{loopback_listeners, on_loopback_ring, RingConfig, RingError, RingMember};
