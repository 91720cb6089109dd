//! The training/validation split, decided in streaming passes over the
//! files: nothing here holds more than a bounded piece of any document.
//!
//! Pass one measures every document (bytes, content hash). When every
//! document is small next to the validation share, whole documents are the
//! units of the split; otherwise a second pass cuts each document into
//! chunks at line boundaries and hashes each chunk. Units are visited in
//! the order of their hash and each one that brings validation closer to
//! its target goes there. [`Router`] then replays the files and sends each
//! unit's text to its side.

use std::path::PathBuf;

use super::source::{DocumentSink, Outcome, Reading};
use super::DataError;

/// Largest validation chunk cut out of a long document.
pub(crate) const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// Smallest validation chunk, so tiny corpora are not cut into crumbs.
pub(crate) const MIN_CHUNK_BYTES: usize = 32;

/// Side of the split that trains (index 0; validation is index 1).
pub(crate) const TRAIN: usize = 0;

/// One unit of the split: `len` bytes of document `doc`, following the
/// previous unit of the same document.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unit {
    pub(crate) doc: u64,
    pub(crate) len: u64,
    pub(crate) val: bool,
}

/// The split of a corpus.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Files read, in order.
    pub(crate) files: Vec<PathBuf>,
    /// Positions (in the resolved list) of files skipped as not text.
    pub(crate) skipped: Vec<usize>,
    /// Units in document order.
    pub(crate) units: Vec<Unit>,
}

/// Measures and splits the documents of `paths`.
pub(crate) fn plan(paths: &[PathBuf], reading: &Reading, fraction: f64) -> Result<Plan, DataError> {
    // Pass one: every non-empty document's length and content hash.
    let mut docs = Vec::new();
    let mut skipped = Vec::new();
    let mut files = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let before = docs.len();
        let mut sink = Measure {
            docs: &mut docs,
            len: 0,
            hasher: blake3::Hasher::new(),
        };
        match reading.read(path, &mut sink)? {
            Outcome::Read => files.push(path.clone()),
            Outcome::NotText => {
                docs.truncate(before);
                skipped.push(i);
            }
        }
    }
    if docs.is_empty() {
        return Err(DataError::EmptyCorpus {
            skipped: skipped.len(),
        });
    }
    let total: u64 = docs.iter().map(|d| d.0).sum();
    let target = fraction * total as f64;
    let largest = docs.iter().map(|d| d.0).max().unwrap_or(0);

    // Whole documents keep validation text unseen in any form during
    // training, but they can only hit the fraction when each is small next
    // to it.
    let (mut units, hashes): (Vec<Unit>, Vec<u64>) = if largest as f64 <= target / 4.0 {
        docs.iter()
            .enumerate()
            .map(|(doc, &(len, hash))| {
                (
                    Unit {
                        doc: doc as u64,
                        len,
                        val: false,
                    },
                    hash,
                )
            })
            .unzip()
    } else {
        drop(docs);
        let chunk = ((target / 8.0) as usize).clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES);
        let mut sink = Chunks {
            chunk,
            doc: 0,
            buf: Vec::new(),
            units: Vec::new(),
            hashes: Vec::new(),
        };
        for path in &files {
            if reading.read(path, &mut sink)? == Outcome::NotText {
                return Err(changed(path));
            }
        }
        (sink.units, sink.hashes)
    };

    // Visit units in the order of their content hash and take each one
    // that brings validation closer to the target. The hash order is a
    // fixed pseudo-random order that ignores paths and file order.
    let mut order: Vec<(u64, usize)> = hashes.iter().copied().zip(0..).collect();
    drop(hashes);
    order.sort_unstable();
    let mut val_bytes = 0u64;
    for &(_, i) in &order {
        let len = units[i].len;
        if val_bytes as f64 + len as f64 / 2.0 <= target {
            units[i].val = true;
            val_bytes += len;
        }
    }
    if val_bytes == 0 || val_bytes == total {
        return Err(DataError::CorpusTooSmall {
            bytes: total,
            fraction,
        });
    }
    Ok(Plan {
        files,
        skipped,
        units,
    })
}

/// A file that changed between two passes over it.
pub(crate) fn changed(path: &std::path::Path) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        message: "changed while the corpus was being read; run again".into(),
    }
}

/// First 8 bytes of a blake3 hash, as an ordering key.
fn key64(hash: &blake3::Hash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Pass one: length and hash of each non-empty document.
struct Measure<'a> {
    docs: &'a mut Vec<(u64, u64)>,
    len: u64,
    hasher: blake3::Hasher,
}

impl DocumentSink for Measure<'_> {
    fn start(&mut self) -> Result<(), DataError> {
        self.len = 0;
        self.hasher.reset();
        Ok(())
    }
    fn text(&mut self, piece: &str) -> Result<(), DataError> {
        self.len += piece.len() as u64;
        self.hasher.update(piece.as_bytes());
        Ok(())
    }
    fn end(&mut self) -> Result<(), DataError> {
        if self.len > 0 {
            self.docs.push((self.len, key64(&self.hasher.finalize())));
        }
        Ok(())
    }
}

/// Pass two (long documents): cuts each document into chunks of at least
/// `chunk` bytes ending at a newline, or hard at a character boundary when
/// a line runs past twice that, and hashes each chunk.
struct Chunks {
    chunk: usize,
    doc: u64,
    /// The current document from the start of its next chunk.
    buf: Vec<u8>,
    units: Vec<Unit>,
    hashes: Vec<u64>,
}

impl Chunks {
    /// Emits every chunk that the bytes held so far decide.
    fn cut(&mut self, eof: bool) {
        let chunk = self.chunk;
        let mut start = 0;
        loop {
            let rest = &self.buf[start..];
            if rest.is_empty() || (!eof && rest.len() <= 2 * chunk) {
                break;
            }
            let end = next_cut(rest, chunk, eof);
            self.units.push(Unit {
                doc: self.doc,
                len: end as u64,
                val: false,
            });
            self.hashes.push(key64(&blake3::hash(&rest[..end])));
            start += end;
        }
        self.buf.drain(..start);
    }
}

/// Length of the first chunk of `rest`: the rest of the document when
/// `eof` (it is all there) and it is at most `chunk` bytes; else up to the
/// first newline at or after `chunk` bytes, within `2 * chunk` bytes; else
/// at `2 * chunk` when the document ends there, or hard at the last
/// character boundary at or before `chunk` bytes. Without `eof`, `rest`
/// must hold more than `2 * chunk` bytes.
fn next_cut(rest: &[u8], chunk: usize, eof: bool) -> usize {
    if eof && rest.len() <= chunk {
        return rest.len();
    }
    let limit = (2 * chunk).min(rest.len());
    match rest[chunk - 1..limit].iter().position(|&b| b == b'\n') {
        Some(p) => chunk + p,
        None if limit == rest.len() => limit,
        None => {
            let mut e = chunk;
            // Continuation bytes of UTF-8 are 0b10xx_xxxx.
            while e > 0 && (rest[e] & 0xC0) == 0x80 {
                e -= 1;
            }
            e
        }
    }
}

impl DocumentSink for Chunks {
    fn start(&mut self) -> Result<(), DataError> {
        self.buf.clear();
        Ok(())
    }
    fn text(&mut self, piece: &str) -> Result<(), DataError> {
        self.buf.extend_from_slice(piece.as_bytes());
        if self.buf.len() > 4 * self.chunk {
            self.cut(false);
        }
        Ok(())
    }
    fn end(&mut self) -> Result<(), DataError> {
        let before = self.units.len();
        self.cut(true);
        if self.units.len() > before {
            self.doc += 1;
        }
        Ok(())
    }
}

/// Receives the text of each side of the split, in order.
pub(crate) trait SideSink {
    /// A unit that does not continue the previous one on `side` begins
    /// (a document start); a separating newline, where one is needed, has
    /// already been delivered.
    fn doc_start(&mut self, side: usize) -> Result<(), DataError>;
    /// The next piece of text of `side`.
    fn text(&mut self, side: usize, piece: &str) -> Result<(), DataError>;
}

/// Replays the documents of a [`Plan`] and sends each unit's text to its
/// side: each side is its units joined in order, a newline added before a
/// unit that starts another document (or resumes one after a gap) unless
/// the side already ends with one.
pub(crate) struct Router<'a, S> {
    units: &'a [Unit],
    next: usize,
    /// Bytes left of the current unit.
    left: u64,
    side: usize,
    doc: u64,
    in_doc: bool,
    /// Per side: (document, unit index) of the last unit appended.
    last: [Option<(u64, usize)>; 2],
    empty: [bool; 2],
    ends_newline: [bool; 2],
    pub(crate) sink: S,
}

impl<'a, S: SideSink> Router<'a, S> {
    pub(crate) fn new(plan: &'a Plan, sink: S) -> Self {
        Self {
            units: &plan.units,
            next: 0,
            left: 0,
            side: TRAIN,
            doc: 0,
            in_doc: false,
            last: [None, None],
            empty: [true, true],
            ends_newline: [false, false],
            sink,
        }
    }

    /// Reads every file of `plan` through the router.
    pub(crate) fn run(plan: &'a Plan, reading: &Reading, sink: S) -> Result<S, DataError> {
        let mut router = Router::new(plan, sink);
        for path in &plan.files {
            if reading.read(path, &mut router)? == Outcome::NotText {
                return Err(changed(path));
            }
        }
        if router.next != router.units.len() || router.left != 0 {
            let path = plan.files.last().cloned().unwrap_or_default();
            return Err(changed(&path));
        }
        Ok(router.sink)
    }

    fn begin_unit(&mut self) -> Result<(), DataError> {
        let unit = self
            .units
            .get(self.next)
            .copied()
            .ok_or_else(|| DataError::Format {
                path: PathBuf::new(),
                message: "the corpus grew while it was being read; run again".into(),
            })?;
        let side = usize::from(unit.val);
        let continues =
            self.last[side].is_some_and(|(doc, i)| doc == unit.doc && i + 1 == self.next);
        if !continues {
            if !self.empty[side] && !self.ends_newline[side] {
                self.sink.text(side, "\n")?;
                self.ends_newline[side] = true;
            }
            self.sink.doc_start(side)?;
        }
        self.last[side] = Some((unit.doc, self.next));
        self.side = side;
        self.left = unit.len;
        self.next += 1;
        Ok(())
    }
}

impl<S: SideSink> DocumentSink for Router<'_, S> {
    fn start(&mut self) -> Result<(), DataError> {
        self.in_doc = false;
        Ok(())
    }
    fn text(&mut self, mut piece: &str) -> Result<(), DataError> {
        if !self.in_doc {
            self.in_doc = true;
        }
        while !piece.is_empty() {
            if self.left == 0 {
                self.begin_unit()?;
            }
            let take = (self.left.min(piece.len() as u64)) as usize;
            if !piece.is_char_boundary(take) {
                return Err(DataError::Format {
                    path: PathBuf::new(),
                    message: "a document changed while the corpus was being read; run again".into(),
                });
            }
            let (head, tail) = piece.split_at(take);
            self.sink.text(self.side, head)?;
            self.empty[self.side] = false;
            self.ends_newline[self.side] = head.ends_with('\n');
            self.left -= take as u64;
            piece = tail;
        }
        Ok(())
    }
    fn end(&mut self) -> Result<(), DataError> {
        if self.in_doc {
            if self.left != 0 {
                return Err(DataError::Format {
                    path: PathBuf::new(),
                    message: "a document changed while the corpus was being read; run again".into(),
                });
            }
            self.doc += 1;
            self.in_doc = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cut rule applied to a whole text at once (the reference the
    /// streaming cutter must reproduce).
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

    #[test]
    fn streamed_chunks_equal_whole_text_chunks_for_any_piece_size() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut text = String::new();
        for _ in 0..30_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 23 {
                0 => text.push('\n'),
                1 => text.push('é'),
                2 => text.push('日'),
                3 => text.push('🦀'),
                4 if x.is_multiple_of(7) => text.push_str(&"z".repeat(300)),
                _ => text.push(char::from(b'a' + (x % 26) as u8)),
            }
        }
        for chunk in [32, 33, 100, 257] {
            let want: Vec<u64> = chunk_ranges(&text, chunk)
                .iter()
                .map(|(a, b)| (b - a) as u64)
                .collect();
            for piece in [1usize, 7, 64, 1000, 100_000] {
                let mut sink = Chunks {
                    chunk,
                    doc: 0,
                    buf: Vec::new(),
                    units: Vec::new(),
                    hashes: Vec::new(),
                };
                sink.start().unwrap();
                let mut at = 0;
                while at < text.len() {
                    let mut end = (at + piece).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    sink.text(&text[at..end]).unwrap();
                    at = end;
                }
                sink.end().unwrap();
                let got: Vec<u64> = sink.units.iter().map(|u| u.len).collect();
                assert_eq!(got, want, "chunk {chunk}, piece {piece}");
            }
        }
    }
}
