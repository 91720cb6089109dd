//! Attack drills: a shard that lies on purpose, so the run's defences
//! (robust aggregation, the checks on received tensors) can be seen at
//! work (`pipewright train --processes --byzantine STAGE/REPLICA=ATTACK[@STEP]`).
//!
//! Gradient attacks change the contribution this shard hands to the
//! replicas' aggregation, bucket by bucket (`sign-flip` negates it,
//! `scale` multiplies it by 100, `scale:F` by `F`, `noise` adds Gaussian
//! noise as large as the contribution itself); `nan` poisons every tensor it
//! sends on the pipeline (activations forward, activation gradients
//! backward); `stale` skips its optimizer update, so its weights fall
//! behind its replicas' (the coordinator's digest check catches it). An attack starts at step `STEP` (1-based, default 1) and is
//! made at most once per step number: a step trained again after its
//! epoch broke off (a receiver refused what it sent) is trained honestly,
//! so a drill always ends.

use std::fmt;
use std::str::FromStr;

/// What a dishonest shard does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttackKind {
    /// Negates its gradient contribution.
    SignFlip,
    /// Multiplies its gradient contribution by a factor ([`SCALE`] unless
    /// given).
    Scale(f32),
    /// Adds Gaussian noise whose expected norm is the contribution's own.
    Noise,
    /// Sends NaN in place of every activation and activation gradient.
    Nan,
    /// Skips its optimizer update, so its weights stay behind its
    /// replicas' (stale weights); it reports the step as done.
    Stale,
}

/// The environment variable that hands a worker process its drill attack
/// (`ATTACK[@STEP]`); `pipewright train --processes --byzantine` sets it.
pub const ATTACK_ENV: &str = "PIPEWRIGHT_BYZANTINE";

/// The attack [`ATTACK_ENV`] asks for, if any.
pub fn from_env() -> Result<Option<Attack>, String> {
    match std::env::var(ATTACK_ENV) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map(Some)
            .map_err(|e| format!("{ATTACK_ENV}: {e}")),
        _ => Ok(None),
    }
}

/// Parses `STAGE/REPLICA=ATTACK[@STEP]` (`--byzantine`).
pub fn parse_shard_attack(s: &str) -> Result<(usize, usize, Attack), String> {
    let bad = || format!("expected STAGE/REPLICA=ATTACK[@STEP] (e.g. 0/1=sign-flip@3), got {s:?}");
    let (shard, attack) = s.split_once('=').ok_or_else(bad)?;
    let (stage, replica) = shard.split_once('/').ok_or_else(bad)?;
    let stage = stage.trim().parse().map_err(|_| bad())?;
    let replica = replica.trim().parse().map_err(|_| bad())?;
    Ok((stage, replica, attack.trim().parse()?))
}

/// The factor of the `scale` attack when none is given.
pub const SCALE: f32 = 100.0;

impl AttackKind {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::SignFlip => "sign-flip",
            AttackKind::Scale(_) => "scale",
            AttackKind::Noise => "noise",
            AttackKind::Nan => "nan",
            AttackKind::Stale => "stale",
        }
    }

    /// Whether it acts on this shard's own step (its gradient
    /// contribution, or for `stale` its update) rather than on what
    /// travels on the pipeline.
    pub fn on_gradients(self) -> bool {
        !matches!(self, AttackKind::Nan)
    }
}

/// An attack and the step it starts at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attack {
    /// What it does.
    pub kind: AttackKind,
    /// First step (1-based) it is made at.
    pub from_step: u64,
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AttackKind::Scale(x) if x != SCALE => {
                write!(f, "scale:{x}@{}", self.from_step)
            }
            k => write!(f, "{}@{}", k.name(), self.from_step),
        }
    }
}

impl FromStr for Attack {
    type Err = String;

    /// `ATTACK[@STEP]`: `sign-flip`, `scale`, `scale:F`, `noise`, `nan` or `stale`, from step
    /// `STEP` (at least 1; default 1).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, from) = match s.split_once('@') {
            Some((n, st)) => (
                n,
                st.parse::<u64>()
                    .ok()
                    .filter(|&v| v >= 1)
                    .ok_or_else(|| format!("the step after @ must be at least 1, got {st:?}"))?,
            ),
            None => (s, 1),
        };
        let kind = match name.split_once(':') {
            Some(("scale", f)) => AttackKind::Scale(
                f.parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("the scale factor must be a number, got {f:?}"))?,
            ),
            _ => [
                AttackKind::SignFlip,
                AttackKind::Scale(SCALE),
                AttackKind::Noise,
                AttackKind::Nan,
                AttackKind::Stale,
            ]
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                format!("unknown attack {name:?}: expected sign-flip, scale, scale:F, noise, nan or stale")
            })?,
        };
        Ok(Attack {
            kind,
            from_step: from,
        })
    }
}

/// Changes a gradient contribution as `kind` says. `seed` keys the noise,
/// so a drill is reproducible.
pub fn corrupt_gradient(kind: AttackKind, data: &mut [f32], seed: u64) {
    match kind {
        AttackKind::SignFlip => data.iter_mut().for_each(|x| *x = -*x),
        AttackKind::Scale(f) => data.iter_mut().for_each(|x| *x *= f),
        AttackKind::Noise => {
            if data.is_empty() {
                return;
            }
            // Per-element deviation so the noise's norm matches the data's.
            let sigma = (crate::sync::aggregate::norm(data) / (data.len() as f64).sqrt()) as f32;
            let mut state = seed;
            for x in data.iter_mut() {
                *x += sigma * gaussian(&mut state);
            }
        }
        AttackKind::Nan | AttackKind::Stale => {}
    }
}

/// A standard normal draw (Box–Muller on two SplitMix64 uniforms).
fn gaussian(state: &mut u64) -> f32 {
    let mut uniform = || {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // In (0, 1]: never zero, so the logarithm is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let (u, v) = (uniform(), uniform());
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_attacks_and_steps() {
        assert_eq!(
            "sign-flip".parse::<Attack>(),
            Ok(Attack {
                kind: AttackKind::SignFlip,
                from_step: 1
            })
        );
        assert_eq!(
            "nan@3".parse::<Attack>(),
            Ok(Attack {
                kind: AttackKind::Nan,
                from_step: 3
            })
        );
        assert_eq!(
            "scale@2".parse::<Attack>().map(|a| a.to_string()),
            Ok("scale@2".into())
        );
        assert_eq!(
            "scale:-100".parse::<Attack>().map(|a| a.kind),
            Ok(AttackKind::Scale(-100.0))
        );
        assert!("scale:inf".parse::<Attack>().is_err());
        assert!("scale@0".parse::<Attack>().is_err());
        assert!("scale@x".parse::<Attack>().is_err());
        assert!("flip".parse::<Attack>().is_err());
        assert_eq!(
            "stale@3".parse::<Attack>(),
            Ok(Attack {
                kind: AttackKind::Stale,
                from_step: 3
            })
        );
        assert!(AttackKind::Stale.on_gradients(), "a one-stage drill");
        assert_eq!(
            parse_shard_attack("1/2=noise@4"),
            Ok((
                1,
                2,
                Attack {
                    kind: AttackKind::Noise,
                    from_step: 4
                }
            ))
        );
        assert!(parse_shard_attack("1=noise").is_err());
        assert!(parse_shard_attack("1/x=noise").is_err());
    }

    #[test]
    fn gradient_attacks_do_what_they_say() {
        let g = vec![1.0f32, -2.0, 0.5, 4.0];
        let mut x = g.clone();
        corrupt_gradient(AttackKind::SignFlip, &mut x, 0);
        assert_eq!(x, vec![-1.0, 2.0, -0.5, -4.0]);
        let mut x = g.clone();
        corrupt_gradient(AttackKind::Scale(SCALE), &mut x, 0);
        assert_eq!(x, vec![100.0, -200.0, 50.0, 400.0]);
        let big: Vec<f32> = (0..20_000).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut x = big.clone();
        corrupt_gradient(AttackKind::Noise, &mut x, 42);
        let noise: Vec<f32> = x.iter().zip(&big).map(|(a, b)| a - b).collect();
        let ratio = crate::sync::aggregate::norm(&noise) / crate::sync::aggregate::norm(&big);
        assert!((ratio - 1.0).abs() < 0.05, "noise norm ratio {ratio}");
        let mut again = big.clone();
        corrupt_gradient(AttackKind::Noise, &mut again, 42);
        assert_eq!(x, again, "the same seed draws the same noise");
    }
}
