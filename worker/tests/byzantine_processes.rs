//! Attack drills on real processes (`pipewright train --processes
//! --byzantine`): a stage of 3 replicas with one dishonest replica, under
//! the plain mean and under the robust aggregations; a worker that
//! sends NaN activations, whose frames are refused and counted; and a
//! replica that skips its update, outvoted by its replicas' parameter
//! digests at the coordinator.

use std::path::{Path, PathBuf};

mod common;

use common::procs::{assert_same, serial, train_processes, write_inputs};
use common::{losses_in, pipewright};

const STEPS: u64 = 12;

/// Final losses of the robust runs under attack stay this close to the
/// clean run's.
const ROBUST_BOUND: f64 = 0.25;

fn manifest(dir: &Path, name: &str, stages: usize, replicas: usize, aggregation: &str) -> PathBuf {
    let path = write_inputs(dir, name, stages, replicas, STEPS);
    let yaml = std::fs::read_to_string(&path)
        .expect("manifest")
        .replace("every: 25", "every: 0")
        .replace(
            &format!("replicas: {replicas}}}"),
            &format!("replicas: {replicas}, aggregation: {aggregation}}}"),
        );
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

fn final_loss(out: &Path) -> f64 {
    *losses_in(&out.join("summary.json")).last().expect("a loss")
}

#[test]
fn one_dishonest_replica_of_three_damages_the_mean_but_not_the_robust_rules() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mean = manifest(d, "mean", 1, 3, "mean");
    train_processes(&mean, &d.join("clean"), &[]);
    let clean = final_loss(&d.join("clean"));
    let first = losses_in(&d.join("clean").join("summary.json"))[0];
    assert!(
        clean < first - 1.0,
        "the clean run learns: {first} → {clean}"
    );
    // −100 times its gradient: the mean goes uphill.
    let attack = ["--byzantine", "0/1=scale:-100"];
    train_processes(&mean, &d.join("mean-attacked"), &attack);
    let damaged = final_loss(&d.join("mean-attacked"));
    assert!(
        damaged > clean + 1.0,
        "mean under attack: {damaged} vs clean {clean}"
    );
    for rule in ["trimmedMean", "median"] {
        let m = manifest(d, &rule.to_lowercase(), 1, 3, rule);
        let out = d.join(format!("{rule}-attacked"));
        train_processes(&m, &out, &attack);
        let got = final_loss(&out);
        assert!(
            (got - clean).abs() < ROBUST_BOUND,
            "{rule} under attack: {got} vs clean {clean}"
        );
    }
    // A replica that merely flips its sign is outvoted as well.
    let m = manifest(d, "median-flip", 1, 3, "median");
    let out = d.join("median-flip");
    train_processes(&m, &out, &["--byzantine", "0/2=sign-flip@3"]);
    let got = final_loss(&out);
    assert!(
        (got - clean).abs() < ROBUST_BOUND,
        "median under sign-flip: {got} vs {clean}"
    );
}

#[test]
fn nan_activations_are_refused_and_the_run_ends_as_a_clean_one() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest(d, "nan", 2, 1, "mean");
    train_processes(&m, &d.join("clean"), &[]);
    let out = pipewright()
        .args(["train", "--processes", "--quiet", "--out"])
        .arg(d.join("drill"))
        .args(["--byzantine", "0/0=nan@3"])
        .arg(&m)
        .output()
        .expect("run pipewright");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Stage 1 refuses every poisoned activation (one per attacked step:
    // a step trained again after its epoch broke off is honest) and the
    // run replays those steps: it ends exactly where the clean one does.
    assert!(
        stderr.contains("refused the Activation") && stderr.contains("non_finite"),
        "{stderr}"
    );
    assert_same(
        &losses_in(&d.join("clean").join("summary.json")),
        &losses_in(&d.join("drill").join("summary.json")),
    );
}

#[test]
fn a_stale_replica_is_outvoted_by_its_replicas_digests_and_the_run_replays_exactly() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest(d, "stale", 1, 3, "mean");
    train_processes(&m, &d.join("clean"), &[]);
    let out = pipewright()
        .args(["train", "--processes", "--quiet", "--out"])
        .arg(d.join("drill"))
        .args(["--byzantine", "0/2=stale@3"])
        .arg(&m)
        .output()
        .expect("run pipewright");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Replica 2 skips its update from step 3 on: at step 3's barrier its
    // digest differs from the two others', it is refused and dropped, and
    // its slot is refilled (it registers again) from a majority replica.
    // Like every drill it attacks again at each later step, and is caught
    // again each time.
    let first = stderr
        .lines()
        .find(|l| l.contains("digest_mismatch"))
        .unwrap_or_else(|| panic!("no digest mismatch: {stderr}"));
    assert!(
        first.contains("stage 0 replica 2's parameters after step 3"),
        "{first}"
    );
    assert!(
        !stderr.contains("replica 0's parameters") && !stderr.contains("replica 1's parameters"),
        "only the stale replica is outvoted: {stderr}"
    );
    // Each caught step is trained again from the majority's state: the
    // run ends exactly where the clean one does.
    assert_same(
        &losses_in(&d.join("clean").join("summary.json")),
        &losses_in(&d.join("drill").join("summary.json")),
    );
}
