//! The worker processes of a local run: one `pipewright worker` per shard,
//! started with the run's manifest file, the coordinator's URL and join
//! token, its shard, its kernel threads, its drill slowdown and send cap,
//! its attack in a `--byzantine` drill, and an identity of its own kept in
//! the run directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use super::LaunchOptions;

/// One shard's worker process.
pub(super) struct Worker {
    pub(super) stage: usize,
    pub(super) replica: usize,
    pub(super) child: Child,
    /// The process has ended (and was not relaunched).
    pub(super) done: bool,
}

/// How to start (and restart) a shard's worker process.
pub(super) struct Spawner<'a> {
    /// The `pipewright` binary.
    pub(super) exe: PathBuf,
    /// The run's manifest, written where the workers read it.
    pub(super) manifest: PathBuf,
    /// The coordinator's URL.
    pub(super) url: String,
    /// The run's join token.
    pub(super) token: String,
    /// Kernel threads per worker.
    pub(super) threads: usize,
    pub(super) opts: &'a LaunchOptions<'a>,
}

impl Spawner<'_> {
    /// Starts the worker process of (`stage`, `replica`).
    pub(super) fn spawn(&self, stage: usize, replica: usize) -> Result<Worker> {
        let slowdown = self
            .opts
            .slow
            .iter()
            .find(|&&(s, r, _)| (s, r) == (stage, replica))
            .map_or(1.0, |&(_, _, f)| f);
        let mut command = Command::new(&self.exe);
        command.arg("worker");
        let attack = self
            .opts
            .byzantine
            .iter()
            .find(|&&(s, r, _)| (s, r) == (stage, replica));
        match attack {
            Some((_, _, a)) => command.env(crate::pipeline::attack::ATTACK_ENV, a.to_string()),
            None => command.env_remove(crate::pipeline::attack::ATTACK_ENV),
        };
        if let Some(rate) = self.opts.max_send_rate {
            command.args(["--max-send-rate", &(rate as f64 / 1e6).to_string()]);
        }
        let child = command
            .arg(&self.manifest)
            .args(["--coordinator", &self.url])
            .args([
                "--stage",
                &stage.to_string(),
                "--replica",
                &replica.to_string(),
            ])
            .args(["--threads", &self.threads.to_string()])
            .args(["--slowdown", &slowdown.to_string()])
            // Each shard's process has an identity of its own, kept in the
            // run directory: a relaunched one keeps its account.
            .arg("--identity")
            .arg(identity_file(self.opts.root, stage, replica))
            .env(crate::coord::setup::TOKEN_ENV, &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting stage {stage} replica {replica}"))?;
        Ok(Worker {
            stage,
            replica,
            child,
            done: false,
        })
    }
}

/// Where the identity of shard (`stage`, `replica`) of the run in `root`
/// is kept.
fn identity_file(root: &Path, stage: usize, replica: usize) -> PathBuf {
    root.join("identities")
        .join(format!("stage-{stage}-replica-{replica}"))
}
