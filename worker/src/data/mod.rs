//! Training data: the corpus, its tokenizer, and the sampler.
//!
//! Flow: [`resolve_files`] turns `data.sources` / `data.exclude` into a sorted
//! file list; [`prepare`] builds the tokenizer (training a BPE on the
//! training split when asked) and the corpus: the files are read as
//! documents (text, JSON Lines, Parquet), split into training and
//! validation by content hashes, tokenized once into a token shard in the
//! cache directory and read back through a memory map; [`sample_train`]
//! and [`val_batches`] cut batches out of the token streams. The shard
//! format and the cache are described in `docs/data.md`.
//!
//! Invariants the rest of the runtime relies on:
//! - Everything here is deterministic. The file list is sorted, the split is
//!   decided by content hashes, and sampling is a pure function of
//!   `(seed, step, micro_batch, replica, row)`, so any process — a stage-0
//!   replica, a validator re-running a micro-batch, a restarted worker —
//!   recomputes exactly the same batch from the same corpus.
//! - Memory does not grow with the corpus: files are streamed while the
//!   shard is built, and the shard is memory-mapped.
//! - [`Corpus::fingerprint`] identifies the token streams, so a checkpoint
//!   can tell whether it is being resumed on the same data.
//! - [`Tokenizer::save`] writes a directory that Hugging Face `transformers`
//!   loads and that encodes text to the same ids as [`Tokenizer::encode`].

mod cache;
mod corpus;
mod sample;
mod shard;
mod source;
mod split;
#[cfg(test)]
mod tests;
mod tokenizer;

use std::path::PathBuf;

pub use corpus::{resolve_files, Corpus};
pub use sample::{sample_train, val_batches, Batch};
pub use shard::Tokens;
pub use tokenizer::Tokenizer;

/// The tokenizer and the corpus of `spec`: the tokenizer it asks for (a
/// BPE to be trained is trained on the training split, once, and cached)
/// and the corpus tokenized by it (from its cached token shard when there
/// is one). Resolves the files and, when anything must be built, splits
/// the corpus only once for both.
pub fn prepare(spec: &pipewright_spec::DataSpec) -> Result<(Tokenizer, Corpus), DataError> {
    let prepared = cache::Prepared::new(spec)?;
    let tokenizer = prepared.tokenizer()?;
    let corpus = prepared.corpus(&tokenizer)?;
    Ok((tokenizer, corpus))
}

/// Everything that can go wrong while preparing training data.
///
/// Every message names the file, manifest field or source entry at fault so
/// a user can fix the manifest without reading code.
#[derive(thiserror::Error, Debug)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `data.sources` entry names nothing that exists.
    #[error("data.sources[{index}] `{source_entry}` matches no file, directory or glob match")]
    SourceNotFound {
        /// Position of the entry in `data.sources`.
        index: usize,
        /// The entry as written in the manifest.
        source_entry: String,
    },
    /// Every file a `data.sources` entry matches is dropped by `data.exclude`.
    #[error(
        "data.sources[{index}] `{source_entry}`: every file it matches is excluded by data.exclude"
    )]
    SourceAllExcluded {
        /// Position of the entry in `data.sources`.
        index: usize,
        /// The entry as written in the manifest.
        source_entry: String,
    },
    /// A glob pattern in the manifest does not parse.
    #[error("{field} `{pattern}` is not a valid glob pattern: {message}")]
    Pattern {
        /// Manifest field holding the pattern, e.g. `data.exclude[2]`.
        field: String,
        /// The pattern as written.
        pattern: String,
        /// What the glob parser objected to.
        message: String,
    },
    /// After reading every file there is no text to train on.
    #[error(
        "the corpus is empty: every matched file is empty or not UTF-8 text \
         ({skipped} file(s) skipped as not text)"
    )]
    EmptyCorpus {
        /// Files skipped because they were not UTF-8 text.
        skipped: usize,
    },
    /// The corpus is too small to be split into a training and a validation part.
    #[error(
        "the corpus ({bytes} bytes) is too small to hold out data.validationFraction = \
         {fraction} for validation and still train on the rest"
    )]
    CorpusTooSmall {
        /// Bytes of text in the corpus.
        bytes: u64,
        /// The requested validation fraction.
        fraction: f64,
    },
    /// One side of a split holds no tokens.
    #[error("the {split} split is empty")]
    EmptySplit {
        /// `training` or `validation`.
        split: &'static str,
    },
    /// A manifest field has a value this module cannot work with.
    #[error("{field}: {message}")]
    InvalidField {
        /// Manifest field, e.g. `data.tokenizer.vocabSize`.
        field: &'static str,
        /// Why the value is refused.
        message: String,
    },
    /// The `tokenizers` library failed.
    #[error("tokenizer ({context}): {source}")]
    Tokenizer {
        /// What was being done, naming the file where there is one.
        context: String,
        /// The library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A token id outside the tokenizer's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} ids")]
    TokenId {
        /// The offending id.
        id: u32,
        /// Size of the vocabulary.
        vocab_size: usize,
    },
    /// A token stream is too short for the requested sequence length.
    #[error(
        "the {stream} stream holds {tokens} tokens, fewer than model.seqLen + 1 = {needed}; \
         add text to the corpus or shorten model.seqLen"
    )]
    StreamTooShort {
        /// `training` or `validation`.
        stream: &'static str,
        /// Tokens in the stream.
        tokens: usize,
        /// Tokens one window needs.
        needed: usize,
    },
    /// A record of a JSON Lines or Parquet file cannot be used.
    #[error("{}: {at}: {message}", path.display())]
    Record {
        /// The file at fault.
        path: PathBuf,
        /// Where in it: `line N` (from 1) or `row N` (from 0).
        at: String,
        /// What is wrong.
        message: String,
    },
    /// A corpus file cannot be read in its format.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A token shard is unusable.
    #[error("token shard {}: {message}", path.display())]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tokenizer configuration file could not be written or parsed.
    #[error("{}: {message}", path.display())]
    TokenizerFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}
