//! A stage's state in checkpoint form without a second copy of it in
//! memory: [`StageEncoding`] lays out the same safetensors bytes as
//! [`super::encode_stage`] (byte for byte) but hands them out as a reader
//! over the live tensors, so a shard worker streams its checkpoint part to
//! the coordinator or a file. [`read_stage_into`] reads such a file back
//! into a stage's live tensors, and [`check_stage_file`] checks one against
//! a stage's parameters from its header alone; neither holds the file's
//! values in memory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::{corrupt, f32_bytes, io as io_err, CheckpointError};
use crate::model::block::Block;
use crate::model::{ModelConfig, Param, Stage};
use crate::optim::AdamW;

/// Largest safetensors header read back (the header of a stage names three
/// tensors per parameter: a few KiB).
const MAX_HEADER: u64 = 100 << 20;

/// The names of a parameter's three tensors in checkpoint form.
fn names(p: &str) -> [String; 3] {
    [
        p.to_string(),
        format!("optimizer.m.{p}"),
        format!("optimizer.v.{p}"),
    ]
}

/// One stage's parameters and Adam moments in the checkpoint's safetensors
/// layout, as a header and the tensors' own bytes in file order.
pub struct StageEncoding<'a> {
    /// The header's length (8 bytes, little-endian) and the padded header.
    header: Vec<u8>,
    /// The tensors' bytes, in the order the header places them.
    pieces: Vec<Cow<'a, [u8]>>,
    len: u64,
}

impl<'a> StageEncoding<'a> {
    /// The encoding of `params` with `opt`'s moments; `data` gives the
    /// values (one vector per parameter), `None` takes the live ones.
    /// Refused when `data` or `opt` does not match `params`' sizes.
    pub fn new(
        params: &[&'a Param],
        data: Option<&'a [Vec<f32>]>,
        opt: &'a AdamW,
    ) -> Result<Self, String> {
        if opt.m.len() != params.len() || opt.v.len() != params.len() {
            return Err(format!(
                "{} first and {} second moments for {} parameters",
                opt.m.len(),
                opt.v.len(),
                params.len()
            ));
        }
        let mut tensors: Vec<(String, &[usize], &'a [f32])> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let values: &'a [f32] = match data {
                Some(d) => d.get(i).ok_or("fewer tensors than parameters")?,
                None => &p.data,
            };
            let [n, m, v] = names(&p.name);
            for (name, vals) in [(n, values), (m, &opt.m[i][..]), (v, &opt.v[i][..])] {
                if vals.len() != p.len() {
                    return Err(format!(
                        "tensor {name}: {} values for {:?}",
                        vals.len(),
                        p.shape
                    ));
                }
                tensors.push((name, &p.shape, vals));
            }
        }
        // The order safetensors writes: by dtype, then by name (all f32).
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut infos = Vec::with_capacity(tensors.len());
        let mut pieces = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, shape, vals) in tensors {
            let n = std::mem::size_of_val(vals);
            infos.push((
                name,
                TensorInfo {
                    dtype: Dtype::F32,
                    shape: shape.to_vec(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
            pieces.push(f32_bytes(vals));
        }
        let info = HashMap::from([("optimizer_steps".to_string(), opt.t.to_string())]);
        let metadata = Metadata::new(Some(info), infos).map_err(|e| e.to_string())?;
        let mut json = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        let len = (header.len() + offset) as u64;
        Ok(Self {
            header,
            pieces,
            len,
        })
    }

    /// Bytes of the whole encoding.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the encoding has no bytes (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A reader over the encoding's bytes, from the start.
    pub fn reader(&self) -> EncodingReader<'_, 'a> {
        EncodingReader {
            encoding: self,
            piece: 0,
            at: 0,
        }
    }

    /// Writes the whole encoding to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.header)?;
        for p in &self.pieces {
            w.write_all(p)?;
        }
        Ok(())
    }
}

/// Reads a [`StageEncoding`]'s bytes in order: the header, then each
/// tensor's bytes straight from its memory.
pub struct EncodingReader<'e, 'a> {
    encoding: &'e StageEncoding<'a>,
    /// 0: the header; `i + 1`: the `i`-th tensor.
    piece: usize,
    at: usize,
}

impl Read for EncodingReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let src: &[u8] = match self.piece {
                0 => &self.encoding.header,
                i => match self.encoding.pieces.get(i - 1) {
                    Some(p) => p,
                    None => return Ok(0),
                },
            };
            if self.at < src.len() {
                let n = buf.len().min(src.len() - self.at);
                buf[..n].copy_from_slice(&src[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.piece += 1;
            self.at = 0;
        }
    }
}

/// Where each of a stage's tensors lies in a checkpoint part: per
/// parameter, the file offsets of its values and its two moments.
struct Layout {
    /// `[values, m, v]` byte ranges (from the file's start) per parameter.
    tensors: Vec<[std::ops::Range<u64>; 3]>,
    /// Adam steps taken (`optimizer_steps`).
    t: u64,
}

/// Reads and checks the header of the checkpoint part in `file` against
/// `params` (names, f32, sizes; tensors that tile the data exactly, nothing
/// more). `path` names the file in errors.
fn layout(
    file: &mut File,
    params: &[(&str, usize)],
    path: &Path,
) -> Result<Layout, CheckpointError> {
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|e| corrupt(path, format!("header length: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(corrupt(
            path,
            format!("a header of {n} bytes in a file of {file_len}"),
        ));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json)
        .map_err(|e| corrupt(path, format!("header: {e}")))?;
    layout_of(&json, file_len, params, path)
}

/// [`layout`] of a part whose header JSON is `json` and whole length
/// `file_len`.
fn layout_of(
    json: &[u8],
    file_len: u64,
    params: &[(&str, usize)],
    path: &Path,
) -> Result<Layout, CheckpointError> {
    let n = json.len() as u64;
    let meta: Metadata =
        serde_json::from_slice(json).map_err(|e| corrupt(path, format!("header: {e}")))?;
    let found = meta.tensors();
    if found.len() != 3 * params.len() {
        return Err(corrupt(
            path,
            format!(
                "{} tensors, expected {} (values and two moments of {} parameters)",
                found.len(),
                3 * params.len(),
                params.len()
            ),
        ));
    }
    let base = 8 + n;
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(found.len());
    let mut tensors = Vec::with_capacity(params.len());
    for &(name, len) in params {
        let mut ranges = [0..0, 0..0, 0..0];
        for (k, tname) in names(name).iter().enumerate() {
            let info = found
                .get(tname)
                .ok_or_else(|| corrupt(path, format!("tensor {tname}: missing")))?;
            let (a, b) = info.data_offsets;
            let elements = info.shape.iter().try_fold(1usize, |x, &d| x.checked_mul(d));
            if info.dtype != Dtype::F32 || elements != Some(len) || b < a || b - a != len * 4 {
                return Err(corrupt(
                    path,
                    format!("tensor {tname}: expected {len} f32 values"),
                ));
            }
            spans.push((a, b));
            ranges[k] = base + a as u64..base + b as u64;
        }
        tensors.push(ranges);
    }
    spans.sort_unstable();
    let mut end = 0usize;
    for (a, b) in spans {
        if a != end {
            return Err(corrupt(path, "tensors that do not tile the data"));
        }
        end = b;
    }
    if base + end as u64 != file_len {
        return Err(corrupt(
            path,
            format!(
                "{} bytes of tensors after the header, but the file has {}",
                end,
                file_len - base
            ),
        ));
    }
    let t = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("optimizer_steps"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(path, "missing optimizer_steps"))?;
    Ok(Layout { tensors, t })
}

/// Checks the checkpoint part at `path` against `params` (names and sizes
/// of a stage's parameters, as [`stage_tensors`] gives them) from its
/// header alone: every tensor present as f32 of the right size, the
/// tensors tiling the data exactly, the optimizer's steps recorded. Reads
/// none of the values.
pub fn check_stage_file(path: &Path, params: &[(String, usize)]) -> Result<(), CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let shapes: Vec<(&str, usize)> = params.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    layout(&mut file, &shapes, path).map(|_| ())
}

/// The names and sizes of the parameters of stage `index` of `stages`
/// over `layers` (in [`Stage::params`]' order), as
/// [`Stage::with_bottleneck`] would build it, without holding the whole
/// stage: the blocks are built one at a time.
pub fn stage_tensors(
    cfg: &ModelConfig,
    index: usize,
    stages: usize,
    layers: std::ops::Range<usize>,
    seed: u64,
    rank: Option<usize>,
) -> Vec<(String, usize)> {
    let named = |p: &&Param| (p.name.clone(), p.len());
    // The stage without blocks: embedding and up-projection come before
    // the blocks, down-projection, final norm and head after them.
    let shell = Stage::with_bottleneck(cfg, index, stages, layers.start..layers.start, seed, rank);
    let outer: Vec<(String, usize)> = shell.params().iter().map(named).collect();
    let before = usize::from(shell.is_first()) + usize::from(rank.is_some() && index > 0);
    let mut all = outer[..before].to_vec();
    for l in layers {
        all.extend(Block::new(cfg, l, seed).params().iter().map(named));
    }
    all.extend_from_slice(&outer[before..]);
    all
}

/// Reads the checkpoint part at `path` straight into `params`' values and
/// `opt`'s moments (the optimizer's step count too), zeroing the
/// gradients. The header is checked first, so a file that does not fit
/// changes nothing; an error while reading the values leaves the stage
/// partly overwritten, which the caller must treat as a lost state.
pub fn read_stage_into(
    path: &Path,
    params: &mut [&mut Param],
    opt: &mut AdamW,
) -> Result<(), CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let shapes: Vec<(&str, usize)> = params.iter().map(|p| (p.name.as_str(), p.len())).collect();
    let layout = layout(&mut file, &shapes, path)?;
    if opt.m.len() != params.len() || opt.v.len() != params.len() {
        return Err(corrupt(path, "the optimizer does not fit the stage"));
    }
    for (i, p) in params.iter_mut().enumerate() {
        let [rv, rm, rv2] = &layout.tensors[i];
        if opt.m[i].len() != p.len() || opt.v[i].len() != p.len() {
            return Err(corrupt(path, format!("moments of {} do not fit", p.name)));
        }
        read_f32_at(&mut file, rv.start, &mut p.data, path)?;
        read_f32_at(&mut file, rm.start, &mut opt.m[i], path)?;
        read_f32_at(&mut file, rv2.start, &mut opt.v[i], path)?;
        p.zero_grad();
    }
    opt.t = layout.t;
    Ok(())
}

/// Reads the parameter values of the checkpoint part at `path` into new
/// buffers shaped like `params` (names and lengths), in their order, and
/// with `moments` the optimizer's moments and step count as well (without,
/// the optimizer returned is empty). The header is checked first.
pub fn read_state(
    path: &Path,
    params: &[(&str, usize)],
    moments: bool,
) -> Result<(Vec<Vec<f32>>, AdamW), CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let layout = layout(&mut file, params, path)?;
    let mut values = Vec::with_capacity(params.len());
    let mut opt = AdamW::default();
    if moments {
        opt.t = layout.t;
    }
    for (i, (_, len)) in params.iter().enumerate() {
        let [rv, rm, rv2] = &layout.tensors[i];
        let mut parts = vec![(rv, &mut values)];
        if moments {
            parts.extend([(rm, &mut opt.m), (rv2, &mut opt.v)]);
        }
        for (range, out) in parts {
            let mut x = vec![0.0f32; *len];
            read_f32_at(&mut file, range.start, &mut x, path)?;
            out.push(x);
        }
    }
    Ok((values, opt))
}

/// Reads the checkpoint part `bytes` (from a live replica or the
/// coordinator) straight into `params`' values and `opt`'s moments and
/// step count, zeroing the gradients, without decoding a copy of it. The
/// header is checked first: a part that does not fit changes nothing.
/// `path` names the source in errors.
pub fn decode_stage_into(
    bytes: &[u8],
    params: &mut [&mut Param],
    opt: &mut AdamW,
    path: &Path,
) -> Result<(), CheckpointError> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt(path, "shorter than a header"))?;
    if n > MAX_HEADER || 8 + n > bytes.len() as u64 {
        return Err(corrupt(
            path,
            format!("a header of {n} bytes in a part of {}", bytes.len()),
        ));
    }
    let shapes: Vec<(&str, usize)> = params.iter().map(|p| (p.name.as_str(), p.len())).collect();
    let layout = layout_of(&bytes[8..8 + n as usize], bytes.len() as u64, &shapes, path)?;
    if opt.m.len() != params.len()
        || opt.v.len() != params.len()
        || params
            .iter()
            .enumerate()
            .any(|(i, p)| opt.m[i].len() != p.len() || opt.v[i].len() != p.len())
    {
        return Err(corrupt(path, "the optimizer does not fit the stage"));
    }
    let fill = |dst: &mut [f32], r: &std::ops::Range<u64>| {
        let src = &bytes[r.start as usize..r.end as usize];
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    };
    for (i, p) in params.iter_mut().enumerate() {
        let [rv, rm, rv2] = &layout.tensors[i];
        fill(&mut p.data, rv);
        fill(&mut opt.m[i], rm);
        fill(&mut opt.v[i], rv2);
        p.zero_grad();
    }
    opt.t = layout.t;
    Ok(())
}

/// Fills `dst` with the little-endian f32 values at byte `at` of `file`.
fn read_f32_at(
    file: &mut File,
    at: u64,
    dst: &mut [f32],
    path: &Path,
) -> Result<(), CheckpointError> {
    file.seek(SeekFrom::Start(at)).map_err(io_err(path))?;
    file.read_exact(bytemuck::cast_slice_mut(dst))
        .map_err(io_err(path))?;
    if cfg!(target_endian = "big") {
        for x in dst.iter_mut() {
            *x = f32::from_le_bytes(x.to_ne_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> (Vec<Param>, AdamW) {
        let mut params = vec![
            Param::filled("model.layers.0.mlp.up_proj.weight", &[3, 4], 0.0, true),
            Param::filled("model.norm.weight", &[4], 0.0, false),
            Param::filled("lm_head.weight", &[5, 4], 0.0, true),
        ];
        let mut x = 0.25f32;
        for p in &mut params {
            for w in p.data.iter_mut() {
                x = (x * 3.7 + 0.1).fract() - 0.5;
                *w = x;
            }
        }
        let mut opt = AdamW::new(&params.iter_mut().collect::<Vec<_>>());
        for (k, (m, v)) in opt.m.iter_mut().zip(opt.v.iter_mut()).enumerate() {
            for (j, (a, b)) in m.iter_mut().zip(v.iter_mut()).enumerate() {
                *a = (k * 100 + j) as f32 * 0.01;
                *b = (k * 100 + j) as f32 * 0.001 + 1.0;
            }
        }
        opt.t = 7;
        (params, opt)
    }

    fn streamed(e: &StageEncoding<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        // Small reads cross the pieces' boundaries.
        let mut r = e.reader();
        let mut buf = [0u8; 13];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn the_stream_is_the_checkpoint_encoding_byte_for_byte() {
        let (params, opt) = stage();
        let refs: Vec<&Param> = params.iter().collect();
        let whole = super::super::encode_stage(&refs, None, &opt).unwrap();
        let e = StageEncoding::new(&refs, None, &opt).unwrap();
        assert_eq!(e.len(), whole.len() as u64);
        assert_eq!(streamed(&e), whole);
        let mut written = Vec::new();
        e.write_to(&mut written).unwrap();
        assert_eq!(written, whole);
        // Values given apart from the live tensors.
        let other: Vec<Vec<f32>> = params.iter().map(|p| vec![1.5; p.len()]).collect();
        let whole = super::super::encode_stage(&refs, Some(&other), &opt).unwrap();
        let e = StageEncoding::new(&refs, Some(&other), &opt).unwrap();
        assert_eq!(streamed(&e), whole);
    }

    #[test]
    fn a_file_reads_back_into_the_live_tensors_and_a_wrong_one_changes_nothing() {
        let (params, opt) = stage();
        let refs: Vec<&Param> = params.iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage.safetensors");
        let mut f = File::create(&path).unwrap();
        StageEncoding::new(&refs, None, &opt)
            .unwrap()
            .write_to(&mut f)
            .unwrap();
        drop(f);
        let sizes: Vec<(String, usize)> = refs.iter().map(|p| (p.name.clone(), p.len())).collect();
        check_stage_file(&path, &sizes).unwrap();

        let (mut back, mut back_opt) = stage();
        for p in &mut back {
            p.data.iter_mut().for_each(|x| *x = 9.0);
            p.grad.iter_mut().for_each(|x| *x = 1.0);
        }
        back_opt.m.iter_mut().flatten().for_each(|x| *x = 0.0);
        back_opt.t = 0;
        let mut muts: Vec<&mut Param> = back.iter_mut().collect();
        read_stage_into(&path, &mut muts, &mut back_opt).unwrap();
        assert_eq!(back_opt, opt);
        for (a, b) in back.iter().zip(&params) {
            assert_eq!(a.data, b.data);
            assert!(a.grad.iter().all(|&g| g == 0.0));
        }

        // The same from bytes in memory.
        let (mut again, mut again_opt) = stage();
        again_opt.t = 0;
        let mut muts: Vec<&mut Param> = again.iter_mut().collect();
        let bytes = std::fs::read(&path).unwrap();
        decode_stage_into(&bytes, &mut muts, &mut again_opt, &path).unwrap();
        assert_eq!(again_opt, opt);
        assert!(
            decode_stage_into(&bytes[..bytes.len() - 1], &mut muts, &mut again_opt, &path).is_err()
        );

        // Another stage's parameters: refused before anything changes.
        let mut wrong = [Param::filled("model.norm.weight", &[5], 3.0, false)];
        let mut wrong_opt = AdamW::new(&wrong.iter_mut().collect::<Vec<_>>());
        let mut muts: Vec<&mut Param> = wrong.iter_mut().collect();
        let e = read_stage_into(&path, &mut muts, &mut wrong_opt).unwrap_err();
        assert!(e.to_string().contains("tensors, expected 3"), "{e}");
        assert!(wrong[0].data.iter().all(|&x| x == 3.0));

        // A truncated file: refused from its header and length alone.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = check_stage_file(&path, &sizes).unwrap_err();
        assert!(e.to_string().contains("bytes of tensors"), "{e}");
        // A header length past the end of the file.
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(check_stage_file(&path, &sizes).is_err());
    }
}

#[cfg(test)]
mod stage_tensor_tests {
    use super::*;

    #[test]
    fn a_stages_tensors_are_those_of_the_whole_stage_in_order() {
        let cfg = ModelConfig {
            vocab: 61,
            dim: 16,
            layers: 6,
            heads: 2,
            kv_heads: 2,
            ffn_dim: 24,
            seq_len: 8,
            tied: false,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            init_std: 0.02,
        };
        for rank in [None, Some(4)] {
            for (index, layers) in [(0, 0..2), (1, 2..4), (2, 4..6)] {
                let whole = Stage::with_bottleneck(&cfg, index, 3, layers.clone(), 5, rank);
                let expected: Vec<(String, usize)> = whole
                    .params()
                    .iter()
                    .map(|p| (p.name.clone(), p.len()))
                    .collect();
                assert_eq!(
                    stage_tensors(&cfg, index, 3, layers, 5, rank),
                    expected,
                    "stage {index}, rank {rank:?}"
                );
            }
        }
    }
}
