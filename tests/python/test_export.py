"""`pipewright export` produces a model that Hugging Face loads and agrees with.

Each test trains a tiny model for a few steps with the real binary, exports
the checkpoint, loads it with `transformers`, and checks that the exported
tokenizer encodes text to the same ids as Pipewright and that the Hugging Face
Llama computes the same logits as `pipewright forward` on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from conftest import run_cli, write_manifest

# Mixed ASCII and multi-byte UTF-8, shorter than seqLen (32) in bytes.
PROBE_TEXT = "Café naïve — 42 ok?\n"

# Logits of a float32 model computed two ways agree to rounding error.
LOGITS_TOLERANCE = 1e-4

MODEL = {"dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 128, "seq_len": 32}


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that `run_dir/latest` points at."""
    assert run_dir.is_dir(), f"train wrote no output directory {run_dir}"
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    assert steps, f"no step-* checkpoint in {run_dir}: {sorted(run_dir.iterdir())}"
    latest = run_dir / "latest"
    assert latest.exists(), f"{latest} missing"
    if latest.is_dir():
        resolved = latest.resolve()
    else:
        # A pointer file naming the checkpoint directory.
        resolved = (run_dir / latest.read_text(encoding="utf-8").strip()).resolve()
    assert resolved == steps[-1].resolve(), f"latest -> {resolved}, newest is {steps[-1]}"
    return resolved


def expected_tensor_shapes(vocab: int, tied: bool) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama parameter names and shapes for the test model."""
    dim, ffn = MODEL["dim"], MODEL["ffn_dim"]
    kv_dim = MODEL["kv_heads"] * dim // MODEL["heads"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, dim),
        "model.norm.weight": (dim,),
    }
    for i in range(MODEL["layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (dim,),
            f"{p}.post_attention_layernorm.weight": (dim,),
            f"{p}.self_attn.q_proj.weight": (dim, dim),
            f"{p}.self_attn.k_proj.weight": (kv_dim, dim),
            f"{p}.self_attn.v_proj.weight": (kv_dim, dim),
            f"{p}.self_attn.o_proj.weight": (dim, dim),
            f"{p}.mlp.gate_proj.weight": (ffn, dim),
            f"{p}.mlp.up_proj.weight": (ffn, dim),
            f"{p}.mlp.down_proj.weight": (dim, ffn),
        }
    if not tied:
        shapes["lm_head.weight"] = (vocab, dim)
    return shapes


def train_export_forward(
    binary: Path, tmp_path: Path, corpus: Path, *, tied: bool, stages: int, tokenizer: dict
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Train 5 steps, export the newest checkpoint, run our forward on PROBE_TEXT."""
    manifest = write_manifest(
        tmp_path / "run.yaml",
        name=f"export-{'tied' if tied else 'untied'}-{stages}",
        corpus=corpus,
        tied=tied,
        stages=stages,
        tokenizer=tokenizer,
    )
    run_dir = tmp_path / "run"
    run_cli(binary, "train", str(manifest), "--steps", "5", "--out", str(run_dir))
    checkpoint = latest_checkpoint(run_dir)

    export_dir = tmp_path / "hf"
    run_cli(binary, "export", str(checkpoint), str(export_dir))
    ours_file = tmp_path / "ours.safetensors"
    run_cli(binary, "forward", str(checkpoint), "--text", PROBE_TEXT, "--out", str(ours_file))
    return export_dir, load_file(str(ours_file))


def check_against_hf(
    export_dir: Path, ours: dict[str, torch.Tensor], *, tied: bool, vocab: int
) -> None:
    """All the properties a user relies on when loading the export with transformers."""
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (export_dir / name).is_file(), f"export lacks {name}"

    # Weights under the Hugging Face names, with the Hugging Face shapes.
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert shapes == expected_tensor_shapes(vocab, tied)
    assert dtypes == {"F32"}

    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]

    model, info = LlamaForCausalLM.from_pretrained(
        str(export_dir), dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert not info["unexpected_keys"], info
    assert not info["missing_keys"], info
    c = model.config
    assert c.vocab_size == vocab
    assert c.hidden_size == MODEL["dim"]
    assert c.intermediate_size == MODEL["ffn_dim"]
    assert c.num_hidden_layers == MODEL["layers"]
    assert c.num_attention_heads == MODEL["heads"]
    assert c.num_key_value_heads == MODEL["kv_heads"]
    assert c.head_dim == MODEL["dim"] // MODEL["heads"]
    assert c.max_position_embeddings >= MODEL["seq_len"]
    assert c.tie_word_embeddings is tied
    assert c.hidden_act == "silu"
    assert c.attention_bias is False and c.mlp_bias is False
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.rope_parameters["rope_theta"] == pytest.approx(10000.0)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    GenerationConfig.from_pretrained(str(export_dir))

    # The exported tokenizer reproduces our token ids and decodes them back.
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    ids = ours["input_ids"]
    assert ids.dtype == torch.int64 and ids.ndim == 2 and ids.shape[0] == 1
    assert tokenizer(PROBE_TEXT)["input_ids"] == ids[0].tolist()
    assert tokenizer.decode(ids[0].tolist()) == PROBE_TEXT

    logits = ours["logits"]
    assert logits.dtype == torch.float32
    assert tuple(logits.shape) == (1, ids.shape[1], vocab)
    # A degenerate model (all-zero weights, say) would match trivially.
    assert logits.std().item() > 1e-3

    with torch.no_grad():
        hf_logits = model(input_ids=ids).logits
    diff = (hf_logits - logits).abs().max().item()
    assert diff <= LOGITS_TOLERANCE, f"max |logits diff| = {diff:.3e}"

    # The loaded model is usable for generation as is.
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_byte_model_exports_to_hf(pipewright_bin, corpus_dir, tmp_path, tied, stages):
    export_dir, ours = train_export_forward(
        pipewright_bin, tmp_path, corpus_dir, tied=tied, stages=stages, tokenizer={"kind": "byte"}
    )
    # Byte tokenizer: one id per UTF-8 byte, the byte's value.
    assert ours["input_ids"][0].tolist() == list(PROBE_TEXT.encode("utf-8"))
    check_against_hf(export_dir, ours, tied=tied, vocab=256)


@pytest.mark.parametrize(("tied", "stages"), [(False, 2), (True, 1)], ids=["untied-2", "tied-1"])
def test_bpe_model_exports_to_hf(pipewright_bin, corpus_dir, tmp_path, tied, stages):
    export_dir, ours = train_export_forward(
        pipewright_bin,
        tmp_path,
        corpus_dir,
        tied=tied,
        stages=stages,
        tokenizer={"kind": "bpe", "vocabSize": 512},
    )
    # A BPE trained on English text merges bytes: fewer ids than bytes.
    assert ours["input_ids"].shape[1] < len(PROBE_TEXT.encode("utf-8"))
    check_against_hf(export_dir, ours, tied=tied, vocab=512)
