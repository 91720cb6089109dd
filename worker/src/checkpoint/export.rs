//! Export of a checkpoint as a Hugging Face `transformers` Llama directory.
//!
//! Parameter names already follow the Hugging Face convention and the model
//! uses its rotary layout, so export is a copy: one `model.safetensors` with
//! every stage's weights (no optimizer state; a tied head is written once,
//! as the embedding), `config.json`, `generation_config.json`, and the
//! tokenizer files.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::{corrupt, io, load, CheckpointError};
use crate::model::head::LM_HEAD_NAME;

/// Write the Hugging Face directory for the checkpoint at `checkpoint` into
/// `out` (created if missing). Returns the number of tensors written.
pub fn export(checkpoint: &Path, out: &Path) -> Result<usize, CheckpointError> {
    let loaded = load(checkpoint)?;
    let cfg = &loaded.meta.model;
    if let Some(rank) = loaded.stages.iter().find_map(|s| s.bottleneck_rank()) {
        return Err(CheckpointError::NotExportable(format!(
            "this model was trained with the learned low-rank bottleneck \
             (spec.pipeline.codec lowrank, rank {rank}): its {} stage boundaries \
             project the residual stream to {rank} of {} dimensions and back, \
             which a Hugging Face LlamaForCausalLM cannot express; \
             evaluate it with `pipewright eval` instead",
            loaded.stages.len().saturating_sub(1),
            cfg.dim
        )));
    }
    fs::create_dir_all(out).map_err(io(out))?;

    let mut blobs: Vec<(String, Vec<usize>, std::borrow::Cow<'_, [u8]>)> = Vec::new();
    for stage in &loaded.stages {
        for p in stage.params() {
            if cfg.tied && p.name == LM_HEAD_NAME {
                continue;
            }
            blobs.push((p.name.clone(), p.shape.clone(), super::f32_bytes(&p.data)));
        }
    }
    let model_path = out.join("model.safetensors");
    let views = blobs
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| corrupt(&model_path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(info), &model_path)
        .map_err(|e| corrupt(&model_path, e.to_string()))?;

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({ "do_sample": true, "max_length": cfg.seq_len }),
    )?;
    loaded.tokenizer.save(out)?;
    Ok(blobs.len())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| corrupt(path, e.to_string()))?;
    fs::write(path, text + "\n").map_err(io(path))
}
