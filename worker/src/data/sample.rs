//! Batches cut from the token streams.
//!
//! Sampling is a pure function of its arguments: no RNG state is carried
//! between calls, so any process holding the same corpus — the replica that
//! trains on a micro-batch, a validator re-running it, a worker that took
//! over a dead one's shard — computes the identical batch.

use super::{Corpus, Tokens};

/// A batch of `rows` windows of `seq` tokens, row-major `[rows, seq]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Input ids, `rows * seq` of them.
    pub tokens: Vec<u32>,
    /// Ids to predict: `targets[r][t]` is the token after `tokens[r][t]`.
    pub targets: Vec<u32>,
    /// Number of rows (sequences).
    pub rows: usize,
    /// Tokens per row.
    pub seq: usize,
}

impl Batch {
    fn with_capacity(rows: usize, seq: usize) -> Self {
        Self {
            tokens: Vec::with_capacity(rows * seq),
            targets: Vec::with_capacity(rows * seq),
            rows,
            seq,
        }
    }

    /// Appends the window of `seq + 1` tokens starting at `start`, read
    /// cyclically so a stream shorter than the window still yields one.
    fn push_window(&mut self, stream: Tokens<'_>, start: usize) {
        let n = stream.len();
        if start + self.seq < n {
            // The common case: a contiguous run, copied without a modulo.
            let window = stream.slice(start..start + self.seq + 1);
            self.tokens.extend_from_slice(&window[..self.seq]);
            self.targets.extend_from_slice(&window[1..]);
            return;
        }
        let at = |i: usize| stream.get((start + i) % n);
        self.tokens.extend((0..self.seq).map(at));
        self.targets.extend((1..=self.seq).map(at));
    }
}

/// The training micro-batch `micro_batch` of optimizer step `step` on data
/// replica `replica`: `rows` windows of `seq + 1` tokens of the training
/// stream, each starting at a position derived by hashing
/// `(seed, step, micro_batch, replica, row)`.
///
/// Never fails; call [`Corpus::check_seq_len`] once beforehand so that
/// every window is a contiguous run of the stream.
pub fn sample_train(
    corpus: &Corpus,
    seed: u64,
    step: u64,
    micro_batch: u64,
    replica: u64,
    rows: usize,
    seq: usize,
) -> Batch {
    let stream = corpus.train_tokens();
    let window = seq + 1;
    let mut batch = Batch::with_capacity(rows, seq);
    for row in 0..rows {
        let h = window_hash(seed, step, micro_batch, replica, row as u64);
        batch.push_window(stream, train_start(h, stream.len(), window));
    }
    batch
}

/// `count` validation batches of `rows` windows of `seq + 1` tokens, spread
/// evenly over the validation stream without overlapping; when the stream
/// holds fewer than `count * rows` windows they follow each other and wrap
/// around. The same corpus always gives the same batches, so validation
/// losses are comparable from one evaluation to the next.
pub fn val_batches(corpus: &Corpus, count: usize, rows: usize, seq: usize) -> Vec<Batch> {
    let stream = corpus.val_tokens();
    let n = stream.len() as u128;
    let window = seq as u128 + 1;
    let windows = (count as u128) * (rows as u128);
    let start = |k: u128| -> usize {
        if windows * window <= n {
            (k * n / windows) as usize
        } else {
            ((k * window) % n) as usize
        }
    };
    (0..count)
        .map(|b| {
            let mut batch = Batch::with_capacity(rows, seq);
            for r in 0..rows {
                batch.push_window(stream, start((b * rows + r) as u128));
            }
            batch
        })
        .collect()
}

/// Maps a hash onto the start positions of a `window` in a stream of
/// `len` (non-zero) tokens.
fn train_start(hash: u64, len: usize, window: usize) -> usize {
    if len >= window {
        // Multiply-shift maps the hash onto [0, starts) without the bias of
        // a modulo.
        let starts = (len - window + 1) as u128;
        ((u128::from(hash) * starts) >> 64) as usize
    } else {
        (hash % len as u64) as usize
    }
}

/// A counter-based hash of the sampling coordinates.
fn window_hash(seed: u64, step: u64, micro_batch: u64, replica: u64, row: u64) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("pipewright sample_train window v1");
    for x in [seed, step, micro_batch, replica, row] {
        hasher.update(&x.to_le_bytes());
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Tokenizer;
    use std::collections::HashSet;

    /// A corpus whose training stream is long and varied enough that two
    /// different windows almost never coincide.
    fn corpus() -> Corpus {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut text = String::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push(char::from(b'a' + (x % 26) as u8));
        }
        Corpus::from_texts(&text, &text[..3000], &Tokenizer::Byte).unwrap()
    }

    #[test]
    fn train_batches_are_a_pure_function_of_their_coordinates() {
        let c = corpus();
        let base = sample_train(&c, 7, 3, 1, 0, 4, 32);
        assert_eq!(base, sample_train(&c, 7, 3, 1, 0, 4, 32));
        assert_eq!(base.tokens.len(), 4 * 32);
        for other in [
            sample_train(&c, 8, 3, 1, 0, 4, 32),
            sample_train(&c, 7, 4, 1, 0, 4, 32),
            sample_train(&c, 7, 3, 2, 0, 4, 32),
            sample_train(&c, 7, 3, 1, 1, 4, 32),
        ] {
            assert_ne!(other.tokens, base.tokens);
        }
        // Rows of one batch differ from each other.
        let rows: HashSet<&[u32]> = base.tokens.chunks(32).collect();
        assert_eq!(rows.len(), 4);
        // Asking for more rows extends the batch without changing the first ones.
        let wider = sample_train(&c, 7, 3, 1, 0, 6, 32);
        assert_eq!(&wider.tokens[..4 * 32], &base.tokens[..]);
    }

    #[test]
    fn rows_are_contiguous_windows_and_targets_are_shifted_tokens() {
        let c = corpus();
        let stream = c.train_tokens().to_vec();
        let seq = 16;
        let batch = sample_train(&c, 1, 2, 3, 4, 8, seq);
        assert_eq!((batch.rows, batch.seq), (8, seq));
        for r in 0..8 {
            let h = window_hash(1, 2, 3, 4, r as u64);
            let start = train_start(h, stream.len(), seq + 1);
            let row = &batch.tokens[r * seq..(r + 1) * seq];
            let targets = &batch.targets[r * seq..(r + 1) * seq];
            assert_eq!(row, &stream[start..start + seq]);
            assert_eq!(targets, &stream[start + 1..start + seq + 1]);
        }
    }

    #[test]
    fn train_starts_cover_the_stream_evenly() {
        let (len, window) = (1000usize, 17usize);
        let starts = len - window + 1;
        let mut deciles = [0u32; 10];
        for row in 0..20_000u64 {
            let s = train_start(window_hash(0, 0, 0, 0, row), len, window);
            assert!(s < starts);
            deciles[s * 10 / starts] += 1;
        }
        assert!(
            deciles.iter().all(|&d| (1700..=2300).contains(&d)),
            "{deciles:?}"
        );
    }

    #[test]
    fn validation_batches_are_fixed_spread_and_disjoint() {
        let c = corpus();
        let stream = c.val_tokens().to_vec();
        let seq = 31;
        let batches = val_batches(&c, 4, 5, seq);
        assert_eq!(batches, val_batches(&c, 4, 5, seq));
        assert_eq!(batches.len(), 4);
        let mut starts = Vec::new();
        for b in &batches {
            assert_eq!(b.tokens.len(), 5 * seq);
            for (row, targets) in b.tokens.chunks(seq).zip(b.targets.chunks(seq)) {
                let start = (0..stream.len() - seq)
                    .find(|&s| &stream[s..s + seq] == row)
                    .expect("each row is a window of the stream");
                assert_eq!(targets, &stream[start + 1..start + seq + 1]);
                starts.push(start);
            }
        }
        assert_eq!(starts[0], 0);
        assert!(starts.windows(2).all(|w| w[1] > w[0] + seq), "{starts:?}");
        // 20 windows over 3000 tokens: the last starts in the final twentieth.
        assert!(
            *starts.last().unwrap() >= stream.len() * 19 / 20 - seq,
            "{starts:?}"
        );
    }

    #[test]
    fn short_streams_wrap_instead_of_failing() {
        let c = Corpus::from_texts("abcdefgh", "xyz", &Tokenizer::Byte).unwrap();
        assert!(c.check_seq_len(8).is_err());
        let b = sample_train(&c, 0, 0, 0, 0, 3, 20);
        assert_eq!((b.tokens.len(), b.targets.len()), (60, 60));
        let v = val_batches(&c, 2, 2, 5);
        assert_eq!(v.len(), 2);
        let x = u32::from(b'x');
        let y = u32::from(b'y');
        let z = u32::from(b'z');
        // Windows of 6 follow each other round the stream "xyz", so each
        // starts where the last one's targets ended.
        assert_eq!(&v[0].tokens[..5], &[x, y, z, x, y]);
        assert_eq!(&v[0].targets[..5], &[y, z, x, y, z]);
        assert_eq!(&v[0].tokens[5..10], &[x, y, z, x, y]);
        assert_eq!(&v[1].targets[5..10], &[y, z, x, y, z]);
    }
}
