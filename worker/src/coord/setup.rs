//! What a run's coordinator is started with, wherever it runs (its own
//! process under `pipewright coordinator`, or inside the `train
//! --processes` launcher): its configuration from the manifest, the run's
//! join token and run key, and the run id every worker derives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::server::{CheckpointContext, Config};
use crate::checkpoint::{self, Meta};
use crate::model::{partition, ModelConfig};

/// Environment variable holding the join token.
pub const TOKEN_ENV: &str = "PIPEWRIGHT_JOIN_TOKEN";

/// Environment variable with the run key (64 hex digits).
pub const RUN_KEY_ENV: &str = "PIPEWRIGHT_RUN_KEY";

/// A fresh 32-byte secret as hex, from the OS's randomness.
pub fn random_hex32() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// The run id every worker of `manifest` uses: derived from its name.
pub fn run_id_hex(manifest: &pipewright_spec::TrainingRun) -> String {
    hex::encode(run_id(&manifest.metadata.name))
}

/// The run id of the run named `name`: the first 16 bytes of its BLAKE3
/// hash.
pub fn run_id(name: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    id.copy_from_slice(&blake3::hash(name.as_bytes()).as_bytes()[..16]);
    id
}

/// Everything the coordinator of `manifest` needs: the tokenizer and the
/// corpus fingerprint for checkpoint metadata, the stage layout.
pub fn config(
    manifest: &pipewright_spec::TrainingRun,
    token: String,
    run_key: String,
    state_dir: PathBuf,
    root: PathBuf,
    lease: Duration,
) -> Result<Config> {
    let spec = &manifest.spec;
    let (tokenizer, corpus) = crate::data::prepare(&spec.data)?;
    corpus.check_seq_len(spec.model.seq_len)?;
    let model = ModelConfig::from_spec(&spec.model, tokenizer.vocab_size());
    let meta = Meta {
        format_version: checkpoint::FORMAT_VERSION,
        step: 0,
        manifest: manifest.clone(),
        model: model.clone(),
        stage_layers: partition(&model, spec.pipeline.stages, &[]),
        seed: spec.training.seed,
        data_fingerprint: hex::encode(corpus.fingerprint()),
        losses: Vec::new(),
    };
    let ledger = Some(root.join(crate::ledger::FILE));
    Ok(Config {
        manifest: manifest.clone(),
        token,
        run_key,
        run_id: run_id_hex(manifest),
        lease,
        state_dir,
        checkpoint: Some(CheckpointContext {
            root,
            meta,
            tokenizer,
            keep: spec.checkpoint.keep,
        }),
        model,
        ledger,
    })
}

/// The run key: from the environment, else the one saved in the state
/// directory, else a new one saved there (readable by the owner only).
pub fn run_key(state_dir: &Path) -> Result<String> {
    if let Ok(k) = std::env::var(RUN_KEY_ENV) {
        let k = k.trim().to_string();
        anyhow::ensure!(
            hex::decode_to_slice(&k, &mut [0u8; 32]).is_ok(),
            "{RUN_KEY_ENV} must be 64 hex digits"
        );
        return Ok(k);
    }
    let path = state_dir.join("run.key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return Ok(k.trim().to_string());
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let k = random_hex32();
    std::fs::write(&path, &k).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(k)
}
