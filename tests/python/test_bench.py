"""The PyTorch reference benchmark measures the same model as `pipewright bench train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_cli, write_manifest

TORCH_TRAIN = REPO_ROOT / "bench" / "torch_train.py"
FIELDS = {
    "tokens_per_sec",
    "step_ms",
    "matmul_gflops",
    "matmul_time_fraction",
    "peak_rss_mib",
    "params",
    "tokens_per_step",
}


def llama_params(dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool) -> int:
    """Parameter count of a bias-free Llama, written out from its shapes."""
    kv_dim = kv_heads * dim // heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * dim * ffn
    head = 0 if tied else vocab * dim
    return vocab * dim + layers * per_layer + dim + head


def run_torch_train(manifest: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(TORCH_TRAIN), str(manifest), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_torch_reference_reports_the_manifest_model(tmp_path, tied):
    manifest = write_manifest(
        tmp_path / "bench.yaml", name="bench", corpus=tmp_path, tied=tied, stages=1
    )
    result = run_torch_train(manifest, "--steps", "2", "--warmup", "1", "--attn", "sdpa", "--threads", "1")
    assert FIELDS <= result.keys()
    assert result["params"] == llama_params(64, 2, 4, 2, 128, 256, tied)
    # microBatchSize 2 x microBatches 2 x seqLen 32.
    assert result["tokens_per_step"] == 128
    assert result["threads"] == 1
    assert result["tokens_per_sec"] == pytest.approx(128 / (result["step_ms"] / 1e3), rel=1e-6)
    assert result["matmul_gflops"] > 0 and result["peak_rss_mib"] > 0
    assert 0 < result["matmul_time_fraction"] < 1
    # Random tokens over 256 ids: the loss starts near ln(256) = 5.55.
    assert 4.5 < result["loss"] < 6.5


def test_torch_reference_picks_the_faster_attention(tmp_path):
    manifest = write_manifest(tmp_path / "bench.yaml", name="bench", corpus=tmp_path, tied=True, stages=1)
    result = run_torch_train(manifest, "--steps", "1", "--warmup", "0", "--threads", "1")
    variants = result["variants"]
    assert set(variants) == {"sdpa", "eager"}
    assert result["tokens_per_sec"] == max(variants.values())
    assert variants[result["attn_implementation"]] == result["tokens_per_sec"]


def test_bench_train_matches_torch_model_size(pipewright_bin, corpus_dir, tmp_path):
    manifest = write_manifest(tmp_path / "bench.yaml", name="bench", corpus=corpus_dir, tied=False, stages=1)
    proc = run_cli(
        pipewright_bin, "bench", "train", str(manifest), "--steps", "2", "--warmup", "1", "--threads", "1"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout
    ours = json.loads(lines[-1])
    assert FIELDS <= ours.keys()
    torch_result = run_torch_train(manifest, "--steps", "1", "--warmup", "0", "--attn", "sdpa", "--threads", "1")
    assert ours["params"] == torch_result["params"]
    assert ours["tokens_per_step"] == torch_result["tokens_per_step"]
    assert ours["tokens_per_sec"] > 0 and ours["step_ms"] > 0
