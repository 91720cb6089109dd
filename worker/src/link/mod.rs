//! Links between pipeline stages: authenticated binary frames over TCP.
//!
//! - [`frame`]: the frame format (header, payload, keyed tag), its encoder
//!   and its hostile-input decoder.
//! - [`codec`]: how an f32 tensor becomes payload bytes (f32, f16, bf16,
//!   per-row int8).
//! - [`Link`]: one TCP connection to a peer, opened with a mutual key proof,
//!   carrying frames both ways with bounded queues and backpressure.
//! - [`sign`]: pipeline frames signed by their author's identity key.
//! - [`origin`]: the first stage's signature over a micro-batch's targets,
//!   relayed unchanged to the last stage.
//! - [`LinkStats`]: traffic and rejection counters for metrics.
//! - [`cap_send_rate`]: a kernel-paced cap on a link's sending rate.
//!
//! The wire format is specified in `docs/protocol.md`.

pub mod codec;
mod conn;
pub mod frame;
mod handshake;
pub mod origin;
mod pace;
pub mod sign;
mod stats;

pub use conn::{Link, LinkConfig, LinkError};
pub use frame::{
    Codec, DType, Frame, FrameError, FrameHeader, FrameKind, FrameLimits, RejectReason, RunId,
    RunKey, Shape, WorkerId,
};
pub use handshake::{HandshakeError, Role};
pub use pace::cap_send_rate;
pub use stats::{LinkStats, LinkStatsSnapshot, Traffic};
