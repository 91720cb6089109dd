use super::*;

const KINDS: [ScheduleKind; 3] = [
    ScheduleKind::Gpipe,
    ScheduleKind::OneFOneB,
    ScheduleKind::ZbH1,
];

/// Every (S, m) pair the schedule tests sweep.
fn grid() -> impl Iterator<Item = (usize, usize)> {
    (1..=6).flat_map(|s| (1..=12).map(move |m| (s, m)))
}

/// The peak in flight of every stage of a `kind` pipeline.
fn peaks(kind: ScheduleKind, stages: usize, m: usize) -> Vec<usize> {
    plan(kind, stages, m)
        .into_iter()
        .map(|ops| peak_in_flight(ops.into_iter()))
        .collect()
}

#[test]
fn each_list_has_one_forward_and_one_backward_per_micro_batch() {
    for kind in KINDS {
        for (stages, m) in grid() {
            for stage in 0..stages {
                let ops = ops(kind, stage, stages, m);
                for mb in 0..m as u32 {
                    let f = ops.iter().position(|&o| o == Op::Forward { mb });
                    let whole = ops.iter().filter(|&&o| o == Op::Backward { mb }).count();
                    let input = ops
                        .iter()
                        .filter(|&&o| o == Op::BackwardInput { mb })
                        .count();
                    let weight = ops
                        .iter()
                        .filter(|&&o| o == Op::BackwardWeight { mb })
                        .count();
                    assert_eq!(ops.iter().filter(|&&o| o == Op::Forward { mb }).count(), 1);
                    assert!(
                        (whole, input, weight) == (1, 0, 0) || (whole, input, weight) == (0, 1, 1)
                    );
                    let first_backward = ops
                        .iter()
                        .position(|o| !matches!(o, Op::Forward { .. }) && o.micro_batch() == mb);
                    assert!(
                        f < first_backward,
                        "{kind:?} S={stages} m={m} stage {stage} mb {mb}"
                    );
                }
                let expected = if kind == ScheduleKind::ZbH1 {
                    3 * m
                } else {
                    2 * m
                };
                assert_eq!(ops.len(), expected);
            }
        }
    }
}

#[test]
fn zb_h1_runs_every_weight_half_after_its_input_half() {
    for (stages, m) in grid() {
        for stage in 0..stages {
            let ops = ops(ScheduleKind::ZbH1, stage, stages, m);
            // The input halves stay where 1F1B puts its backwards.
            let inputs: Vec<Op> = ops
                .iter()
                .filter(|o| !matches!(o, Op::BackwardWeight { .. }))
                .copied()
                .collect();
            let one_f_one_b: Vec<Op> = super::ops(ScheduleKind::OneFOneB, stage, stages, m)
                .into_iter()
                .map(|o| match o {
                    Op::Backward { mb } => Op::BackwardInput { mb },
                    other => other,
                })
                .collect();
            assert_eq!(inputs, one_f_one_b, "S={stages} m={m} stage {stage}");
            for mb in 0..m as u32 {
                let b = ops.iter().position(|&o| o == Op::BackwardInput { mb });
                let w = ops.iter().position(|&o| o == Op::BackwardWeight { mb });
                assert!(b < w);
            }
        }
    }
}

#[test]
fn out_of_range_stage_has_no_work() {
    assert!(ops(ScheduleKind::OneFOneB, 4, 4, 8).is_empty());
    assert!(plan(ScheduleKind::ZbH1, 0, 8).is_empty());
    assert!(plan(ScheduleKind::Gpipe, 3, 0).iter().all(Vec::is_empty));
}

#[test]
fn peaks_in_flight_of_each_schedule() {
    for (stages, m) in grid() {
        assert!(peaks(ScheduleKind::Gpipe, stages, m)
            .iter()
            .all(|&p| p == m));
        let one_f_one_b = peaks(ScheduleKind::OneFOneB, stages, m);
        let expected: Vec<usize> = (0..stages).map(|s| (stages - s).min(m)).collect();
        assert_eq!(one_f_one_b, expected, "S={stages} m={m}");
        // ZB-H1 defers weight halves but never beyond 1F1B's largest peak.
        let zb = peaks(ScheduleKind::ZbH1, stages, m);
        assert_eq!(
            zb.iter().max(),
            one_f_one_b.iter().max(),
            "S={stages} m={m}"
        );
    }
    assert_eq!(peaks(ScheduleKind::ZbH1, 4, 8), [4, 4, 4, 4]);
    assert_eq!(peak_in_flight(std::iter::empty()), 0);
}
