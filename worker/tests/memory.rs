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

use std::path::Path;

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
    let out = common::limited(cmd, limit)
        .output()
        .expect("run pipewright");
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
    let out = common::succeed(&mut common::limited(cmd, limit));
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

/// A volunteer (a worker without `--stage`) says how much memory it has
/// (`PIPEWRIGHT_AVAILABLE_MEMORY` here): the coordinator gives one that
/// fits only the small stage that stage, keeps a second like it as a
/// standby while the large stage stays vacant, and the large stage goes to
/// a worker with the memory for it; the run then trains to its end.
#[test]
fn the_coordinator_gives_a_volunteer_only_a_shard_that_fits() {
    use common::procs::{coordinator, free_port, identity, wait_for, Procs};
    use pipewright::coord::{Client, Phase};
    use std::process::Stdio;
    use std::time::Duration;

    let _serial = common::procs::serial();
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_corpus(dir.path());
    let path = dir.path().join("run.yaml");
    // Activations dominate, and 1F1B holds two micro-batches on stage 0
    // and one on stage 1, so stage 0 needs far more than stage 1.
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: fit}}
spec:
  model: {{dim: 64, layers: 2, heads: 8, ffnDim: 192, seqLen: 512}}
  data: {{sources: ["{}"]}}
  training: {{steps: 2, microBatchSize: 4, microBatches: 2, learningRate: 0.001, seed: 3, evalBatches: 1}}
  pipeline: {{stages: 2}}
"#,
            dir.path().join("corpus.txt").display()
        ),
    )
    .expect("write manifest");
    let run = pipewright_spec::load_manifest(&path).expect("manifest");
    let p = plan(&run, vocab(&run).expect("vocab"), None);
    let need = |s: usize| p.stages[s].total_bytes + PROCESS_OVERHEAD_BYTES;
    assert!(need(0) > need(1) + (8 << 20), "{} vs {}", need(0), need(1));
    let small = (need(0) + need(1)) / 2;

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::new(&url, "t0ken", Duration::from_secs(30));
    let mut procs = Procs(vec![coordinator(&path, &dir.path().join("out"), port)]);
    let volunteer = |tag: &str, memory: Option<u64>| {
        let mut c = common::pipewright();
        c.arg("worker")
            .arg(&path)
            .args(["--coordinator", &url, "--threads", "1", "--identity"])
            .arg(identity(&path, tag))
            .env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
            .env_remove(pipewright::plan::AVAILABLE_MEMORY_ENV)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(m) = memory {
            c.env(pipewright::plan::AVAILABLE_MEMORY_ENV, m.to_string());
        }
        c.spawn().expect("start a worker")
    };
    // The first small volunteer gets stage 1, though stage 0 comes first.
    procs.0.push(volunteer("small-a", Some(small)));
    wait_for(&client, "the small volunteer on stage 1", |s| {
        s.shards[1].worker.is_some()
    });
    // The second waits: stage 0 is vacant but too large for it.
    procs.0.push(volunteer("small-b", Some(small)));
    wait_for(&client, "a standby", |s| s.standby == 1);
    let s = client.status().expect("status");
    assert!(s.shards[0].worker.is_none(), "{:?}", s.shards);
    assert_eq!(s.phase, Phase::Pending);
    // One with the memory for stage 0 takes it; the run trains to its end.
    procs.0.push(volunteer("large", Some(need(0) + (64 << 20))));
    wait_for(&client, "the run to succeed", |s| {
        s.phase == Phase::Succeeded
    });
    let s = client.status().expect("status");
    assert_eq!(s.step, 2);
    assert_eq!(s.standby, 1, "the small standby never got stage 0");
}

/// The multi-process pipeline's stage workers recompute too, and a run
/// with `recompute: full` or `selective` gives the same losses and final
/// parameters, bit for bit, as one without, under 1F1B and under ZB-H1
/// (whose weight halves run apart from the input halves).
#[test]
fn stage_workers_recompute_without_changing_a_bit() {
    use pipewright_spec::{parse_manifest, Recompute};
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_corpus(dir.path());
    for schedule in ["1f1b", "zb-h1"] {
        let run = |policy: Recompute| {
            let mut m = parse_manifest(&format!(
                r#"apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: recompute}}
spec:
  model: {{dim: 32, layers: 6, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: true}}
  data: {{sources: ["{}"]}}
  training: {{steps: 3, microBatchSize: 2, microBatches: 4, learningRate: 0.01, seed: 11}}
  pipeline: {{stages: 3, schedule: {schedule}}}
"#,
                dir.path().join("corpus.txt").display()
            ))
            .expect("manifest");
            m.spec.training.recompute = policy;
            let done = common::run_stage_workers(&m, None).expect("pipeline run");
            let mut losses = Vec::new();
            let mut params = Vec::new();
            for (shard, steps, p) in done {
                if shard.stage == 2 {
                    losses = steps
                        .iter()
                        .map(|s| s.loss.expect("a last stage's loss").to_bits())
                        .collect::<Vec<u32>>();
                }
                let bits: Vec<Vec<u32>> = p
                    .iter()
                    .map(|t| t.iter().map(|v| v.to_bits()).collect())
                    .collect();
                params.push((shard.stage, bits));
            }
            params.sort();
            (losses, params)
        };
        let (losses, params) = run(Recompute::Off);
        assert_eq!(losses.len(), 3);
        for policy in [Recompute::Full, Recompute::Selective] {
            let (l, p) = run(policy);
            assert_eq!(l, losses, "{schedule}, {policy:?}: losses");
            assert!(p == params, "{schedule}, {policy:?}: parameters differ");
        }
    }
}

/// With `spec.training.snapshot: disk` the state one step back lives in a
/// file of each worker's temporary directory: workers killed mid-run are
/// replaced, the survivors roll back from their files, and the run ends
/// with the same losses as an undisturbed run that keeps its snapshots in
/// memory. No snapshot file is left behind (a replacement removes those
/// of killed workers), and the plan takes the snapshot off every stage.
#[test]
fn a_run_with_its_snapshots_on_disk_recovers_from_kills_as_one_in_memory_does() {
    use common::procs::{assert_same, serial, train_processes, write_inputs};
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = write_inputs(dir.path(), "snap", 3, 2, 40);
    let yaml = std::fs::read_to_string(&memory).expect("manifest");
    assert!(yaml.contains("threads: 1}"), "{yaml}");
    let disk = dir.path().join("snap-disk.yaml");
    std::fs::write(
        &disk,
        yaml.replace("threads: 1}", "threads: 1, snapshot: disk}"),
    )
    .expect("write manifest");

    let (m, d) = (
        pipewright_spec::load_manifest(&memory).expect("manifest"),
        pipewright_spec::load_manifest(&disk).expect("manifest"),
    );
    let (pm, pd) = (plan(&m, 256, None), plan(&d, 256, None));
    for (a, b) in pm.stages.iter().zip(&pd.stages) {
        assert_eq!(a.total_bytes - b.total_bytes, 3 * a.weight_bytes);
        assert_eq!(b.snapshot_bytes, 0);
    }

    train_processes(&memory, &dir.path().join("clean"), &[]);
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let out = common::succeed(
        common::pipewright()
            .args(["train", "--processes", "--quiet", "--out"])
            .arg(dir.path().join("drill"))
            .args(["--kill-workers", "3", "--kill-seed", "7"])
            .arg(&disk)
            .env("TMPDIR", &scratch),
    );
    assert!(out.contains("fault drill: 3 kill(s), 3 recovered"), "{out}");
    let summary = |run: &str| common::losses_in(&dir.path().join(run).join("summary.json"));
    assert_same(&summary("clean"), &summary("drill"));
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .expect("scratch")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("pipewright-snapshot-"))
        .collect();
    assert!(left.is_empty(), "snapshot files left: {left:?}");
}
