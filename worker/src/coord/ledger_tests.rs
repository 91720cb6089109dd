//! Identities and the ledger through the coordinator's HTTP API: forged
//! registrations, forged, replayed and unrouted step reports are refused
//! and counted, and only signed, routed work is booked.

use std::sync::Arc;

use axum::http::{Method, StatusCode};

use super::api::{
    step_message, Barrier, Commitment, MicroBatchCommit, Registered, StepClaim, StepDone,
};
use super::routes::tests::{coordinator_with, register_body, request, send, TOKEN};
use super::server::{lock, Shared};
use crate::identity::Identity;
use crate::ledger::Ledger;

fn register(c: &Arc<Shared>, stage: usize, id: &Identity) -> (StatusCode, String) {
    post_register(c, &register_body(c, stage, id))
}

fn registered(c: &Arc<Shared>, stage: usize, id: &Identity) -> Registered {
    let (code, text) = register(c, stage, id);
    assert_eq!(code, StatusCode::OK, "{text}");
    serde_json::from_str(&text).expect("Registered")
}

/// `worker`'s report of step `completed` for stage `stage` (replica 0),
/// committing to `mbs` and signed by `signer`.
pub(in crate::coord) fn report(
    c: &Arc<Shared>,
    worker: u64,
    stage: usize,
    completed: u64,
    mbs: &[u64],
    signer: &Identity,
) -> StepDone {
    let epoch = lock(&c.coord).epoch();
    let loss = (stage == 1).then_some(5.0);
    let mut commitment = Commitment {
        micro_batches: mbs
            .iter()
            .map(|&mb| MicroBatchCommit {
                mb,
                // Each stage's input is the stage before's output.
                input: if stage == 0 { "ab" } else { "cd" }.repeat(32),
                output: "cd".repeat(32),
                gradient: "ef".repeat(32),
            })
            .collect(),
        signature: String::new(),
        params: None,
        contribution: None,
        moments: None,
        applied: None,
    };
    let claim = StepClaim {
        run_id: &c.config.run_id,
        worker,
        epoch,
        completed,
        shard: (stage, 0),
        loss,
        micro_batches: mbs,
        root: commitment.root(),
    };
    commitment.signature = signer.sign(crate::identity::STEP_DOMAIN, &step_message(&claim));
    StepDone {
        worker,
        epoch,
        completed,
        loss,
        grad_norm: 1.0,
        seconds: 0.1,
        busy_seconds: 0.08,
        update_seconds: 0.01,
        link_bytes: 10,
        rejected_frames: 0,
        micro_batches: mbs.len(),
        commitment: Some(commitment),
        suspects: Vec::new(),
    }
}

fn post_step(c: &Arc<Shared>, d: &StepDone) -> (StatusCode, String) {
    let body = serde_json::to_string(d).expect("json");
    send(c, request(Method::POST, "/v1/step", Some(TOKEN), &body))
}

/// `POST /v1/register` with `body`.
fn post_register(c: &Arc<Shared>, body: &str) -> (StatusCode, String) {
    send(c, request(Method::POST, "/v1/register", Some(TOKEN), body))
}

fn refused(c: &Arc<Shared>, reason: &str) -> u64 {
    lock(&c.coord)
        .refused()
        .get(reason)
        .copied()
        .unwrap_or_default()
}

#[test]
fn a_registration_must_prove_its_key_and_a_challenge_is_good_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator_with(dir.path(), None);
    let (alice, mallory) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    // Mallory names Alice's key but can only sign with her own.
    let honest: serde_json::Value =
        serde_json::from_str(&register_body(&c, 0, &alice)).expect("json");
    let mut forged =
        serde_json::from_str::<serde_json::Value>(&register_body(&c, 0, &mallory)).expect("json");
    forged["identity"]["public_key"] = honest["identity"]["public_key"].clone();
    let (code, text) = post_register(&c, &forged.to_string());
    assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(refused(&c, "signature"), 1);
    // Alice's own proof works once; replayed, its challenge is spent.
    let (code, text) = post_register(&c, &honest.to_string());
    assert_eq!(code, StatusCode::OK, "{text}");
    let (code, text) = post_register(&c, &honest.to_string());
    assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(refused(&c, "challenge"), 1);
    // Without any proof: a clear 400.
    let bare = r#"{"stage":1,"pipe_addr":"w:1","ring_addr":"w:2","worker":null,"completed":0,"has_snapshot":false,"name":"x"}"#;
    let (code, text) = send(&c, request(Method::POST, "/v1/register", Some(TOKEN), bare));
    assert_eq!(code, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("identity"), "{text}");
}

#[test]
fn only_signed_routed_work_is_booked_and_forgeries_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.sqlite");
    let c = coordinator_with(dir.path(), Some(path.clone()));
    let (alice, bob) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    let a = registered(&c, 0, &alice).worker;
    let b = registered(&c, 1, &bob).worker;
    // The same identity cannot take a second shard while it holds one.
    let (code, text) = register(&c, 1, &alice);
    assert_eq!(code, StatusCode::CONFLICT, "{text}");
    let m = c.config.manifest.spec.training.micro_batches as u64;
    let mbs: Vec<u64> = (0..m).collect();

    // Alice reports as Bob: signed with her key, refused.
    let (code, text) = post_step(&c, &report(&c, b, 1, 1, &mbs, &alice));
    assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(refused(&c, "signature"), 1);
    // Bob claims a micro-batch the route did not give him.
    let extra: Vec<u64> = (0..=m).collect();
    let (code, text) = post_step(&c, &report(&c, b, 1, 1, &extra, &bob));
    assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(refused(&c, "unrouted"), 1);
    // An unsigned report.
    let mut unsigned = report(&c, a, 0, 1, &mbs, &alice);
    unsigned.commitment = None;
    let (code, _) = post_step(&c, &unsigned);
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(refused(&c, "unsigned"), 1);

    // The honest reports pass the barrier together.
    let ra = report(&c, a, 0, 1, &mbs, &alice);
    let rb = report(&c, b, 1, 1, &mbs, &bob);
    let other = {
        let (c, ra) = (c.clone(), ra.clone());
        std::thread::spawn(move || post_step(&c, &ra))
    };
    let (code, text) = post_step(&c, &rb);
    assert_eq!(code, StatusCode::OK, "{text}");
    let barrier: Barrier = serde_json::from_str(&text).expect("barrier");
    assert!(barrier.proceed);
    assert_eq!(other.join().expect("thread").0, StatusCode::OK);
    // Sent again (a retry), the same report books nothing twice.
    assert_eq!(post_step(&c, &rb).0, StatusCode::OK);
    // Step 2, then Bob's signed report of step 1 replayed: refused.
    let other = {
        let (c, ra) = (c.clone(), report(&c, a, 0, 2, &mbs, &alice));
        std::thread::spawn(move || post_step(&c, &ra))
    };
    assert_eq!(
        post_step(&c, &report(&c, b, 1, 2, &mbs, &bob)).0,
        StatusCode::OK
    );
    assert_eq!(other.join().expect("thread").0, StatusCode::OK);
    let (code, _) = post_step(&c, &rb);
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(refused(&c, "replayed"), 1);

    // Step 1 is booked: one entry per identity, the routed micro-batches.
    let l = Ledger::open_read(&path).expect("ledger");
    assert_eq!(l.last_step().expect("steps"), 2);
    let entries = l.entries(1, 1).expect("entries");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].identity, alice.public_hex());
    assert_eq!(entries[1].identity, bob.public_hex());
    assert!(entries.iter().all(|e| e.micro_batches == mbs));
    assert!(entries.iter().all(|e| e.forward_flops > 0.0));
    // The last stage carries the head: it did more work.
    assert!(entries[1].forward_flops > entries[0].forward_flops);
    let (code, text) = send(&c, request(Method::GET, "/v1/ledger", None, ""));
    assert_eq!(code, StatusCode::OK, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let shares: f64 = v["shares"]
        .as_array()
        .expect("shares")
        .iter()
        .map(|s| s["share"].as_f64().expect("share"))
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "{v}");
    assert_eq!(v["refused"]["signature"], 1);
    let (_, metrics) = send(&c, request(Method::GET, "/metrics", None, ""));
    assert!(
        metrics.contains(&format!(
            "pipewright_reward_share{{worker=\"{}\"}}",
            bob.fingerprint()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("pipewright_refused_reports_total{reason=\"unrouted\"} 1"),
        "{metrics}"
    );
}
