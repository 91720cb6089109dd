//! Attack drills: a shard that lies on purpose, so the run's defences
//! (robust aggregation, the checks on received tensors, the parameters'
//! digests, audits by recomputation) can be seen at work
//! (`pipewright train --processes --byzantine STAGE/REPLICA=ATTACK[@STEP]`).
//!
//! Gradient attacks change the contribution this shard hands to the
//! replicas' aggregation, bucket by bucket (`sign-flip` negates it,
//! `scale` multiplies it by 100, `scale:F` by `F`, `noise` adds Gaussian
//! noise as large as the contribution itself; `contribution-lie` sends it
//! negated but commits to the hash of the honest one; `grad-nan` sends NaN
//! in place of it, which the gradient ring would refuse to send for an
//! honest worker); `nan` poisons every tensor it
//! sends on the pipeline (activations forward, activation gradients
//! backward); `stale` skips its optimizer update, so its weights fall
//! behind its replicas' (the coordinator's digest check catches it).
//!
//! Pipeline attacks change what the shard sends its neighbouring stages
//! while it commits honestly to the hashes of what it sent, so only an
//! audit by recomputation catches them: `act-noise` adds Gaussian noise as
//! large as the tensor to every activation it sends forward and every
//! activation gradient it sends back, `act-scale` multiplies them by 100,
//! `lazy-zeros` sends zeros in place of its forward outputs (the last
//! stage, which sends none, in place of its activation gradients), and
//! `lazy-replay` sends the previous step's output of the same micro-batch
//! again (zeros where it has none). `forge` signs its step reports with a
//! key that is not its registered identity's, `lie` reports, as an
//! auditor, hashes that are not the ones it computed, `lie-received`, as a
//! contribution audit's validator, a contribution it did not receive. `alter-targets`
//! (a middle stage) relays targets shifted by one position under the
//! first stage's signature over the true ones.
//!
//! An attack starts at step `STEP` (1-based, default 1) and is
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
    /// Adds Gaussian noise, whose expected norm is the tensor's own, to
    /// every activation it sends forward and activation gradient it sends
    /// back.
    ActNoise,
    /// Multiplies every activation it sends forward and activation
    /// gradient it sends back by [`SCALE`].
    ActScale,
    /// Sends zeros in place of its forward outputs (the last stage: of its
    /// activation gradients).
    LazyZeros,
    /// Sends the previous step's forward output of the same micro-batch
    /// again (the last stage: its activation gradient; zeros where it has
    /// none).
    LazyReplay,
    /// Signs its step reports with a key that is not its registered
    /// identity's.
    Forge,
    /// As an auditor, reports hashes that are not the ones it computed.
    Lie,
    /// As a contribution audit's validator, says it received a
    /// contribution other than the one it received (the hash of that
    /// hash, so two colluding validators tell the same lie), with no proof.
    LieReceived,
    /// Sends its gradient contribution negated, as [`AttackKind::SignFlip`]
    /// does, but commits to the hash of the honest one: it signs one thing
    /// and sends another.
    ContributionLie,
    /// A middle stage that relays the targets shifted by one position,
    /// with the first stage's origin of the true ones.
    AlterTargets,
    /// Sends NaN in place of its gradient contribution (every value, every
    /// bucket), signed, in the ring all-reduce or the gather.
    GradNan,
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

/// The factor of the `scale` attack when none is given, and of
/// `act-scale`.
pub const SCALE: f32 = 100.0;

/// Every attack, `scale` with its default factor.
const ALL: [AttackKind; 15] = [
    AttackKind::SignFlip,
    AttackKind::Scale(SCALE),
    AttackKind::Noise,
    AttackKind::Nan,
    AttackKind::Stale,
    AttackKind::ActNoise,
    AttackKind::ActScale,
    AttackKind::LazyZeros,
    AttackKind::LazyReplay,
    AttackKind::Forge,
    AttackKind::Lie,
    AttackKind::LieReceived,
    AttackKind::ContributionLie,
    AttackKind::AlterTargets,
    AttackKind::GradNan,
];

/// The attacks' names on the command line (`scale:F` too).
pub const NAMES: [&str; 16] = [
    "sign-flip",
    "scale",
    "scale:F",
    "noise",
    "nan",
    "stale",
    "act-noise",
    "act-scale",
    "lazy-zeros",
    "lazy-replay",
    "forge",
    "lie",
    "lie-received",
    "contribution-lie",
    "alter-targets",
    "grad-nan",
];

impl AttackKind {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::SignFlip => "sign-flip",
            AttackKind::Scale(_) => "scale",
            AttackKind::Noise => "noise",
            AttackKind::Nan => "nan",
            AttackKind::Stale => "stale",
            AttackKind::ActNoise => "act-noise",
            AttackKind::ActScale => "act-scale",
            AttackKind::LazyZeros => "lazy-zeros",
            AttackKind::LazyReplay => "lazy-replay",
            AttackKind::Forge => "forge",
            AttackKind::Lie => "lie",
            AttackKind::LieReceived => "lie-received",
            AttackKind::ContributionLie => "contribution-lie",
            AttackKind::AlterTargets => "alter-targets",
            AttackKind::GradNan => "grad-nan",
        }
    }

    /// Whether it changes this shard's gradient contribution.
    pub fn on_gradients(self) -> bool {
        matches!(
            self,
            AttackKind::SignFlip
                | AttackKind::Scale(_)
                | AttackKind::Noise
                | AttackKind::ContributionLie
                | AttackKind::GradNan
        )
    }

    /// Whether it changes what this shard sends its neighbouring stages
    /// (which a pipeline of one stage does not have).
    pub fn on_pipeline(self) -> bool {
        matches!(
            self,
            AttackKind::Nan
                | AttackKind::ActNoise
                | AttackKind::ActScale
                | AttackKind::LazyZeros
                | AttackKind::LazyReplay
                | AttackKind::AlterTargets
        )
    }

    /// Whether only a middle stage, which relays the targets, can make it.
    pub fn relays_targets(self) -> bool {
        self == AttackKind::AlterTargets
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

    /// `ATTACK[@STEP]`: one of [`NAMES`] (`scale:F` with a factor), from
    /// step `STEP` (at least 1; default 1).
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
            _ => ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
                format!(
                    "unknown attack {name:?}: expected one of {}",
                    NAMES.join(", ")
                )
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
        AttackKind::SignFlip | AttackKind::ContributionLie => {
            data.iter_mut().for_each(|x| *x = -*x)
        }
        AttackKind::Scale(f) => data.iter_mut().for_each(|x| *x *= f),
        AttackKind::GradNan => data.fill(f32::NAN),
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
        _ => {}
    }
}

/// What a pipeline attack sends in place of `data`, a tensor this shard
/// sends a neighbour (`forward`: an activation; else an activation
/// gradient); `previous` is the tensor it computed for the same
/// micro-batch in the previous step, if it kept one. `None`: it sends
/// `data` as it is.
pub fn tamper(
    kind: AttackKind,
    data: &[f32],
    forward: bool,
    last: bool,
    previous: Option<&[f32]>,
    seed: u64,
) -> Option<Vec<f32>> {
    // The lazy attacks fake the forward output; the last stage has none
    // to send, so it fakes its activation gradient.
    let lazy = forward != last;
    match kind {
        AttackKind::Nan => Some(vec![f32::NAN; data.len()]),
        AttackKind::ActNoise => {
            let mut x = data.to_vec();
            corrupt_gradient(AttackKind::Noise, &mut x, seed);
            Some(x)
        }
        AttackKind::ActScale => Some(data.iter().map(|x| x * SCALE).collect()),
        AttackKind::LazyZeros if lazy => Some(vec![0.0; data.len()]),
        AttackKind::LazyReplay if lazy => Some(match previous {
            Some(p) if p.len() == data.len() => p.to_vec(),
            _ => vec![0.0; data.len()],
        }),
        _ => None,
    }
}

/// What the `alter-targets` drill relays in place of `targets`: every
/// id moved one position earlier (the first to the end), so each position
/// is trained to predict the token after its own target; where that
/// changes nothing (all ids equal), the first id is replaced.
pub fn alter_targets(targets: &mut [u32]) {
    let before = targets.first().copied();
    targets.rotate_left(1);
    if targets.windows(2).all(|w| w[0] == w[1]) {
        if let (Some(t), Some(b)) = (targets.first_mut(), before) {
            *t = u32::from(b == 0);
        }
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
        assert!(!AttackKind::Stale.on_pipeline(), "a one-stage drill");
        for name in NAMES.iter().filter(|n| **n != "scale:F") {
            let a: Attack = name.parse().expect(name);
            assert_eq!(a.kind.name(), *name);
            assert_eq!(a.to_string(), format!("{name}@1"));
        }
        assert_eq!(
            "lazy-replay@2".parse::<Attack>(),
            Ok(Attack {
                kind: AttackKind::LazyReplay,
                from_step: 2
            })
        );
        assert!("lazy".parse::<Attack>().is_err());
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
        corrupt_gradient(AttackKind::ContributionLie, &mut x, 0);
        assert_eq!(x, vec![-1.0, 2.0, -0.5, -4.0], "sends what sign-flip sends");
        assert!(AttackKind::ContributionLie.on_gradients());
        let mut x = g.clone();
        corrupt_gradient(AttackKind::Scale(SCALE), &mut x, 0);
        assert_eq!(x, vec![100.0, -200.0, 50.0, 400.0]);
        let mut x = g.clone();
        corrupt_gradient(AttackKind::GradNan, &mut x, 0);
        assert!(x.iter().all(|v| v.is_nan()), "{x:?}");
        assert!(AttackKind::GradNan.on_gradients() && !AttackKind::GradNan.on_pipeline());
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

    #[test]
    fn pipeline_attacks_change_what_is_sent_and_only_that() {
        let h: Vec<f32> = (0..4096).map(|i| ((i % 11) as f32 - 5.0) * 0.1).collect();
        let prev = vec![0.5f32; h.len()];
        let fwd = |k| tamper(k, &h, true, false, Some(&prev), 7);
        assert!(fwd(AttackKind::Nan).unwrap().iter().all(|x| x.is_nan()));
        assert_eq!(fwd(AttackKind::ActScale).unwrap()[1], h[1] * SCALE);
        let noisy = fwd(AttackKind::ActNoise).unwrap();
        let noise: Vec<f32> = noisy.iter().zip(&h).map(|(a, b)| a - b).collect();
        let ratio = crate::sync::aggregate::norm(&noise) / crate::sync::aggregate::norm(&h);
        assert!((ratio - 1.0).abs() < 0.1, "noise norm ratio {ratio}");
        assert_eq!(fwd(AttackKind::LazyZeros), Some(vec![0.0; h.len()]));
        assert_eq!(fwd(AttackKind::LazyReplay), Some(prev.clone()));
        // Nothing kept from the step before: zeros.
        assert_eq!(
            tamper(AttackKind::LazyReplay, &h, true, false, None, 7),
            Some(vec![0.0; h.len()])
        );
        // The lazy attacks fake forward outputs only, except on the last
        // stage, which fakes its gradients.
        assert_eq!(
            tamper(AttackKind::LazyZeros, &h, false, false, None, 7),
            None
        );
        assert_eq!(
            tamper(AttackKind::LazyZeros, &h, false, true, None, 7),
            Some(vec![0.0; h.len()])
        );
        assert!(tamper(AttackKind::ActScale, &h, false, false, None, 7).is_some());
        for k in [
            AttackKind::SignFlip,
            AttackKind::Noise,
            AttackKind::Stale,
            AttackKind::Forge,
            AttackKind::Lie,
            AttackKind::ContributionLie,
            AttackKind::AlterTargets,
        ] {
            assert_eq!(fwd(k), None, "{k:?}");
        }
    }

    #[test]
    fn alter_targets_relays_other_targets() {
        assert_eq!(
            "alter-targets@3".parse::<Attack>(),
            Ok(Attack {
                kind: AttackKind::AlterTargets,
                from_step: 3
            })
        );
        assert!(AttackKind::AlterTargets.relays_targets());
        assert!(AttackKind::AlterTargets.on_pipeline());
        assert!(!AttackKind::ActNoise.relays_targets());
        let mut t = vec![5, 6, 7, 8];
        alter_targets(&mut t);
        assert_eq!(t, vec![6, 7, 8, 5]);
        // All alike: still changed, and still a valid id.
        for (id, want) in [(3, 0), (0, 1)] {
            let mut t = vec![id; 6];
            alter_targets(&mut t);
            assert_eq!(t[0], want);
            assert_eq!(&t[1..], &[id; 5]);
        }
    }
}
