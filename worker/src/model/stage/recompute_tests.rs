//! Activation recomputation gives the gradients of a plain backward, bit
//! for bit, whether the two halves of a backward run together or apart.

use crate::model::{ModelConfig, Recompute, Stage, StageInput, StageOutput};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab: 50,
        dim: 32,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 48,
        seq_len: 16,
        tied: true,
        rope_theta: 1e4,
        norm_eps: 1e-5,
        init_std: 0.02,
    }
}

/// Three micro-batches through a 2-stage split in a zero-bubble-like
/// order (three forwards, then input halves with the weight halves
/// deferred), returning the losses and every gradient's bits.
fn run(policy: Recompute, split: bool) -> (Vec<u32>, Vec<(String, Vec<u32>)>) {
    let cfg = cfg();
    let mut stages: Vec<Stage> = [0..3, 3..4]
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut s = Stage::new(&cfg, i, 2, l, 5);
            s.set_recompute(policy);
            s
        })
        .collect();
    let batch = 2;
    let rows = batch * cfg.seq_len;
    let mut losses = Vec::new();
    for mb in 0..3u64 {
        let tokens: Vec<u32> = (0..rows)
            .map(|i| ((i as u64 * 7 + mb * 11) % 50) as u32)
            .collect();
        let targets: Vec<u32> = (0..rows)
            .map(|i| ((i as u64 * 3 + mb) % 50) as u32)
            .collect();
        let StageOutput::Hidden(h) = stages[0]
            .forward(mb, StageInput::Tokens(&tokens), None, batch, 0.5)
            .expect("forward 0")
        else {
            panic!("stage 0 returns hidden states")
        };
        let StageOutput::Loss(l) = stages[1]
            .forward(mb, StageInput::Hidden(&h), Some(&targets), batch, 0.5)
            .expect("forward 1")
        else {
            panic!("stage 1 returns the loss")
        };
        losses.push(l.to_bits());
    }
    assert_eq!(stages[0].in_flight(), 3);
    let mut pending = Vec::new();
    for mb in 0..3u64 {
        if split {
            let g = stages[1].backward_input(mb, None).expect("input 1");
            stages[0].backward_input(mb, g.as_deref()).expect("input 0");
            pending.push(mb);
            // Weight halves one micro-batch behind, in order.
            if pending.len() > 1 {
                let w = pending.remove(0);
                for s in &mut stages {
                    s.backward_weight(w).expect("weight");
                }
            }
        } else {
            let g = stages[1].backward(mb, None).expect("backward 1");
            stages[0].backward(mb, g.as_deref()).expect("backward 0");
        }
    }
    for w in pending {
        for s in &mut stages {
            s.backward_weight(w).expect("weight");
        }
    }
    assert_eq!(stages[0].in_flight() + stages[1].in_flight(), 0);
    let grads = stages
        .iter()
        .flat_map(|s| s.params())
        .map(|p| (p.name.clone(), p.grad.iter().map(|v| v.to_bits()).collect()))
        .collect();
    (losses, grads)
}

#[test]
fn recomputed_gradients_are_the_plain_gradients_bit_for_bit() {
    for split in [false, true] {
        let (losses, grads) = run(Recompute::Off, split);
        assert!(grads.iter().all(|(_, g)| g.iter().any(|&b| b != 0)));
        for policy in [Recompute::Full, Recompute::Selective] {
            let (l, g) = run(policy, split);
            assert_eq!(l, losses, "{policy:?}, split {split}: losses");
            for ((name, a), (_, b)) in g.iter().zip(&grads) {
                assert!(a == b, "{policy:?}, split {split}: gradient of {name}");
            }
        }
    }
}

#[test]
fn a_recomputed_backward_refuses_what_a_plain_one_refuses() {
    let cfg = cfg();
    let mut s = Stage::new(&cfg, 0, 2, 0..3, 5);
    s.set_recompute(Recompute::Full);
    let tokens = vec![1u32; 2 * cfg.seq_len];
    s.forward(0, StageInput::Tokens(&tokens), None, 2, 1.0)
        .expect("forward");
    let short = vec![0.0f32; 3];
    assert!(s.backward_input(0, Some(&short)).is_err());
    assert_eq!(
        s.backward_weight(0),
        Err(crate::model::StageError::OutOfOrder(0))
    );
    let g = vec![0.01f32; 2 * cfg.seq_len * cfg.dim];
    s.backward_input(0, Some(&g)).expect("input half");
    s.backward_weight(0).expect("weight half");
    assert_eq!(s.in_flight(), 0);
}
