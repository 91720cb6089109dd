//! Tokenizers: one id per byte, or byte-level BPE through the `tokenizers`
//! library (loaded from a `tokenizer.json` or trained on the corpus).

use std::path::Path;

use pipewright_spec::{DataSpec, TokenizerKind, TokenizerSpec};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::PreTokenizerWrapper;

use super::source::Reading;
use super::split::{Plan, Router, SideSink, TRAIN};
use super::DataError;

/// File name of the tokenizer itself inside a saved tokenizer directory.
const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the `transformers` configuration beside it.
const CONFIG_FILE: &str = "tokenizer_config.json";
/// Ids of the byte tokenizer: one per byte value.
const BYTE_VOCAB: usize = 256;

/// Turns text into token ids and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per UTF-8 byte; the id is the byte value (vocabulary 256).
    Byte,
    /// A `tokenizers` library tokenizer, normally byte-level BPE.
    Bpe(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Builds the tokenizer that `data.tokenizer` asks for. A BPE with a
    /// `vocabSize` and no `path` is trained on the training split of the
    /// corpus `data` names (validation text never shapes the vocabulary),
    /// once: the result is kept in the corpus's cache directory and
    /// reused by every later call (see `docs/data.md`).
    pub fn from_spec(data: &DataSpec) -> Result<Self, DataError> {
        match Self::untrained(&data.tokenizer)? {
            Some(t) => Ok(t),
            None => super::cache::Prepared::new(data)?.tokenizer(),
        }
    }

    /// Number of ids of the tokenizer `spec` asks for, without touching
    /// the corpus: 256 for bytes, `vocabSize` for a BPE to be trained (its
    /// training refuses any other size), the file's own for a
    /// `tokenizer.json`.
    pub fn vocab_size_of(spec: &TokenizerSpec) -> Result<usize, DataError> {
        match Self::untrained(spec)? {
            Some(t) => Ok(t.vocab_size()),
            None => spec.vocab_size.ok_or(DataError::InvalidField {
                field: "data.tokenizer.vocabSize",
                message: "a bpe tokenizer needs either path or vocabSize".into(),
            }),
        }
    }

    /// The tokenizer `spec` asks for when it needs no training (bytes, or
    /// a `tokenizer.json`); `None` for a BPE to be trained on the corpus.
    pub(crate) fn untrained(spec: &TokenizerSpec) -> Result<Option<Self>, DataError> {
        match spec.kind {
            TokenizerKind::Byte => {
                if spec.path.is_some() {
                    return Err(DataError::InvalidField {
                        field: "data.tokenizer.path",
                        message: "only a bpe tokenizer is loaded from a file; set kind: bpe".into(),
                    });
                }
                if let Some(v) = spec.vocab_size {
                    if v != BYTE_VOCAB {
                        return Err(DataError::InvalidField {
                            field: "data.tokenizer.vocabSize",
                            message: format!(
                                "the byte tokenizer always has {BYTE_VOCAB} ids, not {v}; \
                                 set kind: bpe for another size"
                            ),
                        });
                    }
                }
                Ok(Some(Self::Byte))
            }
            TokenizerKind::Bpe => match &spec.path {
                Some(path) => {
                    let tokenizer = Self::Bpe(Box::new(read_tokenizer_json(Path::new(path))?));
                    if let Some(v) = spec.vocab_size {
                        if v != tokenizer.vocab_size() {
                            return Err(DataError::InvalidField {
                                field: "data.tokenizer.vocabSize",
                                message: format!(
                                    "{v} disagrees with the {} ids of {path}; drop vocabSize \
                                     or fix it",
                                    tokenizer.vocab_size()
                                ),
                            });
                        }
                    }
                    Ok(Some(tokenizer))
                }
                None => {
                    let vocab_size = spec.vocab_size.ok_or(DataError::InvalidField {
                        field: "data.tokenizer.vocabSize",
                        message: "a bpe tokenizer needs either path (a tokenizer.json) or \
                                  vocabSize (to train one on the corpus)"
                            .into(),
                    })?;
                    check_bpe_size(vocab_size)?;
                    Ok(None)
                }
            },
        }
    }

    /// A BPE tokenizer from a `tokenizer.json` file.
    pub(crate) fn from_json_file(path: &Path) -> Result<Self, DataError> {
        Ok(Self::Bpe(Box::new(read_tokenizer_json(path)?)))
    }

    /// Writes the library's `tokenizer.json` of this tokenizer to `path`,
    /// through a temporary file in `dir` renamed into place.
    pub(crate) fn write_json_atomically(&self, dir: &Path, path: &Path) -> Result<(), DataError> {
        let owned;
        let library = match self {
            Self::Byte => {
                owned = byte_tokenizer_model()?;
                &owned
            }
            Self::Bpe(t) => t.as_ref(),
        };
        let json = library
            .to_string(false)
            .map_err(|source| DataError::Tokenizer {
                context: format!("serializing {}", path.display()),
                source,
            })?;
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(io)?;
        std::io::Write::write_all(&mut tmp, json.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// A name for what this tokenizer does: equal names encode alike.
    pub(crate) fn identity(&self) -> String {
        match self {
            Self::Byte => "byte".into(),
            Self::Bpe(t) => match t.to_string(false) {
                Ok(json) => format!("bpe {}", blake3::hash(json.as_bytes()).to_hex()),
                // Unserializable: a name no other tokenizer shares, so
                // nothing cached for another is taken for it.
                Err(_) => format!("bpe unserializable {:p}", t.as_ref()),
            },
        }
    }

    /// Number of ids the model's embedding must cover (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => BYTE_VOCAB,
            Self::Bpe(t) => t
                .get_vocab(true)
                .values()
                .map(|&id| id as usize + 1)
                .max()
                .unwrap_or(0),
        }
    }

    /// Encodes `text` without adding special tokens: training streams are
    /// plain concatenations of documents, so a BOS/EOS that a loaded
    /// tokenizer's post-processor would add has no place in them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Bpe(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|source| DataError::Tokenizer {
                    context: "encoding text".into(),
                    source,
                }),
        }
    }

    /// Decodes ids back to text. Byte sequences that are not valid UTF-8
    /// (a model may well emit them) become U+FFFD, as the Hugging Face
    /// byte-level decoder does.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Self::Byte => {
                let bytes = ids
                    .iter()
                    .map(|&id| {
                        u8::try_from(id).map_err(|_| DataError::TokenId {
                            id,
                            vocab_size: BYTE_VOCAB,
                        })
                    })
                    .collect::<Result<Vec<u8>, _>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::Bpe(t) => {
                // The library silently drops ids it does not know; a model
                // emitting one is a bug worth reporting.
                if let Some(&id) = ids.iter().find(|&&id| t.id_to_token(id).is_none()) {
                    return Err(DataError::TokenId {
                        id,
                        vocab_size: self.vocab_size(),
                    });
                }
                t.decode(ids, false).map_err(|source| DataError::Tokenizer {
                    context: "decoding ids".into(),
                    source,
                })
            }
        }
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`
    /// (created if missing) so that `transformers`'
    /// `AutoTokenizer.from_pretrained(dir)` loads a fast tokenizer giving the
    /// same ids as [`Tokenizer::encode`], and [`Tokenizer::load`] restores
    /// this tokenizer.
    pub fn save(&self, dir: &Path) -> Result<(), DataError> {
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let owned;
        let library = match self {
            Self::Byte => {
                owned = byte_tokenizer_model()?;
                &owned
            }
            Self::Bpe(t) => t.as_ref(),
        };
        let json_path = dir.join(TOKENIZER_FILE);
        library
            .save(&json_path, true)
            .map_err(|source| DataError::Tokenizer {
                context: format!("writing {}", json_path.display()),
                source,
            })?;
        let config_path = dir.join(CONFIG_FILE);
        let config = serde_json::to_string_pretty(&transformers_config(library)).map_err(|e| {
            DataError::TokenizerFile {
                path: config_path.clone(),
                message: e.to_string(),
            }
        })?;
        std::fs::write(&config_path, config).map_err(|source| DataError::Io {
            path: config_path,
            source,
        })
    }

    /// Reads a tokenizer directory written by [`Tokenizer::save`] (only
    /// `tokenizer.json` is needed). A tokenizer that maps every byte to its
    /// own value comes back as [`Tokenizer::Byte`], so a checkpoint of a
    /// byte-level run restores the fast path.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let library = read_tokenizer_json(&dir.join(TOKENIZER_FILE))?;
        if is_byte_identity(&library) {
            Ok(Self::Byte)
        } else {
            Ok(Self::Bpe(Box::new(library)))
        }
    }

    /// Whether encoding pieces of a text separately, cut just before a `\n`
    /// that follows a printable ASCII character, gives exactly the ids of
    /// encoding the whole text. True for the byte tokenizer and for
    /// byte-level BPE with the GPT-2 split pattern, no normalizer, no added
    /// tokens and no prefix space, because that pattern always ends a
    /// pre-token there. The corpus uses this to tokenize large texts in
    /// parallel without changing a single id.
    pub(crate) fn splits_at_line_starts(&self) -> bool {
        match self {
            Self::Byte => true,
            Self::Bpe(t) => {
                t.get_normalizer().is_none()
                    && t.get_added_vocabulary().is_empty()
                    && matches!(
                        t.get_pre_tokenizer(),
                        Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space
                    )
            }
        }
    }
}

/// Reads a `tokenizer.json`, naming the file on failure.
fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, DataError> {
    if !path.is_file() {
        return Err(DataError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    tokenizers::Tokenizer::from_file(path).map_err(|source| DataError::Tokenizer {
        context: format!("loading {}", path.display()),
        source,
    })
}

/// The GPT-2 byte-to-character table used by byte-level tokenizers: every
/// byte gets a printable character so that vocabularies stay valid JSON
/// strings. Printable Latin-1 bytes map to themselves, the rest to U+0100
/// onwards in byte order.
fn byte_level_chars() -> [char; BYTE_VOCAB] {
    let mut table = ['\0'; BYTE_VOCAB];
    let mut next = 0x100u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        // Codes stay below 0x200, all of which are scalar values.
        *slot = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// The byte tokenizer expressed in the `tokenizers` library's terms: a BPE
/// without merges whose vocabulary maps the byte-level character of byte `b`
/// to id `b`, and a pre-tokenizer that byte-maps the whole text without
/// splitting it — so every id equals its byte.
fn byte_tokenizer_model() -> Result<tokenizers::Tokenizer, DataError> {
    let vocab: tokenizers::models::bpe::Vocab = byte_level_chars()
        .iter()
        .zip(0u32..)
        .map(|(c, id)| (c.to_string(), id))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|source| DataError::Tokenizer {
            context: "building the byte vocabulary".into(),
            source,
        })?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(t)
}

/// Whether `t` gives every byte its own value as id and nothing else — what
/// [`byte_tokenizer_model`] builds.
fn is_byte_identity(t: &tokenizers::Tokenizer) -> bool {
    let byte_level = matches!(
        t.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::ByteLevel(_))
    );
    byte_level
        && t.get_normalizer().is_none()
        && t.get_added_vocabulary().is_empty()
        && t.get_vocab_size(true) == BYTE_VOCAB
        && byte_level_chars()
            .iter()
            .zip(0u32..)
            .all(|(c, id)| t.token_to_id(&c.to_string()) == Some(id))
}

/// The `tokenizer_config.json` that makes `transformers` pick its fast
/// tokenizer class and leave decoded text as it is.
fn transformers_config(t: &tokenizers::Tokenizer) -> serde_json::Value {
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        // transformers otherwise rewrites " ." to "." when decoding.
        "clean_up_tokenization_spaces": false,
    });
    let mut special: Vec<(u32, String)> = t
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, tok)| tok.special)
        .map(|(id, tok)| (id, tok.content))
        .collect();
    special.sort();
    if !special.is_empty() {
        let names: Vec<String> = special.into_iter().map(|(_, c)| c).collect();
        config["additional_special_tokens"] = serde_json::json!(names);
    }
    config
}

/// A BPE vocabulary size is one the trainer can reach.
fn check_bpe_size(vocab_size: usize) -> Result<(), DataError> {
    if vocab_size <= BYTE_VOCAB || u32::try_from(vocab_size).is_err() {
        return Err(DataError::InvalidField {
            field: "data.tokenizer.vocabSize",
            message: format!(
                "{vocab_size} must exceed the {BYTE_VOCAB} byte symbols every byte-level BPE \
                 starts from (and fit in 32 bits)"
            ),
        });
    }
    Ok(())
}

/// Trains a BPE of `vocab_size` ids on the lines of the training side of
/// `plan`, streamed from the files by a reader thread.
pub(crate) fn train_on_split(
    vocab_size: usize,
    plan: &Plan,
    reading: &Reading,
) -> Result<Tokenizer, DataError> {
    check_bpe_size(vocab_size)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<String>>(8);
    let (read, trained) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let sink = TrainLines {
                tx,
                line: String::new(),
                batch: Vec::new(),
                batch_bytes: 0,
            };
            let mut sink = Router::run(plan, reading, sink)?;
            sink.flush_line();
            sink.send()
        });
        let trained = train_bpe(vocab_size, rx.into_iter().flatten());
        let read = reader.join().unwrap_or_else(|_| {
            Err(DataError::InvalidField {
                field: "data.sources",
                message: "the reader of the training text panicked".into(),
            })
        });
        (read, trained)
    });
    read?;
    Ok(Tokenizer::Bpe(Box::new(trained?)))
}

/// Lines of training text, sent in batches to the BPE trainer.
struct TrainLines {
    tx: std::sync::mpsc::SyncSender<Vec<String>>,
    line: String,
    batch: Vec<String>,
    batch_bytes: usize,
}

impl TrainLines {
    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            self.batch_bytes += self.line.len();
            self.batch.push(std::mem::take(&mut self.line));
        }
    }

    fn send(&mut self) -> Result<(), DataError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        // The trainer stopped reading: it failed, and says why itself.
        let _ = self.tx.send(std::mem::take(&mut self.batch));
        Ok(())
    }
}

impl SideSink for TrainLines {
    fn doc_start(&mut self, _side: usize) -> Result<(), DataError> {
        Ok(())
    }
    fn text(&mut self, side: usize, piece: &str) -> Result<(), DataError> {
        if side != TRAIN {
            return Ok(());
        }
        for part in piece.split_inclusive('\n') {
            self.line.push_str(part);
            if part.ends_with('\n') {
                self.flush_line();
            }
        }
        if self.batch_bytes >= 1 << 20 {
            self.send()?;
        }
        Ok(())
    }
}

/// Trains a byte-level BPE of exactly `vocab_size` ids on `lines`.
pub(crate) fn train_bpe<I>(vocab_size: usize, lines: I) -> Result<tokenizers::Tokenizer, DataError>
where
    I: Iterator<Item = String> + Send,
{
    check_bpe_size(vocab_size)?;
    let mut lines = lines.peekable();
    if lines.peek().is_none() {
        return Err(DataError::EmptySplit { split: "training" });
    }
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    // No prefix space: encoding then never invents a character, so
    // decode(encode(text)) == text, and line-aligned pieces encode the same
    // as the whole (see `splits_at_line_starts`).
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // The full byte alphabet is seeded so that every byte is a token even if
    // the corpus never shows it: nothing is ever unknown.
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, lines)
        .map_err(|source| DataError::Tokenizer {
            context: format!("training a {vocab_size}-id BPE on the corpus"),
            source,
        })?;

    let got = tokenizer.get_vocab_size(true);
    if got != vocab_size {
        return Err(DataError::InvalidField {
            field: "data.tokenizer.vocabSize",
            message: format!(
                "the corpus only supports {got} distinct BPE tokens, fewer than the {vocab_size} \
                 asked for; lower vocabSize or add text"
            ),
        });
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    fn bpe_spec(vocab_size: usize) -> TokenizerSpec {
        TokenizerSpec {
            kind: TokenizerKind::Bpe,
            path: None,
            vocab_size: Some(vocab_size),
        }
    }

    /// The data section of a corpus of `files` with tokenizer `t`.
    fn data(files: &[PathBuf], t: TokenizerSpec) -> DataSpec {
        DataSpec {
            sources: files.iter().map(|p| p.display().to_string()).collect(),
            exclude: Vec::new(),
            validation_fraction: 0.05,
            tokenizer: t,
            format: None,
            text_field: None,
            cache_dir: None,
        }
    }

    /// Text with ASCII, accents, CJK, emoji, control bytes and odd spacing.
    const MIXED: &str = "Hello, world!\n\tTabs\r\n  two spaces  \u{0}nul é ü 日本語 🦀🦀 \
                         ZWJ 👩\u{200d}💻 end\n\n";

    /// A small English corpus with enough repetition to learn merges from.
    fn write_corpus(dir: &Path) -> Vec<PathBuf> {
        let words = [
            "the", "pipeline", "stage", "replica", "gradient", "forward", "backward", "token",
            "shard", "worker", "schedule", "ledger", "link", "model", "batch", "loss",
        ];
        let mut files = Vec::new();
        for f in 0..4 {
            let mut text = String::new();
            for i in 0..3000usize {
                let w = words[(i * 7 + f * 3 + i / 5) % words.len()];
                text.push_str(w);
                text.push(if i % 11 == 10 { '\n' } else { ' ' });
            }
            let path = dir.join(format!("doc{f}.txt"));
            std::fs::write(&path, text).unwrap();
            files.push(path);
        }
        files
    }

    #[test]
    fn byte_roundtrips_arbitrary_utf8_and_ids_are_bytes() {
        let t = Tokenizer::Byte;
        let ids = t.encode(MIXED).unwrap();
        assert_eq!(ids, MIXED.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids).unwrap(), MIXED);
        assert_eq!(t.vocab_size(), 256);
        assert!(matches!(
            t.decode(&[300]),
            Err(DataError::TokenId { id: 300, .. })
        ));
    }

    #[test]
    fn byte_level_table_is_a_bijection_onto_the_library_alphabet() {
        let table = byte_level_chars();
        let mine: std::collections::HashSet<char> = table.iter().copied().collect();
        let library: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(mine.len(), 256);
        assert_eq!(mine, library);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn saved_byte_tokenizer_encodes_as_bytes_in_the_library_and_loads_back_as_byte() {
        let dir = tempfile::tempdir().unwrap();
        Tokenizer::Byte.save(dir.path()).unwrap();
        let library = tokenizers::Tokenizer::from_file(dir.path().join(TOKENIZER_FILE)).unwrap();
        let every_byte_char: String = (0u32..0x800).filter_map(char::from_u32).collect();
        for text in [MIXED, every_byte_char.as_str(), "", " leading space"] {
            let ids = library.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(ids, Tokenizer::Byte.encode(text).unwrap(), "text {text:?}");
            assert_eq!(library.decode(&ids, false).unwrap(), text);
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
        assert!(matches!(
            Tokenizer::load(dir.path()).unwrap(),
            Tokenizer::Byte
        ));
    }

    #[test]
    fn trained_bpe_has_the_requested_size_roundtrips_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_corpus(dir.path());
        let t = Tokenizer::from_spec(&data(&files, bpe_spec(320))).unwrap();
        assert_eq!(t.vocab_size(), 320);
        let text = "the pipeline stage sends a gradient backward\n";
        let ids = t.encode(text).unwrap();
        assert!(
            ids.len() < text.len() / 2,
            "merges should compress: {ids:?}"
        );
        assert_eq!(t.decode(&ids).unwrap(), text);
        // Bytes the corpus never contains are still encodable.
        let ids = t.encode(MIXED).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < 320));
        assert_eq!(t.decode(&ids).unwrap(), MIXED);
        // Training is deterministic, so every process builds the same ids.
        let mut elsewhere = data(&files, bpe_spec(320));
        let other_cache = tempfile::tempdir().unwrap();
        elsewhere.cache_dir = Some(other_cache.path().display().to_string());
        let again = Tokenizer::from_spec(&elsewhere).unwrap();
        assert_eq!(again.encode(MIXED).unwrap(), ids);
        assert!(t.splits_at_line_starts());
    }

    #[test]
    fn bpe_save_load_keeps_the_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_corpus(dir.path());
        let t = Tokenizer::from_spec(&data(&files, bpe_spec(300))).unwrap();
        let out = dir.path().join("tok");
        t.save(&out).unwrap();
        let back = Tokenizer::load(&out).unwrap();
        assert!(matches!(back, Tokenizer::Bpe(_)));
        assert_eq!(back.vocab_size(), 300);
        let text = "the ledger of the worker\nlink model batch loss 🦀\n";
        assert_eq!(back.encode(text).unwrap(), t.encode(text).unwrap());
        assert!(matches!(
            back.decode(&[5, 300]),
            Err(DataError::TokenId { id: 300, .. })
        ));
        // The same file also loads as a `path` tokenizer.
        let spec = TokenizerSpec {
            kind: TokenizerKind::Bpe,
            path: Some(out.join(TOKENIZER_FILE).display().to_string()),
            vocab_size: None,
        };
        let from_path = Tokenizer::from_spec(&data(&[], spec.clone())).unwrap();
        assert_eq!(from_path.encode(text).unwrap(), t.encode(text).unwrap());
    }

    #[test]
    fn bad_tokenizer_specs_name_the_field_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_corpus(dir.path());
        let err = Tokenizer::from_spec(&data(&files, bpe_spec(200))).unwrap_err();
        assert!(
            err.to_string().contains("data.tokenizer.vocabSize"),
            "{err}"
        );
        let err = Tokenizer::from_spec(&data(&files, bpe_spec(1_000_000))).unwrap_err();
        assert!(err.to_string().contains("fewer than the 1000000"), "{err}");
        let no_size = TokenizerSpec {
            kind: TokenizerKind::Bpe,
            path: None,
            vocab_size: None,
        };
        let err = Tokenizer::from_spec(&data(&files, no_size.clone())).unwrap_err();
        assert!(
            err.to_string().contains("data.tokenizer.vocabSize"),
            "{err}"
        );
        let missing = TokenizerSpec {
            kind: TokenizerKind::Bpe,
            path: Some("/nonexistent/tok.json".into()),
            vocab_size: None,
        };
        let err = Tokenizer::from_spec(&data(&files, missing.clone())).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tok.json"), "{err}");
        let err = Tokenizer::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        let bad = dir.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join(TOKENIZER_FILE), "{not json").unwrap();
        let err = Tokenizer::load(&bad).unwrap_err();
        assert!(err.to_string().contains("bad/tokenizer.json"), "{err}");
        let byte_with_size = TokenizerSpec {
            kind: TokenizerKind::Byte,
            path: None,
            vocab_size: Some(512),
        };
        assert!(Tokenizer::from_spec(&data(&[], byte_with_size.clone())).is_err());
    }
}
