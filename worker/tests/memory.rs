//! A model whose training does not fit one process's memory trains when
//! its stages are split over processes that each fit.
//!
//! Every process of `pipewright train --processes` (the launcher with its
//! coordinator, and the four stage workers it starts, which inherit the
//! limit) runs under an `RLIMIT_DATA` of [`LIMIT_MIB`]: the most private
//! writable memory it may map, which is more than it touches (the
//! allocator reserves ahead), so the limit is above the plan's resident
//! figure for one stage and well below the plan's figure for the whole
//! model in one process (mostly activations here: every layer's, where a
//! stage keeps only its own). Under the same limit the single-process
//! run of the same manifest is refused by the plan before anything is
//! allocated, naming a stage. The peak resident set of every process
//! (`ru_maxrss` of the children) stays under the limit.
//! `bench/memory.sh` does the same at a billion parameters.

#![cfg(target_os = "linux")]

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use pipewright::plan::{plan, vocab, PROCESS_OVERHEAD_BYTES};

/// Memory every process may map (`RLIMIT_DATA`), MiB.
const LIMIT_MIB: u64 = 512;

fn manifest(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("run.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: memory}}
spec:
  model: {{dim: 256, layers: 12, heads: 8, ffnDim: 768, seqLen: 256}}
  data: {{sources: ["{}"]}}
  training: {{steps: 2, microBatchSize: 8, microBatches: 1, learningRate: 0.001, seed: 3, evalBatches: 1}}
  pipeline: {{stages: 4}}
  checkpoint: {{keep: 1}}
"#,
            dir.join("corpus.txt").display()
        ),
    )
    .expect("write manifest");
    path
}

/// `command` under an `RLIMIT_DATA` of `limit` bytes, inherited by
/// whatever it starts.
fn limited(mut command: Command, limit: u64) -> Command {
    // SAFETY: setrlimit is async-signal-safe and touches no state of the
    // parent.
    unsafe {
        command.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

#[test]
fn a_model_too_large_for_one_process_trains_over_four_that_each_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_corpus(dir.path());
    let path = manifest(dir.path());
    let limit = LIMIT_MIB << 20;

    // What the plan says: the whole model does not fit one process under
    // the limit, and every stage does with room to spare.
    let run = pipewright_spec::load_manifest(&path).expect("manifest");
    let p = plan(&run, vocab(&run).expect("vocab"), None);
    assert!(
        p.single_process_bytes > limit,
        "one process needs {} MiB",
        p.single_process_bytes >> 20
    );
    let largest = p.largest_stage().total_bytes + PROCESS_OVERHEAD_BYTES;
    assert!(largest < limit, "a stage needs {} MiB", largest >> 20);

    // One process: refused by the plan, naming a stage and the limit.
    let mut cmd = common::pipewright();
    cmd.args(["train", "--quiet", "--threads", "1", "--out"])
        .arg(dir.path().join("single"))
        .arg(&path);
    let out = limited(cmd, limit).output().expect("run pipewright");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "one process trained: {err}");
    assert!(
        err.contains("but this machine has 512.0 MiB available: stage "),
        "{err}"
    );
    assert!(err.contains("--processes"), "{err}");
    assert!(
        !dir.path().join("single").exists(),
        "refused before writing anything"
    );

    // Four processes under the same limit: the run trains to its end.
    let mut cmd = common::pipewright();
    cmd.args(["train", "--processes", "--quiet", "--threads", "1", "--out"])
        .arg(dir.path().join("multi"))
        .arg(&path);
    let out = common::succeed(&mut limited(cmd, limit));
    assert!(out.contains("all 4 workers finished 2 steps"), "{out}");
    assert!(out.contains("shard reassignments 0"), "{out}");

    // The largest resident set of any process of the run (the launcher
    // waited for every worker), KiB on Linux.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage the call fills in.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let peak_mib = usage.ru_maxrss as f64 / 1024.0;
    eprintln!(
        "one process would need {} MiB; four under a {LIMIT_MIB} MiB limit peaked at {peak_mib:.0} MiB resident (largest stage planned {} MiB)",
        p.single_process_bytes >> 20,
        largest >> 20
    );
    assert!(peak_mib < LIMIT_MIB as f64, "{peak_mib} MiB");
}
