//! The `pipewright` command.

use clap::Parser;

// Every micro-batch allocates and frees the same large activation buffers;
// mimalloc keeps those pages mapped instead of handing them back to the
// kernel and faulting them in again (about 8% of a quickstart step).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files or CI output.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = pipewright::cli::Cli::parse();
    if let Err(err) = pipewright::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
