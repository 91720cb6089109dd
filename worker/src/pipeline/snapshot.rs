//! The state a shard worker keeps one step back (weights and Adam moments),
//! so that any plan of the coordinator can roll its stage back a step.
//! Where it is kept follows `spec.training.snapshot`: in memory, in buffers
//! kept from step to step and overwritten in place (no allocation after the
//! first step), or on disk, as a checkpoint-form file in the worker's
//! temporary directory, written every step and read straight back into the
//! live tensors on a roll-back. Either way the snapshot can be sent as the
//! stage's checkpoint part without another copy in memory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use pipewright_spec::SnapshotPlace;

use super::{PipelineError, StageState, StageWorker};
use crate::checkpoint::stream::{read_stage_into, StageEncoding};

/// Distinguishes the snapshot files of the workers one process runs.
static FILES: AtomicU64 = AtomicU64::new(0);

/// How a snapshot file's name starts; the writing process's id follows.
const PREFIX: &str = "pipewright-snapshot-";

/// Removes the snapshot files in `dir` whose writing process is gone
/// (Linux: no `/proc/PID`); elsewhere nothing is removed.
fn remove_orphans(dir: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A stage's state one step back, or nothing yet.
#[derive(Debug)]
pub struct Snapshot {
    /// The step of the state kept; `None` when nothing is kept.
    step: Option<u64>,
    kept: Kept,
}

#[derive(Debug)]
enum Kept {
    /// Buffers reused from step to step (`None` before the first).
    Memory(Option<StageState>),
    /// A checkpoint-form file, removed when the snapshot is dropped.
    Disk(PathBuf),
}

/// A stage's state in checkpoint form, ready to be sent: the live
/// tensors (or the in-memory snapshot) encoded as they are read, or the
/// disk snapshot's file.
pub enum StatePart<'a> {
    /// Encoded from tensors in memory.
    Encoded(StageEncoding<'a>),
    /// The file of a disk snapshot and its length.
    File(PathBuf, u64),
}

impl StatePart<'_> {
    /// Bytes of the part.
    pub fn len(&self) -> u64 {
        match self {
            StatePart::Encoded(e) => e.len(),
            StatePart::File(_, n) => *n,
        }
    }

    /// Whether the part has no bytes (never: a part has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader over the part's bytes, from the start (called again for a
    /// retry).
    pub fn open(&self) -> std::io::Result<Box<dyn Read + Send + '_>> {
        Ok(match self {
            StatePart::Encoded(e) => Box::new(e.reader()),
            StatePart::File(p, _) => Box::new(File::open(p)?),
        })
    }
}

impl Snapshot {
    /// An empty snapshot kept where `place` says; a disk snapshot's file
    /// goes in the temporary directory (`TMPDIR`), where the files that
    /// workers killed before they could remove theirs left are removed
    /// first.
    pub fn new(place: SnapshotPlace) -> Self {
        let kept = match place {
            SnapshotPlace::Memory => Kept::Memory(None),
            SnapshotPlace::Disk => {
                let dir = std::env::temp_dir();
                remove_orphans(&dir);
                Kept::Disk(dir.join(format!(
                    "{PREFIX}{}-{}.safetensors",
                    std::process::id(),
                    FILES.fetch_add(1, Ordering::Relaxed)
                )))
            }
        };
        Self { step: None, kept }
    }

    /// The step of the state kept, if any.
    pub fn step(&self) -> Option<u64> {
        self.step
    }

    /// Whether it keeps the state one step before `completed` steps, the
    /// one the coordinator may roll a worker that completed them back to.
    pub fn is_one_back(&self, completed: u64) -> bool {
        completed > 0 && self.step == Some(completed - 1)
    }

    /// Forgets the state kept. In memory the buffers stay for the next
    /// step; on disk the file is removed.
    pub fn clear(&mut self) {
        self.step = None;
        if let Kept::Disk(p) = &self.kept {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Keeps `wk`'s current state (before its next step), overwriting what
    /// was kept: in memory into the same buffers (allocated the first time,
    /// or again when the stage's shapes changed), on disk into the file.
    pub fn keep(&mut self, wk: &StageWorker) -> Result<(), PipelineError> {
        self.step = None;
        match &mut self.kept {
            Kept::Memory(slot) => {
                let params = wk.stage.params();
                let fits = slot.as_ref().is_some_and(|s| {
                    s.params.len() == params.len()
                        && s.params
                            .iter()
                            .zip(&params)
                            .all(|(a, p)| a.len() == p.len())
                        && s.opt.m.len() == wk.opt.m.len()
                });
                if !fits {
                    // Free the old buffers before taking new ones.
                    *slot = None;
                    *slot = Some(wk.state());
                } else if let Some(s) = slot {
                    for (dst, p) in s.params.iter_mut().zip(&params) {
                        dst.copy_from_slice(&p.data);
                    }
                    copy_moments(&mut s.opt, &wk.opt);
                    s.step = wk.step;
                }
            }
            Kept::Disk(path) => {
                let params = wk.stage.params();
                let encoding = StageEncoding::new(&params, None, &wk.opt)
                    .map_err(|e| PipelineError::Layout(format!("encoding the snapshot: {e}")))?;
                let write = || -> std::io::Result<()> {
                    let mut f = BufWriter::with_capacity(1 << 20, File::create(&*path)?);
                    encoding.write_to(&mut f)?;
                    f.flush()
                };
                write().map_err(|e| {
                    PipelineError::Layout(format!(
                        "writing the snapshot to {}: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        self.step = Some(wk.step);
        Ok(())
    }

    /// Rolls `wk` back to the state kept, in place: no copy of the state
    /// is allocated. Refused, changing nothing, when nothing is kept or the
    /// state does not fit the stage; a disk file that breaks off while it
    /// is read leaves the stage unusable (the error says so).
    pub fn restore_into(&self, wk: &mut StageWorker) -> Result<(), PipelineError> {
        let Some(step) = self.step else {
            return Err(PipelineError::Layout("no snapshot to roll back to".into()));
        };
        match &self.kept {
            Kept::Memory(Some(s)) => {
                let mut params = wk.stage.params_mut();
                let fits = |v: &[Vec<f32>]| {
                    v.len() == params.len()
                        && v.iter().zip(params.iter()).all(|(a, p)| a.len() == p.len())
                };
                if !fits(&s.params) || !fits(&s.opt.m) || !fits(&s.opt.v) {
                    return Err(PipelineError::Layout(format!(
                        "the snapshot does not fit stage {} ({} tensors)",
                        wk.shard.stage,
                        params.len()
                    )));
                }
                for (p, d) in params.iter_mut().zip(&s.params) {
                    p.data.copy_from_slice(d);
                    p.zero_grad();
                }
                copy_moments(&mut wk.opt, &s.opt);
            }
            Kept::Memory(None) => {
                return Err(PipelineError::Layout("no snapshot to roll back to".into()))
            }
            Kept::Disk(path) => {
                let mut params = wk.stage.params_mut();
                read_stage_into(path, &mut params, &mut wk.opt).map_err(|e| {
                    PipelineError::Layout(format!("reading the snapshot back: {e}"))
                })?;
            }
        }
        wk.step = step;
        wk.stage.clear_in_flight();
        Ok(())
    }

    /// The state kept, in checkpoint form, for `wk`'s stage; `None` when
    /// nothing is kept.
    pub fn part<'a>(&'a self, wk: &'a StageWorker) -> Result<Option<StatePart<'a>>, String> {
        if self.step.is_none() {
            return Ok(None);
        }
        match &self.kept {
            Kept::Memory(Some(s)) => {
                StageEncoding::new(&wk.stage.params(), Some(&s.params), &s.opt)
                    .map(|e| Some(StatePart::Encoded(e)))
            }
            Kept::Memory(None) => Ok(None),
            Kept::Disk(p) => {
                let len = std::fs::metadata(p)
                    .map_err(|e| format!("the snapshot file {}: {e}", p.display()))?
                    .len();
                Ok(Some(StatePart::File(p.clone(), len)))
            }
        }
    }
}

/// The state before a step, lent to recompute a micro-batch of that step
/// (an audit): the kept state itself in memory, or, from a disk snapshot,
/// its weights read back into buffers of their own (the moments are not
/// needed and not read).
pub enum Before<'a> {
    /// The in-memory snapshot.
    Kept(&'a mut StageState),
    /// Weights read back from the disk snapshot.
    Read(StageState),
}

impl Before<'_> {
    /// The state to recompute with.
    pub fn state(&mut self) -> &mut StageState {
        match self {
            Before::Kept(s) => s,
            Before::Read(s) => s,
        }
    }
}

impl Snapshot {
    /// The state kept, to recompute a micro-batch of the step after it;
    /// `None` when nothing is kept. A disk snapshot's weights are read back
    /// (costing one read of the weights and their size in memory while the
    /// audit runs), without its moments.
    pub fn before(&mut self, wk: &StageWorker) -> Result<Option<Before<'_>>, PipelineError> {
        self.read_back(wk, false)
    }

    /// As [`Snapshot::before`], with the optimizer's moments and step count
    /// too (a disk snapshot's are read back as well), for an update upload.
    pub fn before_with_moments(
        &mut self,
        wk: &StageWorker,
    ) -> Result<Option<Before<'_>>, PipelineError> {
        self.read_back(wk, true)
    }

    fn read_back(
        &mut self,
        wk: &StageWorker,
        moments: bool,
    ) -> Result<Option<Before<'_>>, PipelineError> {
        let Some(step) = self.step else {
            return Ok(None);
        };
        match &mut self.kept {
            Kept::Memory(Some(s)) => Ok(Some(Before::Kept(s))),
            Kept::Memory(None) => Ok(None),
            Kept::Disk(path) => {
                let params = wk.stage.params();
                let shapes: Vec<(&str, usize)> =
                    params.iter().map(|p| (p.name.as_str(), p.len())).collect();
                let (weights, opt) = crate::checkpoint::stream::read_state(path, &shapes, moments)
                    .map_err(|e| {
                        PipelineError::Layout(format!("reading the snapshot back: {e}"))
                    })?;
                Ok(Some(Before::Read(StageState {
                    step,
                    params: weights,
                    opt,
                })))
            }
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Copies `src`'s moments and step count into `dst`'s buffers of the
/// same shapes (checked by the callers).
fn copy_moments(dst: &mut crate::optim::AdamW, src: &crate::optim::AdamW) {
    for (d, s) in dst.m.iter_mut().zip(&src.m) {
        d.copy_from_slice(s);
    }
    for (d, s) in dst.v.iter_mut().zip(&src.v) {
        d.copy_from_slice(s);
    }
    dst.t = src.t;
}

impl StageWorker {
    /// Replaces the stage's training state with the checkpoint-form part
    /// `bytes` (from a live replica or a checkpoint; `source` names it in
    /// errors), read straight into the live tensors. Refused, changing
    /// nothing, when it does not fit this stage.
    pub fn restore_part(
        &mut self,
        bytes: &[u8],
        step: u64,
        source: &std::path::Path,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        let mut params = self.stage.params_mut();
        crate::checkpoint::stream::decode_stage_into(bytes, &mut params, &mut self.opt, source)?;
        self.step = step;
        self.stage.clear_in_flight();
        Ok(())
    }

    /// The current state in checkpoint form, encoded from the live
    /// tensors as it is read.
    pub fn part(&self) -> Result<StatePart<'_>, String> {
        // The stage's parameters borrow from the worker for as long as the
        // encoding lives.
        StageEncoding::new(&self.stage.params(), None, &self.opt).map(StatePart::Encoded)
    }
}
