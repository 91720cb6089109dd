//! The coordinator's rules, driven through the state machine with a fake
//! clock.

use std::time::{Duration, Instant};

use super::api::{
    Commitment, Failure, IdentityProof, MicroBatchCommit, Register, StateSource, StepDone,
};
use super::state::{CoordError, Coordinator, Layout, Phase};

const LEASE: Duration = Duration::from_secs(2);

fn layout(stages: usize, replicas: usize, tied: bool) -> Layout {
    Layout {
        tied,
        checkpoint_every: 4,
        ..super::test_support::layout(stages, replicas)
    }
}

fn coord(stages: usize, replicas: usize, tied: bool) -> Coordinator {
    Coordinator::new(
        "t",
        layout(stages, replicas, tied),
        LEASE,
        Some("/ck".into()),
        None,
    )
}

fn reg(stage: Option<usize>, replica: Option<usize>, tag: &str) -> Register {
    Register {
        stage,
        replica,
        pipe_addr: format!("{tag}:1"),
        ring_addr: format!("{tag}:2"),
        name: tag.into(),
        identity: Some(IdentityProof {
            public_key: format!("key-{tag}"),
            ..IdentityProof::default()
        }),
        ..Register::default()
    }
}

/// Registers every shard in order; returns the ids, stage major.
fn fill(c: &mut Coordinator, now: Instant) -> Vec<u64> {
    let l = c.layout().clone();
    let mut ids = Vec::new();
    for s in 0..l.stages {
        for r in 0..l.replicas {
            let (id, shard) = c
                .register(reg(Some(s), Some(r), &format!("w{s}{r}")), now)
                .expect("register");
            assert_eq!(shard, Some((s, r)));
            ids.push(id);
        }
    }
    ids
}

/// `worker`'s report of step `completed`, committing to the
/// micro-batches the route gives it.
fn done(c: &Coordinator, worker: u64, epoch: u64, completed: u64) -> StepDone {
    let commitment = Commitment {
        micro_batches: c
            .routed_to(worker)
            .into_iter()
            .map(|mb| MicroBatchCommit {
                mb,
                ..MicroBatchCommit::default()
            })
            .collect(),
        signature: String::new(),
        params: None,
        contribution: None,
        moments: None,
        applied: None,
    };
    StepDone {
        commitment: Some(commitment),
        suspects: Vec::new(),
        worker,
        epoch,
        completed,
        loss: Some(1.0 / completed as f32),
        grad_norm: 1.0,
        seconds: 0.1,
        busy_seconds: 0.08,
        update_seconds: 0.01,
        link_bytes: 1000,
        rejected_frames: 0,
        micro_batches: 2,
    }
}

/// Every worker completes `steps` more steps in `epoch`.
fn train(c: &mut Coordinator, ids: &[u64], epoch: u64, from: u64, to: u64, now: Instant) {
    for step in from + 1..=to {
        for &id in ids {
            c.step_done(&done(c, id, epoch, step), now).expect("step");
        }
        for &id in ids {
            let b = c.barrier(id, epoch, step, now).expect("decided");
            assert!(b.proceed);
        }
    }
}

#[test]
fn the_plan_waits_for_every_shard_and_wires_neighbours() {
    let now = Instant::now();
    let mut c = coord(3, 2, true);
    let (first, _) = c
        .register(reg(Some(0), Some(0), "a"), now)
        .expect("register");
    assert_eq!(c.wiring(first, 0), Ok(None), "no plan with vacancies");
    assert_eq!(c.status(now).phase, Phase::Pending);
    let l = c.layout().clone();
    for s in 0..l.stages {
        for r in 0..l.replicas {
            if (s, r) != (0, 0) {
                c.register(reg(Some(s), Some(r), &format!("w{s}{r}")), now)
                    .expect("register");
            }
        }
    }
    let w = c.wiring(first, 0).expect("ok").expect("a plan");
    assert_eq!(w.shard, (0, 0));
    assert_eq!(w.step, 0);
    assert_eq!(w.state, StateSource::Held);
    assert_eq!(w.next, vec![(0, "w10:1".to_string())]);
    assert_eq!(w.ring_next.as_deref(), Some("w01:2"));
    assert_eq!(w.tie, None);
    let last = c
        .workers()
        .into_iter()
        .find(|(_, s)| *s == (2, 1))
        .expect("last")
        .0;
    let w = c.wiring(last, 0).expect("ok").expect("plan");
    assert!(w.next.is_empty());
    assert_eq!(
        w.tie.as_deref(),
        Some("w01:1"),
        "tied last stage links to stage 0"
    );
    assert_eq!(
        w.ring_next.as_deref(),
        Some("w20:2"),
        "the ring wraps around"
    );
    // Nothing newer than the plan's epoch yet.
    assert_eq!(c.wiring(last, w.epoch), Ok(None));
}

#[test]
fn bad_registrations_are_refused() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    assert!(matches!(
        c.register(reg(Some(2), Some(0), "x"), now),
        Err(CoordError::Invalid(_))
    ));
    assert!(matches!(
        c.register(reg(None, Some(0), "x"), now),
        Err(CoordError::Invalid(_))
    ));
    let mut empty = reg(Some(0), None, "x");
    empty.pipe_addr.clear();
    assert!(matches!(
        c.register(empty, now),
        Err(CoordError::Invalid(_))
    ));
    c.register(reg(Some(0), None, "a"), now).expect("first");
    assert_eq!(
        c.register(reg(Some(0), Some(0), "b"), now),
        Err(CoordError::Taken(0, 0))
    );
    assert_eq!(c.heartbeat(99, now), Err(CoordError::UnknownWorker(99)));
}

#[test]
fn the_barrier_holds_until_every_shard_completed_the_step() {
    let now = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, now);
    let epoch = c.epoch();
    assert_eq!(c.step_done(&done(&c, ids[0], epoch, 1), now), Ok(None));
    assert_eq!(c.barrier(ids[0], epoch, 1, now), None);
    for &id in &ids[1..] {
        c.step_done(&done(&c, id, epoch, 1), now).expect("step");
    }
    assert!(c.barrier(ids[0], epoch, 1, now).expect("decided").proceed);
    assert_eq!(c.committed(), 1);
    assert_eq!(c.status(now).phase, Phase::Training);
    assert_eq!(c.status(now).loss, Some(1.0));
}

#[test]
fn checkpoints_are_written_by_one_replica_per_stage_and_end_the_run() {
    let now = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, now);
    let epoch = c.epoch();
    train(&mut c, &ids, epoch, 0, 3, now);
    for &id in &ids {
        c.step_done(&done(&c, id, epoch, 4), now).expect("step");
    }
    let orders: Vec<bool> = ids
        .iter()
        .map(|&id| c.barrier(id, epoch, 4, now).expect("decided").checkpoint)
        .collect();
    assert_eq!(
        orders,
        [true, false, true, false],
        "replica 0 of each stage writes"
    );
    assert_eq!(c.checkpoint_stage(ids[2], 4), Ok(1));
    assert!(
        c.checkpoint_stage(ids[2], 3).is_err(),
        "no checkpoint of step 3"
    );
    assert_eq!(c.status(now).phase, Phase::Checkpointing);
    assert_eq!(c.checkpoint_written(ids[0], 4), Ok(None));
    assert_eq!(c.checkpoint_written(ids[2], 4), Ok(Some(4)));
    c.checkpoint_committed(4, "/ck/step-00000004".into(), now);
    assert_eq!(c.status(now).checkpoint_step, Some(4));
    train(&mut c, &ids, epoch, 4, 10, now);
    assert_eq!(c.finished(), None, "the final checkpoint is still missing");
    c.checkpoint_written(ids[0], 10).expect("written");
    assert_eq!(c.checkpoint_written(ids[2], 10), Ok(Some(10)));
    c.checkpoint_committed(10, "/ck/step-00000010".into(), now);
    assert_eq!(c.status(now).phase, Phase::Succeeded);
    let w = c.wiring(ids[1], epoch).expect("ok").expect("the end");
    assert_eq!(w.finished.as_deref(), Some("Succeeded"));
}

#[test]
fn a_lost_worker_is_replaced_and_takes_its_state_from_a_live_replica() {
    let now = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 5, now);
    // Step 6: three workers finish it, stage 1 replica 1 dies mid-step.
    for &id in &ids[..3] {
        c.step_done(&done(&c, id, e1, 6), now).expect("step");
    }
    assert!(c.lose(ids[3], now));
    let e2 = c.epoch();
    assert!(e2 > e1);
    let b = c.barrier(ids[0], e1, 6, now).expect("decided");
    assert!(!b.proceed, "the old epoch's barrier stops");
    assert_eq!(c.status(now).reassignments, 1);
    assert_eq!(c.wiring(ids[0], e1), Ok(None), "no plan with a vacancy");
    let (new, shard) = c.register(reg(None, None, "new"), now).expect("volunteer");
    assert_eq!(shard, Some((1, 1)), "a volunteer fills the vacancy");
    // The survivors all completed step 6 (the lost worker died after its
    // all-reduce), so the run goes on from 6: the newcomer gets the state
    // of stage 1 replica 0.
    for &id in &ids[..3] {
        let w = c.wiring(id, e1).expect("ok").expect("plan");
        assert_eq!((w.epoch, w.step, w.state), (e2, 6, StateSource::Held));
        assert_eq!(w.upload, id == ids[2], "the donor uploads");
    }
    let w = c.wiring(new, e1).expect("ok").expect("plan");
    assert_eq!((w.step, w.state), (6, StateSource::Replica));
    assert_eq!(c.committed(), 6);
}

#[test]
fn workers_a_step_apart_resume_from_the_earlier_step() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 2, now);
    // Stage 1 completes step 3 (it applies its update first); stage 0
    // breaks off before it does.
    c.step_done(&done(&c, ids[1], e1, 3), now).expect("step");
    let f = Failure {
        worker: ids[0],
        epoch: e1,
        error: "link closed".into(),
        fatal: false,
    };
    c.fail(&f, now).expect("reported");
    let later = now + LEASE + Duration::from_millis(1);
    for &id in &ids {
        c.heartbeat(id, later).expect("alive");
    }
    c.expire(later);
    for &id in &ids {
        let w = c.wiring(id, e1).expect("ok").expect("plan");
        assert_eq!(
            (w.step, w.state),
            (2, StateSource::Held),
            "stage 1 rolls back"
        );
    }
    assert_eq!(c.losses().len(), 2);
}

#[test]
fn a_stage_without_survivors_goes_back_to_the_last_checkpoint() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 3, now);
    // Without a checkpoint: back to the seed.
    c.lose(ids[1], now);
    let (new, _) = c
        .register(reg(Some(1), Some(0), "n"), now)
        .expect("register");
    let w = c.wiring(ids[0], e1).expect("ok").expect("plan");
    assert_eq!((w.step, w.state), (0, StateSource::Init));
    let e2 = w.epoch;
    let ids = [ids[0], new];
    train(&mut c, &ids, e2, 0, 4, now);
    c.checkpoint_written(ids[0], 4).expect("written");
    c.checkpoint_written(ids[1], 4).expect("written");
    c.checkpoint_committed(4, "/ck/step-00000004".into(), now);
    train(&mut c, &ids, e2, 4, 6, now);
    c.lose(ids[0], now);
    c.register(reg(Some(0), Some(0), "m"), now)
        .expect("register");
    let w = c.wiring(ids[1], e2).expect("ok").expect("plan");
    assert_eq!(w.step, 4);
    assert_eq!(
        w.state,
        StateSource::Checkpoint {
            dir: "/ck/step-00000004".into()
        }
    );
}

#[test]
fn a_silent_worker_loses_its_slot_after_the_lease() {
    let t0 = Instant::now();
    let mut c = coord(1, 2, false);
    let ids = fill(&mut c, t0);
    let t1 = t0 + Duration::from_millis(1500);
    c.heartbeat(ids[0], t1).expect("alive");
    assert!(c.expire(t1).is_empty());
    let t2 = t0 + Duration::from_millis(2500);
    assert_eq!(c.expire(t2), vec![(0, 1)]);
    assert_eq!(c.status(t2).stages[0].ready, 1);
    assert_eq!(
        c.heartbeat(ids[1], t2),
        Err(CoordError::UnknownWorker(ids[1]))
    );
}

#[test]
fn a_broken_step_without_a_loss_rewires_after_a_lease() {
    let t0 = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, t0);
    let e1 = c.epoch();
    let f = Failure {
        worker: ids[0],
        epoch: e1,
        error: "timed out".into(),
        fatal: false,
    };
    c.fail(&f, t0).expect("reported");
    let t1 = t0 + Duration::from_millis(2100);
    for &id in &ids {
        c.heartbeat(id, t1).expect("alive");
    }
    c.expire(t1);
    let w = c.wiring(ids[1], e1).expect("ok").expect("a new plan");
    assert!(w.epoch > e1);
}

#[test]
fn a_fatal_failure_fails_the_run() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, now);
    let f = Failure {
        worker: ids[1],
        epoch: c.epoch(),
        error: "loss is NaN at step 3".into(),
        fatal: true,
    };
    c.fail(&f, now).expect("reported");
    let s = c.status(now);
    assert_eq!(s.phase, Phase::Failed);
    assert!(s.reason.contains("NaN"), "{}", s.reason);
    let w = c.wiring(ids[0], 0).expect("ok").expect("the end");
    assert_eq!(w.finished.as_deref(), Some("Failed"));
    assert!(matches!(
        c.register(reg(None, None, "late"), now),
        Err(CoordError::Finished(Phase::Failed))
    ));
}

#[test]
fn volunteers_wait_as_standbys_and_fill_the_most_limiting_stage() {
    let now = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, now);
    let (sb, shard) = c.register(reg(None, None, "spare"), now).expect("standby");
    assert_eq!(shard, None);
    assert_eq!(c.status(now).standby, 1);
    assert_eq!(c.wiring(sb, 0), Ok(None));
    c.lose(ids[2], now);
    assert_eq!(
        c.workers().get(&sb),
        Some(&(1, 0)),
        "the standby took the slot"
    );
    // Two vacancies, on stages with 1 and 0 live replicas: a volunteer
    // goes to the emptier stage.
    c.lose(ids[0], now);
    c.lose(ids[1], now);
    let (_, shard) = c.register(reg(None, None, "v"), now).expect("volunteer");
    assert_eq!(shard.map(|s| s.0), Some(0));
}

#[test]
fn a_restarted_coordinator_resumes_where_its_state_file_left_off() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 3, now);
    // Both workers finish step 4; the coordinator dies before it hears.
    let saved = c.persisted();
    let mut c = Coordinator::new(
        "t",
        layout(2, 1, false),
        LEASE,
        Some("/ck".into()),
        Some(saved),
    );
    assert!(c.epoch() > e1);
    assert_eq!(c.committed(), 3);
    for (s, &id) in ids.iter().enumerate() {
        let mut r = reg(Some(s), Some(0), &format!("w{s}0"));
        r.worker = Some(id);
        r.completed = 4;
        r.has_snapshot = true;
        assert_eq!(c.register(r, now), Ok((id, Some((s, 0)))));
    }
    // Step 4's loss never arrived: everyone replays it from step 3.
    let w = c.wiring(ids[0], e1).expect("ok").expect("plan");
    assert_eq!((w.step, w.state), (3, StateSource::Held));
    train(&mut c, &ids, w.epoch, 3, 4, now);
    assert_eq!(c.losses().len(), 4);
}

#[test]
fn after_a_restart_volunteers_do_not_take_the_shards_of_returning_workers() {
    let now = Instant::now();
    let mut c = coord(1, 2, false);
    let ids = fill(&mut c, now);
    let saved = c.persisted();
    let mut c = Coordinator::new(
        "t",
        layout(1, 2, false),
        LEASE,
        Some("/ck".into()),
        Some(saved),
    );
    let (vol, shard) = c
        .register(reg(None, None, "volunteer"), now)
        .expect("register");
    assert_eq!(shard, None, "both slots are kept for their workers");
    let mut back = reg(None, None, "w00");
    back.worker = Some(ids[0]);
    assert_eq!(c.register(back, now), Ok((ids[0], Some((0, 0)))));
    // The other never comes back: after a lease the volunteer takes it.
    c.heartbeat(ids[0], now + LEASE).expect("alive");
    c.heartbeat(vol, now + LEASE).expect("alive");
    c.expire(now);
    c.expire(now + LEASE + Duration::from_millis(1));
    assert_eq!(c.status(now).standby, 0);
    assert_eq!(c.status(now).stages[0].ready, 2);
}

#[test]
fn a_measured_partition_gives_the_faster_stage_more_layers() {
    let now = Instant::now();
    let mut l = layout(2, 2, false);
    l.measured = true;
    l.stage_layers = vec![0..2, 2..4];
    // A stand-in for the model's partition: layers in proportion to speed.
    let split = |speeds: &[f64]| {
        let first = (4.0 * speeds[0] / (speeds[0] + speeds[1])).round() as usize;
        let first = first.clamp(1, 3);
        vec![0..first, first..4]
    };
    let mut c = Coordinator::new("t", l, LEASE, None, None).with_partitioner(Box::new(split));
    let mut ids = Vec::new();
    for (s, r, speed) in [(0, 0, 100.0), (0, 1, 300.0), (1, 0, 300.0), (1, 1, 300.0)] {
        let mut req = reg(Some(s), Some(r), &format!("w{s}{r}"));
        req.speed = speed;
        ids.push(c.register(req, now).expect("register").0);
    }
    // Stage 0 runs at its slowest replica's 100, stage 1 at 300.
    let w = c.wiring(ids[0], 0).expect("ok").expect("plan");
    assert_eq!(w.layers, [0, 1]);
    let w = c.wiring(ids[3], 0).expect("ok").expect("plan");
    assert_eq!(w.layers, [1, 4]);
    assert_eq!(c.status(now).stages[1].layers, [1, 4]);
    // Settled for the rest of the run, across a coordinator restart.
    let saved = c.persisted();
    assert_eq!(saved.stage_layers, Some(vec![0..1, 1..4]));
    let mut l = layout(2, 2, false);
    l.measured = true;
    let c = Coordinator::new("t", l, LEASE, None, Some(saved));
    assert_eq!(c.layout().stage_layers, vec![0..1, 1..4]);
}

#[test]
fn throughput_routing_moves_micro_batches_to_the_faster_replica() {
    let mut l = layout(2, 2, false);
    l.routed = true;
    l.micro_batches = 4;
    let mut c = Coordinator::new("t", l, LEASE, None, None);
    let now = Instant::now();
    let ids = fill(&mut c, now);
    let w = c.wiring(ids[0], 0).expect("ok").expect("a plan");
    // Routed runs link every replica of the next stage.
    assert_eq!(
        w.next,
        vec![(0, "w10:1".to_string()), (1, "w11:1".to_string())]
    );
    assert_eq!(w.route, None, "lanes until speeds are known");
    let epoch = w.epoch;
    let mut route = None;
    for step in 1..=4 {
        for (k, &id) in ids.iter().enumerate() {
            let mut d = done(&c, id, epoch, step);
            d.micro_batches = 4;
            // Shard (1, 1) takes three times as long per micro-batch.
            d.busy_seconds = if k == 3 { 0.6 } else { 0.2 };
            c.step_done(&d, now).expect("step");
        }
        route = c.barrier(ids[0], epoch, step, now).expect("released").route;
    }
    let route = route.expect("a route once every replica was measured");
    assert_eq!(route.counts(0, 2), vec![4, 4], "stage 0 is balanced");
    assert_eq!(
        route.counts(1, 2),
        vec![6, 2],
        "the slow replica gets a quarter"
    );
    let status = c.status(now);
    let slow = &status.shards[3];
    assert_eq!((slow.stage, slow.replica), (1, 1));
    assert!((slow.seconds_per_micro_batch.expect("measured") - 0.15).abs() < 1e-9);
    // A new wiring hands the route to everyone.
    c.lose(ids[3], now);
    c.register(reg(Some(1), Some(1), "w11b"), now)
        .expect("register");
    let w = c
        .wiring(ids[0], epoch)
        .expect("ok")
        .expect("the new epoch's plan");
    assert_eq!(w.route.map(|r| r.counts(1, 2)), Some(vec![6, 2]));
}

#[test]
fn lanes_runs_never_route() {
    let mut c = coord(2, 2, false);
    let now = Instant::now();
    let ids = fill(&mut c, now);
    let epoch = c.wiring(ids[0], 0).expect("ok").expect("plan").epoch;
    for (k, &id) in ids.iter().enumerate() {
        let mut d = done(&c, id, epoch, 1);
        d.busy_seconds = if k == 3 { 5.0 } else { 0.1 };
        c.step_done(&d, now).expect("step");
    }
    assert_eq!(
        c.barrier(ids[0], epoch, 1, now).expect("released").route,
        None
    );
}

#[test]
fn a_routed_run_goes_on_without_a_lane_until_its_vacancy_is_filled() {
    let mut l = layout(2, 2, false);
    l.routed = true;
    l.micro_batches = 4;
    let mut c = Coordinator::new("t", l, LEASE, None, None);
    let t0 = Instant::now();
    let ids = fill(&mut c, t0);
    let epoch = c.wiring(ids[0], 0).expect("ok").expect("plan").epoch;
    train(&mut c, &ids, epoch, 0, 3, t0);
    // Stage 1 replica 1 dies and nobody replaces it.
    c.lose(ids[3], t0);
    assert_eq!(
        c.wiring(ids[0], epoch).expect("ok"),
        None,
        "waits a lease first"
    );
    let later = t0 + LEASE + Duration::from_millis(10);
    for &id in &ids[..3] {
        c.heartbeat(id, later).expect("alive");
    }
    c.expire(later);
    let w = c
        .wiring(ids[0], epoch)
        .expect("ok")
        .expect("a plan without lane 1");
    assert_eq!(w.lanes, vec![0]);
    assert_eq!(w.step, 3);
    assert_eq!(w.next, vec![(0, "w10:1".to_string())]);
    assert_eq!(w.ring_next, None, "a ring of one");
    let route = w.route.expect("a route over lane 0");
    assert_eq!(route.counts(0, 2), vec![8, 0]);
    assert_eq!(route.counts(1, 2), vec![8, 0]);
    // Lane 1's survivor sits the epoch out.
    let idle = c.wiring(ids[1], epoch).expect("ok").expect("plan");
    assert_eq!(idle.lanes, vec![0]);
    assert!(idle.next.is_empty());
    assert_eq!(idle.layers, [0, 1], "its stage's layers, kept for later");
    let status = c.status(later);
    assert_eq!(status.shards[1].state, "idle");
    assert_eq!(status.shards[3].state, "vacant");
    // Lane 0 trains on; the barrier does not wait for lane 1.
    let e2 = w.epoch;
    for step in 4..=5 {
        for &id in [ids[0], ids[2]].iter() {
            c.step_done(&done(&c, id, e2, step), later).expect("step");
        }
        assert!(
            c.barrier(ids[0], e2, step, later)
                .expect("released")
                .proceed
        );
    }
    // A replacement fills the vacancy: both lanes train again, the idle
    // worker and the newcomer take their state from lane 0.
    let (new, _) = c
        .register(reg(Some(1), Some(1), "w11b"), later)
        .expect("register");
    let w = c.wiring(ids[1], e2).expect("ok").expect("a full plan");
    assert_eq!(w.lanes, vec![0, 1]);
    assert_eq!(w.step, 5);
    assert_eq!(w.state, StateSource::Replica);
    let w = c.wiring(new, e2).expect("ok").expect("plan");
    assert_eq!(w.state, StateSource::Replica);
    let route = w.route.expect("route");
    assert!(route.counts(1, 2).iter().all(|&k| k > 0), "{route:?}");
}

#[test]
fn a_lanes_run_waits_for_every_vacancy() {
    let mut c = coord(2, 2, false);
    let t0 = Instant::now();
    let ids = fill(&mut c, t0);
    let epoch = c.wiring(ids[0], 0).expect("ok").expect("plan").epoch;
    train(&mut c, &ids, epoch, 0, 2, t0);
    c.lose(ids[3], t0);
    let later = t0 + LEASE * 3;
    for &id in &ids[..3] {
        c.heartbeat(id, later).expect("alive");
    }
    c.expire(later);
    assert_eq!(c.wiring(ids[0], epoch).expect("ok"), None);
}

#[test]
fn a_step_report_whose_numbers_do_not_fit_the_run_is_refused_not_a_panic() {
    let now = Instant::now();
    let mut c = coord(2, 1, false);
    let ids = fill(&mut c, now);
    let epoch = c.epoch();
    let bad = |f: &dyn Fn(&mut StepDone)| {
        let mut d = done(&c, ids[1], epoch, 1);
        f(&mut d);
        d
    };
    let reports = [
        bad(&|d| d.completed = 0),
        bad(&|d| d.completed = 11),
        bad(&|d| d.completed = u64::MAX),
        bad(&|d| d.seconds = -1.0),
        bad(&|d| d.busy_seconds = f64::INFINITY),
        bad(&|d| d.update_seconds = 1e300),
        bad(&|d| d.link_bytes = u64::MAX),
        bad(&|d| d.rejected_frames = u64::MAX),
        bad(&|d| d.loss = Some(f32::INFINITY)),
    ];
    for d in &reports {
        match c.step_done(d, now) {
            Err(CoordError::Invalid(e)) => assert!(e.contains("malformed step report"), "{e}"),
            other => panic!("{d:?} answered {other:?}"),
        }
    }
    // Nothing of them was taken: the run is where it was.
    assert_eq!((c.committed(), c.losses().len()), (0, 0));
    assert_eq!(c.status(now).shards[1].completed, 0);
    // A worker cannot register as further along than the run goes.
    let mut r = reg(None, None, "far");
    r.completed = u64::MAX;
    assert!(matches!(c.register(r, now), Err(CoordError::Invalid(_))));
    // The run goes on.
    train(&mut c, &ids, epoch, 0, 2, now);
    assert_eq!(c.committed(), 2);
}

#[test]
fn a_recovery_is_timed_from_the_lost_shard_to_the_first_step_after_it() {
    let t0 = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, t0);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 3, t0);
    assert_eq!(c.status(t0).recoveries, 0);
    let lost = t0 + Duration::from_secs(10);
    assert!(c.lose(ids[3], lost));
    let (new, _) = c
        .register(reg(None, None, "new"), lost + Duration::from_secs(1))
        .expect("volunteer");
    let e2 = c.epoch();
    let w = c.wiring(new, e1).expect("ok").expect("plan");
    let ids = [ids[0], ids[1], ids[2], new];
    // Not over until a step of the new epoch is committed.
    assert_eq!(c.status(lost).recoveries, 0);
    let back = lost + Duration::from_millis(4500);
    train(&mut c, &ids, e2, w.step, w.step + 2, back);
    let s = c.status(back);
    assert_eq!(s.recoveries, 1);
    assert_eq!(s.last_recovery_seconds, Some(4.5));
    assert_eq!(s.recovery_seconds_total, 4.5);
    // The counters survive a restart.
    let again = Coordinator::new("t", c.layout().clone(), LEASE, None, Some(c.persisted()));
    let s = again.status(back);
    assert_eq!(
        (
            s.recoveries,
            s.recovery_seconds_total,
            s.last_recovery_seconds
        ),
        (1, 4.5, Some(4.5))
    );
    // A worker lost before the run trains starts no recovery.
    let mut fresh = coord(2, 1, false);
    let ids = fill(&mut fresh, t0);
    fresh.lose(ids[0], t0);
    fresh.register(reg(None, None, "x"), t0).expect("register");
    let e = fresh.epoch();
    let ids: Vec<u64> = fresh.workers().keys().copied().collect();
    train(&mut fresh, &ids, e, 0, 1, t0);
    assert_eq!(fresh.status(t0).recoveries, 0);
}

#[test]
fn the_history_keeps_each_committed_step_and_what_happened_to_the_run() {
    use super::history::EventKind as K;
    let t0 = Instant::now();
    let mut c = coord(2, 2, false);
    let ids = fill(&mut c, t0);
    let e1 = c.epoch();
    train(&mut c, &ids, e1, 0, 5, t0);
    // Step 6 is done by three; the fourth is lost: everyone resumes at 5.
    for &id in &ids[..3] {
        c.step_done(&done(&c, id, e1, 6), t0).expect("step");
    }
    c.lose(ids[3], t0);
    c.register(reg(None, None, "new"), t0).expect("volunteer");
    let h = c.history(t0, 1000.0);
    let steps: Vec<u64> = h.steps.iter().map(|p| p.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(h.steps[1].loss, Some(0.5));
    assert!(h.steps.iter().all(|p| p.time == 1000.0));
    let kinds: Vec<K> = h.events.iter().map(|e| e.kind).collect();
    for k in [K::Registered, K::Lost, K::Recovery, K::Epoch] {
        assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
    }
    let lost = h.events.iter().find(|e| e.kind == K::Lost).expect("lost");
    assert!(
        lost.text.contains("\"w11\"") && lost.text.contains("stage 1 replica 1"),
        "{}",
        lost.text
    );
    // A refused report is an event too.
    let mut d = done(&c, ids[0], c.epoch(), 1);
    d.commitment = None;
    assert!(c.step_done(&d, t0).is_err());
    let h = c.history(t0, 0.0);
    assert_eq!(h.events.last().map(|e| e.kind), Some(K::Refused));
}

/// A volunteer that says how much memory it has is only given a shard
/// whose planned bytes fit; a vacancy it does not fit stays vacant for a
/// worker that fits, and the refusal is counted once per worker and stage.
#[test]
fn a_volunteer_is_never_given_a_shard_it_lacks_the_memory_for() {
    let now = Instant::now();
    let mut l = layout(2, 1, false);
    // Stage 0 needs 1000 bytes, stage 1 needs 400.
    l.shard_bytes = vec![1000, 400];
    let mut c = Coordinator::new("t", l, LEASE, Some("/ck".into()), None);
    let with = |tag: &str, bytes: Option<u64>| Register {
        available_memory: bytes,
        ..reg(None, None, tag)
    };
    // Both stages vacant; the small worker fits only stage 1, though stage
    // 0 comes first in the usual order.
    let (small, shard) = c.register(with("small", Some(500)), now).expect("small");
    assert_eq!(shard, Some((1, 0)));
    assert_eq!(c.memory_refusals().get(&0), Some(&1));
    // A second small worker fits no vacancy: it waits, stage 0 stays vacant.
    let (small2, shard) = c.register(with("small2", Some(999)), now).expect("small2");
    assert_eq!(shard, None);
    assert_eq!(c.status(now).standby, 1);
    assert_eq!(c.memory_refusals().get(&0), Some(&2));
    assert_eq!(c.memory_refusals().get(&1), None);
    // Registering again (a lost answer) is not a second refusal.
    let again = Register {
        worker: Some(small2),
        ..with("small2", Some(999))
    };
    assert_eq!(c.register(again, now).expect("again").1, None);
    assert_eq!(c.memory_refusals().get(&0), Some(&2));
    // A worker that fits takes stage 0; one that does not say (an older
    // worker) is not held back either.
    let (big, shard) = c.register(with("big", Some(1000)), now).expect("big");
    assert_eq!(shard, Some((0, 0)));
    // Stage 1's worker is lost: the waiting small standby fits it and takes it.
    c.lose(small, now);
    assert_eq!(c.workers().get(&small2), Some(&(1, 0)));
    // Stage 0's worker is lost with only a small standby waiting: the slot
    // stays vacant, the standby waits, the refusal is counted.
    let (tiny, shard) = c.register(with("tiny", Some(450)), now).expect("tiny");
    assert_eq!(shard, None);
    c.lose(big, now);
    assert_eq!(c.workers().get(&tiny), None);
    assert_eq!(c.status(now).standby, 1);
    assert_eq!(c.memory_refusals().get(&0), Some(&3));
    assert!(c.status(now).shards[0].worker.is_none());
    // An older worker (no figure) takes it.
    let (old, shard) = c.register(with("old", None), now).expect("old");
    assert_eq!(shard, Some((0, 0)));
    assert_eq!(c.workers().get(&old), Some(&(0, 0)));
    // The refusals are in the run's history, naming the stage.
    let h = c.history(now, 0.0);
    let text = serde_json::to_string(&h).expect("history json");
    assert!(text.contains("not given stage 0"), "{text}");
}

/// Without planned bytes (an older layout) every volunteer fits.
#[test]
fn without_a_plan_every_volunteer_fits() {
    let now = Instant::now();
    let mut c = coord(1, 1, false);
    let r = Register {
        available_memory: Some(1),
        ..reg(None, None, "v")
    };
    assert_eq!(c.register(r, now).expect("v").1, Some((0, 0)));
    assert!(c.memory_refusals().is_empty());
}

/// `d` with the parameters' digest `digest` (as sent: any text).
fn with_params(mut d: StepDone, digest: &str) -> StepDone {
    if let Some(c) = d.commitment.as_mut() {
        c.params = Some(digest.to_string());
    }
    d
}

/// Every worker of `ids` reports step `step` with its digest from
/// `digests`; returns the last report's answer.
fn report_digests(
    c: &mut Coordinator,
    ids: &[u64],
    epoch: u64,
    step: u64,
    digests: &[&str],
    now: Instant,
) -> Option<super::api::Barrier> {
    let mut last = None;
    for (&id, d) in ids.iter().zip(digests) {
        last = c
            .step_done(&with_params(done(c, id, epoch, step), d), now)
            .expect("step");
    }
    last
}

#[test]
fn replicas_whose_digests_agree_commit_the_step() {
    let now = Instant::now();
    let mut c = coord(1, 3, false);
    let ids = fill(&mut c, now);
    let e = c.epoch();
    let a = "ab".repeat(32);
    for step in 1..=3 {
        let b = report_digests(&mut c, &ids, e, step, &[&a, &a, &a], now).expect("decided");
        assert!(b.proceed);
    }
    assert_eq!(c.committed(), 3);
    assert_eq!(c.epoch(), e);
    assert!(c.digest_mismatches().is_empty());
    assert_eq!(c.refused().get("digest_mismatch"), None);
}

#[test]
fn a_replica_outvoted_by_its_stage_is_refused_dropped_and_refilled_from_the_majority() {
    let now = Instant::now();
    let mut c = coord(1, 3, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    let (a, stale) = ("ab".repeat(32), "cd".repeat(32));
    for step in 1..=2 {
        report_digests(&mut c, &ids, e1, step, &[&a, &a, &a], now);
    }
    // Step 3: replica 2 holds other parameters than the two others.
    let b = report_digests(&mut c, &ids, e1, 3, &[&a, &a, &stale], now).expect("decided");
    assert!(!b.proceed, "the step is not acknowledged");
    assert_eq!(c.committed(), 2, "the minority's step is not committed");
    assert_eq!(c.digest_mismatches().get(&0), Some(&1));
    assert_eq!(c.refused().get("digest_mismatch"), Some(&1));
    // It is convicted: dropped from its slot and barred.
    match c.heartbeat(ids[2], now) {
        Err(CoordError::Quarantined(text)) => {
            assert!(text.starts_with("quarantined:"), "{text}");
            assert!(
                text.contains("step 3") && text.contains("digest_mismatch"),
                "{text}"
            );
        }
        other => panic!("the outvoted replica is not barred: {other:?}"),
    }
    assert!(matches!(
        c.register(reg(Some(0), Some(2), "w02"), now),
        Err(CoordError::Quarantined(_))
    ));
    assert_eq!(c.convictions().len(), 1);
    assert_eq!(c.convictions()[0].reason, "digest_mismatch");
    assert_eq!(c.status(now).quarantined.len(), 1);
    let e2 = c.epoch();
    assert!(e2 > e1);
    assert_eq!(c.losses().len(), 2);
    let events = c.history(now, 0.0).events;
    assert!(
        events
            .iter()
            .any(|e| e.text.contains("differ from the majority")),
        "{events:?}"
    );
    // The slot is refilled; the newcomer takes the majority's state and
    // everyone trains step 3 again.
    let (new, shard) = c.register(reg(None, None, "new"), now).expect("volunteer");
    assert_eq!(shard, Some((0, 2)));
    for &id in &ids[..2] {
        let w = c.wiring(id, e1).expect("ok").expect("plan");
        assert_eq!((w.step, w.state), (2, StateSource::Held));
    }
    let w = c.wiring(new, e1).expect("ok").expect("plan");
    assert_eq!((w.step, w.state), (2, StateSource::Replica));
    let e3 = c.epoch();
    let b =
        report_digests(&mut c, &[ids[0], ids[1], new], e3, 3, &[&a, &a, &a], now).expect("decided");
    assert!(b.proceed);
    assert_eq!(c.committed(), 3);
}

#[test]
fn two_replicas_that_disagree_break_the_step_off_and_keep_their_slots() {
    let now = Instant::now();
    let mut c = coord(1, 2, false);
    let ids = fill(&mut c, now);
    let e1 = c.epoch();
    let (a, b) = ("ab".repeat(32), "cd".repeat(32));
    for step in 1..=2 {
        report_digests(&mut c, &ids, e1, step, &[&a, &a], now);
    }
    let answer = report_digests(&mut c, &ids, e1, 3, &[&a, &b], now).expect("decided");
    assert!(!answer.proceed);
    assert_eq!(c.committed(), 2);
    assert_eq!(c.digest_mismatches().get(&0), Some(&1));
    assert_eq!(
        c.refused().get("digest_mismatch"),
        None,
        "no majority: nobody is refused"
    );
    for &id in &ids {
        assert!(c.heartbeat(id, now).is_ok(), "both keep their slots");
        let w = c.wiring(id, e1).expect("ok").expect("plan");
        assert_eq!((w.step, w.state), (2, StateSource::Held));
    }
    let events = c.history(now, 0.0).events;
    assert!(
        events.iter().any(|e| e.text.contains("no majority")),
        "{events:?}"
    );
    // The replayed step agrees and is committed.
    let e2 = c.epoch();
    assert!(e2 > e1);
    let answer = report_digests(&mut c, &ids, e2, 3, &[&a, &a], now).expect("decided");
    assert!(answer.proceed);
    assert_eq!(c.committed(), 3);
}

#[test]
fn a_malformed_digest_is_refused_and_counted_not_a_panic() {
    let now = Instant::now();
    let mut c = coord(1, 3, false);
    let ids = fill(&mut c, now);
    let e = c.epoch();
    let long = "ab".repeat(40);
    for bad in ["zz", "", long.as_str(), "é", &"g".repeat(64)] {
        let r = c.step_done(&with_params(done(&c, ids[0], e, 1), bad), now);
        assert!(
            matches!(r, Err(CoordError::Refused("malformed_digest", _))),
            "{bad:?}: {r:?}"
        );
    }
    assert_eq!(c.refused().get("malformed_digest"), Some(&5));
    assert_eq!(c.committed(), 0);
    // A well-formed report still goes through.
    let a = "ab".repeat(32);
    report_digests(&mut c, &ids, e, 1, &[&a, &a, &a], now);
    assert_eq!(c.committed(), 1);
}

#[test]
fn a_malformed_contribution_hash_is_refused_and_a_report_without_one_still_counts() {
    let now = Instant::now();
    let mut c = coord(1, 3, false);
    let ids = fill(&mut c, now);
    let e = c.epoch();
    for bad in ["zz", "", &"g".repeat(64)] {
        let mut d = done(&c, ids[0], e, 1);
        if let Some(cm) = d.commitment.as_mut() {
            cm.contribution = Some(bad.to_string());
        }
        let r = c.step_done(&d, now);
        assert!(
            matches!(r, Err(CoordError::Refused("malformed_digest", _))),
            "{bad:?}: {r:?}"
        );
    }
    assert_eq!(c.refused().get("malformed_digest"), Some(&3));
    // Reports without a contribution's hash (under `mean`, or from an
    // older worker) commit the step as before.
    let a = "ab".repeat(32);
    report_digests(&mut c, &ids, e, 1, &[&a, &a, &a], now);
    assert_eq!(c.committed(), 1);
}

#[test]
fn the_commitment_root_covers_the_contribution_hash_and_keeps_the_old_root_without_one() {
    let mut cm = super::api::Commitment {
        params: Some("cd".repeat(32)),
        ..Default::default()
    };
    let old = cm.root();
    cm.contribution = Some("ab".repeat(32));
    let with = cm.root();
    assert_ne!(old, with);
    cm.contribution = Some("ac".repeat(32));
    assert_ne!(cm.root(), with);
    assert_eq!(cm.contribution_hash(), Some(Ok([0xac; 32])));
    cm.contribution = None;
    assert_eq!(cm.root(), old);
    assert_eq!(cm.contribution_hash(), None);
    // Absent on the wire when absent, and an old report parses.
    let json = serde_json::to_string(&cm).expect("json");
    assert!(!json.contains("contribution"), "{json}");
    let back: super::api::Commitment = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, cm);
}

/// A coordinator's shared state for the quickstart manifest changed by
/// `edit`.
fn shared_for(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut pipewright_spec::TrainingRunSpec),
) -> super::server::Shared {
    let mut manifest =
        pipewright_spec::parse_manifest(include_str!("../../../examples/quickstart.yaml"))
            .expect("quickstart manifest");
    edit(&mut manifest.spec);
    let model = crate::model::ModelConfig::from_spec(&manifest.spec.model, 256);
    super::server::Shared::new(super::server::Config {
        manifest,
        token: "t".into(),
        run_key: "0".repeat(64),
        run_id: "1".repeat(32),
        lease: Duration::from_secs(60),
        state_dir: dir.to_path_buf(),
        checkpoint: None,
        model,
        ledger: None,
    })
    .expect("coordinator")
}

#[test]
fn contribution_audits_follow_the_manifests_aggregation_and_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Under mean with audits on: no robust rule, but a stage training
    // alone uploads its whole step (at most every micro-batch of it).
    let mean = shared_for(dir.path(), |s| s.pipeline.replicas = 3);
    assert!(!super::server::lock(&mean.coord).robust_aggregation());
    assert_eq!(mean.evidence_body_limit, 2 * 3 * mean.evidence_limit);
    // Audits off: one micro-batch at a time.
    let one = shared_for(dir.path(), |s| {
        s.pipeline.replicas = 3;
        s.validation.audit_rate = 0.0;
    });
    assert_eq!(one.evidence_body_limit, one.evidence_limit);
    // Under a robust rule at the default rate: a replica's whole step.
    let robust = shared_for(dir.path(), |s| {
        s.pipeline.replicas = 3;
        s.pipeline.aggregation = pipewright_spec::Aggregation::Median;
        s.validation.audit_rate = 0.0;
    });
    assert!(super::server::lock(&robust.coord).robust_aggregation());
    assert_eq!(robust.evidence_body_limit, 2 * robust.evidence_limit);
    // Contribution audits off: one micro-batch again.
    let off = shared_for(dir.path(), |s| {
        s.pipeline.replicas = 3;
        s.pipeline.aggregation = pipewright_spec::Aggregation::Median;
        s.validation.audit_rate = 0.0;
        s.validation.contribution_audit_rate = Some(0.0);
    });
    assert_eq!(off.evidence_body_limit, off.evidence_limit);
    // Bounded whatever the manifest asks.
    let mut spec = robust.config.manifest.spec.clone();
    spec.training.micro_batches = usize::MAX;
    assert_eq!(
        super::server::evidence_body_limit(&spec, 1 << 30),
        super::server::MAX_EVIDENCE_BODY
    );
}
