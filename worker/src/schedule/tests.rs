use pipewright_spec::ScheduleKind;

use super::*;

const KINDS: [ScheduleKind; 3] = [
    ScheduleKind::Gpipe,
    ScheduleKind::OneFOneB,
    ScheduleKind::ZbH1,
];

/// tF = 1, tB = 1, tW = 1: a whole backward costs 2.
fn unit_costs(stages: usize, latency: f64) -> StageCosts {
    StageCosts::uniform(
        stages,
        OpCosts {
            forward: 1.0,
            backward_input: 1.0,
            backward_weight: 1.0,
        },
        latency,
    )
}

/// Every (S, m) pair the schedule tests sweep.
fn grid() -> impl Iterator<Item = (usize, usize)> {
    (1..=6).flat_map(|s| (1..=12).map(move |m| (s, m)))
}

fn timeline(kind: ScheduleKind, stages: usize, m: usize) -> Timeline {
    let plan = plan(kind, stages, m);
    simulate(&plan, &unit_costs(stages, 0.0))
        .unwrap_or_else(|e| panic!("{kind:?} S={stages} m={m} does not simulate: {e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn every_schedule_validates_and_runs_to_completion() {
    for kind in KINDS {
        for (stages, m) in grid() {
            let plan = plan(kind, stages, m);
            validate(&plan).unwrap_or_else(|e| panic!("{kind:?} S={stages} m={m}: {e}"));
            let t = timeline(kind, stages, m);
            for (s, stage) in t.stages.iter().enumerate() {
                // Each micro-batch costs every stage tF + tB + tW = 3.
                assert!(
                    close(stage.busy, 3.0 * m as f64),
                    "{kind:?} S={stages} m={m} stage {s}"
                );
                assert_eq!(stage.spans.len(), plan[s].len());
            }
        }
    }
}

#[test]
fn one_f_one_b_keeps_at_most_s_minus_stage_micro_batches_alive() {
    for (stages, m) in grid() {
        let t = timeline(ScheduleKind::OneFOneB, stages, m);
        for (s, stage) in t.stages.iter().enumerate() {
            assert_eq!(
                stage.peak_in_flight,
                (stages - s).min(m),
                "S={stages} m={m} stage {s}"
            );
        }
    }
}

#[test]
fn gpipe_keeps_every_micro_batch_alive() {
    for (stages, m) in grid() {
        let t = timeline(ScheduleKind::Gpipe, stages, m);
        assert!(
            t.stages.iter().all(|s| s.peak_in_flight == m),
            "S={stages} m={m}"
        );
    }
}

#[test]
fn zb_h1_peak_activation_memory_matches_one_f_one_b() {
    for (stages, m) in grid() {
        let zb = timeline(ScheduleKind::ZbH1, stages, m);
        let peak_1f1b = timeline(ScheduleKind::OneFOneB, stages, m)
            .stages
            .iter()
            .map(|s| s.peak_in_flight)
            .max();
        assert!(
            zb.stages.iter().all(|s| s.peak_in_flight <= stages),
            "S={stages} m={m}"
        );
        assert_eq!(
            zb.stages.iter().map(|s| s.peak_in_flight).max(),
            peak_1f1b,
            "S={stages} m={m}"
        );
    }
}

#[test]
fn uniform_makespans_match_the_closed_forms() {
    for (stages, m) in grid() {
        let one = timeline(ScheduleKind::OneFOneB, stages, m);
        let gpipe = timeline(ScheduleKind::Gpipe, stages, m);
        let zb = timeline(ScheduleKind::ZbH1, stages, m);
        let expected = 3.0 * (m + stages - 1) as f64;
        assert!(
            close(one.makespan, expected),
            "1F1B S={stages} m={m}: {}",
            one.makespan
        );
        assert!(
            close(gpipe.makespan, expected),
            "GPipe S={stages} m={m}: {}",
            gpipe.makespan
        );
        assert!(zb.makespan <= one.makespan + 1e-9, "S={stages} m={m}");
        if stages > 1 && m >= stages {
            assert!(zb.makespan < one.makespan, "S={stages} m={m}");
            // The paper's bubble for ZB-H1: (S − 1)·(tF + tB − tW).
            assert!(
                close(zb.makespan, (3 * m + stages - 1) as f64),
                "ZB-H1 S={stages} m={m}: {}",
                zb.makespan
            );
        }
    }
}

#[test]
fn one_f_one_b_bubble_is_the_textbook_fraction() {
    for (stages, m) in grid() {
        let t = timeline(ScheduleKind::OneFOneB, stages, m);
        let expected = (stages - 1) as f64 / (m + stages - 1) as f64;
        for (s, stage) in t.stages.iter().enumerate() {
            assert!(
                close(stage.bubble_fraction, expected),
                "S={stages} m={m} stage {s}: {}",
                stage.bubble_fraction
            );
        }
    }
}

#[test]
fn zb_h1_bubble_is_below_one_f_one_b() {
    for (stages, m) in grid().filter(|&(s, m)| s > 1 && m >= s) {
        let one = timeline(ScheduleKind::OneFOneB, stages, m);
        let zb = timeline(ScheduleKind::ZbH1, stages, m);
        for (a, b) in zb.stages.iter().zip(&one.stages) {
            assert!(a.bubble_fraction < b.bubble_fraction, "S={stages} m={m}");
        }
        assert!(zb.mean_bubble_fraction() < one.mean_bubble_fraction());
    }
}

#[test]
fn bound_equals_uniform_simulation_and_bounds_it_with_latency() {
    for kind in KINDS {
        for (stages, m) in grid() {
            let plan = plan(kind, stages, m);
            let exact = theoretical_bound(kind, m, &unit_costs(stages, 0.0));
            let simulated = timeline(kind, stages, m).makespan;
            if kind != ScheduleKind::ZbH1 || m >= stages || m == 1 {
                assert!(
                    close(exact, simulated),
                    "{kind:?} S={stages} m={m}: bound {exact}, simulated {simulated}"
                );
            }
            for latency in [0.25, 1.0, 3.0] {
                let costs = unit_costs(stages, latency);
                let bound = theoretical_bound(kind, m, &costs);
                let t = simulate(&plan, &costs).expect("valid plan");
                assert!(
                    t.makespan >= bound - 1e-9,
                    "{kind:?} S={stages} m={m} L={latency}"
                );
            }
        }
    }
    let c = unit_costs(4, 0.0);
    assert!(close(
        theoretical_bound(ScheduleKind::OneFOneB, 8, &c),
        33.0
    ));
    assert!(close(theoretical_bound(ScheduleKind::ZbH1, 8, &c), 27.0));
    assert_eq!(theoretical_bound(ScheduleKind::OneFOneB, 0, &c), 0.0);
}

#[test]
fn bound_uses_the_slowest_stage_for_the_steady_state() {
    // Stage 1 is twice as slow: 8 micro-batches of 6 plus one pass of 3
    // through each of the other three stages, plus 6 hops of 0.5.
    let mut costs = unit_costs(4, 0.5);
    costs.stages[1] = OpCosts {
        forward: 2.0,
        backward_input: 2.0,
        backward_weight: 2.0,
    };
    let bound = theoretical_bound(ScheduleKind::OneFOneB, 8, &costs);
    assert!(close(bound, 8.0 * 6.0 + 9.0 + 3.0));
    let t = simulate(&plan(ScheduleKind::OneFOneB, 4, 8), &costs).expect("valid plan");
    // The bottleneck's own work plus stage 0's forward before it and
    // backward after it, each one hop away, cannot be hidden; the fill of
    // stages 2 and 3 partly hides behind the bottleneck's warm-up forwards,
    // which is why the model overestimates uneven pipelines.
    assert!(t.makespan >= 8.0 * 6.0 + 1.0 + 2.0 + 2.0 * 0.5);
    assert!(t.makespan <= bound);
    let slowest = t
        .stages
        .iter()
        .map(|s| s.bubble_fraction)
        .fold(f64::INFINITY, f64::min);
    assert!(close(t.stages[1].bubble_fraction, slowest));
}

#[test]
fn link_latency_delays_the_pipeline_fill() {
    let plan = plan(ScheduleKind::Gpipe, 3, 2);
    let t = simulate(&plan, &unit_costs(3, 0.5)).expect("valid plan");
    // Forward of micro-batch 0 reaches stage 2 after two hops.
    assert!(close(t.stages[2].spans[0].start, 2.0 + 2.0 * 0.5));
    assert!(close(t.makespan, 3.0 * 4.0 + 4.0 * 0.5));
}

#[test]
fn validate_rejects_broken_lists() {
    use ScheduleError as E;
    let good = plan(ScheduleKind::OneFOneB, 2, 2);
    assert_eq!(validate(&[]), Err(E::NoStages));

    let mut dup = good.clone();
    dup[0].insert(0, Op::Forward { mb: 1 });
    assert_eq!(validate(&dup), Err(E::DuplicateForward { stage: 0, mb: 1 }));

    let mut early = good.clone();
    early[1] = vec![
        Op::Backward { mb: 0 },
        Op::Forward { mb: 0 },
        Op::Forward { mb: 1 },
        Op::Backward { mb: 1 },
    ];
    assert_eq!(
        validate(&early),
        Err(E::BackwardBeforeForward { stage: 1, mb: 0 })
    );

    let mut twice = good.clone();
    twice[1].push(Op::BackwardInput { mb: 0 });
    assert_eq!(
        validate(&twice),
        Err(E::DuplicateBackward { stage: 1, mb: 0 })
    );

    let split = vec![vec![
        Op::Forward { mb: 0 },
        Op::BackwardWeight { mb: 0 },
        Op::BackwardInput { mb: 0 },
    ]];
    assert_eq!(
        validate(&split),
        Err(E::WeightBeforeInput { stage: 0, mb: 0 })
    );

    let half = vec![vec![Op::Forward { mb: 0 }, Op::BackwardInput { mb: 0 }]];
    assert_eq!(validate(&half), Err(E::MissingBackward { stage: 0, mb: 0 }));

    let mut missing = good.clone();
    missing[1].retain(|o| o.micro_batch() != 1);
    assert_eq!(
        validate(&missing),
        Err(E::MissingForward { stage: 1, mb: 1 })
    );

    // Stage 1 wants micro-batch 1 first, but stage 0 sends it only after
    // micro-batch 0's gradient, which stage 1 produces after micro-batch 1.
    let stuck = vec![
        vec![
            Op::Forward { mb: 0 },
            Op::Backward { mb: 0 },
            Op::Forward { mb: 1 },
            Op::Backward { mb: 1 },
        ],
        vec![
            Op::Forward { mb: 1 },
            Op::Forward { mb: 0 },
            Op::Backward { mb: 0 },
            Op::Backward { mb: 1 },
        ],
    ];
    assert_eq!(
        validate(&stuck),
        Err(E::Deadlock {
            stage: 0,
            op: Op::Backward { mb: 0 }
        })
    );
    assert!(matches!(
        simulate(&stuck, &unit_costs(2, 0.0)),
        Err(E::Deadlock { .. })
    ));

    assert_eq!(validate(&good), Ok(()));
}

#[test]
fn simulate_rejects_costs_that_do_not_fit() {
    let plan = plan(ScheduleKind::OneFOneB, 3, 4);
    assert_eq!(
        simulate(&plan, &unit_costs(2, 0.0)),
        Err(ScheduleError::CostStages {
            stages: 3,
            costs: 2
        })
    );
    let mut nan = unit_costs(3, 0.0);
    nan.stages[2].backward_weight = f64::NAN;
    assert_eq!(
        simulate(&plan, &nan),
        Err(ScheduleError::InvalidCost { stage: 2 })
    );
    assert_eq!(
        simulate(&plan, &unit_costs(3, -1.0)),
        Err(ScheduleError::InvalidCost { stage: 3 })
    );
}

#[test]
fn an_empty_step_simulates_to_nothing() {
    let empty = plan(ScheduleKind::Gpipe, 3, 0);
    let t = simulate(&empty, &unit_costs(3, 0.0)).expect("an empty step is valid");
    assert_eq!(t.makespan, 0.0);
    assert!(t
        .stages
        .iter()
        .all(|s| s.bubble_fraction == 0.0 && s.peak_in_flight == 0));
}

/// The diagrams in the module documentation are what the simulator draws.
#[test]
fn module_diagrams_match_the_simulation() {
    let source = include_str!("mod.rs");
    for kind in KINDS {
        let drawn = timeline(kind, 4, 8).render(1.0);
        let documented: String = drawn.lines().map(|l| format!("//! {l}\n")).collect();
        assert!(
            source.contains(&documented),
            "{kind:?} diagram is stale; the simulator draws:\n{drawn}"
        );
    }
}

#[test]
fn four_stages_eight_micro_batches() {
    let one = timeline(ScheduleKind::OneFOneB, 4, 8);
    let gpipe = timeline(ScheduleKind::Gpipe, 4, 8);
    let zb = timeline(ScheduleKind::ZbH1, 4, 8);
    assert!(close(gpipe.makespan, 33.0) && close(one.makespan, 33.0) && close(zb.makespan, 27.0));
    assert!(close(one.mean_bubble_fraction(), 9.0 / 33.0));
    assert!(close(zb.mean_bubble_fraction(), 3.0 / 27.0));
    assert_eq!(
        gpipe
            .stages
            .iter()
            .map(|s| s.peak_in_flight)
            .collect::<Vec<_>>(),
        [8, 8, 8, 8]
    );
    assert_eq!(
        one.stages
            .iter()
            .map(|s| s.peak_in_flight)
            .collect::<Vec<_>>(),
        [4, 3, 2, 1]
    );
    assert_eq!(
        zb.stages
            .iter()
            .map(|s| s.peak_in_flight)
            .collect::<Vec<_>>(),
        [4, 4, 4, 4]
    );
}

mod random_costs {
    use proptest::prelude::*;

    use super::*;

    fn costs(stages: usize) -> impl Strategy<Value = StageCosts> {
        let stage = (0.0..5.0f64, 0.0..5.0f64, 0.0..5.0f64).prop_map(|(f, b, w)| OpCosts {
            forward: f,
            backward_input: b,
            backward_weight: w,
        });
        (prop::collection::vec(stage, stages), 0.0..2.0f64).prop_map(|(stages, link_latency)| {
            StageCosts {
                stages,
                link_latency,
            }
        })
    }

    proptest! {
        #[test]
        fn any_costs_give_a_consistent_timeline(
            (stages, c) in (1usize..=6).prop_flat_map(|s| (Just(s), costs(s))),
            m in 1usize..=12,
            kind in prop::sample::select(KINDS.to_vec()),
        ) {
            let t = simulate(&plan(kind, stages, m), &c).expect("generated plans are valid");
            for (s, stage) in t.stages.iter().enumerate() {
                prop_assert!((stage.busy - m as f64 * c.stages[s].total()).abs() < 1e-6);
                prop_assert!(stage.busy <= t.makespan + 1e-9);
                prop_assert!((0.0..=1.0).contains(&stage.bubble_fraction));
                // A stage never runs two operations at once.
                for pair in stage.spans.windows(2) {
                    prop_assert!(pair[0].end <= pair[1].start + 1e-9);
                }
            }
            // One micro-batch still has to go down and back up the pipeline.
            let path: f64 = c.stages.iter().map(|s| s.forward + s.backward_input).sum::<f64>()
                + 2.0 * (stages - 1) as f64 * c.link_latency;
            prop_assert!(t.makespan >= path - 1e-9);
        }
    }
}
