//! The worker processes of a local run: one `pipewright worker` per shard,
//! started with the run's manifest file, the coordinator's URL and join
//! token, its shard, its kernel threads, its drill slowdown and send cap,
//! its attack in a `--byzantine` drill, and an identity of its own kept in
//! the run directory. A worker whose identity was quarantined is replaced
//! by a fresh one under a new identity file (`stage-S-replica-R.2`, `.3`,
//! …), honest even in a drill: the attacker was the machine shut out.

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
    /// Which identity of the shard it runs as: 1 for the first, one more
    /// for each that replaced a quarantined one.
    pub(super) generation: usize,
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
    /// Starts the worker process of (`stage`, `replica`) under the shard's
    /// identity number `generation` (1: the first; a drill's attack is
    /// handed to that one only, from step `from` on at the earliest, so a
    /// process started again does not attack the step its predecessor
    /// attacked, which is trained again).
    pub(super) fn spawn(
        &self,
        stage: usize,
        replica: usize,
        generation: usize,
        from: u64,
    ) -> Result<Worker> {
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
            .find(|&&(s, r, _)| (s, r) == (stage, replica) && generation == 1);
        match attack {
            Some(&(_, _, mut a)) => {
                a.from_step = a.from_step.max(from);
                command.env(crate::pipeline::attack::ATTACK_ENV, a.to_string())
            }
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
            .arg(identity_file(self.opts.root, stage, replica, generation))
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
            generation,
        })
    }
}

/// Where identity number `generation` of shard (`stage`, `replica`) of the
/// run in `root` is kept: `stage-S-replica-R` for the first,
/// `stage-S-replica-R.G` for the one that replaced the quarantined
/// number `G − 1`.
pub(super) fn identity_file(
    root: &Path,
    stage: usize,
    replica: usize,
    generation: usize,
) -> PathBuf {
    let name = format!("stage-{stage}-replica-{replica}");
    root.join("identities").join(match generation {
        0 | 1 => name,
        g => format!("{name}.{g}"),
    })
}
