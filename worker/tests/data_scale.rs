//! A corpus several times larger than the memory a training process may
//! use: tokenizing it and training on it must not hold it in memory.
//!
//! What proves it: the `pipewright train` process runs under an
//! `RLIMIT_DATA` of [`LIMIT_MIB`] (its heap, anonymous mappings and thread
//! stacks — everything it allocates — may not exceed it; the read-only
//! memory map of the token shard is file-backed and not counted), on a
//! corpus of [`CORPUS_MIB`] of text whose token shard is twice that. It
//! must build the shard, train two steps and evaluate. Its peak resident
//! set (`ru_maxrss`, which does count the shard's pages it touched) is then
//! checked against [`RSS_BOUND_MIB`]: sampling touches a few windows of the
//! shard, never the whole of it.

#![cfg(target_os = "linux")]

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Text in the corpus, in MiB.
const CORPUS_MIB: usize = 320;
/// Memory the training process may allocate (`RLIMIT_DATA`, which counts
/// address space the allocator reserves, not only what it uses), in MiB.
const LIMIT_MIB: u64 = 96;
/// Largest resident set the process may reach, in MiB: a fifth of the
/// corpus's text, a tenth of its token shard.
const RSS_BOUND_MIB: f64 = 64.0;

/// Writes `CORPUS_MIB` of varied text as 32 files quickly: one block of
/// pseudo-random words, written rotated by a different offset each time.
fn write_big_corpus(dir: &Path) {
    let words = [
        "stage", "replica", "gradient", "the", "of", "pipeline", "token", "a", "shard", "loss",
        "worker", "is", "schedule", "and", "ledger", "to", "batch", "link", "memory", "map",
    ];
    let mut block = String::with_capacity(1 << 20);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while block.len() < (1 << 20) - 16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        block.push_str(words[(x % words.len() as u64) as usize]);
        block.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    let bytes = block.as_bytes();
    let files = 32;
    for f in 0..files {
        let file = std::fs::File::create(dir.join(format!("part-{f:02}.txt"))).unwrap();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        for b in 0..CORPUS_MIB / files {
            let at = (f * 7919 + b * 104_729) % bytes.len();
            out.write_all(&bytes[at..]).unwrap();
            out.write_all(&bytes[..at]).unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn training_on_a_corpus_larger_than_memory_keeps_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let started = Instant::now();
    write_big_corpus(&data);
    let written = started.elapsed();
    let manifest = dir.path().join("run.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: scale}}
spec:
  model: {{dim: 32, layers: 2, heads: 4, ffnDim: 64, seqLen: 64}}
  data: {{sources: ["{}"], validationFraction: 0.02}}
  training: {{steps: 2, microBatchSize: 4, microBatches: 2, learningRate: 0.01, seed: 3, evalBatches: 4}}
  checkpoint: {{keep: 0}}
"#,
            data.display()
        ),
    )
    .unwrap();

    let limit = LIMIT_MIB << 20;
    let mut cmd = common::pipewright();
    cmd.args(["train", "--quiet", "--threads", "2", "--out"])
        .arg(dir.path().join("out"))
        .arg(&manifest);
    common::succeed(&mut common::limited(cmd, limit));
    let trained = started.elapsed() - written;

    // Peak resident set of the finished child, in KiB on Linux.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage the call fills in.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let peak_mib = usage.ru_maxrss as f64 / 1024.0;

    let shard = std::fs::read_dir(data.join(".pipewright-cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "tokens"))
        .expect("a token shard in the cache");
    let shard_mib = std::fs::metadata(&shard).unwrap().len() as f64 / (1 << 20) as f64;
    eprintln!(
        "corpus {CORPUS_MIB} MiB of text, shard {shard_mib:.0} MiB; written in {:.1}s, \
         tokenized + trained in {:.1}s; peak RSS {peak_mib:.1} MiB under RLIMIT_DATA {LIMIT_MIB} MiB",
        written.as_secs_f64(),
        trained.as_secs_f64()
    );
    assert!(
        peak_mib < RSS_BOUND_MIB,
        "peak RSS {peak_mib:.1} MiB with a {CORPUS_MIB} MiB corpus"
    );
    assert!(shard_mib > 1.9 * CORPUS_MIB as f64);
}
