//! Vectorisable element-wise helpers.
//!
//! The crate is built for the baseline x86-64 target (SSE2), so loops the
//! compiler vectorises run four lanes wide. [`simd_fn!`] compiles a function
//! body twice, once more with AVX2 and FMA enabled, and picks the wide copy
//! at run time when the CPU has those features. [`exp`] is written without
//! branches or library calls, so loops over it vectorise too.

/// Define `fn name(args) -> ret { body }` with an AVX2+FMA copy chosen at
/// run time. Both copies compute the same arithmetic (no fused multiply-add
/// is introduced), so results do not depend on the CPU.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a part with few mantissa bits (exact when multiplied by a
// small integer) and the rest.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// Adding 1.5·2²³ rounds a float of magnitude < 2²² to an integer.
const ROUND: f32 = 12_582_912.0;

/// `eˣ` to within about two units in the last place, without branches.
/// Arguments below −87.3 give 0; above 88.3 they are clamped (a huge finite
/// value).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.3);
    // x = n·ln2 + r with |r| ≤ ln2/2.
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor series of eʳ to degree 7: error below 1e-8 relative on the range.
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2ⁿ from the integer in t's low mantissa bits.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    simd_fn! {
        fn exp_all(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v = exp(*v);
            }
        }
    }

    #[test]
    fn exp_matches_the_library_to_a_few_ulp() {
        let xs: Vec<f32> = (-9000..=9000).map(|i| i as f32 * 0.0097).collect();
        let mut ys = xs.clone();
        exp_all(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            let rel = ((y as f64 - want) / want).abs();
            assert!(rel < 4e-7, "exp({x}) = {y}, want {want} (rel {rel:.2e})");
            // The scalar path (no vector unit) agrees bit for bit.
            assert_eq!(exp(x).to_bits(), y.to_bits());
        }
    }

    #[test]
    fn exp_of_extreme_arguments_stays_finite() {
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert!(exp(100.0).is_finite());
        assert_eq!(exp(0.0), 1.0);
        assert!((sigmoid(-200.0)).abs() < 1e-30);
        assert_eq!(sigmoid(200.0), 1.0);
    }
}
