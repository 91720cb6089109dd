//! Targets relayed by a middle stage: every targets frame carries the
//! first stage's signature over the ids it sampled (`link::origin`), which
//! each later stage checks. Honest relays train exactly as an unsigned
//! run; a middle stage that alters the targets it relays is refused at the
//! next hop (`bad_signature`), and, since it signed the frame it sent, its
//! receiver's complaint convicts it (`altered_targets`): on processes it is
//! quarantined and replaced at its first attacked step, and the run's
//! losses are a clean run's.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pipewright::identity::Identity;
use pipewright::link::origin::Origin;
use pipewright::link::sign::{verify_frame, PeerKeys};
use pipewright::link::{Frame, FrameKind, RejectReason};
use pipewright::pipeline::{Attack, PipelineError};
use pipewright_spec::{parse_manifest, TrainingRun};

use common::procs::{assert_same, routed, serial, train_processes, write_inputs};
use common::{losses_in, pipewright};

fn three_stages(dir: &Path, steps: u64) -> TrainingRun {
    common::write_corpus(dir);
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: relayed-targets}}
spec:
  model: {{dim: 32, layers: 3, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: true}}
  data: {{sources: ["{}"]}}
  training: {{steps: {steps}, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, seed: 5, threads: 1}}
  pipeline: {{stages: 3, replicas: 1}}
"#,
        dir.join("corpus.txt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

fn identities() -> Vec<Identity> {
    (0..3)
        .map(|s| Identity::from_secret([20 + s; 32]))
        .collect()
}

/// What a stage ended with: its losses, its error, its `bad_signature`
/// count and the frame it refused.
type Ended = (Vec<f32>, Option<PipelineError>, u64, Option<Frame>);

/// Runs the 3 stages on threads; `signed`: each signs with its identity
/// and checks the others' keys; stage 1 makes `attack`.
fn run(m: &TrainingRun, signed: bool, attack: Option<Attack>) -> Vec<Ended> {
    let ids = identities();
    let keys = signed.then(|| {
        let entries: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(s, id)| (s, 0, id.public_hex()))
            .collect();
        PeerKeys::from_hex(&entries).expect("keys")
    });
    let steps = m.spec.training.steps;
    let timeout = Duration::from_secs(if attack.is_some() { 3 } else { 20 });
    common::on_loopback_workers(m, true, timeout, move |mut w| {
        let stage = w.shard().stage;
        w.set_signer(signed.then(|| ids[stage].clone()));
        w.set_peer_keys(keys.clone());
        if stage == 1 {
            w.set_attack(attack);
        }
        let (mut losses, mut error) = (Vec::new(), None);
        for _ in 0..steps {
            match w.train_step() {
                Ok(s) => losses.extend(s.loss),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let (pipe, _) = w.traffic();
        let refused = w.take_refused();
        if error.is_none() {
            let _ = w.finish();
        }
        let bad = pipe.rejected[RejectReason::BadSignature as usize];
        (losses, error, bad, refused)
    })
}

#[test]
fn honest_relays_train_exactly_as_unsigned_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = three_stages(dir.path(), 3);
    let plain = run(&m, false, None);
    let signed = run(&m, true, None);
    for (p, s) in plain.iter().zip(&signed) {
        assert!(p.1.is_none() && s.1.is_none(), "{:?} {:?}", p.1, s.1);
        assert_eq!(s.2, 0, "nothing refused");
    }
    assert_eq!(signed[2].0.len(), 3);
    assert_eq!(plain[2].0, signed[2].0, "the same losses, bit for bit");
}

/// Stage 1 relays shifted targets from step 2: the last stage refuses them
/// at step 2 (`bad_signature`, counted once) and keeps the frame, which
/// carries stage 1's own valid signature but not an origin stage 0 signed:
/// the proof a complaint shows the coordinator. Step 1 trained as usual.
#[test]
fn altered_targets_are_refused_at_the_next_hop_with_their_relay_s_signature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = three_stages(dir.path(), 3);
    let out = run(&m, true, Some("alter-targets@2".parse().expect("attack")));
    let (losses, error, bad, refused) = &out[2];
    assert_eq!(losses.len(), 1, "step 1 completes, step 2 does not");
    match error {
        Some(PipelineError::Refused { reason, peer, what }) => {
            assert_eq!(*reason, "bad_signature");
            assert_eq!(*peer, "previous stage");
            assert!(what.starts_with("Targets of step 1"), "{what}");
        }
        other => panic!("expected a bad_signature refusal, got {other:?}"),
    }
    assert_eq!(*bad, 1, "counted on the link");
    let frame = refused.as_ref().expect("the refused frame is kept");
    let h = &frame.header;
    assert_eq!((h.kind, h.stage, h.step), (FrameKind::Targets, 1, 1));
    let ids = identities();
    let key = |s: usize| {
        PeerKeys::from_hex(&[(s, 0, ids[s].public_hex())])
            .expect("key")
            .key(s as u32, 0)
            .copied()
            .expect("key")
    };
    assert!(verify_frame(frame, &key(1)), "signed by the relay");
    let (targets, origin) = Origin::split(&frame.payload).expect("ids and origin");
    assert_eq!(origin.replica, 0);
    assert!(
        !origin.verify(&key(0), &h.run_id, h.step, h.micro_batch, targets),
        "the first stage did not sign these targets"
    );
    // The relay's own step, and the first stage's, break off too.
    assert!(out[0].1.is_some() && out[1].1.is_some());
    assert_eq!(out[1].2, 0, "the relay itself refused nothing");
}

/// The manifest of a 3-stage run on processes of `steps` steps, which
/// checkpoints only at its end.
fn processes(dir: &Path, name: &str, replicas: usize, steps: u64) -> PathBuf {
    let m = write_inputs(dir, name, 3, replicas, steps);
    let yaml = std::fs::read_to_string(&m)
        .expect("manifest")
        .replace("every: 25", "every: 0");
    std::fs::write(&m, yaml).expect("write manifest");
    m
}

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

/// A conviction: (stage, replica, step, reason).
type Conviction = (usize, usize, u64, String);

/// The convictions and the refusal counts of a finished run's ledger.
fn verdicts(out: &Path) -> (Vec<Conviction>, Vec<(String, u64)>) {
    let ledger = pipewright::ledger::Ledger::open_read(&out.join(pipewright::ledger::FILE))
        .expect("the run's ledger");
    let quarantined = ledger
        .quarantined()
        .expect("quarantined")
        .into_iter()
        .map(|q| {
            let c = q.conviction;
            (c.stage, c.replica, c.step, c.reason)
        })
        .collect();
    (quarantined, ledger.refusal_counts().expect("refusals"))
}

fn count(refusals: &[(String, u64)], reason: &str) -> u64 {
    refusals
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
}

/// On processes, 3 stages × `replicas`: the middle stage's replica 0 (of
/// 1), or 1 of 2 under `routing: throughput` (where each receiver finds
/// the first-stage replica that sampled a micro-batch in the route),
/// relays altered targets from step 3 on. The last stage
/// refuses them at step 3 and complains; the coordinator convicts the
/// relay (`altered_targets`), which is quarantined and replaced; step 3
/// is trained again and the run's losses are a clean run's. Nobody honest
/// is refused.
#[test]
fn a_middle_stage_that_alters_the_targets_it_relays_is_convicted_at_once() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for replicas in [1, 2] {
        let m = routed(processes(d, &format!("relay{replicas}"), replicas, 5));
        let clean_out = d.join(format!("clean{replicas}"));
        train_processes(&m, &clean_out, &[]);
        let clean = losses_in(&clean_out.join("summary.json"));
        let (q, refusals) = verdicts(&clean_out);
        assert!(q.is_empty(), "clean run: {q:?}");
        assert_eq!(count(&refusals, "altered_targets"), 0);
        let shard = (1, replicas - 1);
        let out = d.join(format!("altered{replicas}"));
        let stderr = drill(&m, &out, &format!("1/{}=alter-targets@3", shard.1));
        assert!(stderr.contains("bad_signature"), "{stderr}");
        let (q, refusals) = verdicts(&out);
        assert_eq!(
            q,
            vec![(shard.0, shard.1, 3, "altered_targets".to_string())],
            "{stderr}"
        );
        assert_eq!(count(&refusals, "altered_targets"), 1, "{refusals:?}");
        for honest in [
            "complaint",
            "unfounded_complaint",
            "signature",
            "chain_mismatch",
        ] {
            assert_eq!(count(&refusals, honest), 0, "{honest}: {refusals:?}");
        }
        let message = std::fs::read_to_string(out.with_extension("termination.log"))
            .expect("the quarantined worker's termination message");
        assert!(
            message.starts_with("quarantined:") && message.contains("altered_targets"),
            "{message}"
        );
        assert_same(&clean, &losses_in(&out.join("summary.json")));
    }
}

/// Only a middle stage relays targets: the drill elsewhere is refused
/// before anything starts.
#[test]
fn the_drill_is_refused_off_a_middle_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = processes(dir.path(), "edge", 1, 2);
    for shard in ["0/0", "2/0"] {
        let run = pipewright()
            .args(["train", "--processes", "--quiet", "--out"])
            .arg(dir.path().join("out"))
            .args(["--byzantine", &format!("{shard}=alter-targets@1")])
            .arg(&m)
            .output()
            .expect("run pipewright");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{shard}");
        assert!(
            stderr.contains("only a middle stage relays targets"),
            "{stderr}"
        );
    }
}
