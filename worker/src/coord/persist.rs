//! The state file: what a restarted coordinator of the run resumes from
//! (`state.json` in the state directory, replaced atomically).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::state::Persisted;

/// Reads the state a previous coordinator of this run left in `dir`.
pub fn load_state(dir: &Path) -> Result<Option<Persisted>> {
    let path = dir.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a coordinator state file", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The state file of one coordinator, rewritten only when the state changed.
pub(super) struct StateFile {
    dir: PathBuf,
    /// What the file holds now (`None` before the first write).
    written: Mutex<Option<Persisted>>,
}

impl StateFile {
    pub(super) fn new(dir: PathBuf) -> Self {
        StateFile {
            dir,
            written: Mutex::new(None),
        }
    }

    /// Writes `p` unless the file already holds it. A failed write is
    /// logged and tried again at the next change.
    pub(super) fn save(&self, p: Persisted) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.as_ref() == Some(&p) {
            return;
        }
        match write_state(&self.dir, &p) {
            Ok(()) => *written = Some(p),
            Err(e) => tracing::error!("cannot save the coordinator state: {e:#}"),
        }
    }
}

fn write_state(dir: &Path, p: &Persisted) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".state.json.tmp");
    // It holds the audits' key: readable by its owner only.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // (A temporary file left by an older coordinator keeps its mode.)
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, &serde_json::to_vec_pretty(p)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, dir.join("state.json"))
        .with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}
