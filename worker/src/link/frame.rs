//! Length-prefixed, authenticated binary frames.
//!
//! A frame is a fixed 220-byte little-endian header, the tensor payload, and
//! a 32-byte tag. The header carries the BLAKE3 hash of the payload, which
//! validators use to bind an output tensor to the input it was computed from
//! and to its author; the tag is a BLAKE3 keyed hash (the run key) of the
//! header, and so, through that hash, of the payload as well. Nothing a peer
//! without the key sends is ever accepted. The header also carries the
//! author's Ed25519 signature of the frame (`link::sign`; zero when the
//! frame is not signed), which, unlike the tag, names one worker. The
//! byte-by-byte layout is in
//! `docs/protocol.md`; the constants below are the single source of truth
//! for it.
//!
//! Decoding is written for hostile input: every field is checked before it is
//! trusted, the payload length is bounded before anything is allocated, and
//! every failure is a distinct [`FrameError`] variant instead of a panic.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use thiserror::Error;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PWFR";
/// Frame format version this build writes and accepts.
pub const VERSION: u8 = 2;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 220;
/// Length of the author's signature carried in the header.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the authentication tag that follows the payload.
pub const TAG_LEN: usize = 32;
/// Largest tensor rank a frame can describe.
pub const MAX_RANK: usize = 4;

// Field offsets inside the header. Kept as named constants so the encoder,
// the decoder and the protocol document cannot drift apart silently.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 5;
const OFF_DTYPE: usize = 6;
const OFF_CODEC: usize = 7;
const OFF_RANK: usize = 8;
const OFF_RESERVED: usize = 9;
const OFF_STAGE: usize = 12;
const OFF_REPLICA: usize = 16;
const OFF_STEP: usize = 20;
const OFF_MICRO_BATCH: usize = 28;
const OFF_RUN_ID: usize = 36;
const OFF_SENDER: usize = 52;
const OFF_DIMS: usize = 68;
const OFF_PAYLOAD_HASH: usize = 84;
const OFF_INPUT_HASH: usize = 116;
const OFF_SIGNATURE: usize = 148;
const OFF_PAYLOAD_LEN: usize = 212;

/// The 32-byte key every frame of a run is authenticated with.
#[derive(Clone, PartialEq, Eq)]
pub struct RunKey(pub [u8; 32]);

impl fmt::Debug for RunKey {
    // The key is a secret: never print it, not even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunKey(..)")
    }
}

/// Identifier of a training run (16 bytes, e.g. a UUID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RunId(pub [u8; 16]);

/// Identifier of a worker process (16 bytes, e.g. a UUID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkerId(pub [u8; 16]);

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// Declares a `#[repr(u8)]` wire enum with checked conversion from a byte, so
/// every enum in the header rejects unknown values the same way.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Every variant, in wire-value order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The variant with wire value `byte`, or `None` if unknown.
            pub fn from_byte(byte: u8) -> Option<Self> {
                match byte {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

wire_enum! {
    /// What a frame carries.
    FrameKind {
        /// Forward activations from one stage to the next.
        Activation = 1,
        /// Activation gradients flowing backward.
        Gradient = 2,
        /// Target token ids travelling with a micro-batch.
        Targets = 3,
        /// Small control messages (heartbeats, schedule signals).
        Control = 4,
        /// A slice of a data-parallel gradient all-reduce.
        AllReduce = 5,
        /// A frame re-sent to a validator for recomputation.
        Validation = 6,
    }
}

wire_enum! {
    /// Element type of the payload as it lies on the wire.
    DType {
        /// IEEE 754 binary32.
        F32 = 1,
        /// IEEE 754 binary16.
        F16 = 2,
        /// bfloat16.
        BF16 = 3,
        /// Signed 8-bit integer.
        I8 = 4,
        /// Unsigned 32-bit integer (token ids).
        U32 = 5,
    }
}

wire_enum! {
    /// How the tensor was turned into payload bytes (see `link::codec`).
    Codec {
        /// Elements copied verbatim in the frame's dtype (token ids, control).
        Raw = 0,
        /// f32 tensor sent as f32.
        F32 = 1,
        /// f32 tensor rounded to f16.
        F16 = 2,
        /// f32 tensor rounded to bf16.
        BF16 = 3,
        /// f32 tensor quantised to i8 with one f32 scale per row.
        Int8 = 4,
        /// Output of the model's learned low-rank projection, carried as
        /// f32, f16 or bf16; projecting and lifting belong to the model.
        Lowrank = 5,
    }
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }
}

impl Codec {
    /// Whether a payload produced by this codec may have element type
    /// `dtype`. The pair is checked on decode so a receiver never
    /// reinterprets bytes under the wrong type.
    pub fn accepts(self, dtype: DType) -> bool {
        match self {
            Codec::Raw => true,
            Codec::F32 => dtype == DType::F32,
            Codec::F16 => dtype == DType::F16,
            Codec::BF16 => dtype == DType::BF16,
            Codec::Int8 => dtype == DType::I8,
            Codec::Lowrank => matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        }
    }
}

/// Tensor shape of rank 0 to [`MAX_RANK`]; dimensions beyond the rank are
/// zero on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    rank: u8,
    dims: [u32; MAX_RANK],
}

impl Shape {
    /// A shape from its dimensions, or `None` if there are more than
    /// [`MAX_RANK`].
    pub fn new(dims: &[u32]) -> Option<Self> {
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut all = [0u32; MAX_RANK];
        all[..dims.len()].copy_from_slice(dims);
        Some(Shape {
            rank: dims.len() as u8,
            dims: all,
        })
    }

    /// Shape of a `[len]` vector.
    pub fn vector(len: u32) -> Self {
        Shape {
            rank: 1,
            dims: [len, 0, 0, 0],
        }
    }

    /// Shape of a `[rows, cols]` matrix.
    pub fn matrix(rows: u32, cols: u32) -> Self {
        Shape {
            rank: 2,
            dims: [rows, cols, 0, 0],
        }
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.rank as usize]
    }

    /// Number of elements (1 for a scalar); `None` if it overflows `u64`.
    pub fn elements(&self) -> Option<u64> {
        self.dims()
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
    }

    /// Number of rows when the last dimension is read as columns: the
    /// product of all other dimensions (1 for rank 0 or 1). Int8 stores one
    /// scale per row.
    pub fn rows(&self) -> Option<u64> {
        let dims = self.dims();
        let outer = dims.len().saturating_sub(1);
        dims[..outer]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
    }
}

/// Exact payload length for a tensor of `shape` with elements of `dtype`
/// produced by `codec`; `None` if it does not fit in a `u64`.
pub fn payload_len_for(shape: &Shape, dtype: DType, codec: Codec) -> Option<u64> {
    let data = shape.elements()?.checked_mul(dtype.size() as u64)?;
    if codec == Codec::Int8 {
        data.checked_add(shape.rows()?.checked_mul(4)?)
    } else {
        Some(data)
    }
}

/// Everything in a frame header except the derived fields (payload hash and
/// payload length, which the encoder computes from the payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Run this frame belongs to.
    pub run_id: RunId,
    /// Training step.
    pub step: u64,
    /// Micro-batch index within the step.
    pub micro_batch: u64,
    /// Pipeline stage of the sender.
    pub stage: u32,
    /// Data-parallel replica of the sender.
    pub replica: u32,
    /// What the payload is.
    pub kind: FrameKind,
    /// Element type of the payload on the wire.
    pub dtype: DType,
    /// Encoding of the payload.
    pub codec: Codec,
    /// Logical tensor shape.
    pub shape: Shape,
    /// Worker that produced the frame.
    pub sender: WorkerId,
    /// Content hash of the input this tensor was computed from (all zero
    /// when there is none), so a validator can bind output to input.
    pub input_hash: Digest,
    /// The author's Ed25519 signature over the frame's signed fields
    /// (`link::sign::frame_message`); all zero when unsigned. Covered by the
    /// tag like every header field.
    pub signature: [u8; SIGNATURE_LEN],
}

/// A frame: header plus payload bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Header fields.
    pub header: FrameHeader,
    /// Tensor bytes, laid out as the header's codec describes.
    pub payload: Vec<u8>,
    /// The payload's BLAKE3 hash when it is already known: verified on
    /// receipt, or computed by [`Frame::hash_payload`] (which
    /// [`super::Link::send`] calls). `None` for a frame built here. Senders
    /// put this value in the header as it is, so code that changes the
    /// payload of a frame must reset it to `None` (a receiver would reject
    /// the frame as [`FrameError::BadContentHash`] otherwise).
    pub verified_hash: Option<Digest>,
}

/// Frames are equal when their headers and payloads are: whether a hash was
/// verified on receipt does not matter.
impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header && self.payload == other.payload
    }
}

impl Eq for Frame {}

impl Frame {
    /// A frame to send.
    pub fn new(header: FrameHeader, payload: Vec<u8>) -> Self {
        Frame {
            header,
            payload,
            verified_hash: None,
        }
    }

    /// BLAKE3 hash of the payload, as carried in the header (free for a
    /// received frame: the decoder checked it).
    pub fn content_hash(&self) -> Digest {
        self.verified_hash
            .unwrap_or_else(|| content_hash(&self.payload))
    }

    /// Computes the payload's hash unless it is already known, and keeps it
    /// for the header. Doing this before handing a frame to a link moves the
    /// one pass over the payload that sending costs off the link's writer.
    pub fn hash_payload(&mut self) -> Digest {
        *self
            .verified_hash
            .get_or_insert_with(|| content_hash(&self.payload))
    }

    /// Length of this frame once encoded.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len() + TAG_LEN
    }
}

/// BLAKE3 hash of a payload.
pub fn content_hash(payload: &[u8]) -> Digest {
    *blake3::hash(payload).as_bytes()
}

/// Limits a receiver enforces before trusting a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest payload accepted, in bytes; checked before allocating.
    pub max_payload: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        // Large enough for a [4096 x 8192] f32 activation block.
        FrameLimits {
            max_payload: 256 << 20,
        }
    }
}

/// Why a frame was rejected (or could not be read).
#[derive(Debug, Error)]
pub enum FrameError {
    /// The input ends before the frame does.
    #[error("frame truncated: need {needed} bytes, have {got}")]
    Truncated {
        /// Bytes the frame claims to need.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// Bytes remain after the frame's tag.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(u64),
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The version byte is not [`VERSION`].
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// Unknown [`FrameKind`] value.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown [`DType`] value.
    #[error("unknown dtype {0}")]
    UnknownDType(u8),
    /// Unknown [`Codec`] value.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// Rank above [`MAX_RANK`].
    #[error("tensor rank {0} exceeds {MAX_RANK}")]
    BadRank(u8),
    /// Reserved bytes or dimensions beyond the rank are not zero.
    #[error("reserved header bytes are not zero")]
    NonZeroReserved,
    /// The codec cannot produce elements of this dtype.
    #[error("codec {codec:?} cannot carry dtype {dtype:?}")]
    CodecMismatch {
        /// Codec in the header.
        codec: Codec,
        /// Dtype in the header.
        dtype: DType,
    },
    /// The declared payload length exceeds [`FrameLimits::max_payload`].
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Declared length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// The payload length does not match shape × element size for the codec.
    #[error("payload is {actual} bytes but shape and codec need {expected:?}")]
    SizeMismatch {
        /// Length implied by shape, dtype and codec (`None` on overflow).
        expected: Option<u64>,
        /// Declared length.
        actual: u64,
    },
    /// The authentication tag does not verify: forged, corrupted, or made
    /// with another run's key.
    #[error("authentication tag does not verify")]
    BadTag,
    /// The tag verifies but the payload hash in the header is wrong.
    #[error("payload content hash does not match")]
    BadContentHash,
    /// The stream ended cleanly at a frame boundary.
    #[error("stream closed")]
    Closed,
    /// The underlying reader or writer failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Rejection reasons counted by [`super::LinkStats`], one per decode failure
/// plus the link-level checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum RejectReason {
    /// [`FrameError::Truncated`].
    Truncated = 0,
    /// [`FrameError::TrailingBytes`].
    TrailingBytes,
    /// [`FrameError::BadMagic`].
    BadMagic,
    /// [`FrameError::UnsupportedVersion`].
    UnsupportedVersion,
    /// [`FrameError::UnknownKind`].
    UnknownKind,
    /// [`FrameError::UnknownDType`].
    UnknownDType,
    /// [`FrameError::UnknownCodec`].
    UnknownCodec,
    /// [`FrameError::BadRank`].
    BadRank,
    /// [`FrameError::NonZeroReserved`].
    NonZeroReserved,
    /// [`FrameError::CodecMismatch`].
    CodecMismatch,
    /// [`FrameError::PayloadTooLarge`].
    PayloadTooLarge,
    /// [`FrameError::SizeMismatch`].
    SizeMismatch,
    /// [`FrameError::BadTag`].
    BadTag,
    /// [`FrameError::BadContentHash`].
    BadContentHash,
    /// Authentic frame for another run id than the link's.
    WrongRun,
    /// Authentic frame naming another sender than the link's peer.
    WrongSender,
    /// Authentic, intact tensor (activation, activation gradient or
    /// gradient contribution) holding a NaN or an infinity.
    NonFinite,
    /// Authentic, intact tensor whose norm is beyond the receiver's bound
    /// (see `docs/byzantine.md`).
    AbsurdNorm,
    /// Authentic, intact pipeline frame whose author signature is missing
    /// or does not verify against the author's registered public key.
    BadSignature,
}

impl RejectReason {
    /// Number of reasons (size of the counter array).
    pub const COUNT: usize = 19;

    /// Every reason, in counter order.
    pub const ALL: [RejectReason; Self::COUNT] = [
        RejectReason::Truncated,
        RejectReason::TrailingBytes,
        RejectReason::BadMagic,
        RejectReason::UnsupportedVersion,
        RejectReason::UnknownKind,
        RejectReason::UnknownDType,
        RejectReason::UnknownCodec,
        RejectReason::BadRank,
        RejectReason::NonZeroReserved,
        RejectReason::CodecMismatch,
        RejectReason::PayloadTooLarge,
        RejectReason::SizeMismatch,
        RejectReason::BadTag,
        RejectReason::BadContentHash,
        RejectReason::WrongRun,
        RejectReason::WrongSender,
        RejectReason::NonFinite,
        RejectReason::AbsurdNorm,
        RejectReason::BadSignature,
    ];

    /// Stable snake_case name, used for metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::Truncated => "truncated",
            RejectReason::TrailingBytes => "trailing_bytes",
            RejectReason::BadMagic => "bad_magic",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::UnknownDType => "unknown_dtype",
            RejectReason::UnknownCodec => "unknown_codec",
            RejectReason::BadRank => "bad_rank",
            RejectReason::NonZeroReserved => "nonzero_reserved",
            RejectReason::CodecMismatch => "codec_mismatch",
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::SizeMismatch => "size_mismatch",
            RejectReason::BadTag => "bad_tag",
            RejectReason::BadContentHash => "bad_content_hash",
            RejectReason::WrongRun => "wrong_run",
            RejectReason::WrongSender => "wrong_sender",
            RejectReason::NonFinite => "non_finite",
            RejectReason::AbsurdNorm => "absurd_norm",
            RejectReason::BadSignature => "bad_signature",
        }
    }
}

impl FrameError {
    /// The counted reason for a rejected frame; `None` for stream errors
    /// (clean close, I/O) that are not a verdict on a frame.
    pub fn reason(&self) -> Option<RejectReason> {
        Some(match self {
            FrameError::Truncated { .. } => RejectReason::Truncated,
            FrameError::TrailingBytes(_) => RejectReason::TrailingBytes,
            FrameError::BadMagic(_) => RejectReason::BadMagic,
            FrameError::UnsupportedVersion(_) => RejectReason::UnsupportedVersion,
            FrameError::UnknownKind(_) => RejectReason::UnknownKind,
            FrameError::UnknownDType(_) => RejectReason::UnknownDType,
            FrameError::UnknownCodec(_) => RejectReason::UnknownCodec,
            FrameError::BadRank(_) => RejectReason::BadRank,
            FrameError::NonZeroReserved => RejectReason::NonZeroReserved,
            FrameError::CodecMismatch { .. } => RejectReason::CodecMismatch,
            FrameError::PayloadTooLarge { .. } => RejectReason::PayloadTooLarge,
            FrameError::SizeMismatch { .. } => RejectReason::SizeMismatch,
            FrameError::BadTag => RejectReason::BadTag,
            FrameError::BadContentHash => RejectReason::BadContentHash,
            FrameError::Closed | FrameError::Io(_) => return None,
        })
    }

    /// Whether, after this error from [`read_frame`], the stream position
    /// can no longer be trusted to sit on a frame boundary. A reader must
    /// close the connection after a desynchronising error; after any other
    /// rejection the whole declared frame was consumed and reading may go on.
    pub fn desynchronizes(&self) -> bool {
        matches!(
            self,
            FrameError::BadMagic(_)
                | FrameError::UnsupportedVersion(_)
                | FrameError::PayloadTooLarge { .. }
                | FrameError::Truncated { .. }
                | FrameError::Closed
                | FrameError::Io(_)
        )
    }
}

/// Writes the header for `frame` with the given payload hash.
fn header_bytes(header: &FrameHeader, payload_len: u64, payload_hash: &Digest) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC);
    h[OFF_VERSION] = VERSION;
    h[OFF_KIND] = header.kind as u8;
    h[OFF_DTYPE] = header.dtype as u8;
    h[OFF_CODEC] = header.codec as u8;
    h[OFF_RANK] = header.shape.rank;
    h[OFF_STAGE..OFF_STAGE + 4].copy_from_slice(&header.stage.to_le_bytes());
    h[OFF_REPLICA..OFF_REPLICA + 4].copy_from_slice(&header.replica.to_le_bytes());
    h[OFF_STEP..OFF_STEP + 8].copy_from_slice(&header.step.to_le_bytes());
    h[OFF_MICRO_BATCH..OFF_MICRO_BATCH + 8].copy_from_slice(&header.micro_batch.to_le_bytes());
    h[OFF_RUN_ID..OFF_RUN_ID + 16].copy_from_slice(&header.run_id.0);
    h[OFF_SENDER..OFF_SENDER + 16].copy_from_slice(&header.sender.0);
    for (i, d) in header.shape.dims.iter().enumerate() {
        let at = OFF_DIMS + 4 * i;
        h[at..at + 4].copy_from_slice(&d.to_le_bytes());
    }
    h[OFF_PAYLOAD_HASH..OFF_PAYLOAD_HASH + 32].copy_from_slice(payload_hash);
    h[OFF_INPUT_HASH..OFF_INPUT_HASH + 32].copy_from_slice(&header.input_hash);
    h[OFF_SIGNATURE..OFF_SIGNATURE + SIGNATURE_LEN].copy_from_slice(&header.signature);
    h[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&payload_len.to_le_bytes());
    h
}

/// The tag of a frame: a keyed hash of its header. The header carries the
/// payload's BLAKE3 hash, so the tag covers the payload too, while the
/// payload is hashed once per side instead of twice (once plain, once keyed).
fn tag_of(head: &[u8; HEADER_LEN], key: &RunKey) -> blake3::Hash {
    blake3::keyed_hash(&key.0, head)
}

/// Header bytes and tag for sending `frame`: everything that goes on the
/// wire besides the payload itself. Uses the frame's known payload hash (see
/// [`Frame::verified_hash`]) and hashes the payload only when there is none.
pub fn seal(frame: &Frame, key: &RunKey) -> ([u8; HEADER_LEN], [u8; TAG_LEN]) {
    let head = header_bytes(
        &frame.header,
        frame.payload.len() as u64,
        &frame.content_hash(),
    );
    let tag = tag_of(&head, key);
    (head, *tag.as_bytes())
}

/// Encodes `frame` into a fresh buffer, authenticated with `key`.
pub fn encode(frame: &Frame, key: &RunKey) -> Vec<u8> {
    let (head, tag) = seal(frame, key);
    let mut out = Vec::with_capacity(frame.encoded_len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&frame.payload);
    out.extend_from_slice(&tag);
    out
}

/// Writes `frames` to `w`, each authenticated with `key`, in as few
/// vectored writes as the writer allows: header, payload and tag of every
/// frame go out together, and payloads are never copied into an
/// intermediate buffer. Returns the bytes written.
pub fn write_frames<W: Write>(w: &mut W, frames: &[Frame], key: &RunKey) -> io::Result<u64> {
    let sealed: Vec<_> = frames.iter().map(|f| seal(f, key)).collect();
    let mut slices = Vec::with_capacity(3 * frames.len());
    for (frame, (head, tag)) in frames.iter().zip(&sealed) {
        slices.push(IoSlice::new(head));
        if !frame.payload.is_empty() {
            slices.push(IoSlice::new(&frame.payload));
        }
        slices.push(IoSlice::new(tag));
    }
    write_all_vectored(w, &mut slices)?;
    Ok(frames.iter().map(|f| f.encoded_len() as u64).sum())
}

/// Writes every byte of `slices`, resuming after short writes.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut x = [0u8; N];
    x.copy_from_slice(&b[at..at + N]);
    x
}

/// Header fields parsed and structurally checked, before authentication.
struct ParsedHeader {
    header: FrameHeader,
    payload_hash: Digest,
    payload_len: u64,
}

/// Checks only what is needed to know how long the frame is: magic, version
/// and the declared payload length against the limit.
fn check_envelope(head: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<u64, FrameError> {
    let magic = array_at::<4>(head, OFF_MAGIC);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if head[OFF_VERSION] != VERSION {
        return Err(FrameError::UnsupportedVersion(head[OFF_VERSION]));
    }
    let len = u64_at(head, OFF_PAYLOAD_LEN);
    if len > limits.max_payload {
        return Err(FrameError::PayloadTooLarge {
            len,
            max: limits.max_payload,
        });
    }
    Ok(len)
}

/// Parses and checks every header field; the envelope must already be valid.
fn parse_header(head: &[u8; HEADER_LEN]) -> Result<ParsedHeader, FrameError> {
    let kind =
        FrameKind::from_byte(head[OFF_KIND]).ok_or(FrameError::UnknownKind(head[OFF_KIND]))?;
    let dtype =
        DType::from_byte(head[OFF_DTYPE]).ok_or(FrameError::UnknownDType(head[OFF_DTYPE]))?;
    let codec =
        Codec::from_byte(head[OFF_CODEC]).ok_or(FrameError::UnknownCodec(head[OFF_CODEC]))?;
    let rank = head[OFF_RANK];
    if rank as usize > MAX_RANK {
        return Err(FrameError::BadRank(rank));
    }
    if head[OFF_RESERVED..OFF_STAGE].iter().any(|&b| b != 0) {
        return Err(FrameError::NonZeroReserved);
    }
    let mut dims = [0u32; MAX_RANK];
    for (i, d) in dims.iter_mut().enumerate() {
        *d = u32_at(head, OFF_DIMS + 4 * i);
        // Unused dimensions must be zero so that one tensor has exactly one
        // encoding; otherwise a frame could be altered without changing its
        // meaning.
        if i >= rank as usize && *d != 0 {
            return Err(FrameError::NonZeroReserved);
        }
    }
    if !codec.accepts(dtype) {
        return Err(FrameError::CodecMismatch { codec, dtype });
    }
    let shape = Shape { rank, dims };
    let payload_len = u64_at(head, OFF_PAYLOAD_LEN);
    let expected = payload_len_for(&shape, dtype, codec);
    if expected != Some(payload_len) {
        return Err(FrameError::SizeMismatch {
            expected,
            actual: payload_len,
        });
    }
    Ok(ParsedHeader {
        header: FrameHeader {
            run_id: RunId(array_at(head, OFF_RUN_ID)),
            step: u64_at(head, OFF_STEP),
            micro_batch: u64_at(head, OFF_MICRO_BATCH),
            stage: u32_at(head, OFF_STAGE),
            replica: u32_at(head, OFF_REPLICA),
            kind,
            dtype,
            codec,
            shape,
            sender: WorkerId(array_at(head, OFF_SENDER)),
            input_hash: array_at(head, OFF_INPUT_HASH),
            signature: array_at(head, OFF_SIGNATURE),
        },
        payload_hash: array_at(head, OFF_PAYLOAD_HASH),
        payload_len,
    })
}

/// A frame whose header is authenticated (its tag verified with the run
/// key) but whose payload has not yet been checked against the hash that
/// header carries. [`AuthenticFrame::verify`] does that check; splitting
/// the two lets a link read the next frame while the previous payload is
/// being hashed elsewhere.
#[derive(Debug)]
pub struct AuthenticFrame {
    frame: Frame,
    payload_hash: Digest,
}

impl AuthenticFrame {
    /// The authenticated header.
    pub fn header(&self) -> &FrameHeader {
        &self.frame.header
    }

    /// Length of the frame as it was encoded.
    pub fn encoded_len(&self) -> usize {
        self.frame.encoded_len()
    }

    /// Checks the payload against the authenticated content hash: the frame,
    /// or [`FrameError::BadContentHash`].
    pub fn verify(self) -> Result<Frame, FrameError> {
        self.verify_in_pieces(usize::MAX, |_, _| {})
    }

    /// Bytes of payload the frame carries.
    pub fn payload_len(&self) -> usize {
        self.frame.payload.len()
    }

    /// Checks the payload against the authenticated content hash in the
    /// same pass as the caller's own work on it: the payload is handed to
    /// `each` in consecutive pieces of `piece` bytes (with each piece's byte
    /// offset), every piece hashed just before, so both passes find it in
    /// cache. `each` may rewrite the piece; the returned frame then still
    /// carries the hash of what arrived in [`Frame::verified_hash`], which
    /// the caller must replace.
    ///
    /// `each` has seen every piece by the time the verdict is known, so
    /// whatever it did with them must be thrown away on
    /// [`FrameError::BadContentHash`].
    pub fn verify_in_pieces(
        self,
        piece: usize,
        mut each: impl FnMut(usize, &mut [u8]),
    ) -> Result<Frame, FrameError> {
        let AuthenticFrame {
            mut frame,
            payload_hash,
        } = self;
        let mut hasher = blake3::Hasher::new();
        let mut at = 0;
        for bytes in frame.payload.chunks_mut(piece.max(1)) {
            hasher.update(bytes);
            each(at, bytes);
            at += bytes.len();
        }
        if *hasher.finalize().as_bytes() != payload_hash {
            return Err(FrameError::BadContentHash);
        }
        frame.verified_hash = Some(payload_hash);
        Ok(frame)
    }
}

/// Authenticates the header. The tag verdict comes before any check of the
/// payload so that an unauthenticated frame is only ever reported as
/// forged, never as anything more specific.
fn authenticate(
    head: &[u8; HEADER_LEN],
    parsed: ParsedHeader,
    payload: Vec<u8>,
    tag: &[u8],
    key: &RunKey,
) -> Result<AuthenticFrame, FrameError> {
    // `blake3::Hash` equality is constant-time, so a forger learns nothing
    // from how long the comparison takes.
    if tag_of(head, key) != *tag {
        return Err(FrameError::BadTag);
    }
    debug_assert_eq!(payload.len() as u64, parsed.payload_len);
    Ok(AuthenticFrame {
        frame: Frame {
            header: parsed.header,
            payload,
            verified_hash: None,
        },
        payload_hash: parsed.payload_hash,
    })
}

/// Decodes exactly one frame occupying all of `bytes`, verifying it with
/// `key` and `limits`. Never panics, whatever `bytes` holds.
pub fn decode(bytes: &[u8], key: &RunKey, limits: &FrameLimits) -> Result<Frame, FrameError> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN as u64,
            got: bytes.len() as u64,
        });
    };
    let head: [u8; HEADER_LEN] = array_at(head, 0);
    let len = check_envelope(&head, limits)?;
    let parsed = parse_header(&head)?;
    // `len` is at most `max_payload`, so this sum cannot overflow for any
    // sane limit; saturate anyway rather than trust the configuration.
    let total = (HEADER_LEN as u64)
        .saturating_add(len)
        .saturating_add(TAG_LEN as u64);
    let got = bytes.len() as u64;
    if got < total {
        return Err(FrameError::Truncated { needed: total, got });
    }
    if got > total {
        return Err(FrameError::TrailingBytes(got - total));
    }
    let body_end = HEADER_LEN + len as usize;
    let payload = bytes[HEADER_LEN..body_end].to_vec();
    authenticate(&head, parsed, payload, &bytes[body_end..], key)?.verify()
}

/// Reads `n` bytes into a fresh vector without zero-filling it first and
/// without trusting `n` beyond what actually arrives.
fn read_exact_vec<R: Read>(r: &mut R, n: u64) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(n as usize);
    let got = r.take(n).read_to_end(&mut buf)? as u64;
    if got < n {
        return Err(FrameError::Truncated { needed: n, got });
    }
    Ok(buf)
}

/// Reads and verifies one frame from `r`: [`read_authentic`], then
/// [`AuthenticFrame::verify`].
pub fn read_frame<R: Read>(
    r: &mut R,
    key: &RunKey,
    limits: &FrameLimits,
) -> Result<Frame, FrameError> {
    read_authentic(r, key, limits)?.verify()
}

/// Reads one frame from `r` and authenticates its header; the payload is
/// left for [`AuthenticFrame::verify`] to check.
///
/// The payload length is checked against `limits` before anything is
/// allocated. On an error for which [`FrameError::desynchronizes`] is false
/// the whole frame has been consumed and the next call reads the next frame.
/// A clean end of stream before the first header byte is
/// [`FrameError::Closed`].
pub fn read_authentic<R: Read>(
    r: &mut R,
    key: &RunKey,
    limits: &FrameLimits,
) -> Result<AuthenticFrame, FrameError> {
    let mut head = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut head[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    needed: HEADER_LEN as u64,
                    got: filled as u64,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_envelope(&head, limits)?;
    // Consume the whole declared frame before judging the rest of the
    // header, so that a rejected frame leaves the stream on a boundary.
    let payload = read_exact_vec(r, len)?;
    let mut tag = [0u8; TAG_LEN];
    if let Err(e) = r.read_exact(&mut tag) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated {
                needed: TAG_LEN as u64,
                got: 0,
            }
        } else {
            e.into()
        });
    }
    let parsed = parse_header(&head)?;
    authenticate(&head, parsed, payload, &tag, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: RunKey = RunKey([7u8; 32]);

    fn header(kind: FrameKind, dtype: DType, codec: Codec, dims: &[u32]) -> FrameHeader {
        FrameHeader {
            run_id: RunId([1; 16]),
            step: 42,
            micro_batch: 3,
            stage: 2,
            replica: 1,
            kind,
            dtype,
            codec,
            shape: Shape::new(dims).expect("rank <= 4"),
            sender: WorkerId([9; 16]),
            input_hash: [5; 32],
            signature: [0; SIGNATURE_LEN],
        }
    }

    fn frame_for(kind: FrameKind, dtype: DType, codec: Codec, dims: &[u32]) -> Frame {
        let h = header(kind, dtype, codec, dims);
        let len = payload_len_for(&h.shape, dtype, codec).expect("small shape") as usize;
        let payload = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        Frame::new(h, payload)
    }

    fn sample() -> Frame {
        frame_for(FrameKind::Activation, DType::F32, Codec::F32, &[3, 5])
    }

    /// Encodes with an arbitrary payload hash but a valid tag: what a key
    /// holder with a broken hasher would send.
    fn encode_with_hash(frame: &Frame, payload_hash: &Digest, key: &RunKey) -> Vec<u8> {
        let head = header_bytes(&frame.header, frame.payload.len() as u64, payload_hash);
        let tag = tag_of(&head, key);
        let mut out = head.to_vec();
        out.extend_from_slice(&frame.payload);
        out.extend_from_slice(tag.as_bytes());
        out
    }

    #[test]
    fn layout_constants_tile_the_header() {
        assert_eq!(OFF_PAYLOAD_LEN + 8, HEADER_LEN);
        let f = sample();
        let bytes = encode(&f, &KEY);
        assert_eq!(bytes.len(), HEADER_LEN + 60 + TAG_LEN);
        assert_eq!(&bytes[..4], b"PWFR");
        assert_eq!(bytes[OFF_RANK], 2);
        assert_eq!(u32_at(&bytes, OFF_DIMS), 3);
        assert_eq!(u64_at(&bytes, OFF_PAYLOAD_LEN), 60);
        assert_eq!(array_at::<32>(&bytes, OFF_PAYLOAD_HASH), f.content_hash());
    }

    #[test]
    fn roundtrip_every_kind_dtype_codec() {
        let limits = FrameLimits::default();
        let mut combos = 0;
        for &kind in FrameKind::ALL {
            for &dtype in DType::ALL {
                for &codec in Codec::ALL {
                    for dims in [&[][..], &[7][..], &[2, 3][..], &[2, 1, 3, 2][..]] {
                        let f = frame_for(kind, dtype, codec, dims);
                        let bytes = encode(&f, &KEY);
                        let got = decode(&bytes, &KEY, &limits);
                        if codec.accepts(dtype) {
                            let got = got.expect("valid frame decodes");
                            assert_eq!(got, f);
                            let mut via_stream = bytes.as_slice();
                            let streamed =
                                read_frame(&mut via_stream, &KEY, &limits).expect("stream");
                            assert_eq!(streamed, f);
                            combos += 1;
                        } else {
                            assert!(matches!(got, Err(FrameError::CodecMismatch { .. })));
                        }
                    }
                }
            }
        }
        assert!(combos > 100);
    }

    #[test]
    fn wrong_key_is_bad_tag() {
        let bytes = encode(&sample(), &KEY);
        let err = decode(&bytes, &RunKey([8; 32]), &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::BadTag), "{err}");
    }

    #[test]
    fn authentic_frame_with_wrong_content_hash_is_rejected() {
        let bytes = encode_with_hash(&sample(), &[0xAB; 32], &KEY);
        let err = decode(&bytes, &KEY, &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::BadContentHash), "{err}");
    }

    #[test]
    fn verify_in_pieces_sees_every_byte_once_and_judges_the_bytes_that_arrived() {
        let mut f = frame_for(FrameKind::AllReduce, DType::F32, Codec::F32, &[3000]);
        f.payload = (0..12_000).map(|i| (i % 251) as u8).collect();
        let read = |bytes: &[u8]| {
            read_authentic(&mut &bytes[..], &KEY, &FrameLimits::default()).expect("authentic")
        };
        let good = encode(&f, &KEY);
        let mut seen = Vec::new();
        let got = read(&good)
            .verify_in_pieces(1024, |at, piece| {
                assert_eq!(at, seen.len(), "pieces come in order");
                seen.extend_from_slice(piece);
                // Rewriting a piece after it was hashed does not change
                // the verdict on what arrived.
                piece.fill(0);
            })
            .expect("good payload");
        assert_eq!(seen, f.payload);
        assert_eq!(got.verified_hash, Some(content_hash(&f.payload)));

        // A payload that differs from the one its authentic header names.
        let forged = encode_with_hash(&f, &content_hash(b"something else"), &KEY);
        let err = read(&forged).verify_in_pieces(1024, |_, _| {}).unwrap_err();
        assert!(matches!(err, FrameError::BadContentHash), "{err}");
    }

    #[test]
    fn oversized_length_rejected_before_reading_payload() {
        let mut bytes = encode(&sample(), &KEY);
        bytes[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        // A reader that would fail if asked for more than the header proves
        // nothing past the header was requested (and so nothing allocated).
        let mut only_header = &bytes[..HEADER_LEN];
        let err = read_frame(&mut only_header, &KEY, &FrameLimits::default()).unwrap_err();
        assert!(
            matches!(err, FrameError::PayloadTooLarge { len: u64::MAX, .. }),
            "{err}"
        );
        assert!(err.desynchronizes());
    }

    #[test]
    fn each_structural_error_has_its_own_variant() {
        let limits = FrameLimits::default();
        let base = encode(&sample(), &KEY);
        let check = |at: usize, value: u8, want: RejectReason| {
            let mut b = base.clone();
            b[at] = value;
            let err = decode(&b, &KEY, &limits).unwrap_err();
            assert_eq!(err.reason(), Some(want), "byte {at} = {value}: {err}");
        };
        check(0, b'X', RejectReason::BadMagic);
        check(OFF_VERSION, 1, RejectReason::UnsupportedVersion);
        check(OFF_VERSION, 3, RejectReason::UnsupportedVersion);
        check(OFF_KIND, 0, RejectReason::UnknownKind);
        check(OFF_KIND, 200, RejectReason::UnknownKind);
        check(OFF_DTYPE, 9, RejectReason::UnknownDType);
        check(OFF_CODEC, 6, RejectReason::UnknownCodec);
        check(OFF_RANK, 5, RejectReason::BadRank);
        check(OFF_RESERVED, 1, RejectReason::NonZeroReserved);
        check(OFF_DIMS + 8, 1, RejectReason::NonZeroReserved);
        check(OFF_DTYPE, DType::U32 as u8, RejectReason::CodecMismatch);
        check(OFF_DIMS, 4, RejectReason::SizeMismatch);
        check(OFF_STEP, 43, RejectReason::BadTag);
        check(HEADER_LEN + 5, 0xFF, RejectReason::BadContentHash);
        check(base.len() - 1, 0, RejectReason::BadTag);
        assert!(matches!(
            decode(&base[..base.len() - 1], &KEY, &limits),
            Err(FrameError::Truncated { .. })
        ));
        let mut longer = base.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer, &KEY, &limits),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn stream_stays_in_sync_after_a_forged_frame() {
        let good = sample();
        let mut forged = encode(&good, &RunKey([3; 32]));
        forged.extend(encode(&good, &KEY));
        let mut r = forged.as_slice();
        let limits = FrameLimits::default();
        let first = read_frame(&mut r, &KEY, &limits).unwrap_err();
        assert!(matches!(first, FrameError::BadTag));
        assert!(!first.desynchronizes());
        assert_eq!(read_frame(&mut r, &KEY, &limits).expect("next frame"), good);
        assert!(matches!(
            read_frame(&mut r, &KEY, &limits),
            Err(FrameError::Closed)
        ));
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            0..FrameKind::ALL.len(),
            0..Codec::ALL.len(),
            prop::collection::vec(0u32..6, 0..=4),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
        )
            .prop_map(|(k, c, dims, step, mb, sender)| {
                let codec = Codec::ALL[c];
                let dtype = DType::ALL
                    .iter()
                    .copied()
                    .find(|&d| codec.accepts(d))
                    .expect("every codec accepts some dtype");
                let mut f = frame_for(FrameKind::ALL[k], dtype, codec, &dims);
                f.header.step = step;
                f.header.micro_batch = mb;
                f.header.sender = WorkerId(sender);
                f
            })
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let limits = FrameLimits { max_payload: 1 << 16 };
            let _ = decode(&bytes, &KEY, &limits);
            let _ = read_frame(&mut bytes.as_slice(), &KEY, &limits);
        }

        #[test]
        fn arbitrary_header_with_valid_magic_never_panics(mut bytes in prop::collection::vec(any::<u8>(), HEADER_LEN..HEADER_LEN + 300)) {
            bytes[..4].copy_from_slice(&MAGIC);
            bytes[OFF_VERSION] = VERSION;
            let limits = FrameLimits { max_payload: 1 << 16 };
            prop_assert!(decode(&bytes, &KEY, &limits).is_err());
            prop_assert!(read_frame(&mut bytes.as_slice(), &KEY, &limits).is_err());
        }

        #[test]
        fn roundtrip_arbitrary_frames(f in arb_frame()) {
            let bytes = encode(&f, &KEY);
            prop_assert_eq!(decode(&bytes, &KEY, &FrameLimits::default()).expect("decodes"), f);
        }

        #[test]
        fn every_bit_flip_is_rejected(f in arb_frame(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&f, &KEY);
            let at = pick.index(bytes.len());
            bytes[at] ^= 1 << bit;
            let err = decode(&bytes, &KEY, &FrameLimits::default());
            prop_assert!(err.is_err(), "flip at {} accepted", at);
            let err = err.unwrap_err();
            if at >= HEADER_LEN + f.payload.len() {
                prop_assert!(matches!(err, FrameError::BadTag), "tag flip gave {}", err);
            } else if at >= HEADER_LEN {
                // The header (and its tag) are intact: the payload no longer
                // matches the authenticated content hash.
                prop_assert!(matches!(err, FrameError::BadContentHash), "payload flip gave {}", err);
            }
            let streamed = read_frame(&mut bytes.as_slice(), &KEY, &FrameLimits::default());
            prop_assert!(streamed.is_err());
        }

        #[test]
        fn checking_in_pieces_agrees_with_checking_whole(
            f in arb_frame(),
            piece in 1usize..5000,
            flip in prop::option::of((any::<prop::sample::Index>(), 0u8..8)),
        ) {
            let mut bytes = encode(&f, &KEY);
            if let (Some((pick, bit)), false) = (flip, f.payload.is_empty()) {
                bytes[HEADER_LEN + pick.index(f.payload.len())] ^= 1 << bit;
            }
            let read = || read_authentic(&mut bytes.as_slice(), &KEY, &FrameLimits::default());
            let whole = read().expect("header intact").verify();
            let mut seen = Vec::new();
            let pieces = read().expect("header intact").verify_in_pieces(piece, |at, p| {
                assert_eq!(at, seen.len());
                assert!(p.len() <= piece);
                seen.extend_from_slice(p);
            });
            prop_assert_eq!(whole.is_ok(), pieces.is_ok());
            prop_assert_eq!(&seen[..], &bytes[HEADER_LEN..HEADER_LEN + f.payload.len()]);
            if let (Ok(a), Ok(b)) = (whole, pieces) {
                prop_assert_eq!(a.verified_hash, b.verified_hash);
                prop_assert_eq!(a, b);
            }
        }

        #[test]
        fn truncation_is_rejected(f in arb_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&f, &KEY);
            let keep = cut.index(bytes.len());
            let err = decode(&bytes[..keep], &KEY, &FrameLimits::default());
            prop_assert!(matches!(err, Err(FrameError::Truncated { .. })), "{:?}", err.err());
            let streamed = read_frame(&mut &bytes[..keep], &KEY, &FrameLimits::default());
            prop_assert!(streamed.is_err());
        }

        #[test]
        fn length_lies_are_rejected(f in arb_frame(), lie in any::<u64>()) {
            let mut bytes = encode(&f, &KEY);
            prop_assume!(lie != f.payload.len() as u64);
            bytes[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&lie.to_le_bytes());
            let limits = FrameLimits::default();
            prop_assert!(decode(&bytes, &KEY, &limits).is_err());
            prop_assert!(read_frame(&mut bytes.as_slice(), &KEY, &limits).is_err());
        }

        #[test]
        fn forged_tags_are_rejected(f in arb_frame(), key in any::<[u8; 32]>()) {
            prop_assume!(key != KEY.0);
            let bytes = encode(&f, &RunKey(key));
            let err = decode(&bytes, &KEY, &FrameLimits::default());
            prop_assert!(matches!(err, Err(FrameError::BadTag)));
        }
    }
}
