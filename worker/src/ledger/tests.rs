use pipewright_spec::RewardsSpec;

use super::*;

fn entry(step: u64, stage: usize, replica: usize, identity: &str, mbs: &[u64]) -> Entry {
    let n = mbs.len() as f64;
    Entry {
        step,
        stage,
        replica,
        identity: identity.into(),
        worker: (stage * 10 + replica) as u64,
        epoch: 1,
        micro_batches: mbs.to_vec(),
        layers: 0..2,
        tokens: mbs.len() as u64 * 64,
        forward_flops: 100.0 * n,
        input_grad_flops: 100.0 * n,
        weight_grad_flops: 100.0 * n,
        allreduce_bytes: 1000,
        validation_flops: 0.0,
        loss: None,
        commitment: [7; 32],
        signature: "00".repeat(64),
        reported_seconds: 0.5,
        audits_passed: 0,
        audits_failed: 0,
    }
}

fn booking(step: u64, entries: Vec<Entry>) -> StepBooking {
    StepBooking {
        step,
        epoch: 1,
        loss: Some(2.0),
        entries,
    }
}

fn ledger() -> Ledger {
    Ledger::in_memory(&[("run_id", "r".into())]).expect("ledger")
}

#[test]
fn a_step_is_booked_once() {
    let mut l = ledger();
    let b = booking(
        1,
        vec![entry(1, 0, 0, "a", &[0, 1]), entry(1, 0, 1, "b", &[2, 3])],
    );
    assert!(l.book(&b).unwrap());
    // Replayed after a restart, perhaps by other workers: the first stands.
    let again = booking(1, vec![entry(1, 0, 0, "c", &[0, 1, 2, 3])]);
    assert!(!l.book(&again).unwrap());
    let e = l.entries(1, 1).unwrap();
    assert_eq!(e, b.entries);
    assert_eq!(l.last_step().unwrap(), 1);
    assert!(l.integrity().unwrap().is_empty());
}

#[test]
fn shares_follow_verified_flops_and_sql_agrees_with_the_raw_pass() {
    let mut l = ledger();
    for step in 1..=4 {
        l.book(&booking(
            step,
            vec![
                entry(step, 0, 0, "fast", &[0, 1, 2]),
                entry(step, 0, 1, "slow", &[3]),
            ],
        ))
        .unwrap();
    }
    let rewards = RewardsSpec::default();
    let sql = l.totals(1, 4).unwrap();
    let raw = shares::totals_of(&l.entries(1, 4).unwrap(), &[]);
    assert_eq!(sql, raw);
    let s = shares(&sql, 4, &rewards);
    assert_eq!(s[0].identity, "fast");
    assert!((s[0].share - 0.75).abs() < 1e-12, "{s:?}");
    assert!((s[1].share - 0.25).abs() < 1e-12);
    assert_eq!(s[0].micro_batches, 12);
    assert_eq!(s[0].tokens, 12 * 64);
}

#[test]
fn a_failed_audit_forfeits_the_window_and_thin_participation_earns_nothing() {
    let mut l = ledger();
    for step in 1..=4 {
        let mut cheat = entry(step, 0, 1, "cheat", &[1]);
        if step == 2 {
            cheat.audits_failed = 1;
        }
        let mut entries = vec![entry(step, 0, 0, "honest", &[0]), cheat];
        if step == 4 {
            entries.push(entry(step, 1, 0, "late", &[0]));
        }
        l.book(&booking(step, entries)).unwrap();
    }
    let rewards = RewardsSpec {
        min_participation: 0.5,
        ..RewardsSpec::default()
    };
    let s = shares(&l.totals(1, 4).unwrap(), 4, &rewards);
    let by = |id: &str| s.iter().find(|x| x.identity == id).unwrap().clone();
    assert_eq!(by("honest").share, 1.0);
    assert_eq!(by("cheat").share, 0.0);
    assert_eq!(by("cheat").credit, 0.0);
    assert_eq!(by("cheat").audits_failed, 1);
    // One step of four is below the 50% participation asked for.
    assert!(!by("late").eligible);
    assert_eq!(by("late").share, 0.0);
}

#[test]
fn the_window_counts_back_from_the_last_step() {
    let w = |window_steps, last| {
        window_of(
            last,
            &RewardsSpec {
                window_steps,
                ..RewardsSpec::default()
            },
        )
    };
    assert_eq!(w(0, 50), (1, 50));
    assert_eq!(w(10, 50), (41, 50));
    assert_eq!(w(100, 50), (1, 50));
}

#[test]
fn a_ledger_of_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    Ledger::open(&path, &[("run_id", "a".into())]).unwrap();
    let e = Ledger::open(&path, &[("run_id", "b".into())]).unwrap_err();
    assert!(e.to_string().contains("another run"), "{e}");
    assert!(Ledger::open_read(&dir.path().join("nope")).is_err());
}

fn conviction(identity: &str, step: u64) -> Conviction {
    Conviction {
        identity: identity.into(),
        worker: 7,
        stage: 0,
        replica: 1,
        step,
        reason: "failed_audit".into(),
        evidence: r#"{"mb":3}"#.into(),
    }
}

#[test]
fn a_conviction_forfeits_the_window_before_it_and_stands_once() {
    let rewards = RewardsSpec {
        window_steps: 3,
        ..RewardsSpec::default()
    };
    let mut l = Ledger::in_memory(&[
        ("run_id", "r".into()),
        ("rewards", serde_json::to_string(&rewards).unwrap()),
    ])
    .expect("ledger");
    for step in 1..=5 {
        l.book(&booking(
            step,
            vec![
                entry(step, 0, 0, "honest", &[0, 1]),
                entry(step, 0, 1, "cheat", &[2, 3]),
            ],
        ))
        .unwrap();
    }
    // Caught at step 6 (never booked): the window of steps 3..=5 is lost.
    assert!(l.quarantine(&conviction("cheat", 6)).unwrap());
    assert!(
        !l.quarantine(&conviction("cheat", 9)).unwrap(),
        "the first stands"
    );
    let q = l.quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].forfeit_from, q[0].forfeit_to), (3, 5));
    assert_eq!(q[0].conviction, conviction("cheat", 6));
    assert!(q[0].forfeits("cheat", 3) && !q[0].forfeits("cheat", 2));
    assert!(!q[0].forfeits("honest", 4));

    // Over the window the cheat earns nothing; SQL and the raw pass agree.
    let sql = l.totals(3, 5).unwrap();
    let raw = shares::totals_of(&l.entries(3, 5).unwrap(), &q);
    assert_eq!(sql, raw);
    let s = shares(&sql, 3, &rewards);
    let cheat = s.iter().find(|s| s.identity == "cheat").unwrap();
    assert_eq!((cheat.credit, cheat.share, cheat.forfeited), (0.0, 0.0, 3));
    assert!(!cheat.eligible);
    let honest = s.iter().find(|s| s.identity == "honest").unwrap();
    assert_eq!(honest.share, 1.0);

    // Its work before the forfeited window still counts there.
    let early = shares(&l.totals(1, 2).unwrap(), 2, &rewards);
    let cheat = early.iter().find(|s| s.identity == "cheat").unwrap();
    assert!((cheat.share - 0.5).abs() < 1e-12, "{early:?}");
    assert_eq!(
        l.totals(1, 2).unwrap(),
        shares::totals_of(&l.entries(1, 2).unwrap(), &q)
    );
}

#[test]
fn a_conviction_before_any_booking_forfeits_nothing() {
    let mut l = ledger();
    assert!(l.quarantine(&conviction("early", 1)).unwrap());
    let q = l.quarantined().unwrap();
    assert_eq!((q[0].forfeit_from, q[0].forfeit_to), (1, 0));
    assert!(!q[0].forfeits("early", 1));
}

#[test]
fn convictions_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    {
        let mut l = Ledger::open(&path, &[("run_id", "r".into())]).unwrap();
        l.book(&booking(1, vec![entry(1, 0, 0, "x", &[0])]))
            .unwrap();
        l.quarantine(&conviction("x", 2)).unwrap();
    }
    let l = Ledger::open_read(&path).unwrap();
    let q = l.quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].conviction.identity, "x");
    assert_eq!((q[0].forfeit_from, q[0].forfeit_to), (1, 1));
}
