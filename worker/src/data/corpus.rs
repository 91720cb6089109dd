//! The corpus: which files, how they split into training and validation
//! text, and the token streams of both — tokenized once into a token shard
//! on disk and read back through a memory map.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pipewright_spec::DataSpec;
use rayon::prelude::*;

use super::cache::Prepared;
use super::shard::{Fingerprint, Shard, Stats, Tokens, Writer};
use super::split::{Plan, SideSink, TRAIN};
use super::{DataError, Tokenizer};

/// Texts are tokenized in pieces of about this many bytes, in parallel.
const PIECE_BYTES: usize = 64 * 1024;
/// Text gathered before a batch of pieces is tokenized.
const BATCH_BYTES: usize = 8 << 20;
/// Name of the cache directory beside the data; never read as corpus.
pub(crate) const CACHE_DIR_NAME: &str = ".pipewright-cache";

/// Training and validation token streams of a corpus, with the statistics
/// that metrics and checkpoints need.
///
/// Both streams are non-empty by construction. A corpus loaded from files
/// reads its ids from a memory-mapped token shard, so cloning it is cheap
/// and its pages belong to the page cache, not to the process.
#[derive(Clone, Debug)]
pub struct Corpus {
    files: Vec<PathBuf>,
    skipped: Vec<PathBuf>,
    store: Store,
    train_bytes: u64,
    val_bytes: u64,
    unigram_bits_per_byte: f64,
    fingerprint: [u8; 32],
}

#[derive(Clone, Debug)]
enum Store {
    Memory {
        train: Arc<Vec<u32>>,
        val: Arc<Vec<u32>>,
    },
    Shard(Shard),
}

impl Corpus {
    /// Reads the files that `spec` names (see [`resolve_files`]), holds out
    /// about `validationFraction` of the bytes for validation, and tokenizes
    /// both parts with `tokenizer` — or opens the token shard a previous
    /// call wrote for the same files, settings and tokenizer (see
    /// `docs/data.md`).
    ///
    /// Each document (a text file, a JSON Lines record, a Parquet row) is
    /// joined to the previous one with a newline (one is added only where a
    /// document does not already end with one). When every document is
    /// small next to the validation share, whole documents go to
    /// validation; otherwise documents are cut into chunks at line
    /// boundaries and chunks go. Which ones is decided by the blake3 hash
    /// of their content, so the split depends on neither the order of
    /// `data.sources` nor the order of files on disk, and identical texts
    /// always land on the same side. Text files that are not UTF-8 text
    /// (invalid UTF-8 or NUL bytes) are skipped and listed in
    /// [`Corpus::skipped_files`]. Files are streamed: memory does not grow
    /// with the corpus.
    pub fn load(spec: &DataSpec, tokenizer: &Tokenizer) -> Result<Corpus, DataError> {
        Prepared::new(spec)?.corpus(tokenizer)
    }

    /// The corpus of an open shard; `resolved` is the file list it was
    /// built from.
    pub(crate) fn from_shard(shard: Shard, resolved: &[PathBuf]) -> Corpus {
        let skipped: HashSet<usize> = shard.skipped.iter().copied().collect();
        let (files, skipped) = resolved
            .iter()
            .enumerate()
            .partition::<Vec<_>, _>(|(i, _)| !skipped.contains(i));
        let strip = |v: Vec<(usize, &PathBuf)>| v.into_iter().map(|(_, p)| p.clone()).collect();
        Corpus {
            files: strip(files),
            skipped: strip(skipped),
            train_bytes: shard.stats.train_bytes,
            val_bytes: shard.stats.val_bytes,
            unigram_bits_per_byte: shard.stats.unigram_bits_per_byte,
            fingerprint: shard.stats.fingerprint,
            store: Store::Shard(shard),
        }
    }

    /// A corpus from texts already split, for callers that hold text in
    /// memory rather than in files. `train_text` and `val_text` are
    /// tokenized as single documents.
    pub fn from_texts(
        train_text: &str,
        val_text: &str,
        tokenizer: &Tokenizer,
    ) -> Result<Corpus, DataError> {
        let encode = |text: &str| -> Result<Vec<u32>, DataError> {
            let mut ids = Vec::new();
            let mut enc = Encoder::new(tokenizer);
            enc.doc_start();
            enc.push(text, &mut |t| {
                ids.extend_from_slice(t);
                Ok(())
            })?;
            enc.finish(&mut |t| {
                ids.extend_from_slice(t);
                Ok(())
            })?;
            Ok(ids)
        };
        let (train, val) = rayon::join(|| encode(train_text), || encode(val_text));
        let (train, val) = (train?, val?);
        if train.is_empty() {
            return Err(DataError::EmptySplit { split: "training" });
        }
        if val.is_empty() {
            return Err(DataError::EmptySplit {
                split: "validation",
            });
        }
        let mut fp = Fingerprint::new();
        for stream in [&train, &val] {
            fp.begin(stream.len() as u64);
            fp.ids(stream);
        }
        let mut counts = [0u64; 256];
        for &b in train_text.as_bytes() {
            counts[b as usize] += 1;
        }
        Ok(Corpus {
            files: Vec::new(),
            skipped: Vec::new(),
            train_bytes: train_text.len() as u64,
            val_bytes: val_text.len() as u64,
            unigram_bits_per_byte: unigram_bits_per_byte(&counts),
            fingerprint: fp.finish(),
            store: Store::Memory {
                train: Arc::new(train),
                val: Arc::new(val),
            },
        })
    }

    /// Token stream of the training split.
    pub fn train_tokens(&self) -> Tokens<'_> {
        match &self.store {
            Store::Memory { train, .. } => Tokens::U32(train),
            Store::Shard(s) => s.train(),
        }
    }

    /// Token stream of the validation split.
    pub fn val_tokens(&self) -> Tokens<'_> {
        match &self.store {
            Store::Memory { val, .. } => Tokens::U32(val),
            Store::Shard(s) => s.val(),
        }
    }

    /// The token shard the streams are read from (none for a corpus made
    /// from texts in memory).
    pub fn shard_path(&self) -> Option<&Path> {
        match &self.store {
            Store::Memory { .. } => None,
            Store::Shard(s) => Some(&s.path),
        }
    }

    /// UTF-8 bytes of training text (the denominator of bits per byte).
    pub fn train_bytes(&self) -> u64 {
        self.train_bytes
    }

    /// UTF-8 bytes of validation text (the denominator of bits per byte).
    pub fn val_bytes(&self) -> u64 {
        self.val_bytes
    }

    /// The files the corpus was read from, sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Files that matched the sources but were skipped as not UTF-8 text.
    pub fn skipped_files(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// Order-0 entropy of the training text, in bits per byte: what a model
    /// that knows only byte frequencies achieves. A trained model's
    /// validation bits per byte should end well below it.
    pub fn unigram_bits_per_byte(&self) -> f64 {
        self.unigram_bits_per_byte
    }

    /// blake3 of both token streams, recorded in checkpoints so that a
    /// resumed run can tell whether its data changed.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Checks that both streams hold at least one window of `seq_len + 1`
    /// tokens. Call it once before training: [`super::sample_train`] and
    /// [`super::val_batches`] never fail and instead read a too-short stream
    /// cyclically.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), DataError> {
        let needed = seq_len.saturating_add(1);
        for (stream, tokens) in [
            ("training", self.train_tokens().len()),
            ("validation", self.val_tokens().len()),
        ] {
            if tokens < needed {
                return Err(DataError::StreamTooShort {
                    stream,
                    tokens,
                    needed,
                });
            }
        }
        Ok(())
    }
}

/// Tokenizes the split of `plan` into a shard at `path`, streaming: each
/// side's text passes through in bounded batches.
pub(crate) fn build_shard(
    plan: &Plan,
    reading: &super::source::Reading,
    tokenizer: &Tokenizer,
    dir: &Path,
    path: &Path,
    key: &[u8; 32],
) -> Result<(), DataError> {
    let sink = TokenSink {
        enc: [Encoder::new(tokenizer), Encoder::new(tokenizer)],
        writer: Writer::new(dir, tokenizer.vocab_size())?,
        bytes: [0, 0],
        counts: Box::new([0; 256]),
    };
    let mut sink = super::split::Router::run(plan, reading, sink)?;
    for side in 0..2 {
        let writer = &mut sink.writer;
        sink.enc[side].finish(&mut |ids| writer.push(side, ids))?;
    }
    if sink.writer.count(0) == 0 {
        return Err(DataError::EmptySplit { split: "training" });
    }
    if sink.writer.count(1) == 0 {
        return Err(DataError::EmptySplit {
            split: "validation",
        });
    }
    let mut stats = Stats {
        vocab: 0,
        train_tokens: 0,
        val_tokens: 0,
        train_bytes: sink.bytes[0],
        val_bytes: sink.bytes[1],
        unigram_bits_per_byte: unigram_bits_per_byte(&sink.counts),
        fingerprint: [0; 32],
    };
    sink.writer.finish(path, key, &mut stats, &plan.skipped)
}

/// Both sides of the split on their way into a shard.
struct TokenSink<'t> {
    enc: [Encoder<'t>; 2],
    writer: Writer,
    bytes: [u64; 2],
    counts: Box<[u64; 256]>,
}

impl SideSink for TokenSink<'_> {
    fn doc_start(&mut self, side: usize) -> Result<(), DataError> {
        self.enc[side].doc_start();
        Ok(())
    }
    fn text(&mut self, side: usize, piece: &str) -> Result<(), DataError> {
        self.bytes[side] += piece.len() as u64;
        if side == TRAIN {
            for &b in piece.as_bytes() {
                self.counts[b as usize] += 1;
            }
        }
        let writer = &mut self.writer;
        self.enc[side].push(piece, &mut |ids| writer.push(side, ids))
    }
}

/// Tokenizes one side's text as it streams by, in batches whose pieces are
/// encoded in parallel. Cut points are chosen so that the ids equal those
/// of encoding each document whole: at line starts for tokenizers that
/// allow it (then ids equal those of encoding the whole side), else at
/// document starts.
struct Encoder<'t> {
    tokenizer: &'t Tokenizer,
    lines: bool,
    buf: String,
    /// Document starts inside `buf` (after its first byte).
    doc_starts: Vec<usize>,
    /// Length `buf` must reach before the next attempt to cut it.
    next_try: usize,
    /// Bytes between line cuts, and bytes gathered before a batch.
    piece: usize,
    batch: usize,
}

type Emit<'a> = dyn FnMut(&[u32]) -> Result<(), DataError> + 'a;

impl<'t> Encoder<'t> {
    fn new(tokenizer: &'t Tokenizer) -> Self {
        Self::with_sizes(tokenizer, PIECE_BYTES, BATCH_BYTES)
    }

    fn with_sizes(tokenizer: &'t Tokenizer, piece: usize, batch: usize) -> Self {
        Self {
            tokenizer,
            lines: tokenizer.splits_at_line_starts(),
            buf: String::new(),
            doc_starts: Vec::new(),
            next_try: batch,
            piece,
            batch,
        }
    }

    fn doc_start(&mut self) {
        if !self.buf.is_empty() {
            self.doc_starts.push(self.buf.len());
        }
    }

    fn push(&mut self, piece: &str, emit: &mut Emit<'_>) -> Result<(), DataError> {
        if let Tokenizer::Byte = self.tokenizer {
            let ids: Vec<u32> = piece.bytes().map(u32::from).collect();
            return emit(&ids);
        }
        self.buf.push_str(piece);
        if self.buf.len() >= self.next_try {
            self.encode_batch(false, emit)?;
            self.next_try = (self.buf.len() + self.batch).max(2 * self.buf.len());
        }
        Ok(())
    }

    fn finish(&mut self, emit: &mut Emit<'_>) -> Result<(), DataError> {
        self.encode_batch(true, emit)
    }

    /// Encodes the text up to the last cut point (all of it when `last`).
    fn encode_batch(&mut self, last: bool, emit: &mut Emit<'_>) -> Result<(), DataError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut cuts = if self.lines {
            line_start_cuts(self.buf.as_bytes(), self.piece)
        } else {
            std::mem::take(&mut self.doc_starts)
        };
        let end = if last {
            cuts.push(self.buf.len());
            self.buf.len()
        } else {
            match cuts.last() {
                Some(&c) => c,
                None => return Ok(()),
            }
        };
        let bounds: Vec<(usize, usize)> = std::iter::once(0)
            .chain(cuts.iter().copied())
            .zip(cuts.iter().copied())
            .filter(|(a, b)| a < b)
            .collect();
        let text = &self.buf;
        let tokenizer = self.tokenizer;
        let pieces = bounds
            .par_iter()
            .map(|&(a, b)| tokenizer.encode(&text[a..b]))
            .collect::<Result<Vec<_>, _>>()?;
        for ids in &pieces {
            emit(ids)?;
        }
        self.buf.drain(..end);
        self.doc_starts.clear();
        self.next_try = self.batch;
        Ok(())
    }
}

/// −Σ p·log2 p over byte frequencies.
fn unigram_bits_per_byte(counts: &[u64; 256]) -> f64 {
    let n = counts.iter().sum::<u64>() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// The files that `data.sources` and `data.exclude` select, sorted by path
/// with duplicates (the same file reached twice, e.g. via a symlink)
/// removed.
///
/// A source is a file, a directory (walked recursively, following symlinks;
/// entries whose names start with `.` are left out, as version-control
/// folders are not text) or a glob pattern. An exclude pattern drops a file
/// when it matches the file's full path or its file name. A source that
/// matches nothing, or only excluded files, is an error naming it.
pub fn resolve_files(spec: &DataSpec) -> Result<Vec<PathBuf>, DataError> {
    let excludes = spec
        .exclude
        .iter()
        .enumerate()
        .map(|(i, p)| {
            glob::Pattern::new(p).map_err(|e| DataError::Pattern {
                field: format!("data.exclude[{i}]"),
                pattern: p.clone(),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let excluded = |path: &Path| {
        let name = path.file_name().map(|n| n.to_string_lossy());
        excludes.iter().any(|pattern| {
            pattern.matches_path(path) || name.as_deref().is_some_and(|n| pattern.matches(n))
        })
    };

    let mut files = Vec::new();
    for (index, source) in spec.sources.iter().enumerate() {
        let matched = expand_source(index, source)?;
        if matched.is_empty() {
            return Err(DataError::SourceNotFound {
                index,
                source_entry: source.clone(),
            });
        }
        let before = files.len();
        files.extend(
            matched
                .into_iter()
                .filter(|p| !excluded(p) && !in_cache_dir(p)),
        );
        if files.len() == before {
            return Err(DataError::SourceAllExcluded {
                index,
                source_entry: source.clone(),
            });
        }
    }
    files.sort();
    files.dedup();
    let mut seen = HashSet::new();
    let mut unique = Vec::with_capacity(files.len());
    for path in files {
        let canonical = std::fs::canonicalize(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        if seen.insert(canonical) {
            unique.push(path);
        }
    }
    Ok(unique)
}

/// Whether `path` lies in a token cache directory (a glob may reach one).
fn in_cache_dir(path: &Path) -> bool {
    path.components()
        .any(|c| c.as_os_str() == std::ffi::OsStr::new(CACHE_DIR_NAME))
}

/// The files one `data.sources` entry stands for (possibly none).
fn expand_source(index: usize, source: &str) -> Result<Vec<PathBuf>, DataError> {
    let path = Path::new(source);
    let mut out = Vec::new();
    let mut visited = HashSet::new();
    if path.is_file() {
        out.push(path.to_path_buf());
    } else if path.is_dir() {
        walk(path, &mut visited, &mut out)?;
    } else if source.contains(['*', '?', '[']) {
        let entries = glob::glob(source).map_err(|e| DataError::Pattern {
            field: format!("data.sources[{index}]"),
            pattern: source.to_string(),
            message: e.to_string(),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::Io {
                path: e.path().to_path_buf(),
                source: std::io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            if entry.is_file() {
                out.push(entry);
            } else if entry.is_dir() {
                walk(&entry, &mut visited, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Collects the files under `dir` in name order. `visited` holds canonical
/// directories already walked, so a symlink loop ends instead of recursing
/// forever.
fn walk(
    dir: &Path,
    visited: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if !visited.insert(std::fs::canonicalize(dir).map_err(io)?) {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        // `metadata` follows symlinks; a dangling link is not a file.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, visited, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Offsets of `\n` bytes preceded by a printable ASCII character, at least
/// `piece_bytes` apart: points where the GPT-2 split pattern always ends a
/// pre-token, so cutting there changes no id.
fn line_start_cuts(bytes: &[u8], piece_bytes: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut from = piece_bytes.max(1);
    while from < bytes.len() {
        let found = bytes[from..]
            .iter()
            .enumerate()
            .find(|&(i, &b)| b == b'\n' && (0x21..=0x7E).contains(&bytes[from + i - 1]))
            .map(|(i, _)| from + i);
        match found {
            Some(cut) => {
                cuts.push(cut);
                from = cut + piece_bytes.max(1);
            }
            None => break,
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipewright_spec::{TokenizerKind, TokenizerSpec};

    fn spec(sources: &[&Path], exclude: &[&str], fraction: f64) -> DataSpec {
        DataSpec {
            sources: sources.iter().map(|p| p.display().to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            validation_fraction: fraction,
            tokenizer: TokenizerSpec::default(),
            format: None,
            text_field: None,
            cache_dir: None,
        }
    }

    /// Deterministic, varied English-like text of about `bytes` bytes,
    /// ending with a newline.
    fn prose(seed: u64, bytes: usize) -> String {
        let words = [
            "stage", "replica", "gradient", "the", "of", "pipeline", "token", "a", "shard", "loss",
            "worker", "is", "schedule", "and", "ledger", "to", "batch", "link",
        ];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = String::new();
        while out.len() < bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push_str(words[(x % words.len() as u64) as usize]);
            out.push(if x.is_multiple_of(13) { '\n' } else { ' ' });
        }
        out.push('\n');
        out
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn val_fraction(c: &Corpus) -> f64 {
        c.val_bytes() as f64 / (c.train_bytes() + c.val_bytes()) as f64
    }

    #[test]
    fn many_files_split_close_to_the_fraction_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for i in 0..60u64 {
            write(
                &a.join(format!("{i:02}.txt")),
                &prose(i, 1000 + 37 * i as usize),
            );
        }
        for i in 0..40u64 {
            write(&b.join(format!("{i:02}.txt")), &prose(100 + i, 800));
        }
        let c = Corpus::load(&spec(&[&a, &b], &[], 0.1), &Tokenizer::Byte).unwrap();
        assert_eq!(c.files().len(), 100);
        assert!(
            (val_fraction(&c) - 0.1).abs() < 0.01,
            "{}",
            val_fraction(&c)
        );
        let swapped = Corpus::load(&spec(&[&b, &a], &[], 0.1), &Tokenizer::Byte).unwrap();
        assert_eq!(swapped.fingerprint(), c.fingerprint());

        // The same contents under names that sort differently land on the
        // same sides.
        let renamed = dir.path().join("renamed");
        for (k, f) in c.files().iter().enumerate() {
            let text = std::fs::read_to_string(f).unwrap();
            write(&renamed.join(format!("{:03}.txt", (k * 37) % 100)), &text);
        }
        let r = Corpus::load(&spec(&[&renamed], &[], 0.1), &Tokenizer::Byte).unwrap();
        assert_eq!(
            (r.train_bytes(), r.val_bytes()),
            (c.train_bytes(), c.val_bytes())
        );
        let mut a_val = c.val_tokens().to_vec();
        let mut r_val = r.val_tokens().to_vec();
        a_val.sort_unstable();
        r_val.sort_unstable();
        assert_eq!(a_val, r_val);
    }

    #[test]
    fn few_large_files_are_split_by_chunks() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("one.txt"), &prose(7, 300_000));
        write(&dir.path().join("two.txt"), &prose(8, 100_000));
        for fraction in [0.02, 0.05, 0.2, 0.5] {
            let c = Corpus::load(&spec(&[dir.path()], &[], fraction), &Tokenizer::Byte).unwrap();
            let got = val_fraction(&c);
            assert!((got - fraction).abs() < 0.1 * fraction, "{fraction}: {got}");
        }
        // A single file without newlines is cut too.
        let single = dir.path().join("single.txt");
        write(&single, &"abcdefghij".repeat(5000));
        let c = Corpus::load(&spec(&[&single], &[], 0.1), &Tokenizer::Byte).unwrap();
        assert!(
            (val_fraction(&c) - 0.1).abs() < 0.01,
            "{}",
            val_fraction(&c)
        );
    }

    #[test]
    fn chunks_of_one_file_rejoin_exactly() {
        // Consecutive chunks of one file on the same side are joined with no
        // separator, so every line of the training text is a line of the file.
        let dir = tempfile::tempdir().unwrap();
        let text = prose(3, 50_000);
        write(&dir.path().join("f.txt"), &text);
        let c = Corpus::load(&spec(&[dir.path()], &[], 0.1), &Tokenizer::Byte).unwrap();
        let train = Tokenizer::Byte.decode(&c.train_tokens().to_vec()).unwrap();
        let lines: HashSet<&str> = text.lines().collect();
        assert!(train.lines().all(|l| lines.contains(l)));
        // At most one newline is added per validation chunk.
        assert!(c.train_bytes() + c.val_bytes() <= text.len() as u64 + 200);
    }

    #[test]
    fn exclude_matches_full_paths_and_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("a.txt"), &prose(1, 3000));
        write(&root.join("b.log"), &prose(2, 3000));
        write(&root.join("sub/c.txt"), &prose(3, 3000));
        write(&root.join("sub/d.txt"), &prose(4, 3000));
        write(&root.join(".git/config"), "[core]\n");
        let names = |s: &DataSpec| -> Vec<String> {
            resolve_files(s)
                .unwrap()
                .iter()
                .map(|p| p.strip_prefix(root).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(
            names(&spec(&[root], &[], 0.1)),
            ["a.txt", "b.log", "sub/c.txt", "sub/d.txt"]
        );
        assert_eq!(
            names(&spec(&[root], &["*.log"], 0.1)),
            ["a.txt", "sub/c.txt", "sub/d.txt"]
        );
        assert_eq!(names(&spec(&[root], &["*/sub/*", "b.*"], 0.1)), ["a.txt"]);
        let glob = root.join("sub/*.txt");
        assert_eq!(names(&spec(&[&glob], &["c.txt"], 0.1)), ["sub/d.txt"]);
        // Overlapping sources do not read a file twice.
        assert_eq!(
            names(&spec(&[&glob, root], &["*.log"], 0.1)),
            ["a.txt", "sub/c.txt", "sub/d.txt"]
        );
    }

    #[test]
    fn bad_sources_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.txt"), &prose(1, 3000));
        let missing = dir.path().join("nope");
        let err = resolve_files(&spec(&[dir.path(), &missing], &[], 0.1)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("data.sources[1]") && msg.contains(&missing.display().to_string()),
            "{msg}"
        );
        let empty_glob = dir.path().join("*.md");
        let err = resolve_files(&spec(&[&empty_glob], &[], 0.1)).unwrap_err();
        assert!(err.to_string().contains("*.md"), "{err}");
        let err = resolve_files(&spec(&[dir.path()], &["a.*"], 0.1)).unwrap_err();
        assert!(
            matches!(err, DataError::SourceAllExcluded { index: 0, .. }),
            "{err}"
        );
        let err = resolve_files(&spec(&[dir.path()], &["[z-"], 0.1)).unwrap_err();
        assert!(err.to_string().contains("data.exclude[0]"), "{err}");
        let err = Corpus::load(&spec(&[dir.path()], &[], 0.7), &Tokenizer::Byte).unwrap_err();
        assert!(err.to_string().contains("data.validationFraction"), "{err}");
    }

    #[test]
    fn binary_files_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("text.txt"), &prose(1, 20_000));
        std::fs::write(dir.path().join("nul.dat"), b"abc\0def").unwrap();
        std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9\n").unwrap();
        let c = Corpus::load(&spec(&[dir.path()], &[], 0.1), &Tokenizer::Byte).unwrap();
        assert_eq!(c.files(), [dir.path().join("text.txt")]);
        assert_eq!(c.skipped_files().len(), 2);

        let bin = tempfile::tempdir().unwrap();
        std::fs::write(bin.path().join("nul.dat"), b"abc\0def").unwrap();
        let err = Corpus::load(&spec(&[bin.path()], &[], 0.1), &Tokenizer::Byte).unwrap_err();
        assert!(
            matches!(err, DataError::EmptyCorpus { skipped: 1 }),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_followed_once_and_loops_end() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        write(&root.join("a.txt"), &prose(1, 3000));
        std::os::unix::fs::symlink(&root, root.join("loop")).unwrap();
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("alias.txt")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
        let files = resolve_files(&spec(&[&root], &[], 0.1)).unwrap();
        assert_eq!(files, [root.join("a.txt")]);
    }

    #[test]
    fn unigram_entropy_of_known_distributions() {
        let t = Tokenizer::Byte;
        let c = Corpus::from_texts(&"ab".repeat(500), "abab", &t).unwrap();
        assert!((c.unigram_bits_per_byte() - 1.0).abs() < 1e-12);
        let c = Corpus::from_texts(&"abcd".repeat(500), "abab", &t).unwrap();
        assert!((c.unigram_bits_per_byte() - 2.0).abs() < 1e-12);
        let c = Corpus::from_texts(&"aaab".repeat(500), "abab", &t).unwrap();
        let expected = -(0.75f64 * 0.75f64.log2() + 0.25 * 0.25f64.log2());
        assert!((c.unigram_bits_per_byte() - expected).abs() < 1e-12);
        let c = Corpus::from_texts("zzzz", "z", &t).unwrap();
        assert_eq!(c.unigram_bits_per_byte(), 0.0);
        assert_eq!((c.train_bytes(), c.val_bytes()), (4, 1));
        assert!(Corpus::from_texts("", "abc", &t).is_err());
        assert!(Corpus::from_texts("abc", "", &t).is_err());
    }

    #[test]
    fn fingerprint_and_seq_len_check_follow_the_streams() {
        let t = Tokenizer::Byte;
        let a = Corpus::from_texts("hello world", "bye", &t).unwrap();
        let b = Corpus::from_texts("hello world", "bye", &t).unwrap();
        let moved = Corpus::from_texts("hello worl", "dbye", &t).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), moved.fingerprint());
        assert!(a.check_seq_len(2).is_ok());
        let err = a.check_seq_len(3).unwrap_err();
        assert!(
            err.to_string().contains("validation stream holds 3 tokens"),
            "{err}"
        );
        let err = a.check_seq_len(20).unwrap_err();
        assert!(err.to_string().contains("training stream"), "{err}");
    }

    #[test]
    fn bpe_streams_cut_at_line_starts_equal_whole_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for i in 0..3u64 {
            let path = dir.path().join(format!("{i}.txt"));
            write(&path, &prose(i, 40_000));
            files.push(path);
        }
        let tok_spec = TokenizerSpec {
            kind: TokenizerKind::Bpe,
            path: None,
            vocab_size: Some(320),
        };
        let mut s = spec(&[dir.path()], &[], 0.1);
        s.tokenizer = tok_spec;
        let tok = Tokenizer::from_spec(&s).unwrap();
        let text = format!(
            "{}  trailing spaces  \n\n\n  indented\n\té tab\r\nwindows 日本\n{}",
            prose(9, 3000),
            prose(10, 3000)
        );
        let cuts = line_start_cuts(text.as_bytes(), 40);
        assert!(cuts.len() > 50);
        // Streamed in small pieces, cut in small batches: the same ids.
        for (piece, step) in [(40, 7), (40, 1000), (1000, 13)] {
            let mut enc = Encoder::with_sizes(&tok, piece, 300);
            let mut ids = Vec::new();
            let mut emit = |t: &[u32]| {
                ids.extend_from_slice(t);
                Ok(())
            };
            enc.doc_start();
            let mut at = 0;
            while at < text.len() {
                let mut end = (at + step).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                enc.push(&text[at..end], &mut emit).unwrap();
                at = end;
            }
            enc.finish(&mut emit).unwrap();
            assert_eq!(
                ids,
                tok.encode(&text).unwrap(),
                "piece {piece}, step {step}"
            );
        }

        // Loading with BPE keeps every byte: the streams decode to exactly
        // the counted bytes.
        let c = Corpus::load(&s, &tok).unwrap();
        let train = tok.decode(&c.train_tokens().to_vec()).unwrap();
        let val = tok.decode(&c.val_tokens().to_vec()).unwrap();
        assert_eq!(
            (train.len() as u64, val.len() as u64),
            (c.train_bytes(), c.val_bytes())
        );
        assert!(c.train_tokens().len() < c.train_bytes() as usize / 2);
    }
}
