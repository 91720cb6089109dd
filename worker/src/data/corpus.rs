//! The corpus: which files, how they split into training and validation
//! text, and the token streams of both.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use pipewright_spec::DataSpec;
use rayon::prelude::*;

use super::{DataError, Tokenizer};

/// Texts are tokenized in pieces of about this many bytes, in parallel.
const PIECE_BYTES: usize = 64 * 1024;
/// Largest validation chunk cut out of a long file.
const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// Smallest validation chunk, so tiny corpora are not cut into crumbs.
const MIN_CHUNK_BYTES: usize = 32;

/// Training and validation token streams of a corpus, with the statistics
/// that metrics and checkpoints need.
///
/// Both streams are non-empty by construction.
#[derive(Clone, Debug)]
pub struct Corpus {
    files: Vec<PathBuf>,
    skipped: Vec<PathBuf>,
    train: Vec<u32>,
    val: Vec<u32>,
    train_bytes: u64,
    val_bytes: u64,
    unigram_bits_per_byte: f64,
    fingerprint: [u8; 32],
}

impl Corpus {
    /// Reads the files that `spec` names (see [`resolve_files`]), holds out
    /// about `validationFraction` of the bytes for validation, and tokenizes
    /// both parts.
    ///
    /// Each file is a document; documents are joined with a newline (one is
    /// added only where a document does not already end with one). When
    /// every file is small next to the validation share, whole files go to
    /// validation; otherwise files are cut into chunks at line boundaries
    /// and chunks go. Which ones is decided by the blake3 hash of their
    /// content, so the split depends on neither the order of
    /// `data.sources` nor the order of files on disk, and identical texts
    /// always land on the same side. Files that are not UTF-8 text (invalid
    /// UTF-8 or NUL bytes) are skipped and listed in [`Corpus::skipped_files`].
    pub fn load(spec: &DataSpec, tokenizer: &Tokenizer) -> Result<Corpus, DataError> {
        let fraction = spec.validation_fraction;
        if !(fraction > 0.0 && fraction <= 0.5) {
            return Err(DataError::InvalidField {
                field: "data.validationFraction",
                message: format!("{fraction} is outside (0, 0.5]"),
            });
        }
        let paths = resolve_files(spec)?;
        let texts = paths
            .par_iter()
            .map(|p| read_text(p))
            .collect::<Result<Vec<_>, _>>()?;

        let mut files = Vec::new();
        let mut skipped = Vec::new();
        let mut documents = Vec::new();
        for (path, text) in paths.into_iter().zip(texts) {
            match text {
                Some(text) => {
                    files.push(path);
                    if !text.is_empty() {
                        documents.push(text);
                    }
                }
                None => skipped.push(path),
            }
        }
        if documents.is_empty() {
            return Err(DataError::EmptyCorpus {
                skipped: skipped.len(),
            });
        }
        let (train_text, val_text) = split_documents(&documents, fraction)?;
        drop(documents);
        let mut corpus = Self::from_streams(&train_text, &val_text, tokenizer)?;
        corpus.files = files;
        corpus.skipped = skipped;
        Ok(corpus)
    }

    /// A corpus from texts already split, for callers that hold text in
    /// memory rather than in files. `train_text` and `val_text` are
    /// tokenized as single documents.
    pub fn from_texts(
        train_text: &str,
        val_text: &str,
        tokenizer: &Tokenizer,
    ) -> Result<Corpus, DataError> {
        let train = Stream::whole(train_text);
        let val = Stream::whole(val_text);
        Self::from_streams(&train, &val, tokenizer)
    }

    fn from_streams(
        train_text: &Stream,
        val_text: &Stream,
        tokenizer: &Tokenizer,
    ) -> Result<Corpus, DataError> {
        let (train, val) = rayon::join(
            || encode_stream(tokenizer, train_text, PIECE_BYTES),
            || encode_stream(tokenizer, val_text, PIECE_BYTES),
        );
        let (train, val) = (train?, val?);
        if train.is_empty() {
            return Err(DataError::EmptySplit { split: "training" });
        }
        if val.is_empty() {
            return Err(DataError::EmptySplit {
                split: "validation",
            });
        }
        let fingerprint = fingerprint(&train, &val);
        Ok(Corpus {
            files: Vec::new(),
            skipped: Vec::new(),
            train_bytes: train_text.text.len() as u64,
            val_bytes: val_text.text.len() as u64,
            unigram_bits_per_byte: unigram_bits_per_byte(train_text.text.as_bytes()),
            train,
            val,
            fingerprint,
        })
    }

    /// Token stream of the training split.
    pub fn train_tokens(&self) -> &[u32] {
        &self.train
    }

    /// Token stream of the validation split.
    pub fn val_tokens(&self) -> &[u32] {
        &self.val
    }

    /// UTF-8 bytes of training text (the denominator of bits per byte).
    pub fn train_bytes(&self) -> u64 {
        self.train_bytes
    }

    /// UTF-8 bytes of validation text (the denominator of bits per byte).
    pub fn val_bytes(&self) -> u64 {
        self.val_bytes
    }

    /// The text files the corpus was read from, sorted.
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
        for (stream, tokens) in [("training", &self.train), ("validation", &self.val)] {
            if tokens.len() < needed {
                return Err(DataError::StreamTooShort {
                    stream,
                    tokens: tokens.len(),
                    needed,
                });
            }
        }
        Ok(())
    }
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
        files.extend(matched.into_iter().filter(|p| !excluded(p)));
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

/// Reads a file as text: `None` when it is not UTF-8 or holds NUL bytes
/// (binary data that happens to decode, such as UTF-16 or index files).
pub(crate) fn read_text(path: &Path) -> Result<Option<String>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.contains(&0) {
        return Ok(None);
    }
    Ok(String::from_utf8(bytes).ok())
}

/// A text with the offsets where its documents start: tokenizers that cannot
/// be cut at line starts are run document by document.
struct Stream {
    text: String,
    doc_starts: Vec<usize>,
}

impl Stream {
    fn whole(text: &str) -> Self {
        Self {
            text: text.to_string(),
            doc_starts: vec![0],
        }
    }
}

/// A byte range of one document that goes to one side of the split.
#[derive(Clone, Copy)]
struct Unit {
    doc: usize,
    start: usize,
    end: usize,
}

/// Splits documents into (training, validation) text so that about
/// `fraction` of the bytes land in validation.
fn split_documents(documents: &[String], fraction: f64) -> Result<(Stream, Stream), DataError> {
    let total: u64 = documents.iter().map(|d| d.len() as u64).sum();
    let target = fraction * total as f64;
    let largest = documents.iter().map(String::len).max().unwrap_or(0);
    // Whole files keep validation text unseen in any form during training,
    // but they can only hit the fraction when each is small next to it.
    let units: Vec<Unit> = if largest as f64 <= target / 4.0 {
        documents
            .iter()
            .enumerate()
            .map(|(doc, d)| Unit {
                doc,
                start: 0,
                end: d.len(),
            })
            .collect()
    } else {
        let chunk = ((target / 8.0) as usize).clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES);
        documents
            .iter()
            .enumerate()
            .flat_map(|(doc, d)| {
                chunk_ranges(d, chunk)
                    .into_iter()
                    .map(move |(start, end)| Unit { doc, start, end })
            })
            .collect()
    };

    // Visit units in the order of their content hash and take each one that
    // brings validation closer to the target. The hash order is a fixed
    // pseudo-random order that ignores paths and file order.
    let text = |u: &Unit| &documents[u.doc].as_bytes()[u.start..u.end];
    let mut order: Vec<(u64, usize)> = units
        .par_iter()
        .enumerate()
        .map(|(i, u)| (hash64(text(u)), i))
        .collect();
    order.sort_unstable();
    let mut in_val = vec![false; units.len()];
    let mut val_bytes = 0u64;
    for &(_, i) in &order {
        let len = (units[i].end - units[i].start) as u64;
        if val_bytes as f64 + len as f64 / 2.0 <= target {
            in_val[i] = true;
            val_bytes += len;
        }
    }
    if val_bytes == 0 || val_bytes == total {
        return Err(DataError::CorpusTooSmall {
            bytes: total,
            fraction,
        });
    }

    // Where the last unit appended to each side ended, to tell a chunk that
    // continues its predecessor from the start of another document.
    let mut last_end: [Option<(usize, usize)>; 2] = [None, None];
    let mut streams = [
        Stream {
            text: String::with_capacity((total - val_bytes) as usize + units.len()),
            doc_starts: Vec::new(),
        },
        Stream {
            text: String::with_capacity(val_bytes as usize + units.len()),
            doc_starts: Vec::new(),
        },
    ];
    for (unit, &val) in units.iter().zip(&in_val) {
        let side = usize::from(val);
        let stream = &mut streams[side];
        let continues = last_end[side] == Some((unit.doc, unit.start));
        if !continues {
            if !stream.text.is_empty() && !stream.text.ends_with('\n') {
                stream.text.push('\n');
            }
            stream.doc_starts.push(stream.text.len());
        }
        stream
            .text
            .push_str(&documents[unit.doc][unit.start..unit.end]);
        last_end[side] = Some((unit.doc, unit.end));
    }
    let [train, val] = streams;
    Ok((train, val))
}

/// Cuts `text` into pieces of at least `chunk` bytes ending at a newline,
/// or hard at a character boundary when a line runs past twice that.
fn chunk_ranges(text: &str, chunk: usize) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        if bytes.len() - start <= chunk {
            ranges.push((start, bytes.len()));
            break;
        }
        let want = start + chunk;
        let limit = (start + 2 * chunk).min(bytes.len());
        let end = match bytes[want - 1..limit].iter().position(|&b| b == b'\n') {
            Some(p) => want + p,
            None if limit == bytes.len() => limit,
            None => {
                let mut e = want;
                while !text.is_char_boundary(e) {
                    e -= 1;
                }
                e
            }
        };
        ranges.push((start, end));
        start = end;
    }
    ranges
}

/// Tokenizes a stream. Cut points are chosen so that the ids equal those of
/// encoding each document whole: at line starts for tokenizers that allow
/// it (then ids equal those of encoding the whole stream), else at
/// document starts.
fn encode_stream(
    tokenizer: &Tokenizer,
    stream: &Stream,
    piece_bytes: usize,
) -> Result<Vec<u32>, DataError> {
    if let Tokenizer::Byte = tokenizer {
        return tokenizer.encode(&stream.text);
    }
    let text = &stream.text;
    let cuts: Vec<usize> = if tokenizer.splits_at_line_starts() {
        line_start_cuts(text.as_bytes(), piece_bytes)
    } else {
        stream
            .doc_starts
            .iter()
            .copied()
            .filter(|&c| c > 0)
            .collect()
    };
    let bounds: Vec<(usize, usize)> = std::iter::once(0)
        .chain(cuts.iter().copied())
        .zip(cuts.iter().copied().chain(std::iter::once(text.len())))
        .filter(|(a, b)| a < b)
        .collect();
    let pieces = bounds
        .par_iter()
        .map(|&(a, b)| tokenizer.encode(&text[a..b]))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pieces.concat())
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

/// First 8 bytes of the blake3 hash, as an ordering key.
fn hash64(bytes: &[u8]) -> u64 {
    let hash = blake3::hash(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// −Σ p·log2 p over the byte frequencies of `bytes`.
fn unigram_bits_per_byte(bytes: &[u8]) -> f64 {
    let counts = bytes
        .par_chunks(1 << 20)
        .map(|chunk| {
            let mut counts = [0u64; 256];
            for &b in chunk {
                counts[b as usize] += 1;
            }
            counts
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        );
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// blake3 over both streams with their lengths, so that moving a token from
/// one stream to the other changes it.
fn fingerprint(train: &[u32], val: &[u32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("pipewright corpus token streams v1");
    for stream in [train, val] {
        hasher.update(&(stream.len() as u64).to_le_bytes());
        let mut buf = Vec::with_capacity(4 * 4096);
        for chunk in stream.chunks(4096) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
            hasher.update(&buf);
        }
    }
    *hasher.finalize().as_bytes()
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
        let train = Tokenizer::Byte.decode(c.train_tokens()).unwrap();
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
        let tok = Tokenizer::from_spec(&tok_spec, &files).unwrap();
        let text = format!(
            "{}  trailing spaces  \n\n\n  indented\n\té tab\r\nwindows 日本\n{}",
            prose(9, 3000),
            prose(10, 3000)
        );
        let cuts = line_start_cuts(text.as_bytes(), 40);
        assert!(cuts.len() > 50);
        let stream = Stream::whole(&text);
        assert_eq!(
            encode_stream(&tok, &stream, 40).unwrap(),
            tok.encode(&text).unwrap()
        );

        // Loading with BPE keeps every byte: the streams decode to exactly
        // the counted bytes.
        let mut s = spec(&[dir.path()], &[], 0.1);
        s.tokenizer = tok_spec;
        let c = Corpus::load(&s, &tok).unwrap();
        let train = tok.decode(c.train_tokens()).unwrap();
        let val = tok.decode(c.val_tokens()).unwrap();
        assert_eq!(
            (train.len() as u64, val.len() as u64),
            (c.train_bytes(), c.val_bytes())
        );
        assert!(c.train_tokens().len() < c.train_bytes() as usize / 2);
    }
}
