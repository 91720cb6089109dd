//! `pipewright ledger`: who did what in a run, and each contributor's
//! share, read from the run's ledger; `pipewright ledger verify` checks it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pipewright_spec::RewardsSpec;

use crate::coord::api::{step_message, StepClaim};
use crate::ledger::{self, shares, window_of, Entry, Ledger, Share};

/// Arguments of `pipewright ledger`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LedgerArgs {
    /// Check the ledger instead of printing it.
    #[command(subcommand)]
    pub action: Option<LedgerAction>,
    /// Run directory (or its `ledger.sqlite`).
    pub run_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV.
    #[arg(long)]
    pub csv: bool,
    /// Steps `A..B` (inclusive) instead of the run's reward window.
    #[arg(long, value_parser = parse_window)]
    pub window: Option<(u64, u64)>,
}

/// `pipewright ledger verify`.
#[derive(Debug, Subcommand)]
pub enum LedgerAction {
    /// Check the database's integrity, every entry's signature, tokens and
    /// FLOPs, and recompute every share from the raw entries.
    Verify {
        /// Run directory (or its `ledger.sqlite`).
        run_dir: PathBuf,
    },
}

fn parse_window(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("expected steps A..B (e.g. 1..100), got {s:?}");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b
        .trim()
        .trim_start_matches('=')
        .parse()
        .map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(format!("the window {s} is empty (steps count from 1)"));
    }
    Ok((a, b))
}

fn ledger_path(dir: &Path) -> PathBuf {
    if dir.is_dir() {
        dir.join(ledger::FILE)
    } else {
        dir.to_path_buf()
    }
}

/// The run's reward settings, as its coordinator recorded them.
fn rewards_of(l: &Ledger) -> Result<RewardsSpec> {
    match l.meta("rewards")? {
        Some(text) => serde_json::from_str(&text).context("the ledger's reward settings"),
        None => Ok(RewardsSpec::default()),
    }
}

/// Each identity's last registered name.
fn names_of(l: &Ledger) -> Result<BTreeMap<String, String>> {
    Ok(l.names()?.into_iter().collect())
}

/// Run `pipewright ledger`.
pub fn run(args: LedgerArgs) -> Result<()> {
    if let Some(LedgerAction::Verify { run_dir }) = args.action {
        return verify(&run_dir);
    }
    let Some(dir) = args.run_dir else {
        bail!("which run? pipewright ledger RUN_DIR");
    };
    let l = Ledger::open_read(&ledger_path(&dir))?;
    let rewards = rewards_of(&l)?;
    let last = l.last_step()?;
    let (from, to) = args.window.unwrap_or_else(|| window_of(last, &rewards));
    let steps = l.steps_in(from, to)?;
    let shares = shares(&l.totals(from, to)?, steps, &rewards);
    let names = names_of(&l)?;
    let quarantined = l.quarantined()?;
    if args.json {
        let rows: Vec<serde_json::Value> = shares
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["name"] = names.get(&s.identity).cloned().unwrap_or_default().into();
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "window": [from, to],
                "steps": steps,
                "rewards": rewards,
                "shares": rows,
                "quarantined": quarantined,
            }))?
        );
        return Ok(());
    }
    if args.csv {
        println!("identity,fingerprint,name,stages,micro_batches,tokens,flops,audits_passed,audits_failed,forfeited,eligible,share");
        for s in &shares {
            println!(
                "{},{},{},{},{},{},{},{},{},{},{},{}",
                s.identity,
                s.fingerprint,
                csv_field(names.get(&s.identity).map_or("", String::as_str)),
                csv_field(&stages_text(s)),
                s.micro_batches,
                s.tokens,
                s.flops,
                s.audits_passed,
                s.audits_failed,
                s.forfeited,
                s.eligible,
                s.share
            );
        }
        return Ok(());
    }
    println!("steps {from}..{to} ({steps} booked)");
    println!(
        "{:<16}  {:<24}  {:>6}  {:>8}  {:>10}  {:>10}  {:>9}  {:>7}",
        "IDENTITY", "NAME", "STAGES", "MICRO-B", "TOKENS", "TFLOP", "AUDITS", "SHARE"
    );
    for s in &shares {
        let name = names.get(&s.identity).cloned().unwrap_or_default();
        println!(
            "{:<16}  {:<24}  {:>6}  {:>8}  {:>10}  {:>10.3}  {:>9}  {:>6.2}%{}",
            s.fingerprint,
            truncate(&name, 24),
            stages_text(s),
            s.micro_batches,
            s.tokens,
            s.flops / 1e12,
            format!("{}/{}", s.audits_passed, s.audits_failed),
            100.0 * s.share,
            if s.forfeited > 0 {
                " (forfeited)"
            } else if s.eligible {
                ""
            } else {
                " (ineligible)"
            }
        );
    }
    if !quarantined.is_empty() {
        println!("\nquarantined (barred from the run; credit over the steps shown forfeited)");
        for q in &quarantined {
            let c = &q.conviction;
            println!(
                "{:<16}  {:<24}  stage {} replica {}  caught at step {}  {}  forfeits steps {}..{}",
                crate::identity::fingerprint_hex(&c.identity),
                truncate(&names.get(&c.identity).cloned().unwrap_or_default(), 24),
                c.stage,
                c.replica,
                c.step,
                c.reason,
                q.forfeit_from,
                q.forfeit_to
            );
            println!("    evidence: {}", c.evidence);
        }
    }
    Ok(())
}

fn stages_text(s: &Share) -> String {
    s.stages
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("+")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The problems with one entry: a signature that is not its identity's
/// over what it records, or tokens and FLOPs that are not what its
/// micro-batches cost at its stage's layers under the run's cost model.
fn entry_problems(
    e: &Entry,
    run_id: &str,
    cost: Option<(&ledger::CostModel, usize)>,
) -> Vec<String> {
    let tokens_per_mb = cost.map(|(c, _)| c.tokens_per_micro_batch);
    let mut out = Vec::new();
    let claim = StepClaim {
        run_id,
        worker: e.worker,
        epoch: e.epoch,
        completed: e.step,
        shard: (e.stage, e.replica),
        loss: e.loss,
        micro_batches: &e.micro_batches,
        root: e.commitment,
    };
    if !crate::identity::verify(
        &e.identity,
        crate::identity::STEP_DOMAIN,
        &step_message(&claim),
        &e.signature,
    ) {
        out.push(format!(
            "step {} stage {} replica {}: the signature is not {}'s over this entry",
            e.step,
            e.stage,
            e.replica,
            crate::identity::fingerprint_hex(&e.identity)
        ));
    }
    if let Some(t) = tokens_per_mb {
        if e.tokens != t * e.micro_batches.len() as u64 {
            out.push(format!(
                "step {} stage {} replica {}: {} tokens booked for {} micro-batches of {t}",
                e.step,
                e.stage,
                e.replica,
                e.tokens,
                e.micro_batches.len()
            ));
        }
    }
    if let Some((c, stages)) = cost {
        let want = c.flops(e.stage, stages, &e.layers, e.micro_batches.len() as u64);
        let got = [e.forward_flops, e.input_grad_flops, e.weight_grad_flops];
        if want.iter().zip(&got).any(|(w, g)| !close(*w, *g)) {
            out.push(format!(
                "step {} stage {} replica {}: FLOPs {got:?} booked; layers {:?} and {} \
                 micro-batches cost {want:?}",
                e.step,
                e.stage,
                e.replica,
                e.layers,
                e.micro_batches.len()
            ));
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Run `pipewright ledger verify`.
fn verify(dir: &Path) -> Result<()> {
    let l = Ledger::open_read(&ledger_path(dir))?;
    let mut problems = l.integrity()?;
    let run_id = l
        .meta("run_id")?
        .context("the ledger does not record its run id")?;
    let model = l
        .meta("cost_model")?
        .and_then(|t| serde_json::from_str::<Option<ledger::CostModel>>(&t).ok())
        .flatten();
    let stages = l.meta("stages")?.and_then(|t| t.parse::<usize>().ok());
    let cost = model.as_ref().zip(stages);
    let rewards = rewards_of(&l)?;
    let last = l.last_step()?;
    let entries = l.entries(1, last)?;
    for e in &entries {
        problems.extend(entry_problems(e, &run_id, cost));
    }
    // Two independent sums: SQLite's (what the coordinator serves) and a
    // pass over the raw entries.
    let (from, to) = window_of(last, &rewards);
    let steps = l.steps_in(from, to)?;
    let in_window: Vec<Entry> = entries
        .iter()
        .filter(|e| (from..=to).contains(&e.step))
        .cloned()
        .collect();
    let served = shares(&l.totals(from, to)?, steps, &rewards);
    let convictions = l.quarantined()?;
    let recomputed = shares(
        &ledger::totals_of(&in_window, &convictions),
        steps,
        &rewards,
    );
    if served.len() != recomputed.len() {
        problems.push(format!(
            "{} identities in the served shares, {} in the entries",
            served.len(),
            recomputed.len()
        ));
    }
    for (a, b) in served.iter().zip(&recomputed) {
        if a.identity != b.identity || !close(a.share, b.share) || !close(a.credit, b.credit) {
            problems.push(format!(
                "share of {}: {} served, {} recomputed from the entries",
                a.fingerprint, a.share, b.share
            ));
        }
    }
    if problems.is_empty() {
        println!(
            "ledger OK: {last} steps, {} entries, {} identities; every signature valid; \
             shares over steps {from}..{to} recomputed from the raw entries",
            entries.len(),
            recomputed.len()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        bail!("the ledger has {} problem(s)", problems.len())
    }
}
