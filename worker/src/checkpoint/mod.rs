//! Checkpoints: one safetensors file per stage (parameters and Adam
//! moments) plus `meta.json` (step, configuration, data cursor, seed) and
//! the tokenizer. A checkpoint directory is written under a temporary name
//! and renamed into place, so a crash never leaves a half-written one behind
//! a `latest` pointer.

pub mod export;
pub mod stream;

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::Tokenizer;
use crate::model::{ModelConfig, Param, Stage};
use crate::optim::AdamW;

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File-system error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file that is not a valid checkpoint part.
    #[error("{path}: {message}")]
    Corrupt {
        /// Path of the file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer could not be saved or loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::data::DataError),
    /// The checkpoint is valid but has no Hugging Face equivalent.
    #[error("cannot export: {0}")]
    NotExportable(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `meta.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Layout version.
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The manifest the run was started with.
    pub manifest: pipewright_spec::TrainingRun,
    /// Resolved model shape.
    pub model: ModelConfig,
    /// Layer range of each stage.
    pub stage_layers: Vec<Range<usize>>,
    /// Seed of initialisation and data order. Together with `step` it is
    /// the whole data cursor and RNG state: samples are a pure function of
    /// (seed, step, micro-batch, replica).
    pub seed: u64,
    /// blake3 of the tokenized corpus, hex; resuming on other data warns.
    pub data_fingerprint: String,
    /// Mean training loss of each completed step, for exact-resume checks
    /// and plots.
    pub losses: Vec<f32>,
}

/// Checkpoint directory name for `step`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// `v` as safetensors' little-endian bytes: the values' own memory where
/// the machine is little-endian (no copy: a checkpoint of a large stage
/// costs no second copy of its tensors), else a converted copy.
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

fn read_f32(
    st: &SafeTensors<'_>,
    name: &str,
    len: usize,
    path: &Path,
) -> Result<Vec<f32>, CheckpointError> {
    let t = st
        .tensor(name)
        .map_err(|e| corrupt(path, format!("tensor {name}: {e}")))?;
    if t.dtype() != Dtype::F32 || t.data().len() != len * 4 {
        return Err(corrupt(
            path,
            format!("tensor {name}: expected {len} f32 values"),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// One stage's parameters and Adam moments in the checkpoint's safetensors
/// layout (`NAME`, `optimizer.m.NAME`, `optimizer.v.NAME`, metadata
/// `optimizer_steps`). `data` gives the values of `params` (their shapes
/// and names come from `params`); `None` takes the live values.
pub fn encode_stage(
    params: &[&Param],
    data: Option<&[Vec<f32>]>,
    opt: &AdamW,
) -> Result<Vec<u8>, String> {
    let mut blobs: Vec<(String, Vec<usize>, std::borrow::Cow<'_, [u8]>)> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let values = match data {
            Some(d) => d.get(i).ok_or("fewer tensors than parameters")?,
            None => &p.data,
        };
        if values.len() != p.len() {
            return Err(format!(
                "tensor {}: {} values for {:?}",
                p.name,
                values.len(),
                p.shape
            ));
        }
        blobs.push((p.name.clone(), p.shape.clone(), f32_bytes(values)));
        if let (Some(m), Some(v)) = (opt.m.get(i), opt.v.get(i)) {
            blobs.push((
                format!("optimizer.m.{}", p.name),
                p.shape.clone(),
                f32_bytes(m),
            ));
            blobs.push((
                format!("optimizer.v.{}", p.name),
                p.shape.clone(),
                f32_bytes(v),
            ));
        }
    }
    let views = blobs
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("tensor {n}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = HashMap::from([("optimizer_steps".to_string(), opt.t.to_string())]);
    safetensors::serialize(views, Some(info)).map_err(|e| e.to_string())
}

/// Parameter values and Adam moments read back from [`encode_stage`]'s
/// bytes, each checked against `params`' names and sizes. `path` names the
/// source in errors.
pub fn decode_stage(
    bytes: &[u8],
    params: &[&Param],
    path: &Path,
) -> Result<(Vec<Vec<f32>>, AdamW), CheckpointError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let mut data = Vec::new();
    let mut m = Vec::new();
    let mut v = Vec::new();
    for p in params {
        data.push(read_f32(&st, &p.name, p.len(), path)?);
        m.push(read_f32(
            &st,
            &format!("optimizer.m.{}", p.name),
            p.len(),
            path,
        )?);
        v.push(read_f32(
            &st,
            &format!("optimizer.v.{}", p.name),
            p.len(),
            path,
        )?);
    }
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path, format!("header: {e}")))?;
    let t = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("optimizer_steps"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(path, "missing optimizer_steps"))?;
    Ok((data, AdamW { m, v, t }))
}

/// Write one stage's parameters and moments to `path`.
pub fn save_stage(path: &Path, params: &[&Param], opt: &AdamW) -> Result<(), CheckpointError> {
    let bytes = encode_stage(params, None, opt).map_err(|e| corrupt(path, e))?;
    fs::write(path, bytes).map_err(io(path))
}

/// Read parameters and moments saved by [`save_stage`] into `params` / `opt`.
/// Every tensor is checked against the expected shape first, so a mismatched
/// checkpoint is refused before anything is overwritten.
pub fn load_stage(
    path: &Path,
    params: &mut [&mut Param],
    opt: &mut AdamW,
) -> Result<(), CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let (data, loaded) = {
        let view: Vec<&Param> = params.iter().map(|p| &**p).collect();
        decode_stage(&bytes, &view, path)?
    };
    for (p, d) in params.iter_mut().zip(data) {
        p.data = d;
        p.zero_grad();
    }
    *opt = loaded;
    Ok(())
}

/// Write a complete checkpoint of `stages` at `meta.step` under `root`,
/// point `root/latest` at it, and keep only the newest `keep` (0: all).
pub fn save(
    root: &Path,
    meta: &Meta,
    stages: &[Stage],
    opts: &[AdamW],
    tokenizer: &Tokenizer,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(root).map_err(io(root))?;
    let tmp = tmp_dir(root, meta.step);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for (stage, opt) in stages.iter().zip(opts) {
        save_stage(
            &tmp.join(format!("stage-{}.safetensors", stage.index)),
            &stage.params(),
            opt,
        )?;
    }
    commit(root, meta, tokenizer, keep)
}

/// Temporary directory a checkpoint of `step` is assembled in.
pub fn tmp_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!(".tmp-step-{step:08}"))
}

/// Completes the checkpoint whose stage files are already in
/// [`tmp_dir`]`(root, meta.step)` (written by one process, or by one worker
/// per stage): adds the tokenizer and `meta.json`, renames it into place,
/// points `root/latest` at it and keeps only the newest `keep` (0: all).
/// Refused, leaving the previous checkpoint in place, when a stage file is
/// missing.
pub fn commit(
    root: &Path,
    meta: &Meta,
    tokenizer: &Tokenizer,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let dir = step_dir(root, meta.step);
    let tmp = tmp_dir(root, meta.step);
    for i in 0..meta.stage_layers.len() {
        let f = tmp.join(format!("stage-{i}.safetensors"));
        if !f.is_file() {
            return Err(corrupt(&f, "stage file missing; checkpoint not committed"));
        }
    }
    tokenizer.save(&tmp.join("tokenizer"))?;
    let meta_path = tmp.join("meta.json");
    let json = serde_json::to_vec_pretty(meta).map_err(|e| corrupt(&meta_path, e.to_string()))?;
    fs::write(&meta_path, json).map_err(io(&meta_path))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest = root.join("latest");
    let latest_tmp = root.join(".latest.tmp");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fs::write(&latest_tmp, format!("{name}\n")).map_err(io(&latest_tmp))?;
    fs::rename(&latest_tmp, &latest).map_err(io(&latest))?;
    if keep > 0 {
        prune(root, keep)?;
    }
    Ok(dir)
}

fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for d in &dirs[..excess] {
        fs::remove_dir_all(d).map_err(io(d))?;
    }
    Ok(())
}

/// Resolve a checkpoint argument: a `step-…` directory, or a run directory
/// whose `latest` names one.
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join("meta.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    let name = fs::read_to_string(&latest).map_err(|_| {
        corrupt(
            path,
            "not a checkpoint (no meta.json) and no `latest` pointer in it",
        )
    })?;
    let dir = path.join(name.trim());
    if dir.join("meta.json").is_file() {
        Ok(dir)
    } else {
        Err(corrupt(
            &latest,
            format!("points at {}, which has no meta.json", dir.display()),
        ))
    }
}

/// Read `meta.json` of a checkpoint directory.
pub fn read_meta(dir: &Path) -> Result<Meta, CheckpointError> {
    let path = dir.join("meta.json");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let meta: Meta = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(corrupt(
            &path,
            format!(
                "format version {} (expected {FORMAT_VERSION})",
                meta.format_version
            ),
        ));
    }
    Ok(meta)
}

/// A loaded checkpoint: stages with their weights, their optimizers, and the
/// tokenizer.
pub struct Loaded {
    /// Metadata.
    pub meta: Meta,
    /// Every stage, in order.
    pub stages: Vec<Stage>,
    /// Optimizer of each stage.
    pub opts: Vec<AdamW>,
    /// The run's tokenizer.
    pub tokenizer: Tokenizer,
}

/// Load a whole checkpoint (every stage) from `dir` (see [`resolve`]).
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let dir = resolve(dir)?;
    let meta = read_meta(&dir)?;
    let n = meta.stage_layers.len();
    let rank = bottleneck_rank(&meta, &dir)?;
    let mut stages = Vec::with_capacity(n);
    let mut opts = Vec::with_capacity(n);
    for (i, layers) in meta.stage_layers.iter().enumerate() {
        let mut stage = Stage::with_bottleneck(&meta.model, i, n, layers.clone(), meta.seed, rank);
        let mut opt = AdamW::default();
        load_stage(
            &dir.join(format!("stage-{i}.safetensors")),
            &mut stage.params_mut(),
            &mut opt,
        )?;
        stages.push(stage);
        opts.push(opt);
    }
    let tokenizer = Tokenizer::load(&dir.join("tokenizer"))?;
    Ok(Loaded {
        meta,
        stages,
        opts,
        tokenizer,
    })
}

/// Width of the learned bottleneck at the stage boundaries of the run
/// `meta` describes (`None` unless its codec is `lowrank`); refused when it
/// does not fit the model, which only a hand-edited `meta.json` can cause.
pub fn bottleneck_rank(meta: &Meta, dir: &Path) -> Result<Option<usize>, CheckpointError> {
    let dim = meta.model.dim;
    match meta.manifest.spec.pipeline.lowrank_rank(dim) {
        Some(r) if r == 0 || r >= dim => Err(corrupt(
            &dir.join("meta.json"),
            format!("bottleneck rank {r} does not fit a model of width {dim}"),
        )),
        rank => Ok(rank),
    }
}
