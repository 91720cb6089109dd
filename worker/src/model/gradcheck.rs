//! Finite-difference checks of every backward, and of the split model.
//!
//! Each check compares the analytic gradient with a central difference of
//! the loss along random directions: `(L(θ+εv) − L(θ−εv)) / 2ε ≈ ⟨∇L, v⟩`.
//! Losses are summed in f64; the tolerance allows for f32 rounding.

use super::attention::Attention;
use super::block::Block;
use super::bottleneck::Projection;
use super::head::Head;
use super::mlp::Mlp;
use super::rmsnorm::RmsNorm;
use super::stage::tie_gradients;
use super::{init, partition, ModelConfig, Stage, StageInput, StageOutput};
use crate::kernels::ops::Rope;

const EPS: f64 = 1e-2;
const TOL: f64 = 2e-2;

fn cfg(tied: bool) -> ModelConfig {
    ModelConfig {
        vocab: 11,
        dim: 16,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ffn_dim: 24,
        seq_len: 5,
        tied,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.3,
    }
}

const BATCH: usize = 2;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Checks `analytic` against the directional derivative of `loss` at `x0`.
fn check(what: &str, x0: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x0.len(), analytic.len(), "{what}: gradient shape");
    for trial in 0..3 {
        // A unit direction: the step stays small however many values move.
        let v = init::normal(99 + trial, what, x0.len(), 1.0);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let v: Vec<f32> = v.iter().map(|x| x / norm).collect();
        let shifted = |s: f64| -> Vec<f32> {
            x0.iter()
                .zip(&v)
                .map(|(x, d)| x + (s * *d as f64) as f32)
                .collect()
        };
        let numeric = (loss(&shifted(EPS)) - loss(&shifted(-EPS))) / (2.0 * EPS);
        let exact = dot(analytic, &v);
        let err = (numeric - exact).abs() / numeric.abs().max(exact.abs()).max(1e-4);
        assert!(
            err < TOL,
            "{what}: numeric {numeric:.6} vs analytic {exact:.6} (rel err {err:.2e})"
        );
    }
}

fn inputs(n: usize, name: &str) -> Vec<f32> {
    init::normal(5, name, n, 1.0)
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let c = cfg(false);
    let mut norm = RmsNorm::new("n".into(), c.dim, c.norm_eps);
    norm.weight.data = inputs(c.dim, "gain");
    let x = inputs(BATCH * c.seq_len * c.dim, "x");
    let r = inputs(x.len(), "r");
    let (_, mut cache) = norm.forward(x.clone());
    let mut dx = vec![0.0; x.len()];
    norm.backward_input(&mut cache, r.clone(), &mut dx);
    norm.backward_weight(&cache);
    check("rmsnorm dx", &x, &dx, |x| {
        dot(&norm.forward(x.to_vec()).0, &r)
    });
    check(
        "rmsnorm dw",
        &norm.weight.data.clone(),
        &norm.weight.grad,
        |w| {
            let mut n = norm.clone();
            n.weight.data = w.to_vec();
            dot(&n.forward(x.clone()).0, &r)
        },
    );
}

#[test]
fn attention_backward_matches_finite_differences() {
    let c = cfg(false);
    let rope = Rope::new(c.seq_len, c.head_dim(), c.rope_theta);
    let mut attn = Attention::new(&c, 0, 3);
    let x = inputs(BATCH * c.seq_len * c.dim, "x");
    let r = inputs(x.len(), "r");
    let (_, mut cache) = attn.forward(x.clone(), BATCH, c.seq_len, &rope);
    let dx = attn.backward_input(&mut cache, r.clone(), &rope);
    attn.backward_weight(&cache);
    let run = |a: &Attention, x: &[f32]| dot(&a.forward(x.to_vec(), BATCH, c.seq_len, &rope).0, &r);
    check("attention dx", &x, &dx, |x| run(&attn, x));
    for i in 0..4 {
        let p = attn.params()[i].clone();
        check(&p.name, &p.data, &p.grad, |w| {
            let mut a = attn.clone();
            a.params_mut()[i].data = w.to_vec();
            run(&a, &x)
        });
    }
}

#[test]
fn mlp_backward_matches_finite_differences() {
    let c = cfg(false);
    let mut mlp = Mlp::new(&c, 0, 3);
    let rows = BATCH * c.seq_len;
    let x = inputs(rows * c.dim, "x");
    let r = inputs(x.len(), "r");
    let (_, mut cache) = mlp.forward(x.clone(), rows);
    let dx = mlp.backward_input(&mut cache, r.clone());
    mlp.backward_weight(&cache);
    check("mlp dx", &x, &dx, |x| {
        dot(&mlp.forward(x.to_vec(), rows).0, &r)
    });
    for i in 0..3 {
        let p = mlp.params()[i].clone();
        check(&p.name, &p.data, &p.grad, |w| {
            let mut m = mlp.clone();
            m.params_mut()[i].data = w.to_vec();
            dot(&m.forward(x.clone(), rows).0, &r)
        });
    }
}

#[test]
fn block_backward_matches_finite_differences() {
    let c = cfg(false);
    let rope = Rope::new(c.seq_len, c.head_dim(), c.rope_theta);
    let mut block = Block::new(&c, 1, 3);
    let x = inputs(BATCH * c.seq_len * c.dim, "x");
    let r = inputs(x.len(), "r");
    let (_, mut cache) = block.forward(x.clone(), BATCH, c.seq_len, &rope);
    let dx = block.backward_input(&mut cache, r.clone(), &rope);
    block.backward_weight(&cache);
    let run = |b: &Block, x: &[f32]| dot(&b.forward(x.to_vec(), BATCH, c.seq_len, &rope).0, &r);
    check("block dx", &x, &dx, |x| run(&block, x));
    let n = block.params().len();
    for i in 0..n {
        let p = block.params()[i].clone();
        check(&p.name, &p.data, &p.grad, |w| {
            let mut b = block.clone();
            b.params_mut()[i].data = w.to_vec();
            run(&b, &x)
        });
    }
}

#[test]
fn head_and_loss_backward_match_finite_differences() {
    let c = cfg(false);
    let mut head = Head::new(&c, 3);
    let rows = BATCH * c.seq_len;
    let x = inputs(rows * c.dim, "x");
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % c.vocab as u32).collect();
    let (_, mut cache) = head.forward(x.clone(), &targets, 1.0);
    let dx = head.backward_input(&mut cache);
    head.backward_weight(&cache);
    let run = |h: &Head, x: &[f32]| h.forward(x.to_vec(), &targets, 1.0).0 as f64;
    check("head dx", &x, &dx, |x| run(&head, x));
    let w = head.weight.clone();
    check("lm_head", &w.data, &w.grad, |d| {
        let mut h = head.clone();
        h.weight.data = d.to_vec();
        run(&h, &x)
    });
    let g = head.norm.weight.clone();
    check("final norm", &g.data, &g.grad, |d| {
        let mut h = head.clone();
        h.norm.weight.data = d.to_vec();
        run(&h, &x)
    });
}

fn batch(c: &ModelConfig) -> (Vec<u32>, Vec<u32>) {
    let n = BATCH * c.seq_len;
    let tokens = (0..n as u32)
        .map(|i| (i * 5 + 3) % c.vocab as u32)
        .collect();
    let targets = (0..n as u32)
        .map(|i| (i * 3 + 1) % c.vocab as u32)
        .collect();
    (tokens, targets)
}

fn build(c: &ModelConfig, stages: usize) -> Vec<Stage> {
    build_lowrank(c, stages, None)
}

fn build_lowrank(c: &ModelConfig, stages: usize, rank: Option<usize>) -> Vec<Stage> {
    partition(c, stages, &[])
        .into_iter()
        .enumerate()
        .map(|(i, r)| Stage::with_bottleneck(c, i, stages, r, 42, rank))
        .collect()
}

/// Forward and backward of two micro-batches through all stages in order,
/// the way a single process runs a pipeline; returns the mean loss.
fn train_pass(stages: &mut [Stage], c: &ModelConfig) -> f64 {
    let (tokens, targets) = batch(c);
    let mut total = 0.0;
    for mb in 0..2u64 {
        let mut x: Option<Vec<f32>> = None;
        let n = stages.len();
        for (i, s) in stages.iter_mut().enumerate() {
            let input = match &x {
                None => StageInput::Tokens(&tokens),
                Some(h) => StageInput::Hidden(h),
            };
            let t = (i + 1 == n).then_some(&targets[..]);
            match s.forward(mb, input, t, BATCH, 0.5).expect("forward") {
                StageOutput::Hidden(h) => x = Some(h),
                StageOutput::Loss(l) => total += l as f64 / 2.0,
            }
        }
        let mut g: Option<Vec<f32>> = None;
        for s in stages.iter_mut().rev() {
            g = s.backward(mb, g.as_deref()).expect("backward");
        }
    }
    tie_gradients(stages);
    total
}

fn loss_only(stages: &mut [Stage], c: &ModelConfig) -> f64 {
    let (tokens, targets) = batch(c);
    let mut x: Option<Vec<f32>> = None;
    let n = stages.len();
    for (i, s) in stages.iter_mut().enumerate() {
        let input = match &x {
            None => StageInput::Tokens(&tokens),
            Some(h) => StageInput::Hidden(h),
        };
        match s
            .infer(input, (i + 1 == n).then_some(&targets[..]), BATCH)
            .expect("infer")
        {
            StageOutput::Hidden(h) => x = Some(h),
            StageOutput::Loss(l) => return l as f64,
        }
    }
    unreachable!("the last stage returns a loss")
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    whole_model_gradient_check(2, None);
}

#[test]
fn bottleneck_projection_backward_matches_finite_differences() {
    let c = cfg(false);
    let rows = BATCH * c.seq_len;
    for (what, mut p) in [
        ("down", Projection::down(7, 0, c.dim, 3)),
        ("up", Projection::up(7, 0, c.dim, 3)),
    ] {
        // Move off the orthonormal start so the check is general.
        p.weight.data = inputs(p.weight.len(), what);
        let x = inputs(rows * p.width_in(), "x");
        let r = inputs(rows * p.width_out(), "r");
        let (_, mut cache) = p.forward(x.clone());
        let dx = p.backward_input(&mut cache, r.clone());
        p.backward_weight(&cache);
        check(&format!("{what} dx"), &x, &dx, |x| {
            dot(&p.forward(x.to_vec()).0, &r)
        });
        check(
            &format!("{what} dw"),
            &p.weight.data.clone(),
            &p.weight.grad,
            |w| {
                let mut q = p.clone();
                q.weight.data = w.to_vec();
                dot(&q.forward(x.clone()).0, &r)
            },
        );
    }
}

#[test]
fn whole_model_with_bottleneck_gradient_matches_finite_differences() {
    // Three stages: the middle one has both projections.
    whole_model_gradient_check(3, Some(3));
}

#[test]
fn bottleneck_stages_compute_the_projected_model() {
    // A lowrank pipeline is the plain pipeline with `U·D` applied to the
    // residual stream at every boundary: same loss, and the same gradient
    // reaching every block, as the plain stages with the map done by hand.
    let c = cfg(false);
    let (n, rank) = (3, 4);
    let mut low = build_lowrank(&c, n, Some(rank));
    let mut plain = build(&c, n);
    let want_loss = train_pass(&mut low, &c);
    let (tokens, targets) = batch(&c);
    let mut loss = 0.0;
    for mb in 0..2u64 {
        let mut x: Option<Vec<f32>> = None;
        for (i, s) in plain.iter_mut().enumerate() {
            let input = match &x {
                None => StageInput::Tokens(&tokens),
                Some(h) => StageInput::Hidden(h),
            };
            let t = (i + 1 == n).then_some(&targets[..]);
            match s.forward(mb, input, t, BATCH, 0.5).expect("forward") {
                StageOutput::Hidden(h) => {
                    let (z, _) = Projection::down(42, i, c.dim, rank).forward(h);
                    x = Some(Projection::up(42, i, c.dim, rank).forward(z).0);
                }
                StageOutput::Loss(l) => loss += l as f64 / 2.0,
            }
        }
        let mut g: Option<Vec<f32>> = None;
        for (i, s) in plain.iter_mut().enumerate().rev() {
            // The map is symmetric (U = Dᵀ at the start), so its backward
            // is the same projection.
            if let (Some(gr), true) = (&g, i + 1 < n) {
                let (z, _) = Projection::down(42, i, c.dim, rank).forward(gr.clone());
                g = Some(Projection::up(42, i, c.dim, rank).forward(z).0);
            }
            g = s.backward(mb, g.as_deref()).expect("backward");
        }
    }
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "loss {loss} vs {want_loss}"
    );
    let plain_params: Vec<_> = plain.iter().flat_map(|s| s.params()).collect();
    let low_params: Vec<_> = low
        .iter()
        .flat_map(|s| s.params())
        .filter(|p| !super::bottleneck::is_bottleneck(&p.name))
        .collect();
    assert_eq!(plain_params.len(), low_params.len());
    for (a, b) in plain_params.iter().zip(&low_params) {
        assert_eq!(a.name, b.name);
        // The two compute the map in a different order of products, so
        // compare against the tensor's largest gradient.
        let scale = a.grad.iter().fold(1e-12f32, |m, g| m.max(g.abs()));
        for (x, y) in a.grad.iter().zip(&b.grad) {
            assert!((x - y).abs() <= 1e-4 * scale, "{}: {x} vs {y}", a.name);
        }
    }
}

fn whole_model_gradient_check(n: usize, rank: Option<usize>) {
    for tied in [false, true] {
        let c = cfg(tied);
        let build = |c: &ModelConfig, n: usize| build_lowrank(c, n, rank);
        let mut stages = build(&c, n);
        train_pass(&mut stages, &c);
        // Perturb every parameter at once along one direction; with tied
        // embeddings both copies move together, so count the gradient once.
        let names: Vec<(usize, usize)> = stages
            .iter()
            .enumerate()
            .flat_map(|(s, st)| (0..st.params().len()).map(move |p| (s, p)))
            .collect();
        let flat = |st: &[Stage], grad: bool| -> Vec<f32> {
            names
                .iter()
                .flat_map(|&(s, p)| {
                    let prm = st[s].params()[p];
                    let skip = tied && grad && prm.name == super::head::LM_HEAD_NAME;
                    let src = if grad { &prm.grad } else { &prm.data };
                    src.iter().map(move |&v| if skip { 0.0 } else { v })
                })
                .collect()
        };
        let theta = flat(&stages, false);
        let grad = flat(&stages, true);
        let emb_len = c.vocab * c.dim;
        check(
            &format!("model tied={tied} rank={rank:?}"),
            &theta,
            &grad,
            |t| {
                let mut st = build(&c, n);
                let mut off = 0;
                for &(s, p) in &names {
                    let prm = &mut st[s].params_mut()[p];
                    let n = prm.len();
                    prm.data.copy_from_slice(&t[off..off + n]);
                    off += n;
                }
                if tied {
                    // The head replica follows the embedding.
                    let emb = t[..emb_len].to_vec();
                    st.last_mut()
                        .and_then(|s| s.head_mut())
                        .expect("head")
                        .0
                        .data = emb;
                }
                loss_only(&mut st, &c)
            },
        );
    }
}

#[test]
fn split_model_reproduces_the_unsplit_model() {
    for tied in [false, true] {
        let c = cfg(tied);
        let mut whole = build(&c, 1);
        let want_loss = train_pass(&mut whole, &c);
        let want: Vec<_> = whole[0].params().into_iter().cloned().collect();
        for stages in 2..=4 {
            let mut split = build(&c, stages);
            let loss = train_pass(&mut split, &c);
            assert!(
                (loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
                "{stages} stages: loss {loss} vs {want_loss}"
            );
            let got: Vec<_> = split
                .iter()
                .flat_map(|s| s.params().into_iter().cloned())
                .collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.name, w.name);
                assert_eq!(g.data, w.data, "{}: initial values differ", g.name);
                for (a, b) in g.grad.iter().zip(&w.grad) {
                    let scale = a.abs().max(b.abs()).max(1e-12);
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "{stages} stages, {}: {a} vs {b}",
                        g.name
                    );
                }
            }
        }
    }
}
