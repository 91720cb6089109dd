//! Audits of stages with one replica on real processes (`pipewright train
//! --processes`): the coordinator is their validator. It recomputes an
//! audited micro-batch itself from the worker's evidence and the
//! parameters of before the step the worker uploads (accepted only with
//! the digest that worker committed to after the step before, or at the
//! first step the digest of the run's initial parameters), then replays the
//! worker's optimizer update from the moments and the applied gradient it
//! committed to. A clean run audited at every step passes every audit and
//! trains as a run without audits; a worker that sends what it did not
//! compute, or skips its update, is convicted at the step it starts,
//! quarantined and replaced, and the run's losses are a clean run's.

use std::path::{Path, PathBuf};

mod common;

use common::procs::{assert_same, serial, train_processes, write_inputs};
use common::{losses_in, pipewright};
use pipewright::ledger::Ledger;

const STEPS: u64 = 5;

/// A 2-stage × 1-replica manifest of [`STEPS`] steps, no checkpoints,
/// with `validation`.
fn manifest(dir: &Path, name: &str, validation: &str) -> PathBuf {
    let path = write_inputs(dir, name, 2, 1, STEPS);
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("every: 25", "every: 0")
        + &format!("  validation: {validation}\n");
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// The run's ledger: the quarantined identities as (stage, replica, step,
/// reason) with their evidence, the refusals by reason, and the audits
/// passed and failed over every entry.
struct Verdicts {
    quarantined: Vec<(usize, usize, u64, String)>,
    evidence: Vec<serde_json::Value>,
    refusals: Vec<(String, u64)>,
    passed: u64,
    failed: u64,
}

fn verdicts(out: &Path) -> Verdicts {
    let ledger = Ledger::open_read(&out.join(pipewright::ledger::FILE)).expect("the run's ledger");
    let q = ledger.quarantined().expect("quarantined");
    let entries = ledger.entries(0, u64::MAX).expect("entries");
    Verdicts {
        quarantined: q
            .iter()
            .map(|q| {
                let c = &q.conviction;
                (c.stage, c.replica, c.step, c.reason.clone())
            })
            .collect(),
        evidence: q
            .iter()
            .map(|q| serde_json::from_str(&q.conviction.evidence).expect("JSON evidence"))
            .collect(),
        refusals: ledger.refusal_counts().expect("refusals"),
        passed: entries.iter().map(|e| e.audits_passed as u64).sum(),
        failed: entries.iter().map(|e| e.audits_failed as u64).sum(),
    }
}

/// The shards whose worker the launcher replaced after a quarantine.
fn replaced(out: &Path) -> Vec<(usize, usize)> {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["quarantined"]
        .as_array()
        .expect("a quarantined list")
        .iter()
        .map(|q| {
            (
                q["stage"].as_u64().expect("stage") as usize,
                q["replica"].as_u64().expect("replica") as usize,
            )
        })
        .collect()
}

/// `pipewright train --processes` with the drill `attack`; its standard
/// error, after checking that it succeeded.
fn drill(manifest: &Path, out: &Path, attack: &str) -> String {
    let run = pipewright()
        .env(
            pipewright::shard::TERMINATION_LOG_ENV,
            out.with_extension("termination.log"),
        )
        .args(["train", "--processes", "--quiet", "--out"])
        .arg(out)
        .args(["--byzantine", attack])
        .arg(manifest)
        .output()
        .expect("run pipewright");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{attack}: {stderr}");
    stderr
}

/// With every shard audited at every step, a clean run of one replica per
/// stage passes all its audits (the first step's too, against the initial
/// parameters' digest), refuses nothing, and trains exactly as the same
/// run with audits off. So too with `snapshot: disk`, where the
/// parameters and moments of an update upload are read back from the
/// snapshot file.
#[test]
fn a_clean_one_replica_run_audited_at_every_step_passes_and_trains_as_without_audits() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let off = manifest(d, "unaudited", "{auditRate: 0.0}");
    train_processes(&off, &d.join("unaudited"), &[]);
    let m = manifest(d, "every", "{auditRate: 1.0}");
    train_processes(&m, &d.join("every"), &[]);
    let v = verdicts(&d.join("every"));
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(v.refusals.is_empty(), "{:?}", v.refusals);
    assert_eq!(
        (v.passed, v.failed),
        (STEPS * 2, 0),
        "every shard, every step"
    );
    let none = verdicts(&d.join("unaudited"));
    assert_eq!((none.passed, none.failed), (0, 0));
    assert_same(
        &losses_in(&d.join("unaudited").join("summary.json")),
        &losses_in(&d.join("every").join("summary.json")),
    );
    let yaml = std::fs::read_to_string(&m).expect("manifest");
    assert!(yaml.contains("threads: 1}"), "{yaml}");
    let disk = d.join("disk.yaml");
    std::fs::write(
        &disk,
        yaml.replace("threads: 1}", "threads: 1, snapshot: disk}"),
    )
    .expect("write manifest");
    train_processes(&disk, &d.join("disk"), &[]);
    let v = verdicts(&d.join("disk"));
    assert!(v.refusals.is_empty(), "{:?}", v.refusals);
    assert_eq!((v.passed, v.failed), (STEPS * 2, 0), "snapshot: disk");
    assert_same(
        &losses_in(&d.join("unaudited").join("summary.json")),
        &losses_in(&d.join("disk").join("summary.json")),
    );
}

/// A worker, alone on its stage, that sends noise on its activations (the
/// first stage) or zeros for its activation gradients (the last) from
/// step 3 on is convicted at step 3 by the coordinator's recomputation
/// alone, quarantined and replaced; the run goes back to its start (no
/// checkpoint, and the stage lost its only holder) and its losses are a
/// clean run's. So too from the first step on, where the parameters are
/// accepted against the digest of the run's initial ones.
#[test]
fn a_sole_replica_that_sends_what_it_did_not_compute_is_convicted_by_the_coordinator() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest(d, "sole", "{auditRate: 1.0}");
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    for (stage, attack, step) in [
        (0, "act-noise@3", 3),
        (1, "lazy-zeros@3", 3),
        (0, "act-noise@1", 1),
    ] {
        let out = d.join(attack.replace('@', "-"));
        let stderr = drill(&m, &out, &format!("{stage}/0={attack}"));
        let v = verdicts(&out);
        assert_eq!(
            v.quarantined,
            vec![(stage, 0, step, "failed_audit".to_string())],
            "{attack}: {stderr}"
        );
        assert_eq!(v.evidence[0]["validator"], "coordinator", "{attack}");
        assert_ne!(
            v.evidence[0]["coordinator"], v.evidence[0]["committed"],
            "{attack}"
        );
        assert_eq!(replaced(&out), vec![(stage, 0)], "{attack}");
        let message = std::fs::read_to_string(out.with_extension("termination.log"))
            .expect("the quarantined worker's termination message");
        assert!(
            message.starts_with("quarantined:")
                && message.contains(&format!("at step {step}"))
                && message.contains("failed_audit"),
            "{message}"
        );
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}

/// A worker alone on its stage that skips its optimizer update (`stale`)
/// computes honest activations and gradients, which its audit's
/// micro-batch reproduces, but the coordinator also replays its update
/// from the parameters and moments it committed to before the step and
/// the gradient it committed to applying: the parameters' digest it signed
/// after the step is not the replay's. One that applies a gradient other
/// than the one its micro-batches give (`sign-flip` negates it, `scale`
/// multiplies it by 100) and commits to it replays consistently, but the
/// coordinator also recomputes the step's weight gradients from the
/// evidence of every micro-batch of the step: they are not the gradient
/// applied. Each is convicted (`wrong_update`) at the first attacked step,
/// quarantined and replaced, and the run's losses are a clean run's. The
/// first step too, whose moments must be the initial zeros.
#[test]
fn a_sole_replica_that_skips_its_update_or_applies_another_gradient_is_convicted() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest(d, "sole", "{auditRate: 1.0}");
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    for (stage, attack, step) in [
        (1, "stale@3", 3),
        (0, "stale@1", 1),
        (0, "sign-flip@2", 2),
        (1, "scale@3", 3),
    ] {
        let out = d.join(attack.replace('@', "-"));
        let stderr = drill(&m, &out, &format!("{stage}/0={attack}"));
        let v = verdicts(&out);
        assert_eq!(
            v.quarantined,
            vec![(stage, 0, step, "wrong_update".to_string())],
            "{attack}: {stderr}"
        );
        assert_eq!(v.evidence[0]["validator"], "coordinator", "{attack}");
        assert!(
            v.refusals
                .iter()
                .any(|(r, n)| r == "wrong_update" && *n == 1),
            "{attack}: {:?}",
            v.refusals
        );
        // The gradient drills replay consistently: the recomputed step is
        // what convicts them.
        assert_eq!(
            stderr.contains("is not the one its micro-batches give"),
            !attack.starts_with("stale"),
            "{attack}: {stderr}"
        );
        assert_eq!(replaced(&out), vec![(stage, 0)], "{attack}");
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}
