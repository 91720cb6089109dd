//! Token shard files: the tokenized corpus on disk, read through a memory
//! map so a process's memory does not grow with the corpus.
//!
//! Layout (all integers little-endian; see `docs/data.md`):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `PWTOKENS` |
//! | 8..12 | format version (1) |
//! | 12..16 | bytes per token id: 2 (vocabulary ≤ 65536) or 4 |
//! | 16..24 | vocabulary size |
//! | 24..32 | training tokens |
//! | 32..40 | validation tokens |
//! | 40..48 | training text bytes |
//! | 48..56 | validation text bytes |
//! | 56..64 | unigram bits per byte of the training text (f64) |
//! | 64..72 | files skipped as not text |
//! | 72..104 | fingerprint of the token streams |
//! | 104..136 | key: what the shard was built from |
//! | 136..160 | zero |
//!
//! then the training ids, the validation ids, and the positions of the
//! skipped files in the resolved file list (8 bytes each).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::DataError;

const MAGIC: &[u8; 8] = b"PWTOKENS";
/// Version of the layout above.
pub(crate) const VERSION: u32 = 1;
/// Bytes before the first token id.
pub(crate) const HEADER_BYTES: usize = 160;
/// Bytes read at a time when a shard is checked.
const SCAN_BYTES: usize = 4 << 20;

/// A borrowed token stream, stored as 16- or 32-bit ids.
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    /// Ids of a vocabulary of at most 65536.
    U16(&'a [u16]),
    /// Ids of any vocabulary.
    U32(&'a [u32]),
}

impl Tokens<'_> {
    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            Self::U16(t) => t.len(),
            Self::U32(t) => t.len(),
        }
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Id at `i` (panics past the end, like a slice).
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Self::U16(t) => u32::from(t[i]),
            Self::U32(t) => t[i],
        }
    }

    /// Ids `range` as a vector.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        match self {
            Self::U16(t) => t[range].iter().map(|&x| u32::from(x)).collect(),
            Self::U32(t) => t[range].to_vec(),
        }
    }

    /// Every id as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        self.slice(0..self.len())
    }
}

/// What a shard records about its corpus besides the ids.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Stats {
    pub(crate) vocab: u64,
    pub(crate) train_tokens: u64,
    pub(crate) val_tokens: u64,
    pub(crate) train_bytes: u64,
    pub(crate) val_bytes: u64,
    pub(crate) unigram_bits_per_byte: f64,
    pub(crate) fingerprint: [u8; 32],
}

/// An open, checked shard.
#[derive(Clone, Debug)]
pub(crate) struct Shard {
    map: Arc<Mmap>,
    wide: bool,
    pub(crate) stats: Stats,
    pub(crate) skipped: Vec<usize>,
    pub(crate) path: PathBuf,
}

fn width_for(vocab: u64) -> usize {
    if vocab <= 1 << 16 {
        2
    } else {
        4
    }
}

impl Shard {
    /// The training ids.
    pub(crate) fn train(&self) -> Tokens<'_> {
        self.stream(0, self.stats.train_tokens as usize)
    }

    /// The validation ids.
    pub(crate) fn val(&self) -> Tokens<'_> {
        self.stream(
            self.stats.train_tokens as usize,
            self.stats.val_tokens as usize,
        )
    }

    fn stream(&self, first: usize, len: usize) -> Tokens<'_> {
        let w = if self.wide { 4 } else { 2 };
        let bytes = &self.map[HEADER_BYTES + first * w..HEADER_BYTES + (first + len) * w];
        // The map starts on a page and every offset is a multiple of the
        // width, so the casts cannot fail on alignment.
        if self.wide {
            Tokens::U32(bytemuck::cast_slice(bytes))
        } else {
            Tokens::U16(bytemuck::cast_slice(bytes))
        }
    }

    /// Opens and checks the shard at `path`, built from `key` for a
    /// tokenizer of `vocab` ids: the header, the length of the file, every
    /// id (below `vocab`) and the fingerprint of the streams. Every
    /// problem is an error naming the file.
    pub(crate) fn open(path: &Path, key: &[u8; 32], vocab: usize) -> Result<Shard, DataError> {
        let bad = |message: String| DataError::Shard {
            path: path.to_path_buf(),
            message,
        };
        if cfg!(target_endian = "big") {
            return Err(bad(
                "token shards are little-endian; this machine is not".into()
            ));
        }
        let mut file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = file.metadata().map_err(io)?.len();
        let mut header = [0u8; HEADER_BYTES];
        if len < HEADER_BYTES as u64 {
            return Err(bad(format!(
                "{len} bytes, shorter than the {HEADER_BYTES}-byte header (truncated, or not a token shard)"
            )));
        }
        file.read_exact(&mut header).map_err(io)?;
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        if &header[0..8] != MAGIC {
            return Err(bad("not a token shard (wrong magic bytes)".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}; this build reads version {VERSION}"
            )));
        }
        let stats = Stats {
            vocab: u64_at(16),
            train_tokens: u64_at(24),
            val_tokens: u64_at(32),
            train_bytes: u64_at(40),
            val_bytes: u64_at(48),
            unigram_bits_per_byte: f64::from_bits(u64_at(56)),
            fingerprint: header[72..104].try_into().unwrap_or([0; 32]),
        };
        if &header[104..136] != key {
            return Err(bad(
                "built from other files or settings than this corpus's".into()
            ));
        }
        if stats.vocab != vocab as u64 {
            return Err(bad(format!(
                "holds ids of a {}-id vocabulary; the tokenizer has {vocab}",
                stats.vocab
            )));
        }
        let width = u32_at(12) as usize;
        if width != width_for(stats.vocab) {
            return Err(bad(format!(
                "token width {width} does not fit its vocabulary"
            )));
        }
        let skipped_count = u64_at(64);
        let expected = stats
            .train_tokens
            .checked_add(stats.val_tokens)
            .and_then(|t| t.checked_mul(width as u64))
            .and_then(|t| t.checked_add(HEADER_BYTES as u64))
            .and_then(|t| t.checked_add(skipped_count.checked_mul(8)?));
        if expected != Some(len) {
            return Err(bad(format!(
                "{len} bytes where its header promises {} (truncated or overwritten)",
                expected.map_or("more than 2^64".into(), |e| e.to_string())
            )));
        }
        if stats.train_tokens == 0 || stats.val_tokens == 0 {
            return Err(bad("a split holds no tokens".into()));
        }
        let fingerprint = scan(&mut file, &stats, width, path)?;
        if fingerprint != stats.fingerprint {
            return Err(bad(
                "its ids do not match its fingerprint (corrupted)".into()
            ));
        }
        let mut skipped = Vec::with_capacity(skipped_count as usize);
        let mut eight = [0u8; 8];
        for _ in 0..skipped_count {
            file.read_exact(&mut eight).map_err(io)?;
            let i = u64::from_le_bytes(eight);
            skipped.push(
                usize::try_from(i).map_err(|_| bad("a skipped-file position overflows".into()))?,
            );
        }
        // SAFETY: the map is read-only. The file is private to the cache
        // and replaced only by rename, which leaves this inode's contents
        // as they are; a process truncating it in place is outside what
        // this reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if map.len() as u64 != len {
            return Err(bad("changed while it was being opened".into()));
        }
        Ok(Shard {
            map: Arc::new(map),
            wide: width == 4,
            stats,
            skipped,
            path: path.to_path_buf(),
        })
    }
}

/// Reads the ids after the header in bounded blocks (the page cache holds
/// them, not this process), checks each against the vocabulary and
/// returns the fingerprint of the streams.
fn scan(file: &mut File, stats: &Stats, width: usize, path: &Path) -> Result<[u8; 32], DataError> {
    file.seek(SeekFrom::Start(HEADER_BYTES as u64))
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut fp = Fingerprint::new();
    let mut buf = vec![0u8; SCAN_BYTES];
    let mut wide = Vec::with_capacity(SCAN_BYTES * 4 / width);
    for (count, _) in [(stats.train_tokens, 0), (stats.val_tokens, 1)] {
        fp.begin(count);
        let mut left = count as usize * width;
        while left > 0 {
            let n = left.min(SCAN_BYTES);
            file.read_exact(&mut buf[..n])
                .map_err(|source| DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            wide.clear();
            if width == 2 {
                wide.extend(
                    buf[..n]
                        .chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
                );
            } else {
                wide.extend(
                    buf[..n]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            if let Some(&id) = wide.iter().find(|&&id| u64::from(id) >= stats.vocab) {
                return Err(DataError::Shard {
                    path: path.to_path_buf(),
                    message: format!(
                        "holds token id {id}, outside its vocabulary of {}",
                        stats.vocab
                    ),
                });
            }
            fp.ids(&wide);
            left -= n;
        }
    }
    Ok(fp.finish())
}

/// blake3 over both streams, each preceded by its length, ids as 32-bit
/// little-endian: moving a token from one stream to the other changes it.
pub(crate) struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    pub(crate) fn new() -> Self {
        Self(blake3::Hasher::new_derive_key(
            "pipewright corpus token streams v1",
        ))
    }
    pub(crate) fn begin(&mut self, len: u64) {
        self.0.update(&len.to_le_bytes());
    }
    pub(crate) fn ids(&mut self, ids: &[u32]) {
        if cfg!(target_endian = "little") {
            self.0.update(bytemuck::cast_slice(ids));
        } else {
            for id in ids {
                self.0.update(&id.to_le_bytes());
            }
        }
    }
    pub(crate) fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// Writes a shard: ids arrive per side, in order; `finish` adds the
/// header and renames the file into place.
pub(crate) struct Writer {
    dir: PathBuf,
    width: usize,
    vocab: u64,
    /// The shard being written (training ids go straight in) and a file
    /// for the validation ids, appended at the end.
    files: [(tempfile::NamedTempFile, u64); 2],
    outs: [Option<BufWriter<File>>; 2],
}

impl Writer {
    /// A writer of a shard in `dir` (temporary files there, unique names).
    pub(crate) fn new(dir: &Path, vocab: usize) -> Result<Writer, DataError> {
        let io = |source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let make = || {
            tempfile::Builder::new()
                .prefix(".tmp-")
                .suffix(".tokens")
                .tempfile_in(dir)
        };
        let (main, val) = (make().map_err(io)?, make().map_err(io)?);
        let mut main_out = BufWriter::with_capacity(1 << 20, main.reopen().map_err(io)?);
        main_out.write_all(&[0u8; HEADER_BYTES]).map_err(io)?;
        let val_out = BufWriter::with_capacity(1 << 20, val.reopen().map_err(io)?);
        Ok(Writer {
            dir: dir.to_path_buf(),
            width: width_for(vocab as u64),
            vocab: vocab as u64,
            files: [(main, 0), (val, 0)],
            outs: [Some(main_out), Some(val_out)],
        })
    }

    /// Appends ids to `side` (0 training, 1 validation).
    pub(crate) fn push(&mut self, side: usize, ids: &[u32]) -> Result<(), DataError> {
        if let Some(&id) = ids.iter().find(|&&id| u64::from(id) >= self.vocab) {
            return Err(DataError::TokenId {
                id,
                vocab_size: self.vocab as usize,
            });
        }
        let path = self.files[side].0.path().to_path_buf();
        let out = self.outs[side].as_mut().ok_or_else(|| DataError::Shard {
            path: path.clone(),
            message: "written after it was finished".into(),
        })?;
        let io = |source| DataError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = Vec::with_capacity(ids.len() * self.width);
        if self.width == 2 {
            bytes.extend(ids.iter().flat_map(|&id| (id as u16).to_le_bytes()));
        } else {
            bytes.extend(ids.iter().flat_map(|&id| id.to_le_bytes()));
        }
        out.write_all(&bytes).map_err(io)?;
        self.files[side].1 += ids.len() as u64;
        Ok(())
    }

    /// Ids written so far to `side`.
    pub(crate) fn count(&self, side: usize) -> u64 {
        self.files[side].1
    }

    /// Completes the shard and renames it to `path`, replacing any file
    /// there (readers holding the old one keep reading it).
    pub(crate) fn finish(
        mut self,
        path: &Path,
        key: &[u8; 32],
        stats: &mut Stats,
        skipped: &[usize],
    ) -> Result<(), DataError> {
        let [main_out, val_out] = [self.outs[0].take(), self.outs[1].take()];
        let [(main, train_tokens), (val, val_tokens)] = self.files;
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DataError::Io { path: p, source }
        };
        let flush = |out: Option<BufWriter<File>>, p: &Path| -> Result<File, DataError> {
            let out = out.ok_or_else(|| DataError::Shard {
                path: p.to_path_buf(),
                message: "finished twice".into(),
            })?;
            out.into_inner().map_err(|e| DataError::Io {
                path: p.to_path_buf(),
                source: e.into_error(),
            })
        };
        let mut main_file = flush(main_out, main.path())?;
        drop(flush(val_out, val.path())?);
        let mut val_file = File::open(val.path()).map_err(io(val.path()))?;
        std::io::copy(&mut val_file, &mut main_file).map_err(io(main.path()))?;
        drop(val_file);
        drop(val);
        let mut tail = Vec::with_capacity(skipped.len() * 8);
        for &i in skipped {
            tail.extend((i as u64).to_le_bytes());
        }
        main_file.write_all(&tail).map_err(io(main.path()))?;
        stats.vocab = self.vocab;
        stats.train_tokens = train_tokens;
        stats.val_tokens = val_tokens;
        stats.fingerprint = scan(&mut main_file, stats, self.width, main.path())?;
        let mut header = [0u8; HEADER_BYTES];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(self.width as u32).to_le_bytes());
        for (at, v) in [
            (16, stats.vocab),
            (24, stats.train_tokens),
            (32, stats.val_tokens),
            (40, stats.train_bytes),
            (48, stats.val_bytes),
            (56, stats.unigram_bits_per_byte.to_bits()),
            (64, skipped.len() as u64),
        ] {
            header[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        header[72..104].copy_from_slice(&stats.fingerprint);
        header[104..136].copy_from_slice(key);
        main_file
            .seek(SeekFrom::Start(0))
            .and_then(|_| main_file.write_all(&header))
            .and_then(|()| main_file.sync_all())
            .map_err(io(main.path()))?;
        drop(main_file);
        main.persist(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}
