//! Signed gradient ring frames on real processes (`pipewright train
//! --processes --byzantine`): a replica that sends NaN in its gradient
//! contribution (`grad-nan`) signs the ring frame that carries it, under
//! the ring mean (its own chunk, its partial sums) and under a robust rule
//! (its gathered contribution). Its receiver refuses the frame and shows
//! it to the coordinator, which convicts the signer (`refused_frame`) at
//! the attacked step; the identity is quarantined, the launcher replaces
//! it under a new identity, the step is trained again, and the run's
//! losses are a clean run's. Over loopback, a ring frame altered after its
//! author signed it, signed by another identity, or unsigned is refused
//! (`bad_signature`) and counted, while the genuine frame is taken.

use std::path::{Path, PathBuf};

mod common;

use common::losses_in;
use common::pipewright;
use common::procs::{assert_same, serial, train_processes, write_inputs};
use pipewright::ledger::Ledger;

/// A manifest of `stages` × `replicas` under `aggregation`, `steps` long,
/// without checkpoints.
fn manifest(
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

/// `pipewright train --processes` with the drill `attack`; its standard
/// error, after checking that it succeeded. A quarantined worker writes
/// its reason to `out`'s sibling `termination.log`.
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

/// The run's convictions from its ledger, `(stage, replica, step,
/// reason)`, and its refusals counted by reason.
type Convictions = Vec<(usize, usize, u64, String)>;

fn ledger_of(out: &Path) -> (Convictions, Vec<(String, u64)>) {
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
    (quarantined, ledger.refusal_counts().expect("refusals"))
}

fn count(refusals: &[(String, u64)], reason: &str) -> u64 {
    refusals
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
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

/// A clean run of `m` and a run with `shard` sending NaN in its gradient
/// from step 3: the NaN sender is convicted at step 3 by the ring frame it
/// signed, quarantined and replaced; nobody honest is refused; the losses
/// are the clean run's.
fn convicted_by_its_ring_frame(dir: &Path, m: &Path, shard: (usize, usize)) {
    train_processes(m, &dir.join("clean"), &[]);
    let clean = losses_in(&dir.join("clean").join("summary.json"));
    let out = dir.join("grad-nan");
    let stderr = drill(m, &out, &format!("{}/{}=grad-nan@3", shard.0, shard.1));
    assert!(stderr.contains("non_finite"), "{stderr}");
    let (quarantined, refusals) = ledger_of(&out);
    assert_eq!(
        quarantined,
        vec![(shard.0, shard.1, 3, "refused_frame".to_string())],
        "{stderr}"
    );
    assert_eq!(count(&refusals, "refused_frame"), 1, "{refusals:?}");
    for honest in ["complaint", "unfounded_complaint", "signature"] {
        assert_eq!(count(&refusals, honest), 0, "{honest}: {refusals:?}");
    }
    assert_eq!(replaced(&out), vec![shard]);
    let message = std::fs::read_to_string(out.with_extension("termination.log"))
        .expect("the quarantined worker's termination message");
    assert!(
        message.starts_with("quarantined:")
            && message.contains("refused_frame")
            && message.contains("AllReduce"),
        "{message}"
    );
    assert_same(&clean, &losses_in(&out.join("summary.json")));
}

/// Under the ring mean the NaN sender's own chunk, the first frame it
/// sends, reaches the next replica, which refuses it.
#[test]
fn a_nan_gradient_under_the_mean_is_convicted_by_its_signed_ring_frame() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest(dir.path(), "mean", 1, 2, "mean", 6);
    convicted_by_its_ring_frame(dir.path(), &m, (0, 1));
}

/// Under the median every replica gathers the NaN sender's contribution
/// straight from it: both receivers refuse it and complain; the first
/// complaint convicts, the second finds the signer convicted already.
#[test]
fn a_nan_gradient_under_the_median_is_convicted_by_its_signed_gather_frame() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest(dir.path(), "median", 1, 3, "median", 6);
    convicted_by_its_ring_frame(dir.path(), &m, (0, 2));
}

/// What the impostor at rank 0 of a ring of 2 sends as its own chunk.
enum Sent {
    /// Signed by rank 0's registered identity, as it is.
    Genuine,
    /// Signed by rank 0's identity, then one value changed (re-sealed
    /// with the run key, as any member can).
    Altered,
    /// Signed by an identity that is not rank 0's.
    Forged,
    /// Not signed.
    Unsigned,
}

/// Rank 1 of a ring of 2 is a real signing, checking member; rank 0 is an
/// impostor holding the run key that speaks the link protocol itself and
/// sends `sent` as the first frame of the ring mean (its chunk 0, ring
/// step 0, segment 0). Rank 1's error and its `bad_signature` refusals.
fn ring_of_two_receives(sent: Sent) -> (pipewright::sync::RingError, u64) {
    use pipewright::identity::Identity;
    use pipewright::link::frame::{Frame, FrameHeader, SIGNATURE_LEN};
    use pipewright::link::sign::{sign_frame, PeerKeys};
    use pipewright::link::{
        Codec, DType, FrameKind, Link, LinkConfig, RejectReason, RunId, RunKey, Shape, WorkerId,
    };
    use pipewright::sync::{loopback_listeners, RingConfig, RingMember};
    use std::sync::Arc;
    use std::time::Duration;

    let (run, key) = (RunId([7; 16]), RunKey([9; 32]));
    let ids = [
        Identity::from_secret([21; 32]),
        Identity::from_secret([22; 32]),
    ];
    let keys = Arc::new(
        PeerKeys::from_hex(&[(0, 0, ids[0].public_hex()), (0, 1, ids[1].public_hex())])
            .expect("keys"),
    );
    let (listeners, addrs) = loopback_listeners(2).expect("listeners");
    let [l0, l1]: [std::net::TcpListener; 2] = listeners.try_into().expect("two");
    let len = 1000usize;
    std::thread::scope(|s| {
        let member = s.spawn(|| {
            let mut c = RingConfig::new(1, 2, run, key.clone(), WorkerId([1; 16]));
            c.timeout = Duration::from_secs(2);
            c.signer = Some(Arc::new(ids[1].clone()));
            c.keys = Some(keys.clone());
            let mut m = RingMember::connect(c, l1, &addrs[0].to_string()).expect("ring");
            m.begin_step(0, true);
            let mut buf: Vec<f32> = (0..len).map(|i| i as f32 * 0.001).collect();
            let err = m
                .allreduce_mean(&mut buf)
                .expect_err("the impostor never finishes");
            let (next, prev) = m.links();
            let bad = [next, prev]
                .into_iter()
                .flatten()
                .map(|l| l.stats().rejected(RejectReason::BadSignature))
                .sum::<u64>();
            (err, bad)
        });
        let link_config = {
            let mut c = LinkConfig::new(run, key.clone(), WorkerId([0; 16]));
            c.handshake_timeout = Duration::from_secs(5);
            c
        };
        // Rank 0: the link to its next rank (1), then the one from its
        // previous (1 too).
        let next = Link::connect(addrs[1], &link_config).expect("connect to rank 1");
        let _prev = Link::accept(&l0, &link_config).expect("accept rank 1");
        let values: Vec<f32> = (0..len / 2).map(|i| i as f32 * 0.002).collect();
        let mut frame = Frame::new(
            FrameHeader {
                run_id: run,
                step: 0,
                // Operation 0 of the step, ring step 0, segment 0.
                micro_batch: 0,
                stage: 0,
                replica: 0,
                kind: FrameKind::AllReduce,
                dtype: DType::F32,
                codec: Codec::F32,
                shape: Shape::vector((len / 2) as u32),
                sender: WorkerId([0; 16]),
                input_hash: [0; 32],
                signature: [0; SIGNATURE_LEN],
            },
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        match sent {
            Sent::Genuine => sign_frame(&mut frame, &ids[0]),
            Sent::Altered => {
                sign_frame(&mut frame, &ids[0]);
                frame.payload[40] ^= 0x01;
                frame.verified_hash = None;
            }
            Sent::Forged => sign_frame(&mut frame, &Identity::from_secret([23; 32])),
            Sent::Unsigned => {}
        }
        next.send(frame).expect("send");
        let got = member.join().expect("member");
        drop(next);
        got
    })
}

/// A ring frame altered after its author signed it, signed by another
/// identity than its author's, or not signed at all is refused by its
/// receiver (`bad_signature`) and counted on the link; the same frame as
/// its author signed it is taken (the ring then waits for the rest, which
/// the impostor never sends).
#[test]
fn a_forged_altered_or_unsigned_ring_frame_is_refused_and_counted() {
    use pipewright::sync::RingError;
    for sent in [Sent::Altered, Sent::Forged, Sent::Unsigned] {
        let (err, bad) = ring_of_two_receives(sent);
        assert!(
            matches!(
                err,
                RingError::Refused {
                    peer: 0,
                    origin: 0,
                    reason: "bad_signature",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(bad, 1);
    }
    let (err, bad) = ring_of_two_receives(Sent::Genuine);
    assert!(matches!(err, RingError::Timeout { .. }), "{err:?}");
    assert_eq!(bad, 0);
}
