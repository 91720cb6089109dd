//! `pipewright plan`: what each stage of a run needs, before anything runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::plan::{available_memory, human, min_stages, parse_bytes, plan, vocab, Plan};

/// Arguments of `pipewright plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// TrainingRun manifest (YAML).
    pub manifest: PathBuf,
    /// Memory of one node, for the smallest number of stages that fits
    /// (`80GiB`, `512MiB`; default: what this machine has available now).
    #[arg(long, value_parser = parse_bytes)]
    pub node_memory: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run `pipewright plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    let manifest = pipewright_spec::load_manifest(&args.manifest)
        .with_context(|| format!("{} is not a valid TrainingRun", args.manifest.display()))?;
    let vocab = vocab(&manifest).context("reading the tokenizer's vocabulary")?;
    let p = plan(&manifest, vocab, None);
    let node = args.node_memory.or_else(available_memory);
    let fit = node.map(|n| min_stages(&manifest, vocab, n));
    if args.json {
        let out = json!({
            "run": manifest.metadata.name,
            "plan": p,
            "node_memory_bytes": node,
            "min_stages": fit.flatten(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_table(&manifest.metadata.name, &manifest.spec, &p);
    match (node, fit) {
        (Some(n), Some(Some(s))) => println!(
            "smallest number of stages for a node of {}: {s}{}",
            human(n),
            if s == manifest.spec.pipeline.stages {
                " (as the manifest has)"
            } else {
                ""
            }
        ),
        (Some(n), _) => println!(
            "no number of stages fits a node of {}: even one layer per stage needs more",
            human(n)
        ),
        (None, _) => println!("node memory unknown; pass --node-memory"),
    }
    Ok(())
}

fn print_table(name: &str, spec: &pipewright_spec::TrainingRunSpec, p: &Plan) {
    let t = &spec.training;
    println!(
        "run {name}: {:.1}M parameters, vocabulary {}, {} stage(s) × {} replica(s), \
         schedule {}, {} micro-batch(es) of {} × {} tokens, recompute {}",
        p.params as f64 / 1e6,
        p.vocab,
        p.stages.len(),
        spec.pipeline.replicas,
        serde_json::to_value(p.schedule)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        t.micro_batches,
        t.micro_batch_size,
        spec.model.seq_len,
        serde_json::to_value(p.recompute)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    );
    println!(
        "{:>5} {:>9} {:>10} {:>11} {:>11} {:>11} {:>11} {:>9} {:>12} {:>11} {:>12} {:>11}",
        "stage",
        "layers",
        "params",
        "weights",
        "gradients",
        "adam m+v",
        "act/micro",
        "in flight",
        "activations",
        "total",
        "GFLOP/token",
        "TFLOP/step"
    );
    for s in &p.stages {
        println!(
            "{:>5} {:>9} {:>9.2}M {:>11} {:>11} {:>11} {:>11} {:>9} {:>12} {:>11} {:>12.3} {:>11.3}",
            s.stage,
            format!("{}..{}", s.layers.start, s.layers.end),
            s.params as f64 / 1e6,
            human(s.weight_bytes),
            human(s.gradient_bytes),
            human(s.optimizer_bytes),
            human(s.activation_bytes_per_micro_batch),
            s.peak_in_flight,
            human(s.activation_bytes),
            human(s.total_bytes),
            s.flops_per_token / 1e9,
            s.flops_per_step / 1e12,
        );
    }
    println!(
        "a stage's total is its shard process (pipewright worker): it also holds its weights \
         and Adam moments one step back ({}; a checkpoint is streamed from the tensors)",
        match p.stages.first().map(|s| s.snapshot_bytes) {
            Some(0) => "on disk: spec.training.snapshot is disk".to_string(),
            Some(b) => format!("{} in memory", human(b)),
            None => String::new(),
        }
    );
    // The most any stage holds of one kind, where any holds some.
    let most =
        |of: fn(&crate::plan::StagePlan) -> u64| p.stages.iter().map(of).max().filter(|&b| b > 0);
    if let Some(e) = most(|s| s.evidence_bytes) {
        let applied = if spec.pipeline.replicas == 1 {
            " and a copy of the gradient its update applied (the coordinator replays the update)"
        } else {
            ""
        };
        println!(
            "with audits on (spec.validation) each also keeps what its step's micro-batches \
             received{applied}, up to {} (counted in its total)",
            human(e)
        );
    }
    if let Some(a) = most(|s| s.aggregation_bytes) {
        let receipts = if spec.pipeline.aggregation == pipewright_spec::Aggregation::Mean {
            ""
        } else {
            ", its ring neighbours' contributions kept as receipts for the step"
        };
        println!(
            "with {} replicas each also holds what combining their gradients ({}) needs: copies \
             of its gradients and the combined result{receipts}, up to {} (counted in its total)",
            spec.pipeline.replicas,
            spec.pipeline.aggregation.name(),
            human(a)
        );
    }
    println!(
        "one process (pipewright train without --processes): {}",
        human(p.single_process_bytes)
    );
}
