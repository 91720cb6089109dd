//! What a run needs of a machine, from the manifest alone.
//!
//! The sizing itself (per stage its parameters, the bytes of weights,
//! gradients, AdamW moments and activations at the schedule's peak, its
//! FLOPs; [`plan`], [`min_stages`], [`shard_fits`]) is the spec crate's
//! [`pipewright_spec::sizing`], so that the operator sizes shard pods with
//! the same function; it is re-exported here. This module adds what reads
//! files: the vocabulary of a `tokenizer.json` ([`vocab`]) and the memory
//! this process can use ([`available_memory`]).

use pipewright_spec::sizing::manifest_vocab;
use pipewright_spec::TrainingRun;

pub use pipewright_spec::sizing::{
    human, min_stages, parse_bytes, plan, shard_fits, Plan, StagePlan, PROCESS_OVERHEAD_BYTES,
    SLACK_BYTES_PER_PARAM,
};

/// Vocabulary size the model will have, read from the manifest without
/// touching the corpus: 256 for bytes, `vocabSize` for a BPE tokenizer to
/// be trained ([`manifest_vocab`]), the file's own for a `tokenizer.json`.
pub fn vocab(run: &TrainingRun) -> anyhow::Result<usize> {
    match manifest_vocab(run) {
        Some(v) => Ok(v),
        None => Ok(crate::data::Tokenizer::vocab_size_of(
            &run.spec.data.tokenizer,
        )?),
    }
}

/// Environment variable that caps the memory a process plans with
/// (`24GiB`, `512MiB`): a machine shared with other work offers less than
/// it has.
pub const AVAILABLE_MEMORY_ENV: &str = "PIPEWRIGHT_AVAILABLE_MEMORY";

/// Memory this process can give a run now: the lowest of what the machine
/// has ([`machine_memory`]), the process's own limits on its data segment
/// and address space (`RLIMIT_DATA`, `RLIMIT_AS`, as `prlimit` sets them)
/// and [`AVAILABLE_MEMORY_ENV`] (a value that is not a size is reported
/// and ignored). `None` where none of them is known.
pub fn available_memory() -> Option<u64> {
    let offered = std::env::var(AVAILABLE_MEMORY_ENV).ok().and_then(|v| {
        parse_bytes(&v)
            .map_err(|e| tracing::warn!("{AVAILABLE_MEMORY_ENV} is ignored: {e}"))
            .ok()
    });
    [machine_memory(), process_limit(), offered]
        .into_iter()
        .flatten()
        .min()
}

/// The lower of this process's soft limits on its data segment and its
/// address space, where either is set.
fn process_limit() -> Option<u64> {
    [libc::RLIMIT_DATA, libc::RLIMIT_AS]
        .into_iter()
        .filter_map(|resource| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct it is given and nothing else.
            let ok = unsafe { libc::getrlimit(resource, &mut r) } == 0;
            (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
        })
        .min()
}

/// Memory this machine can give a run now: `MemAvailable` from
/// `/proc/meminfo`, or the cgroup's limit less its usage when that is lower.
/// `None` where neither can be read (not Linux).
pub fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo
        .as_deref()
        .and_then(|m| proc_field(m, "MemAvailable"));
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    // cgroup v2, then v1; "max" (no limit) does not parse and is skipped.
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)))
        .or_else(|| {
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes").map(|max| {
                max.saturating_sub(read("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0))
            })
        });
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// The value of `field` in the text of a `/proc` file of `Field:  N kB`
/// lines (`/proc/meminfo`, `/proc/PID/status`), in bytes.
pub fn proc_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// [`proc_field`] of this process's `/proc/self/status` (`VmRSS`, `VmHWM`):
/// `None` where it cannot be read (not Linux).
pub fn own_status(field: &str) -> Option<u64> {
    proc_field(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

#[cfg(test)]
mod tests {
    use super::proc_field;

    #[test]
    fn proc_fields_are_read_in_bytes_by_their_exact_name() {
        let status = "Name:\tpipewright\nVmHWMx:\t9 kB\nVmHWM:\t  2048 kB\nVmRSS:\t1 kB\n";
        assert_eq!(proc_field(status, "VmHWM"), Some(2048 * 1024));
        assert_eq!(proc_field(status, "VmRSS"), Some(1024));
        assert_eq!(proc_field(status, "VmSwap"), None);
        assert_eq!(proc_field("MemAvailable: lots kB\n", "MemAvailable"), None);
    }
}
