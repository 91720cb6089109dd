//! Wire encodings of f32 tensors: f32, f16, bf16 and per-row int8, and
//! [`TensorWire`], which also covers the low-rank bottleneck's frames.
//!
//! Activations and gradients cross stage boundaries many times per step, so
//! the byte count per element matters more than the last bit of precision.
//! The [`Codec::Lowrank`] bottleneck is a learned projection that belongs to
//! the model: the model projects before sending and lifts after receiving,
//! and the link only carries the projected tensor's f32, f16 or bf16 bytes
//! ([`TensorWire::lowrank`] encodes them with the matching plain codec and
//! names `Lowrank` and the element type for the frame header).

use half::{bf16, f16};
use pipewright_spec::{Codec as SpecCodec, LowrankWire, PipelineSpec};
use thiserror::Error;

use super::frame::{Codec, DType};

/// Why a tensor could not be encoded or decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// `data.len()` (or the payload length) does not match the shape.
    #[error("expected {expected} bytes or elements for the shape, got {actual}")]
    LengthMismatch {
        /// Length implied by rows × cols and the codec.
        expected: usize,
        /// Length supplied.
        actual: usize,
    },
    /// Int8 needs a finite per-row maximum to derive its scale.
    #[error("row {row} holds a non-finite value; int8 cannot scale it")]
    NonFinite {
        /// The offending row.
        row: usize,
    },
    /// rows × cols does not fit in memory addresses.
    #[error("shape [{rows}, {cols}] is too large")]
    TooLarge {
        /// Rows requested.
        rows: usize,
        /// Columns requested.
        cols: usize,
    },
    /// The codec does not describe an f32 tensor (Raw, Lowrank).
    #[error("codec {0:?} is not an f32 tensor encoding")]
    NotATensorCodec(Codec),
}

/// How an f32 tensor crosses a stage link: the codec its frame is marked
/// with and the element type of its bytes. For the plain codecs the two go
/// together; for [`Codec::Lowrank`] the model has already projected the
/// tensor to the bottleneck's width, and the bytes are plain f32, f16 or
/// bf16 of that narrower tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorWire {
    /// Codec named in the frame header.
    pub codec: Codec,
    /// Element type named in the frame header.
    pub dtype: DType,
}

impl TensorWire {
    /// Plain f32, exact.
    pub const F32: Self = Self {
        codec: Codec::F32,
        dtype: DType::F32,
    };

    /// A plain f32-tensor codec (F32, F16, BF16, Int8).
    pub fn plain(codec: Codec) -> Result<Self, CodecError> {
        Ok(Self {
            codec,
            dtype: wire_dtype(codec)?,
        })
    }

    /// The low-rank bottleneck's projected tensor carried as `dtype` (F32,
    /// F16 or BF16).
    pub fn lowrank(dtype: DType) -> Result<Self, CodecError> {
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(Self {
                codec: Codec::Lowrank,
                dtype,
            }),
            _ => Err(CodecError::NotATensorCodec(Codec::Lowrank)),
        }
    }

    /// How the manifest's `spec.pipeline` sends activations and gradients
    /// between stages: its codec, or under `lowrank` the bottleneck's wire
    /// element type (`spec.pipeline.lowrank.wire`).
    pub fn for_pipeline(pipeline: &PipelineSpec) -> Self {
        let (codec, dtype) = match pipeline.codec {
            SpecCodec::F32 => (Codec::F32, DType::F32),
            SpecCodec::F16 => (Codec::F16, DType::F16),
            SpecCodec::Bf16 => (Codec::BF16, DType::BF16),
            SpecCodec::Int8 => (Codec::Int8, DType::I8),
            SpecCodec::Lowrank => match pipeline.lowrank_wire() {
                LowrankWire::F32 => (Codec::Lowrank, DType::F32),
                LowrankWire::F16 => (Codec::Lowrank, DType::F16),
                LowrankWire::Bf16 => (Codec::Lowrank, DType::BF16),
            },
        };
        Self { codec, dtype }
    }

    /// The plain codec that lays out the payload bytes.
    pub fn payload_codec(&self) -> Codec {
        match (self.codec, self.dtype) {
            (Codec::Lowrank, DType::F16) => Codec::F16,
            (Codec::Lowrank, DType::BF16) => Codec::BF16,
            (Codec::Lowrank, _) => Codec::F32,
            (codec, _) => codec,
        }
    }

    /// Bytes of a `[rows, cols]` tensor.
    pub fn encoded_len(&self, rows: usize, cols: usize) -> Result<usize, CodecError> {
        encoded_len(self.payload_codec(), rows, cols)
    }

    /// Payload bytes of a row-major `[rows, cols]` tensor.
    pub fn encode(&self, data: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>, CodecError> {
        encode_matrix(data, rows, cols, self.payload_codec())
    }

    /// The tensor back from [`TensorWire::encode`]'s bytes.
    pub fn decode(&self, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<f32>, CodecError> {
        decode_matrix(bytes, rows, cols, self.payload_codec())
    }
}

/// Element type on the wire for an f32-tensor codec.
pub fn wire_dtype(codec: Codec) -> Result<DType, CodecError> {
    match codec {
        Codec::F32 => Ok(DType::F32),
        Codec::F16 => Ok(DType::F16),
        Codec::BF16 => Ok(DType::BF16),
        Codec::Int8 => Ok(DType::I8),
        Codec::Raw | Codec::Lowrank => Err(CodecError::NotATensorCodec(codec)),
    }
}

/// Bytes a `[rows, cols]` f32 tensor occupies under `codec`.
pub fn encoded_len(codec: Codec, rows: usize, cols: usize) -> Result<usize, CodecError> {
    let too_large = CodecError::TooLarge { rows, cols };
    let n = rows.checked_mul(cols).ok_or(too_large.clone())?;
    let len = match codec {
        Codec::F32 => n.checked_mul(4),
        Codec::F16 | Codec::BF16 => n.checked_mul(2),
        // One f32 scale per row, then one byte per element.
        Codec::Int8 => rows.checked_mul(4).and_then(|s| s.checked_add(n)),
        Codec::Raw | Codec::Lowrank => return Err(CodecError::NotATensorCodec(codec)),
    };
    len.ok_or(too_large)
}

/// Encodes a row-major `[rows, cols]` f32 tensor.
///
/// Int8 is symmetric per row: `scale = max|x| / 127`, `q = round(x / scale)`;
/// its payload is `rows` little-endian f32 scales followed by the
/// `rows × cols` quantised bytes. An all-zero row has scale 0.
pub fn encode_matrix(
    data: &[f32],
    rows: usize,
    cols: usize,
    codec: Codec,
) -> Result<Vec<u8>, CodecError> {
    let len = encoded_len(codec, rows, cols)?;
    // encoded_len succeeded, so rows * cols cannot overflow.
    if data.len() != rows * cols {
        return Err(CodecError::LengthMismatch {
            expected: rows * cols,
            actual: data.len(),
        });
    }
    let mut out = Vec::with_capacity(len);
    match codec {
        // The wire is little-endian; on little-endian hosts the in-memory
        // bytes already are the wire bytes.
        Codec::F32 if cfg!(target_endian = "little") => {
            out.extend_from_slice(bytemuck::cast_slice(data))
        }
        Codec::F32 => out.extend(data.iter().flat_map(|&x| x.to_le_bytes())),
        Codec::F16 => out.extend(data.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes())),
        Codec::BF16 => out.extend(data.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes())),
        Codec::Int8 => encode_int8(data, rows, cols, &mut out)?,
        Codec::Raw | Codec::Lowrank => return Err(CodecError::NotATensorCodec(codec)),
    }
    Ok(out)
}

fn encode_int8(
    data: &[f32],
    rows: usize,
    cols: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let mut inv_scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        let max = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
        if !max.is_finite() || row.iter().any(|x| x.is_nan()) {
            return Err(CodecError::NonFinite { row: r });
        }
        let scale = max / 127.0;
        out.extend_from_slice(&scale.to_le_bytes());
        inv_scales.push(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    }
    for (r, inv) in inv_scales.into_iter().enumerate() {
        let row = &data[r * cols..(r + 1) * cols];
        out.extend(
            row.iter()
                .map(|&x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    Ok(())
}

/// Decodes bytes produced by [`encode_matrix`] back to f32.
pub fn decode_matrix(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    codec: Codec,
) -> Result<Vec<f32>, CodecError> {
    let expected = encoded_len(codec, rows, cols)?;
    if bytes.len() != expected {
        return Err(CodecError::LengthMismatch {
            expected,
            actual: bytes.len(),
        });
    }
    Ok(match codec {
        Codec::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Codec::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Codec::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Codec::Int8 => {
            let (scales, quants) = bytes.split_at(4 * rows);
            let mut out = Vec::with_capacity(rows * cols);
            for (r, s) in scales.chunks_exact(4).enumerate() {
                let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                let row = &quants[r * cols..(r + 1) * cols];
                out.extend(row.iter().map(|&q| f32::from(q as i8) * scale));
            }
            out
        }
        Codec::Raw | Codec::Lowrank => return Err(CodecError::NotATensorCodec(codec)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic activation-like matrix: rows of different magnitude.
    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let r = i / cols;
                let x = ((i * 2654435761usize) % 10007) as f32 / 10007.0 - 0.5;
                x * (1.0 + r as f32)
            })
            .collect()
    }

    #[test]
    fn every_codec_roundtrips_within_its_precision() {
        let (rows, cols) = (16, 257);
        let data = matrix(rows, cols);
        let row_max: Vec<f32> = data
            .chunks(cols)
            .map(|r| r.iter().fold(0f32, |m, x| m.max(x.abs())))
            .collect();
        let mut report = Vec::new();
        for codec in [Codec::F32, Codec::F16, Codec::BF16, Codec::Int8] {
            let bytes = encode_matrix(&data, rows, cols, codec).expect("encode");
            assert_eq!(bytes.len(), encoded_len(codec, rows, cols).expect("len"));
            let back = decode_matrix(&bytes, rows, cols, codec).expect("decode");
            // Worst error relative to the row's largest magnitude, which is
            // what each codec's precision is defined against.
            let max_rel = data
                .iter()
                .zip(&back)
                .enumerate()
                .map(|(i, (a, b))| (a - b).abs() / row_max[i / cols])
                .fold(0f32, f32::max);
            let bound = match codec {
                Codec::F32 => 0.0,
                Codec::F16 => 1.0 / 2048.0,
                Codec::BF16 => 1.0 / 256.0,
                _ => 0.5 / 127.0 + 1e-6,
            };
            assert!(max_rel <= bound, "{codec:?}: error {max_rel} > {bound}");
            let per_elem = bytes.len() as f64 / (rows * cols) as f64;
            report.push(format!(
                "{codec:?}: {per_elem:.3} B/elem, max rel err {max_rel:.2e}"
            ));
        }
        println!("{}", report.join("\n"));
    }

    #[test]
    fn int8_zero_row_and_extremes() {
        let data = [0.0, 0.0, 0.0, -3.0, 1.5, 3.0];
        let bytes = encode_matrix(&data, 2, 3, Codec::Int8).expect("encode");
        let back = decode_matrix(&bytes, 2, 3, Codec::Int8).expect("decode");
        assert_eq!(&back[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(back[3], -3.0);
        assert_eq!(back[5], 3.0);
        assert!((back[4] - 1.5).abs() <= 3.0 / 254.0);
    }

    #[test]
    fn int8_refuses_non_finite_rows() {
        let data = [1.0, f32::NAN, 0.0, 2.0];
        assert_eq!(
            encode_matrix(&data, 2, 2, Codec::Int8),
            Err(CodecError::NonFinite { row: 0 })
        );
        let data = [1.0, 2.0, f32::INFINITY, 2.0];
        assert_eq!(
            encode_matrix(&data, 2, 2, Codec::Int8),
            Err(CodecError::NonFinite { row: 1 })
        );
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(matches!(
            encode_matrix(&[1.0; 5], 2, 3, Codec::F16),
            Err(CodecError::LengthMismatch {
                expected: 6,
                actual: 5
            })
        ));
        assert!(matches!(
            decode_matrix(&[0u8; 7], 2, 2, Codec::Int8),
            Err(CodecError::LengthMismatch {
                expected: 12,
                actual: 7
            })
        ));
        assert!(matches!(
            encode_matrix(&[1.0], 1, 1, Codec::Lowrank),
            Err(CodecError::NotATensorCodec(Codec::Lowrank))
        ));
    }

    #[test]
    fn lowrank_frames_carry_plain_bytes_of_the_projected_width() {
        let (rows, dim) = (8, 128);
        let f32_bytes = TensorWire::plain(Codec::F32)
            .expect("plain")
            .encoded_len(rows, dim)
            .expect("len");
        for (dtype, bytes_per_value) in [(DType::F32, 4), (DType::F16, 2), (DType::BF16, 2)] {
            let wire = TensorWire::lowrank(dtype).expect("lowrank wire");
            assert!(wire.codec.accepts(wire.dtype));
            for rank in [dim / 8, dim / 32] {
                let len = wire.encoded_len(rows, rank).expect("len");
                assert_eq!(len, rows * rank * bytes_per_value);
                // The frame's size check agrees with the payload.
                assert_eq!(
                    len as u64,
                    crate::link::frame::payload_len_for(
                        &crate::link::frame::Shape::matrix(rows as u32, rank as u32),
                        wire.dtype,
                        wire.codec
                    )
                    .expect("small")
                );
                // r/dim of the f32 bytes (half that again on a 2-byte wire).
                assert_eq!(len * dim * 4, f32_bytes * rank * bytes_per_value);
                let data = matrix(rows, rank);
                let back = wire
                    .decode(&wire.encode(&data, rows, rank).expect("encode"), rows, rank)
                    .expect("decode");
                if dtype == DType::F32 {
                    assert_eq!(back, data);
                }
            }
        }
        let mut pipeline = PipelineSpec {
            stages: 2,
            codec: SpecCodec::Lowrank,
            ..PipelineSpec::default()
        };
        assert_eq!(
            TensorWire::for_pipeline(&pipeline),
            TensorWire::lowrank(DType::F32).expect("f32")
        );
        pipeline.lowrank = Some(pipewright_spec::LowrankSpec {
            rank: 4,
            wire: LowrankWire::Bf16,
        });
        let wire = TensorWire::for_pipeline(&pipeline);
        assert_eq!((wire.codec, wire.dtype), (Codec::Lowrank, DType::BF16));
        assert_eq!(wire.payload_codec(), Codec::BF16);
        pipeline.codec = SpecCodec::Int8;
        assert_eq!(
            TensorWire::for_pipeline(&pipeline),
            TensorWire::plain(Codec::Int8).expect("int8")
        );
        assert!(TensorWire::lowrank(DType::I8).is_err());
        assert!(TensorWire::plain(Codec::Lowrank).is_err());
    }

    #[test]
    fn wire_dtype_matches_what_frames_accept() {
        for codec in [Codec::F32, Codec::F16, Codec::BF16, Codec::Int8] {
            let dtype = wire_dtype(codec).expect("tensor codec");
            assert!(codec.accepts(dtype));
            assert_eq!(
                encoded_len(codec, 3, 5).expect("len"),
                crate::link::frame::payload_len_for(
                    &crate::link::frame::Shape::matrix(3, 5),
                    dtype,
                    codec
                )
                .expect("small") as usize
            );
        }
    }
}
