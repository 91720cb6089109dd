//! Tests across the data modules: the streamed, cached corpus against an
//! in-memory reference of the same split, token shards, the formats, and
//! the tokenizer's training split.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pipewright_spec::{DataFormat, DataSpec, TokenizerKind, TokenizerSpec};

use super::shard::{Fingerprint, Shard, HEADER_BYTES};
use super::{prepare, Corpus, Tokenizer};

fn spec(sources: &[&Path], fraction: f64) -> DataSpec {
    DataSpec {
        sources: sources.iter().map(|p| p.display().to_string()).collect(),
        exclude: Vec::new(),
        validation_fraction: fraction,
        tokenizer: TokenizerSpec::default(),
        format: None,
        text_field: None,
        cache_dir: None,
    }
}

fn bpe(vocab: usize) -> TokenizerSpec {
    TokenizerSpec {
        kind: TokenizerKind::Bpe,
        path: None,
        vocab_size: Some(vocab),
    }
}

/// Deterministic English-like text of about `bytes` bytes.
fn prose(seed: u64, bytes: usize) -> String {
    let words = [
        "stage", "replica", "gradient", "the", "of", "pipeline", "token", "a", "shard", "loss",
        "worker", "is", "schedule", "and", "ledger", "to", "batch", "link", "é", "日本",
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
    out
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The split and tokenization done the simple way, every file in memory:
/// what the corpus was before it was streamed, kept as the reference the
/// streamed one must reproduce id for id.
fn reference(files: &[PathBuf], fraction: f64, tok: &Tokenizer) -> (Vec<u32>, Vec<u32>) {
    let docs: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let b = std::fs::read(p).unwrap();
            (!b.contains(&0))
                .then(|| String::from_utf8(b).ok())
                .flatten()
        })
        .filter(|d| !d.is_empty())
        .collect();
    let total: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let target = fraction * total as f64;
    let largest = docs.iter().map(String::len).max().unwrap();
    let mut units: Vec<(usize, usize, usize)> = Vec::new();
    if largest as f64 <= target / 4.0 {
        units.extend(docs.iter().enumerate().map(|(i, d)| (i, 0, d.len())));
    } else {
        let chunk = ((target / 8.0) as usize).clamp(32, 64 * 1024);
        for (i, d) in docs.iter().enumerate() {
            let b = d.as_bytes();
            let mut start = 0;
            while start < b.len() {
                if b.len() - start <= chunk {
                    units.push((i, start, b.len()));
                    break;
                }
                let want = start + chunk;
                let limit = (start + 2 * chunk).min(b.len());
                let end = match b[want - 1..limit].iter().position(|&c| c == b'\n') {
                    Some(p) => want + p,
                    None if limit == b.len() => limit,
                    None => {
                        let mut e = want;
                        while !d.is_char_boundary(e) {
                            e -= 1;
                        }
                        e
                    }
                };
                units.push((i, start, end));
                start = end;
            }
        }
    }
    let text = |u: &(usize, usize, usize)| &docs[u.0][u.1..u.2];
    let mut order: Vec<(u64, usize)> = units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let h = blake3::hash(text(u).as_bytes());
            (u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap()), i)
        })
        .collect();
    order.sort_unstable();
    let mut in_val = vec![false; units.len()];
    let mut val_bytes = 0u64;
    for &(_, i) in &order {
        let len = (units[i].2 - units[i].1) as u64;
        if val_bytes as f64 + len as f64 / 2.0 <= target {
            in_val[i] = true;
            val_bytes += len;
        }
    }
    let mut sides = [String::new(), String::new()];
    let mut last: [Option<(usize, usize)>; 2] = [None, None];
    for (u, &v) in units.iter().zip(&in_val) {
        let s = usize::from(v);
        if last[s] != Some((u.0, u.1)) && !sides[s].is_empty() && !sides[s].ends_with('\n') {
            sides[s].push('\n');
        }
        sides[s].push_str(text(u));
        last[s] = Some((u.0, u.2));
    }
    (
        tok.encode(&sides[0]).unwrap(),
        tok.encode(&sides[1]).unwrap(),
    )
}

fn fingerprint(train: &[u32], val: &[u32]) -> [u8; 32] {
    let mut fp = Fingerprint::new();
    for s in [train, val] {
        fp.begin(s.len() as u64);
        fp.ids(s);
    }
    fp.finish()
}

#[test]
fn streamed_corpus_equals_the_in_memory_split_id_for_id() {
    let dir = tempfile::tempdir().unwrap();
    // Many small files (whole files go to validation) ...
    let many = dir.path().join("many");
    for i in 0..70u64 {
        write(
            &many.join(format!("{i:02}.txt")),
            &prose(i, 500 + 97 * i as usize),
        );
    }
    // ... a few large ones (cut into chunks), one without newlines, one
    // with a line longer than two chunks, and a binary file.
    let few = dir.path().join("few");
    write(&few.join("a.txt"), &prose(100, 3_000_000));
    write(&few.join("b.txt"), &"abcdefghé".repeat(20_000));
    write(
        &few.join("c.txt"),
        &format!("{}{}\n", "x".repeat(200_000), prose(7, 90_000)),
    );
    std::fs::write(few.join("d.bin"), b"ab\0cd").unwrap();
    for (source, fraction) in [(&many, 0.2), (&few, 0.05), (&few, 0.3)] {
        let s = spec(&[source], fraction);
        let files = super::resolve_files(&s).unwrap();
        let c = Corpus::load(&s, &Tokenizer::Byte).unwrap();
        let (train, val) = reference(&files, fraction, &Tokenizer::Byte);
        assert_eq!(c.train_tokens().to_vec(), train, "{source:?} {fraction}");
        assert_eq!(c.val_tokens().to_vec(), val);
        assert_eq!(c.fingerprint(), fingerprint(&train, &val));
        assert_eq!(c.train_bytes(), train.len() as u64);
        assert!(c.shard_path().is_some());
    }
    // A BPE tokenizer (from a file, so the reference encodes with the same
    // one) cut at line starts: the same ids as encoding each side whole.
    let trained_on = dir.path().join("tok");
    write(&trained_on.join("t.txt"), &prose(1, 200_000));
    let tok = Tokenizer::from_spec(&DataSpec {
        tokenizer: bpe(330),
        ..spec(&[&trained_on], 0.05)
    })
    .unwrap();
    let s = spec(&[&few], 0.05);
    let files = super::resolve_files(&s).unwrap();
    let c = Corpus::load(&s, &tok).unwrap();
    let (train, val) = reference(&files, 0.05, &tok);
    assert_eq!(c.train_tokens().to_vec(), train);
    assert_eq!(c.val_tokens().to_vec(), val);
}

#[test]
fn shards_are_reused_rebuilt_when_damaged_and_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u64 {
        write(&dir.path().join(format!("{i}.txt")), &prose(i, 50_000));
    }
    let s = spec(&[dir.path()], 0.1);
    let first = Corpus::load(&s, &Tokenizer::Byte).unwrap();
    let path = first.shard_path().unwrap().to_path_buf();
    assert!(path.starts_with(dir.path().join(".pipewright-cache")));
    let stamp = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Unchanged corpus and tokenizer: the same shard, not rebuilt.
    let again = Corpus::load(&s, &Tokenizer::Byte).unwrap();
    assert_eq!(again.shard_path(), Some(path.as_path()));
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), stamp);
    assert_eq!(again.fingerprint(), first.fingerprint());
    // The cache directory is never read as corpus.
    assert_eq!(again.files().len(), 3);

    let good = std::fs::read(&path).unwrap();
    let key: [u8; 32] = good[104..136].try_into().unwrap();
    let damaged: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 7].to_vec(), "truncated"),
        ("short", good[..20].to_vec(), "header"),
        (
            "foreign",
            b"hello, this is not a shard at all".repeat(9),
            "magic",
        ),
        (
            "flipped",
            {
                let mut b = good.clone();
                b[HEADER_BYTES + 10] ^= 0x01;
                b
            },
            "fingerprint",
        ),
        (
            "out of range",
            {
                // A 16-bit id of 300 > 255 in a byte vocabulary.
                let mut b = good.clone();
                b[HEADER_BYTES..HEADER_BYTES + 2].copy_from_slice(&300u16.to_le_bytes());
                b
            },
            "token id 300",
        ),
        (
            "version",
            {
                let mut b = good.clone();
                b[8] = 9;
                b
            },
            "version 9",
        ),
    ];
    for (what, bytes, says) in damaged {
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::open(&path, &key, 256).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains(says),
            "{what}: {err}"
        );
        // Loading rebuilds it.
        let c = Corpus::load(&s, &Tokenizer::Byte).unwrap();
        assert_eq!(c.fingerprint(), first.fingerprint(), "{what}");
        assert_eq!(std::fs::read(&path).unwrap(), good, "{what}");
    }
    // Another tokenizer's vocabulary, another key: refused.
    let err = Shard::open(&path, &key, 300).unwrap_err().to_string();
    assert!(err.contains("256-id vocabulary"), "{err}");
    let err = Shard::open(&path, &[7; 32], 256).unwrap_err().to_string();
    assert!(err.contains("other files"), "{err}");

    // A changed file makes a new shard.
    write(&dir.path().join("0.txt"), &prose(99, 50_000));
    let changed = Corpus::load(&s, &Tokenizer::Byte).unwrap();
    assert_ne!(changed.shard_path(), Some(path.as_path()));
    assert_ne!(changed.fingerprint(), first.fingerprint());
}

#[test]
fn concurrent_loads_of_one_corpus_agree_and_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..4u64 {
        write(&data.join(format!("{i}.txt")), &prose(i, 300_000));
    }
    let cache = dir.path().join("cache");
    let s = Arc::new(DataSpec {
        cache_dir: Some(cache.display().to_string()),
        ..spec(&[&data], 0.05)
    });
    let prints: Vec<[u8; 32]> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                scope.spawn(move || Corpus::load(&s, &Tokenizer::Byte).unwrap().fingerprint())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(prints.windows(2).all(|w| w[0] == w[1]));
    let names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    assert_eq!(names.iter().filter(|n| n.ends_with(".tokens")).count(), 1);
}

/// Words no other text contains, one per file, repeated so often that a
/// BPE seeing them merges them before anything else.
fn marked_corpus(dir: &Path, files: usize) -> Vec<String> {
    let mut words = Vec::new();
    for i in 0..files {
        let h = blake3::hash(&(i as u64).to_le_bytes());
        let tail: String = h.as_bytes()[..4]
            .iter()
            .map(|b| char::from(b'a' + b % 26))
            .collect();
        let word = format!("zx{tail}");
        let mut text = prose(i as u64, 2000);
        for _ in 0..2000 {
            text.push(' ');
            text.push_str(&word);
        }
        text.push('\n');
        write(&dir.join(format!("{i:02}.txt")), &text);
        words.push(word);
    }
    words
}

#[test]
fn a_trained_bpe_learns_from_the_training_split_only() {
    let dir = tempfile::tempdir().unwrap();
    let words = marked_corpus(dir.path(), 60);
    let mut s = spec(&[dir.path()], 0.2);
    // The text of each side, from the same split.
    let by_bytes = Corpus::load(&s, &Tokenizer::Byte).unwrap();
    let val = Tokenizer::Byte
        .decode(&by_bytes.val_tokens().to_vec())
        .unwrap();
    let train = Tokenizer::Byte
        .decode(&by_bytes.train_tokens().to_vec())
        .unwrap();
    let vocab = 400;
    s.tokenizer = bpe(vocab);
    let (tok, corpus) = prepare(&s).unwrap();
    let Tokenizer::Bpe(learned) = &tok else {
        panic!("a bpe")
    };
    // Exactly the vocabulary of a BPE trained on the training text alone ...
    let lines = |t: &str| {
        t.split_inclusive('\n')
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let alone = super::tokenizer::train_bpe(vocab, lines(&train).into_iter()).unwrap();
    assert_eq!(learned.get_vocab(true), alone.get_vocab(true));
    // ... which validation text would have changed: its words become
    // tokens of a BPE that sees it, and are none of the learned one's.
    let mut both = lines(&train);
    both.extend(lines(&val));
    let leaky = Tokenizer::Bpe(Box::new(
        super::tokenizer::train_bpe(vocab, both.into_iter()).unwrap(),
    ));
    let one_token = |t: &Tokenizer, w: &str| t.encode(&format!(" {w}")).unwrap().len() == 1;
    let val_only: Vec<&String> = words
        .iter()
        .filter(|w| val.contains(w.as_str()) && !train.contains(w.as_str()))
        .collect();
    assert!(val_only.len() > 5, "{}", val_only.len());
    assert!(val_only.iter().all(|w| !one_token(&tok, w)));
    assert!(val_only.iter().any(|w| one_token(&leaky, w)));
    assert!(words
        .iter()
        .any(|w| !val.contains(w.as_str()) && one_token(&tok, w)));
    // The trained tokenizer is kept and reused, by a later prepare and by
    // Tokenizer::from_spec.
    let again = Tokenizer::from_spec(&s).unwrap();
    assert_eq!(again.encode(&val).unwrap(), tok.encode(&val).unwrap());
    assert_eq!(prepare(&s).unwrap().1.fingerprint(), corpus.fingerprint());
}

#[test]
fn json_lines_records_are_documents_and_bad_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut jsonl = String::new();
    let mut plain = String::new();
    let mut bodies = 0;
    for i in 0..200u64 {
        let text = format!("{}\n", prose(i, 300).trim_end());
        let body = format!("body {i}\n");
        bodies += body.len();
        jsonl.push_str(&serde_json::json!({"id": i, "text": text, "body": body}).to_string());
        jsonl.push('\n');
        if i % 50 == 0 {
            jsonl.push_str("   \n");
        }
        plain.push_str(&text);
    }
    let path = dir.path().join("docs.jsonl");
    write(&path, &jsonl);
    let c = Corpus::load(&spec(&[&path], 0.1), &Tokenizer::Byte).unwrap();
    // Every record's text, each a document: the same bytes as the texts
    // joined by newlines.
    assert_eq!(c.train_bytes() + c.val_bytes(), plain.len() as u64);
    let train = Tokenizer::Byte.decode(&c.train_tokens().to_vec()).unwrap();
    assert!(train.lines().all(|l| plain.contains(l)));
    assert!(!train.contains("\"id\""));

    let field = DataSpec {
        text_field: Some("body".into()),
        ..spec(&[&path], 0.1)
    };
    let b = Corpus::load(&field, &Tokenizer::Byte).unwrap();
    assert_eq!(b.train_bytes() + b.val_bytes(), bodies as u64);

    for (name, body, says) in [
        (
            "bad.jsonl",
            "{\"text\": \"ok\"}\n{\"text\": \"broken\n",
            "line 2: is not valid JSON",
        ),
        (
            "missing.jsonl",
            "{\"text\": \"ok\"}\n\n{\"txt\": \"no\"}\n",
            "line 3: has no field `text`",
        ),
        (
            "number.jsonl",
            "{\"text\": 5}\n",
            "line 1: field `text` is a number, not a string",
        ),
        (
            "array.jsonl",
            "[\"text\"]\n",
            "line 1: is not a JSON object",
        ),
    ] {
        let p = dir.path().join("bad").join(name);
        write(&p, body);
        let err = Corpus::load(&spec(&[&p], 0.1), &Tokenizer::Byte)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&p.display().to_string()) && err.contains(says),
            "{name}: {err}"
        );
    }
    // `format` overrides the extension.
    let txt = dir.path().join("docs.txt");
    write(&txt, &jsonl);
    let forced = DataSpec {
        format: Some(DataFormat::Jsonl),
        ..spec(&[&txt], 0.1)
    };
    let f = Corpus::load(&forced, &Tokenizer::Byte).unwrap();
    assert_eq!(f.train_bytes() + f.val_bytes(), plain.len() as u64);
}

/// A Parquet file with a string column `text` (nullable when `nulls`), an
/// integer column `n` and `rows` rows.
fn write_parquet(path: &Path, texts: &[Option<String>]) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = Arc::new(
        parse_message_type("message doc { OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED INT32 n; }")
            .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_row_count(Some(64))
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    for group in texts.chunks(64) {
        let mut rg = writer.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = group
            .iter()
            .flatten()
            .map(|t| ByteArray::from(t.as_str()))
            .collect();
        let defs: Vec<i16> = group.iter().map(|t| i16::from(t.is_some())).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ns: Vec<i32> = (0..group.len() as i32).collect();
        col.typed::<Int32Type>()
            .write_batch(&ns, None, None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_text_columns_are_read_row_by_row_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // Texts ending with a newline: no separator is added between them.
    let texts: Vec<Option<String>> = (0..300u64)
        .map(|i| Some(format!("{}\n", prose(i, 250).trim_end())))
        .collect();
    let path = dir.path().join("docs.parquet");
    write_parquet(&path, &texts);
    let c = Corpus::load(&spec(&[&path], 0.1), &Tokenizer::Byte).unwrap();
    let joined: usize = texts.iter().flatten().map(String::len).sum();
    assert_eq!(c.train_bytes() + c.val_bytes(), joined as u64);
    let train = Tokenizer::Byte.decode(&c.train_tokens().to_vec()).unwrap();
    let all: String = texts.iter().flatten().map(String::as_str).collect();
    assert!(train.lines().all(|l| all.contains(l)));

    let int = DataSpec {
        text_field: Some("n".into()),
        ..spec(&[&path], 0.1)
    };
    let err = Corpus::load(&int, &Tokenizer::Byte)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("docs.parquet") && err.contains("column `n` is not a string column"),
        "{err}"
    );
    let missing = DataSpec {
        text_field: Some("body".into()),
        ..spec(&[&path], 0.1)
    };
    let err = Corpus::load(&missing, &Tokenizer::Byte)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no column `body` (columns: text, n)"), "{err}");

    let mut with_null = texts.clone();
    with_null[77] = None;
    let nulls = dir.path().join("nulls").join("n.parquet");
    std::fs::create_dir_all(nulls.parent().unwrap()).unwrap();
    write_parquet(&nulls, &with_null);
    let err = Corpus::load(&spec(&[&nulls], 0.1), &Tokenizer::Byte)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n.parquet: row 77: `text` is null"), "{err}");

    let garbage = dir.path().join("junk").join("x.parquet");
    write(&garbage, "PAR1 this is not parquet");
    let err = Corpus::load(&spec(&[&garbage], 0.1), &Tokenizer::Byte)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.parquet") && err.contains("cannot read it as Parquet"),
        "{err}"
    );
}
