//! Where token shards and trained tokenizers are kept, how they are named,
//! and how concurrent processes share them.
//!
//! A shard's name is a hash of what it was built from: every resolved
//! file's path, size and modification time, how files are read
//! (`format`, `textField`), the validation fraction and the tokenizer
//! (`tokenizer.json` as the library serializes it). A trained tokenizer's
//! name is the same hash with its vocabulary size in place of the
//! tokenizer. Files are written under a temporary name and renamed into
//! place; a lock file per name makes a second process wait for the first
//! one's result instead of building it again.

use std::cell::OnceCell;
use std::fs::File;
use std::path::{Path, PathBuf};

use pipewright_spec::{DataSpec, TokenizerKind};
use tracing::{info, warn};

use super::corpus::{build_shard, resolve_files, CACHE_DIR_NAME};
use super::shard::{Shard, VERSION};
use super::source::Reading;
use super::split::{plan, Plan};
use super::{Corpus, DataError, Tokenizer};

/// A corpus about to be opened: its files resolved and its cache located.
/// The split is computed at most once, and only when something must be
/// built.
pub(crate) struct Prepared {
    spec: DataSpec,
    paths: Vec<PathBuf>,
    reading: Reading,
    dir: PathBuf,
    /// Hash of the files' identity and the split settings.
    identity: blake3::Hash,
    plan: OnceCell<Plan>,
}

impl Prepared {
    pub(crate) fn new(spec: &DataSpec) -> Result<Prepared, DataError> {
        let fraction = spec.validation_fraction;
        if !(fraction > 0.0 && fraction <= 0.5) {
            return Err(DataError::InvalidField {
                field: "data.validationFraction",
                message: format!("{fraction} is outside (0, 0.5]"),
            });
        }
        let paths = resolve_files(spec)?;
        let reading = Reading::new(spec);
        let mut h = blake3::Hasher::new_derive_key("pipewright corpus identity v1");
        h.update(&VERSION.to_le_bytes());
        h.update(&fraction.to_bits().to_le_bytes());
        h.update(reading.describe().as_bytes());
        for path in &paths {
            let meta = std::fs::metadata(path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let name = path.as_os_str().as_encoded_bytes();
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name);
            h.update(&meta.len().to_le_bytes());
            h.update(&modified.to_le_bytes());
        }
        let dir = cache_dir(spec, &paths)?;
        Ok(Prepared {
            spec: spec.clone(),
            paths,
            reading,
            dir,
            identity: h.finalize(),
            plan: OnceCell::new(),
        })
    }

    fn plan(&self) -> Result<&Plan, DataError> {
        if let Some(p) = self.plan.get() {
            return Ok(p);
        }
        let p = plan(&self.paths, &self.reading, self.spec.validation_fraction)?;
        Ok(self.plan.get_or_init(|| p))
    }

    fn name(&self, what: &[u8]) -> (String, [u8; 32]) {
        let mut h = blake3::Hasher::new_derive_key("pipewright cache entry v1");
        h.update(self.identity.as_bytes());
        h.update(what);
        let key = *h.finalize().as_bytes();
        (hex::encode(&key[..16]), key)
    }

    /// The tokenizer of the manifest: a BPE to be trained is trained on
    /// the training split only, once, and kept in the cache.
    pub(crate) fn tokenizer(&self) -> Result<Tokenizer, DataError> {
        let t = &self.spec.tokenizer;
        if let Some(tok) = Tokenizer::untrained(t)? {
            return Ok(tok);
        }
        let vocab = match (t.kind, t.vocab_size) {
            (TokenizerKind::Bpe, Some(v)) => v,
            _ => {
                return Err(DataError::InvalidField {
                    field: "data.tokenizer.vocabSize",
                    message: "a bpe tokenizer needs either path or vocabSize".into(),
                });
            }
        };
        let (name, _) = self.name(format!("trained bpe {vocab}").as_bytes());
        let path = self.dir.join(format!("{name}.tokenizer.json"));
        let cached = |path: &Path| -> Option<Tokenizer> {
            if !path.exists() {
                return None;
            }
            match Tokenizer::from_json_file(path) {
                Ok(tok) if tok.vocab_size() == vocab => Some(tok),
                Ok(tok) => {
                    warn!(file = %path.display(), "the cached tokenizer has {} ids, not {vocab}; training it again", tok.vocab_size());
                    None
                }
                Err(e) => {
                    warn!("{e}; training the tokenizer again");
                    None
                }
            }
        };
        if let Some(tok) = cached(&path) {
            return Ok(tok);
        }
        let _lock = lock(&self.dir, &name)?;
        if let Some(tok) = cached(&path) {
            return Ok(tok);
        }
        info!(vocab, dir = %self.dir.display(), "training a BPE tokenizer on the training split");
        let tok = super::tokenizer::train_on_split(vocab, self.plan()?, &self.reading)?;
        tok.write_json_atomically(&self.dir, &path)?;
        Ok(tok)
    }

    /// The corpus tokenized by `tokenizer`: the cached shard when there is
    /// a sound one, else built (once, under the lock) and cached.
    pub(crate) fn corpus(&self, tokenizer: &Tokenizer) -> Result<Corpus, DataError> {
        let (name, key) = self.name(tokenizer.identity().as_bytes());
        let path = self.dir.join(format!("{name}.tokens"));
        let vocab = tokenizer.vocab_size();
        let open = |quiet: bool| -> Option<Shard> {
            if !path.exists() {
                return None;
            }
            match Shard::open(&path, &key, vocab) {
                Ok(s) => Some(s),
                Err(e) => {
                    if !quiet {
                        warn!("{e}; building it again");
                    }
                    None
                }
            }
        };
        if let Some(s) = open(true) {
            return Ok(Corpus::from_shard(s, &self.paths));
        }
        let _lock = lock(&self.dir, &name)?;
        if let Some(s) = open(false) {
            return Ok(Corpus::from_shard(s, &self.paths));
        }
        let started = std::time::Instant::now();
        build_shard(
            self.plan()?,
            &self.reading,
            tokenizer,
            &self.dir,
            &path,
            &key,
        )?;
        info!(shard = %path.display(), seconds = started.elapsed().as_secs_f64(), "tokenized the corpus");
        let shard = Shard::open(&path, &key, vocab)?;
        Ok(Corpus::from_shard(shard, &self.paths))
    }
}

/// Holds an exclusive lock on `<dir>/<name>.lock` until dropped.
fn lock(dir: &Path, name: &str) -> Result<File, DataError> {
    let path = dir.join(format!("{name}.lock"));
    let io = |source| DataError::Io {
        path: path.clone(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

/// The cache directory: `data.cacheDir`; else `.pipewright-cache` inside
/// the first source when it is a directory, or beside the first file;
/// else, when that cannot be written, in the system's temporary directory.
fn cache_dir(spec: &DataSpec, paths: &[PathBuf]) -> Result<PathBuf, DataError> {
    if let Some(dir) = &spec.cache_dir {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|source| DataError::Io {
            path: dir.clone(),
            source,
        })?;
        return Ok(dir);
    }
    let beside = spec
        .sources
        .first()
        .map(Path::new)
        .filter(|p| p.is_dir())
        .map(Path::to_path_buf)
        .or_else(|| {
            paths
                .first()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf)
        })
        .map(|d| d.join(CACHE_DIR_NAME));
    if let Some(dir) = beside {
        if writable(&dir) {
            return Ok(dir);
        }
    }
    let dir = std::env::temp_dir().join("pipewright-cache");
    std::fs::create_dir_all(&dir).map_err(|source| DataError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn writable(dir: &Path) -> bool {
    std::fs::create_dir_all(dir).is_ok() && tempfile::tempfile_in(dir).is_ok()
}
