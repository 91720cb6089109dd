//! Assignment of contiguous layer ranges to stages.

use std::ops::Range;

use super::ModelConfig;

/// Split `cfg.layers` blocks into `stages` contiguous, non-empty ranges that
/// minimise the largest stage cost, where a stage's cost is the sum of its
/// blocks' costs plus the embedding (first stage) and the LM head (last
/// stage). `speeds[s]` (relative throughput of the worker that will run
/// stage `s`; all 1.0 for a cost-balanced split) divides each stage's cost.
pub fn partition(cfg: &ModelConfig, stages: usize, speeds: &[f64]) -> Vec<Range<usize>> {
    let n = cfg.layers;
    assert!(stages >= 1 && stages <= n, "need 1 <= stages <= layers");
    let block = cfg.block_flops_per_token();
    let head = cfg.head_flops_per_token();
    let speed = |s: usize| speeds.get(s).copied().filter(|v| *v > 0.0).unwrap_or(1.0);
    let cost = |s: usize, r: Range<usize>| {
        let mut c = block * r.len() as f64;
        if s + 1 == stages {
            c += head;
        }
        c / speed(s)
    };
    // best[s][i]: minimal max-cost of placing layers 0..i on stages 0..s.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for i in s..=n {
            for j in (s - 1)..i {
                let c = best[s - 1][j].max(cost(s - 1, j..i));
                if c < best[s][i] {
                    best[s][i] = c;
                    cut[s][i] = j;
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n;
    for s in (1..=stages).rev() {
        let start = cut[s][end];
        ranges[s - 1] = start..end;
        end = start;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layers: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            vocab,
            dim: 64,
            layers,
            heads: 4,
            kv_heads: 4,
            ffn_dim: 128,
            seq_len: 32,
            tied: false,
            rope_theta: 1e4,
            norm_eps: 1e-5,
            init_std: 0.02,
        }
    }

    #[test]
    fn ranges_cover_all_layers_in_order() {
        for stages in 1..=6 {
            let r = partition(&cfg(6, 256), stages, &[]);
            assert_eq!(r.len(), stages);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[stages - 1].end, 6);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(!w[0].is_empty());
            }
        }
    }

    #[test]
    fn a_heavy_head_leaves_the_last_stage_fewer_layers() {
        let r = partition(&cfg(8, 32_000), 2, &[]);
        assert!(r[1].len() < r[0].len(), "{r:?}");
    }

    #[test]
    fn a_faster_worker_gets_more_layers() {
        let r = partition(&cfg(8, 256), 2, &[1.0, 3.0]);
        assert!(r[1].len() > r[0].len(), "{r:?}");
    }
}
