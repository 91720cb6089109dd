//! Attack drills on real processes (`pipewright train --processes
//! --byzantine`): a stage of 3 replicas with one dishonest replica, under
//! the plain mean and under the robust aggregations; workers that send
//! NaN, convicted by the signed frames their receivers refused; a
//! replica that skips its update, outvoted by its replicas' parameter
//! digests at the coordinator, quarantined and replaced; workers that send
//! what they did not compute, convicted by audits, quarantined and
//! replaced; a lying auditor overturned; a forged report refused; a
//! clean run with audits and a worker on another thread count, where every
//! audit passes; replicas that distort their gradient contribution,
//! convicted by contribution audits, quarantined and replaced; and a lying
//! contribution auditor overturned.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

mod common;

use common::procs::{
    assert_same, coordinator, free_port, identity, serial, train_processes, wait_for, write_inputs,
    Procs,
};
use common::{losses_in, pipewright};
use pipewright::coord::{Client, Phase};
use pipewright::ledger::Ledger;

const STEPS: u64 = 12;

/// Final losses of the robust runs under attack stay this close to the
/// clean run's.
const ROBUST_BOUND: f64 = 0.25;

fn manifest(dir: &Path, name: &str, stages: usize, replicas: usize, aggregation: &str) -> PathBuf {
    manifest_of(dir, name, stages, replicas, aggregation, STEPS)
}

fn manifest_of(
    dir: &Path,
    name: &str,
    stages: usize,
    replicas: usize,
    aggregation: &str,
    steps: u64,
) -> PathBuf {
    let path = write_inputs(dir, name, stages, replicas, steps);
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

/// A worker that sends NaN (activations forward, activation gradients
/// back) signs what it sends: its receiver refuses the frame and shows it
/// to the coordinator, which convicts the signer (`refused_frame`) at the
/// first attacked step; its identity is quarantined, the launcher replaces
/// it under a new identity, and the step is trained again: the run's
/// losses are a clean run's.
#[test]
fn nan_senders_are_convicted_by_the_frame_they_signed_quarantined_and_replaced() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest_of(d, "nan", 2, 3, "median", 6);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    for shard in [(0, 1), (1, 2)] {
        let out = d.join(format!("nan-{}-{}", shard.0, shard.1));
        let stderr = drill(&m, &out, &format!("{}/{}=nan@3", shard.0, shard.1));
        assert!(stderr.contains("non_finite"), "{stderr}");
        let v = verdicts(&out);
        assert_eq!(
            v.quarantined,
            vec![(shard.0, shard.1, 3, "refused_frame".to_string())],
            "{stderr}"
        );
        assert_eq!(refused(&v, "refused_frame"), 1, "{:?}", v.refusals);
        for honest in ["complaint", "unfounded_complaint", "signature"] {
            assert_eq!(refused(&v, honest), 0, "{honest}: {:?}", v.refusals);
        }
        assert_eq!(replaced(&out), vec![shard]);
        let message = std::fs::read_to_string(out.with_extension("termination.log"))
            .expect("the quarantined worker's termination message");
        assert!(
            message.starts_with("quarantined:") && message.contains("refused_frame"),
            "{message}"
        );
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}

/// A first stage that sends zeros as its activations (`lazy-zeros`)
/// passes every check on what it sends, but makes its receiver's honest
/// backward absurd (RMSNorm of a zero row), so its own contribution in its
/// stage's gather comes back absurd and the step breaks off there, before
/// its barrier: no audit is drawn (audits are off here anyway). Its peers
/// name it as the suspect, its receiver reports the signed headers of its
/// activations, and two other replicas of the first stage recheck them
/// before the next epoch links: they convict it (`failed_recheck`); it is
/// quarantined and replaced, and the run ends. Nobody honest is refused.
#[test]
fn a_first_stage_that_sends_zeros_is_convicted_by_the_recheck_of_a_broken_step() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = manifest_of(d, "zeros", 2, 3, "median", 10);
    let yaml = std::fs::read_to_string(&m).expect("manifest") + "  validation: {auditRate: 0}\n";
    std::fs::write(&m, yaml).expect("write manifest");
    let out = d.join("zeros");
    let stderr = drill(&m, &out, "0/1=lazy-zeros@3");
    let v = verdicts(&out);
    assert_eq!(v.quarantined.len(), 1, "{:?}: {stderr}", v.quarantined);
    let (stage, replica, step, reason) = v.quarantined[0].clone();
    assert_eq!(
        (stage, replica, reason.as_str()),
        (0, 1, "failed_recheck"),
        "{stderr}"
    );
    assert!(
        (3..=6).contains(&step),
        "convicted at step {step}: {stderr}"
    );
    assert!(stderr.contains("absurd_norm"), "{stderr}");
    assert_eq!(replaced(&out), vec![(0, 1)]);
    for honest in [
        "complaint",
        "unfounded_complaint",
        "signature",
        "audit_report",
    ] {
        assert_eq!(refused(&v, honest), 0, "{honest}: {:?}", v.refusals);
    }
    let message = std::fs::read_to_string(out.with_extension("termination.log"))
        .expect("the quarantined worker's termination message");
    assert!(
        message.starts_with("quarantined:") && message.contains("failed_recheck"),
        "{message}"
    );
    assert_eq!(
        losses_in(&out.join("summary.json")).len(),
        10,
        "the run ends"
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
    // digest differs from the two others', it is refused, its identity
    // quarantined, its process exits and the launcher replaces it by a
    // fresh, honest one under a new identity, which gets a majority
    // replica's state.
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
    let v = verdicts(&d.join("drill"));
    assert_eq!(
        v.quarantined,
        vec![(0, 2, 3, "digest_mismatch".to_string())],
        "{stderr}"
    );
    assert_eq!(replaced(&d.join("drill")), vec![(0, 2)]);
    assert!(
        d.join("drill/identities/stage-0-replica-2").exists()
            && d.join("drill/identities/stage-0-replica-2.2").exists(),
        "the old identity is kept beside the new one"
    );
    // Each caught step is trained again from the majority's state: the
    // run ends exactly where the clean one does.
    assert_same(
        &losses_in(&d.join("clean").join("summary.json")),
        &losses_in(&d.join("drill").join("summary.json")),
    );
}

/// A manifest of `steps` steps whose every shard is audited at every step
/// (`auditRate: 1.0`), so a drill is caught at the step it starts.
fn audited(dir: &Path, name: &str, stages: usize, replicas: usize, steps: u64) -> PathBuf {
    let path = manifest_of(dir, name, stages, replicas, "mean", steps);
    let yaml =
        std::fs::read_to_string(&path).expect("manifest") + "  validation: {auditRate: 1.0}\n";
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// What a run's ledger says about its audits: the quarantined identities
/// as (stage, replica, step, reason), the refusals by reason, and the
/// audits passed and failed over every entry.
struct Verdicts {
    quarantined: Vec<(usize, usize, u64, String)>,
    refusals: Vec<(String, u64)>,
    passed: u64,
    failed: u64,
}

fn verdicts(out: &Path) -> Verdicts {
    let ledger = Ledger::open_read(&out.join(pipewright::ledger::FILE)).expect("the run's ledger");
    let quarantined = ledger
        .quarantined()
        .expect("quarantined")
        .into_iter()
        .map(|q| {
            let c = q.conviction;
            (c.stage, c.replica, c.step, c.reason)
        })
        .collect();
    let entries = ledger.entries(0, u64::MAX).expect("entries");
    Verdicts {
        quarantined,
        refusals: ledger.refusal_counts().expect("refusals"),
        passed: entries.iter().map(|e| e.audits_passed as u64).sum(),
        failed: entries.iter().map(|e| e.audits_failed as u64).sum(),
    }
}

fn refused(v: &Verdicts, reason: &str) -> u64 {
    v.refusals
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
}

/// The shards whose worker the launcher replaced after a quarantine, from
/// the run's summary.
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

/// `pipewright train --processes` with a drill; its standard error, after
/// checking that it succeeded. A quarantined worker writes its reason to
/// `out`'s sibling `termination.log`.
fn drill(manifest: &Path, out: &Path, attack: &str) -> String {
    let mut cmd = pipewright();
    cmd.env(
        pipewright::shard::TERMINATION_LOG_ENV,
        out.with_extension("termination.log"),
    )
    .args(["train", "--processes", "--quiet", "--out"])
    .arg(out);
    // Several drills, separated by spaces.
    for a in attack.split_whitespace() {
        cmd.args(["--byzantine", a]);
    }
    let run = cmd.arg(manifest).output().expect("run pipewright");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{attack}: {stderr}");
    stderr
}

/// A worker that sends what it did not compute (noise on its activations,
/// zeros for its gradients, its previous step's activations, or gradients
/// 100 times too large) commits
/// to what it sent, so the chain of hashes holds; the audit of its first
/// attacked step recomputes its micro-batch on two other replicas, which
/// agree with each other and not with it: it is convicted, its identity
/// quarantined, its process exits and the launcher replaces it by a fresh
/// one under a new identity. The attacked step is trained again: the run's
/// losses are a clean run's.
#[test]
fn workers_that_send_what_they_did_not_compute_are_convicted_quarantined_and_replaced() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = audited(d, "lazy", 2, 3, 5);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let v = verdicts(&d.join("clean"));
    assert!(v.quarantined.is_empty() && v.failed == 0, "clean run");
    // Every shard with a micro-batch is audited at every step.
    assert_eq!(v.passed, 5 * 6, "clean run's audits");
    for (shard, attack) in [
        ((0, 1), "act-noise@3"),
        ((1, 2), "lazy-zeros@3"),
        ((0, 2), "lazy-replay@3"),
        ((1, 0), "act-scale@3"),
    ] {
        let out = d.join(attack.replace('@', "-"));
        let stderr = drill(&m, &out, &format!("{}/{}={attack}", shard.0, shard.1));
        let v = verdicts(&out);
        assert_eq!(
            v.quarantined,
            vec![(shard.0, shard.1, 3, "failed_audit".to_string())],
            "{attack}: {stderr}"
        );
        assert_eq!(replaced(&out), vec![shard], "{attack}");
        let message = std::fs::read_to_string(out.with_extension("termination.log"))
            .expect("the quarantined worker's termination message");
        assert!(
            message.starts_with("quarantined:")
                && message.contains("at step 3")
                && message.contains("failed_audit"),
            "{message}"
        );
        assert!(
            stderr.contains(&format!(
                "stage {} replica {} was quarantined",
                shard.0, shard.1
            )),
            "{attack}: {stderr}"
        );
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}

/// A validator that reports hashes it did not compute is contradicted by a
/// second validator that agrees with the audited worker: its verdict is
/// overturned, the audit passes, nobody is quarantined. Two validators
/// that tell the same lie (colluding) agree against an honest worker when
/// both validate it, but convict no one: the coordinator recomputes the
/// micro-batch itself, reproduces the commitment and refutes both. A
/// worker that signs its reports with a key that is not its identity's is
/// refused. Every run ends as a clean one.
#[test]
fn a_lying_auditor_is_overturned_and_a_forged_report_refused() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = audited(d, "liar", 1, 3, 8);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let stderr = drill(&m, &d.join("lie"), "0/1=lie@2");
    let v = verdicts(&d.join("lie"));
    // From step 2 on, replica 1 validates two audits of each step (of
    // replicas 0 and 2) half the time each: caught once at least.
    assert!(refused(&v, "overturned_verdict") >= 1, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(replaced(&d.join("lie")).is_empty());
    assert_same(&clean, &losses_in(&d.join("lie").join("summary.json")));
    let stderr = drill(&m, &d.join("collude"), "0/1=lie@2 0/2=lie@2");
    let v = verdicts(&d.join("collude"));
    // Replica 0's audit is validated by both liars at every step from 2
    // on: both refuted each time.
    assert!(refused(&v, "overturned_verdict") >= 2, "{stderr}");
    assert_eq!(refused(&v, "failed_audit"), 0, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(replaced(&d.join("collude")).is_empty());
    assert_same(&clean, &losses_in(&d.join("collude").join("summary.json")));
    let stderr = drill(&m, &d.join("forge"), "0/2=forge@4");
    let v = verdicts(&d.join("forge"));
    assert!(refused(&v, "signature") >= 1, "{stderr}");
    assert_same(&clean, &losses_in(&d.join("forge").join("summary.json")));
}

/// A worker process of `manifest`'s shard (`stage`, `replica`) on
/// `threads` kernel threads.
fn worker_on(manifest: &Path, url: &str, stage: usize, replica: usize, threads: usize) -> Child {
    pipewright()
        .arg("worker")
        .arg(manifest)
        .args(["--coordinator", url, "--threads", &threads.to_string()])
        .args([
            "--stage",
            &stage.to_string(),
            "--replica",
            &replica.to_string(),
        ])
        .arg("--identity")
        .arg(identity(manifest, &format!("{stage}-{replica}")))
        .env("PIPEWRIGHT_JOIN_TOKEN", "t0ken")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

/// Honest workers pass every audit, even when the validator runs its
/// kernels on another number of threads than the audited worker: the
/// recomputation is bitwise the same.
#[test]
fn a_clean_run_with_audits_and_a_worker_on_other_threads_fails_no_audit() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = audited(d, "threads", 2, 3, 4);
    let out = d.join("run");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::new(&url, "t0ken", Duration::from_secs(30));
    let mut procs = Procs(vec![coordinator(&m, &out, port)]);
    for s in 0..2 {
        for r in 0..3 {
            let threads = if (s, r) == (1, 1) { 3 } else { 1 };
            procs.0.push(worker_on(&m, &url, s, r, threads));
        }
    }
    wait_for(&client, "the run to succeed", |s| {
        s.phase == Phase::Succeeded
    });
    drop(procs);
    let v = verdicts(&out);
    assert_eq!(v.failed, 0, "refusals {:?}", v.refusals);
    assert_eq!(v.passed, 4 * 6, "every shard audited at every step");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(v.refusals.is_empty(), "{:?}", v.refusals);
}

/// A manifest of `steps` steps under `aggregation` whose every training
/// shard's contribution is audited at every step
/// (`contributionAuditRate: 1.0`), micro-batch audits off, so a gradient
/// drill is caught at the step it starts and only contribution audits
/// catch it.
fn contribution_audited(
    dir: &Path,
    name: &str,
    stages: usize,
    aggregation: &str,
    steps: u64,
) -> PathBuf {
    let path = manifest_of(dir, name, stages, 3, aggregation, steps);
    let yaml = std::fs::read_to_string(&path).expect("manifest")
        + "  validation: {auditRate: 0, contributionAuditRate: 1.0}\n";
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

/// A replica that sign-flips or scales its gradient contribution commits to
/// what it sent, so its peers received what it signed; the contribution
/// audit of its first attacked step recomputes its whole step on its two
/// ring neighbours, who agree with each other and not with it: it is
/// convicted, its identity quarantined, its process exits and the launcher
/// replaces it by a fresh one under a new identity. One that commits to
/// the honest contribution but sends a negated one (`contribution-lie`) is
/// convicted on what its first validator proves it received: the frames it
/// signed. The attacked step is trained
/// again: the run's losses are a clean run's. The clean run fails no
/// audit.
#[test]
fn gradient_drills_are_convicted_by_contribution_audits_quarantined_and_replaced() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = contribution_audited(d, "contrib", 2, "median", 5);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let v = verdicts(&d.join("clean"));
    assert!(
        v.quarantined.is_empty() && v.failed == 0,
        "clean run: {:?}",
        v.refusals
    );
    assert!(v.refusals.is_empty(), "clean run: {:?}", v.refusals);
    // Every training shard's contribution is audited at every step.
    assert_eq!(v.passed, 5 * 6, "clean run's audits");
    for (shard, attack) in [
        ((0, 1), "sign-flip@3"),
        ((1, 2), "scale@3"),
        ((1, 0), "contribution-lie@3"),
    ] {
        let out = d.join(attack.replace('@', "-"));
        let stderr = drill(&m, &out, &format!("{}/{}={attack}", shard.0, shard.1));
        let v = verdicts(&out);
        assert_eq!(
            v.quarantined,
            vec![(shard.0, shard.1, 3, "failed_audit".to_string())],
            "{attack}: {stderr}"
        );
        assert_eq!(replaced(&out), vec![shard], "{attack}");
        let message = std::fs::read_to_string(out.with_extension("termination.log"))
            .expect("the quarantined worker's termination message");
        assert!(
            message.starts_with("quarantined:")
                && message.contains("at step 3")
                && message.contains("failed_audit"),
            "{message}"
        );
        // The validators say why: the sign-flipped and scaled
        // contributions are not what the evidence recomputes to (and are
        // what was received), which both validators agree on; the liar's
        // is, but it sent another, which the first validator proves alone
        // with the frames the liar signed.
        let evidence = conviction_evidence(&out);
        assert!(evidence["contribution"].is_string(), "{evidence}");
        let committed = &evidence["contribution"];
        let (recomputed, received) = (
            evidence["recomputed"].as_array().expect("recomputed"),
            evidence["received"].as_array().expect("received"),
        );
        let lie = attack.starts_with("contribution-lie");
        let n = if lie { 1 } else { 2 };
        assert_eq!((recomputed.len(), received.len()), (n, n), "{evidence}");
        for k in 0..n {
            assert_eq!(&recomputed[k] == committed, lie, "{attack}: {evidence}");
            assert_eq!(&received[k] == committed, !lie, "{attack}: {evidence}");
        }
        let frames = evidence["receipt_frames"][0].as_u64().unwrap_or(0);
        assert_eq!(frames > 0, lie, "{attack}: {evidence}");
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}

/// The evidence of the one conviction in the run at `out`, as JSON.
fn conviction_evidence(out: &Path) -> serde_json::Value {
    let ledger = Ledger::open_read(&out.join(pipewright::ledger::FILE)).expect("the run's ledger");
    let q = ledger.quarantined().expect("quarantined");
    assert_eq!(q.len(), 1, "one conviction");
    serde_json::from_str(&q[0].conviction.evidence).expect("the evidence is JSON")
}

/// A validator that reports a recomputed contribution it did not compute
/// is contradicted by the audited replica's other neighbour, which agrees
/// with the audited replica's commitment: its verdict is overturned,
/// nobody is quarantined, and the run ends as a clean one. Two colluding
/// validators, the honest replica's only two neighbours, agree against it
/// at every step, but convict no one: the coordinator recomputes the
/// replica's whole step itself, reproduces its commitment and refutes
/// both. Nor can they by saying the replica sent them something else:
/// that needs the frames it signed.
#[test]
fn a_lying_contribution_auditor_is_overturned() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = contribution_audited(d, "contrib-liar", 1, "centeredClip", 6);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let v = verdicts(&d.join("clean"));
    assert!(
        v.failed == 0 && v.refusals.is_empty(),
        "clean run: {:?}",
        v.refusals
    );
    let stderr = drill(&m, &d.join("lie"), "0/1=lie@2");
    let v = verdicts(&d.join("lie"));
    // From step 2 on, replica 1 is the first validator of each of its two
    // neighbours' audits half the time: overturned once at least.
    assert!(refused(&v, "overturned_verdict") >= 1, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(replaced(&d.join("lie")).is_empty());
    assert_same(&clean, &losses_in(&d.join("lie").join("summary.json")));
    let out = d.join("collude");
    let stderr = drill(&m, &out, "0/0=lie@2 0/1=lie@2");
    let v = verdicts(&out);
    // Replica 2's contribution is validated by both liars at every step
    // from 2 on (5 steps): both refuted each time.
    assert!(refused(&v, "overturned_verdict") >= 10, "{stderr}");
    assert_eq!(refused(&v, "failed_audit"), 0, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(replaced(&out).is_empty());
    assert_same(&clean, &losses_in(&out.join("summary.json")));
    // The same two say instead that the honest replica sent them another
    // contribution than it committed to, both the same one: a claim about
    // the gather that needs the frames it signed, which they do not have.
    // Each claim is struck and counted; their recomputations agree with the
    // commitment, so every audit passes.
    let out = d.join("collude-received");
    let stderr = drill(&m, &out, "0/0=lie-received@2 0/1=lie-received@2");
    let v = verdicts(&out);
    assert!(refused(&v, "unproven_receipt") >= 10, "{stderr}");
    assert_eq!(refused(&v, "failed_audit"), 0, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert!(replaced(&out).is_empty());
    assert_same(&clean, &losses_in(&out.join("summary.json")));
}

/// With contribution audits all but never drawn at random, a replica that
/// sign-flips its contribution is still audited, and convicted, at its
/// first attacked step: both other replicas report it as suspect with
/// their step reports, and a suspected replica is audited.
#[test]
fn a_suspected_contribution_is_audited_and_convicted_without_a_random_draw() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = contribution_audited(d, "suspected", 1, "median", 5);
    let yaml = std::fs::read_to_string(&m).expect("manifest").replace(
        "contributionAuditRate: 1.0",
        "contributionAuditRate: 0.000001",
    );
    std::fs::write(&m, yaml).expect("write manifest");
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let v = verdicts(&d.join("clean"));
    // Nobody is suspected, so (all but surely) nothing is audited.
    assert_eq!((v.passed, v.failed), (0, 0), "{:?}", v.refusals);
    let out = d.join("flip");
    let stderr = drill(&m, &out, "0/2=sign-flip@3");
    let v = verdicts(&out);
    assert_eq!(
        v.quarantined,
        vec![(0, 2, 3, "failed_audit".to_string())],
        "{stderr}"
    );
    let evidence = conviction_evidence(&out);
    let by: Vec<u64> = evidence["suspected_by"]
        .as_array()
        .expect("suspected_by")
        .iter()
        .map(|s| {
            assert_eq!(s["reason"], "cosine", "{evidence}");
            s["replica"].as_u64().expect("replica")
        })
        .collect();
    assert_eq!(by, vec![0, 1], "{evidence}");
    assert_eq!(replaced(&out), vec![(0, 2)]);
    assert_same(&clean, &losses_in(&out.join("summary.json")));
}

/// With two replicas a stage has no second validator: when the one
/// validator disputes the audited worker's commitment, the coordinator
/// recomputes the micro-batch itself, from the parameters of before the
/// step uploaded by a replica (checked against the digest both committed)
/// and the evidence it holds. A worker that sends noise in place of its
/// activation gradients is convicted at the step it starts, quarantined
/// and replaced; the step is trained again and the run's losses are a
/// clean run's.
#[test]
fn with_two_replicas_the_coordinator_recomputes_a_disputed_audit_and_convicts() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = audited(d, "pair", 2, 2, 5);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let v = verdicts(&d.join("clean"));
    assert!(v.quarantined.is_empty() && v.failed == 0, "clean run");
    assert_eq!(v.passed, 5 * 4, "clean run's audits");
    let out = d.join("noise");
    let stderr = drill(&m, &out, "1/1=act-noise@3");
    let v = verdicts(&out);
    assert_eq!(
        v.quarantined,
        vec![(1, 1, 3, "failed_audit".to_string())],
        "{stderr}"
    );
    assert_eq!(replaced(&out), vec![(1, 1)]);
    let evidence = conviction_evidence(&out);
    assert_eq!(evidence["second_validator"], "coordinator", "{evidence}");
    assert_eq!(evidence["coordinator"], evidence["recomputed"][0]);
    assert_same(&clean, &losses_in(&out.join("summary.json")));
}

/// With two replicas a validator that reports hashes it did not compute
/// is contradicted by the coordinator's own recomputation, which agrees
/// with the audited worker: its verdict is overturned at every step it
/// lies, every audit passes, nobody is quarantined and the run ends as a
/// clean one, without a step trained again for it.
#[test]
fn with_two_replicas_a_lying_auditor_is_overturned_by_the_coordinator() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let m = audited(d, "liar-pair", 1, 2, 5);
    train_processes(&m, &d.join("clean"), &[]);
    let clean = losses_in(&d.join("clean").join("summary.json"));
    let stderr = drill(&m, &d.join("lie"), "0/1=lie@2");
    let v = verdicts(&d.join("lie"));
    // From step 2 on, replica 1 validates replica 0 at every step.
    assert_eq!(refused(&v, "overturned_verdict"), 4, "{stderr}");
    assert_eq!(refused(&v, "bad_weights"), 0, "{stderr}");
    assert!(v.quarantined.is_empty(), "{:?}", v.quarantined);
    assert_eq!(v.passed, 5 * 2, "every audit passes");
    assert!(replaced(&d.join("lie")).is_empty());
    assert_same(&clean, &losses_in(&d.join("lie").join("summary.json")));
}
