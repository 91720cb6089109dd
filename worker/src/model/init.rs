//! Deterministic initialisation.
//!
//! Every tensor draws from its own stream keyed by (seed, tensor name), so
//! a tensor gets the same values whichever stage holds it and however many
//! stages there are: a split model starts exactly where the unsplit one does.

use super::Param;

/// A `[rows, cols]` matrix parameter named `name`, drawn from N(0, std²)
/// with weight decay on.
pub fn matrix(seed: u64, name: &str, key: &str, rows: usize, cols: usize, std: f64) -> Param {
    let data = normal(seed, key, rows * cols, std);
    Param {
        grad: vec![0.0; data.len()],
        data,
        name: name.to_string(),
        shape: vec![rows, cols],
        decay: true,
    }
}

/// splitmix64: a counter-based generator, cheap and well mixed.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stream key of a tensor.
fn key(seed: u64, name: &str) -> u64 {
    let h = blake3::hash(format!("{seed}/{name}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// `n` samples of N(0, std²) for the tensor `name` (Box–Muller).
pub fn normal(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let k = key(seed, name);
    let uniform =
        |i: u64| ((splitmix64(k ^ splitmix64(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        let (u1, u2) = (uniform(2 * i), uniform(2 * i + 1));
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        if out.len() < n {
            out.push((r * th.sin()) as f32);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_distinct_and_have_the_right_spread() {
        let a = normal(7, "w", 20_000, 0.02);
        assert_eq!(a, normal(7, "w", 20_000, 0.02));
        assert_ne!(a[..8], normal(8, "w", 8, 0.02)[..]);
        assert_ne!(a[..8], normal(7, "v", 8, 0.02)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.001, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
    }
}
