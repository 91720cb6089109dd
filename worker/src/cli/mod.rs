//! The `pipewright` command line.

mod bench;
#[cfg(feature = "cuda")]
mod bench_gpu;
mod coordinator;
mod ledger;
mod plan;
mod train;
mod worker;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::checkpoint;
use crate::data::Corpus;
use crate::train::{evaluate, logits};

/// Train transformer language models split into pipeline stages.
#[derive(Debug, Parser)]
#[command(name = "pipewright", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the run described by a TrainingRun manifest on this machine.
    Train(train::TrainArgs),
    /// What each stage of a run needs (parameters, memory, FLOPs) and the
    /// fewest stages that fit a node, from the manifest alone.
    Plan(plan::PlanArgs),
    /// Report validation loss and bits per byte of a checkpoint.
    Eval {
        /// Checkpoint (a step directory, or a run directory with `latest`).
        checkpoint: PathBuf,
        /// Validation batches to score.
        #[arg(long, default_value_t = 32)]
        batches: usize,
        /// Score this manifest's data instead of the checkpoint's.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Write a checkpoint as a Hugging Face `transformers` Llama directory.
    Export {
        /// Checkpoint (a step directory, or a run directory with `latest`).
        checkpoint: PathBuf,
        /// Output directory.
        out: PathBuf,
    },
    /// Compute logits of a text with our model (to compare with an export).
    Forward {
        /// Checkpoint (a step directory, or a run directory with `latest`).
        checkpoint: PathBuf,
        /// Text to encode (truncated to the model's context).
        #[arg(long)]
        text: String,
        /// Output safetensors file with `input_ids` and `logits`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure training throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the coordinator of one run (registration, wiring, barrier,
    /// leases, checkpoints, status and metrics over HTTP).
    Coordinator(coordinator::CoordinatorArgs),
    /// Serve one shard of a run, wired by its coordinator.
    Worker(worker::WorkerArgs),
    /// Volunteer for a running run: take the shard that most limits it, or
    /// wait as a standby for one.
    Join(worker::JoinArgs),
    /// Who did what in a run and each contributor's share, from its
    /// ledger; `ledger verify RUN_DIR` checks the ledger.
    Ledger(ledger::LedgerArgs),
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Eval {
            checkpoint,
            batches,
            data,
        } => eval(&checkpoint, batches, data.as_deref()),
        Command::Export { checkpoint, out } => {
            let n = checkpoint::export::export(&checkpoint, &out)
                .with_context(|| format!("exporting {}", checkpoint.display()))?;
            println!(
                "wrote {n} tensors, config.json and tokenizer to {}",
                out.display()
            );
            Ok(())
        }
        Command::Forward {
            checkpoint,
            text,
            out,
        } => forward(&checkpoint, &text, &out),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Join(args) => worker::join(args),
        Command::Ledger(args) => ledger::run(args),
    }
}

fn eval(path: &Path, batches: usize, data: Option<&Path>) -> Result<()> {
    let mut loaded =
        checkpoint::load(path).with_context(|| format!("loading {}", path.display()))?;
    let manifest = match data {
        Some(p) => {
            pipewright_spec::load_manifest(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => loaded.meta.manifest.clone(),
    };
    let corpus = Corpus::load(&manifest.spec.data, &loaded.tokenizer)?;
    corpus.check_seq_len(loaded.meta.model.seq_len)?;
    let rows = manifest.spec.training.micro_batch_size;
    let e = evaluate(&mut loaded.stages, &corpus, batches, rows)?;
    let (loss, bpb, tokens) = (e.loss, e.bits_per_byte, e.tokens);
    println!("checkpoint      {}", checkpoint::resolve(path)?.display());
    println!("step            {}", loaded.meta.step);
    println!("tokens scored   {tokens}");
    println!("val loss        {loss:.4} nats/token");
    println!("val bits/byte   {bpb:.4}");
    println!(
        "unigram entropy {:.4} bits/byte",
        corpus.unigram_bits_per_byte()
    );
    Ok(())
}

fn forward(path: &Path, text: &str, out: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut loaded =
        checkpoint::load(path).with_context(|| format!("loading {}", path.display()))?;
    let seq = loaded.meta.model.seq_len;
    let mut ids = loaded.tokenizer.encode(text)?;
    anyhow::ensure!(!ids.is_empty(), "--text encodes to no tokens");
    ids.truncate(seq);
    // The model runs on full windows; pad by repeating the text (causal
    // attention makes the first positions independent of the padding).
    let n = ids.len();
    let padded: Vec<u32> = ids.iter().cycle().take(seq).copied().collect();
    let all = logits(&mut loaded.stages, &padded)?;
    let vocab = loaded.meta.model.vocab;
    let logits: Vec<u8> = all[..n * vocab]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let input: Vec<u8> = ids.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
    let views = vec![
        (
            "input_ids".to_string(),
            TensorView::new(Dtype::I64, vec![1, n], &input)?,
        ),
        (
            "logits".to_string(),
            TensorView::new(Dtype::F32, vec![1, n, vocab], &logits)?,
        ),
    ];
    safetensors::serialize_to_file(views, None, out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote logits of {n} tokens to {}", out.display());
    Ok(())
}

/// The summary lines of a run's final evaluation beside the corpus's
/// order-0 entropy.
pub(crate) fn print_evaluation(eval: &crate::train::EvalReport, unigram: f64) {
    println!(
        "  validation loss            {:.4} nats/token ({} tokens)",
        eval.loss, eval.tokens
    );
    println!("  validation bits per byte   {:.3}", eval.bits_per_byte);
    println!("  unigram entropy            {unigram:.3} bits per byte (order-0 baseline)");
    println!(
        "  model vs baseline          {:.3} bits per byte {}",
        (unigram - eval.bits_per_byte).abs(),
        if eval.bits_per_byte < unigram {
            "below"
        } else {
            "ABOVE"
        }
    );
}
