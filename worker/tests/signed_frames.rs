//! Pipeline frames signed by their author's identity: a run whose workers
//! sign and check every frame trains exactly as one without signatures; a
//! frame signed by another identity than the one registered for its shard,
//! or not signed, is refused and counted (`bad_signature`); a worker never
//! sends a tensor of its own that its receiver would refuse.

mod common;

use std::path::Path;
use std::time::Duration;

use pipewright::identity::Identity;
use pipewright::link::sign::PeerKeys;
use pipewright::link::RejectReason;
use pipewright::pipeline::PipelineError;
use pipewright_spec::{parse_manifest, TrainingRun};

fn manifest(dir: &Path) -> TrainingRun {
    common::write_corpus(dir);
    let yaml = format!(
        r#"
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: signed-frames}}
spec:
  model: {{dim: 32, layers: 2, heads: 4, kvHeads: 2, ffnDim: 64, seqLen: 32, tiedEmbeddings: true}}
  data: {{sources: ["{}"]}}
  training: {{steps: 3, microBatchSize: 4, microBatches: 2, learningRate: 0.01, warmupSteps: 2, seed: 5, threads: 1}}
  pipeline: {{stages: 2, replicas: 1}}
"#,
        dir.join("corpus.txt").display(),
    );
    parse_manifest(&yaml).expect("test manifest is valid")
}

/// Who signs what: the identity each stage signs with (none: unsigned),
/// and the identity each stage's receivers believe the other holds (none:
/// they check nothing).
#[derive(Clone)]
struct Signing {
    signers: [Option<Identity>; 2],
    registered: Option<[Identity; 2]>,
}

/// Each stage's losses, error and `bad_signature` count after `steps`.
type Ran = Vec<(Vec<f32>, Option<PipelineError>, u64)>;

fn run(m: &TrainingRun, signing: &Signing, timeout: Duration) -> Ran {
    let keys = signing.registered.as_ref().map(|ids| {
        PeerKeys::from_hex(&[(0, 0, ids[0].public_hex()), (1, 0, ids[1].public_hex())])
            .expect("keys")
    });
    let (signers, steps) = (signing.signers.clone(), m.spec.training.steps);
    common::on_loopback_workers(m, true, timeout, move |mut w| {
        w.set_signer(signers[w.shard().stage].clone());
        w.set_peer_keys(keys.clone());
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
        if error.is_none() {
            let _ = w.finish();
        }
        (
            losses,
            error,
            pipe.rejected[RejectReason::BadSignature as usize],
        )
    })
}

fn ids() -> [Identity; 2] {
    [
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    ]
}

#[test]
fn signed_and_checked_frames_train_exactly_as_unsigned_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest(dir.path());
    let t = Duration::from_secs(20);
    let plain = run(
        &m,
        &Signing {
            signers: [None, None],
            registered: None,
        },
        t,
    );
    let [a, b] = ids();
    let signed = run(
        &m,
        &Signing {
            signers: [Some(a.clone()), Some(b.clone())],
            registered: Some([a, b]),
        },
        t,
    );
    for (p, s) in plain.iter().zip(&signed) {
        assert!(p.1.is_none() && s.1.is_none(), "{:?} {:?}", p.1, s.1);
        assert_eq!(s.2, 0, "nothing refused");
    }
    assert_eq!(plain[1].0.len(), 3);
    assert_eq!(plain[1].0, signed[1].0, "the same losses, bit for bit");
}

/// The first stage signs with `signer` while its receiver holds
/// `registered` as its key: the receiver refuses the first frame it takes
/// (`bad_signature`, counted once) and its step breaks off.
fn refused_with(signer: Option<Identity>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest(dir.path());
    let [a, b] = ids();
    let out = run(
        &m,
        &Signing {
            signers: [signer, Some(b.clone())],
            registered: Some([a, b]),
        },
        Duration::from_secs(3),
    );
    let (losses, error, bad) = &out[1];
    assert!(losses.is_empty(), "no step completes");
    match error {
        Some(PipelineError::Refused { reason, peer, .. }) => {
            assert_eq!(*reason, "bad_signature");
            assert_eq!(*peer, "previous stage");
        }
        other => panic!("expected a bad_signature refusal, got {other:?}"),
    }
    assert_eq!(*bad, 1, "counted on the link");
    assert!(out[0].1.is_some(), "the sender's step breaks off too");
}

#[test]
fn a_frame_signed_by_another_identity_is_refused_and_counted() {
    refused_with(Some(Identity::from_secret([3; 32])));
}

#[test]
fn an_unsigned_frame_is_refused_where_signatures_are_checked() {
    refused_with(None);
}
