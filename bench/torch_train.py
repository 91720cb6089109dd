#!/usr/bin/env python3
"""PyTorch reference for `pipewright bench train`.

Builds the same Llama model as a Pipewright manifest describes, with Hugging
Face `LlamaForCausalLM` in float32 on the CPU, and times full optimizer steps
the way Pipewright takes them: a global batch of microBatchSize x microBatches
sequences of seqLen tokens, gradients accumulated over the micro-batches, the
global gradient norm clipped, then one AdamW step. Token ids are random: the
throughput of a dense model does not depend on what the tokens are.

It prints one JSON line with the same fields as `pipewright bench train`:
tokens_per_sec, step_ms, matmul_gflops (the rate inside matrix-product
kernels, from one profiled step), matmul_time_fraction, peak_rss_mib, params,
tokens_per_step; plus model_gflops (the model's matmul FLOPs per step over
the step time), attn_implementation and torch_version. Each attention
implementation runs in its own process so that peak RSS is not inflated by
the other one; by default both "sdpa" and "eager" run and the faster is
reported.

Usage: torch_train.py MANIFEST.yaml [--steps N] [--warmup W] [--threads T]
                      [--attn best|sdpa|eager]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# Kineto, torch's profiler backend, logs an error for every CUDA probe on a
# machine without a GPU; only warnings that matter should reach stderr.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# The aten operators that run a dense matrix product on the CPU.
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


@dataclass(frozen=True)
class BenchSpec:
    """The parts of a manifest that decide the cost of a training step."""

    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn_dim: int
    seq_len: int
    tied_embeddings: bool
    rope_theta: float
    norm_eps: float
    vocab_size: int
    micro_batch_size: int
    micro_batches: int
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    seed: int
    threads: int

    @property
    def tokens_per_step(self) -> int:
        """Tokens whose loss one optimizer step trains on."""
        return self.micro_batch_size * self.micro_batches * self.seq_len


def vocab_size_of(tokenizer: dict) -> int:
    """Vocabulary size implied by the manifest's tokenizer section."""
    kind = tokenizer.get("kind", "byte")
    if kind == "byte":
        return 256
    if kind == "bpe":
        if tokenizer.get("vocabSize"):
            return int(tokenizer["vocabSize"])
        path = tokenizer.get("path")
        if path:
            # A loaded tokenizer.json: its vocabulary plus added tokens.
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            ids = list(data.get("model", {}).get("vocab", {}).values())
            ids += [t["id"] for t in data.get("added_tokens", [])]
            return max(ids) + 1
        raise ValueError("spec.data.tokenizer: bpe needs vocabSize or path")
    raise ValueError(f"spec.data.tokenizer.kind: unknown kind {kind!r}")


def load_spec(path: str, threads: int | None) -> BenchSpec:
    """Read a TrainingRun manifest, applying the spec's defaults."""
    with open(path, encoding="utf-8") as f:
        manifest = yaml.safe_load(f)
    spec = manifest["spec"]
    model = spec["model"]
    training = spec["training"]
    tokenizer = spec.get("data", {}).get("tokenizer", {}) or {}
    if threads is None or threads == 0:
        threads = int(training.get("threads", 0)) or (os.cpu_count() or 1)
    return BenchSpec(
        dim=int(model["dim"]),
        layers=int(model["layers"]),
        heads=int(model["heads"]),
        kv_heads=int(model.get("kvHeads") or model["heads"]),
        ffn_dim=int(model["ffnDim"]),
        seq_len=int(model["seqLen"]),
        tied_embeddings=bool(model.get("tiedEmbeddings", False)),
        rope_theta=float(model.get("ropeTheta", 10000.0)),
        norm_eps=float(model.get("normEps", 1e-5)),
        vocab_size=vocab_size_of(tokenizer),
        micro_batch_size=int(training["microBatchSize"]),
        micro_batches=int(training.get("microBatches", 1)),
        learning_rate=float(training["learningRate"]),
        weight_decay=float(training.get("weightDecay", 0.0)),
        beta1=float(training.get("beta1", 0.9)),
        beta2=float(training.get("beta2", 0.95)),
        eps=float(training.get("eps", 1e-8)),
        grad_clip=float(training.get("gradClip", 1.0)),
        seed=int(training.get("seed", 0)),
        threads=threads,
    )


def matmul_flops_per_step(s: BenchSpec) -> float:
    """Analytical matmul FLOPs of one training step (forward + backward).

    Per token and layer the forward pass multiplies by the q, k, v, o, gate,
    up and down matrices, and computes scores and the weighted sum of values;
    causal attention uses about half of the seqLen x seqLen matrix, so those
    two products cost seqLen x dim multiply-adds together. The LM head adds
    one dim x vocab product. Backward costs twice the forward (input and
    weight gradients), so a step is three forwards. This is the same count
    `pipewright bench train` uses, so the two GFLOP/s figures compare.
    """
    head_dim = s.dim // s.heads
    kv_dim = s.kv_heads * head_dim
    per_layer_weights = 2 * s.dim * s.dim + 2 * s.dim * kv_dim + 3 * s.dim * s.ffn_dim
    attention = s.seq_len * s.dim  # scores and values, per token (causal half)
    per_token = 2 * (s.layers * (per_layer_weights + attention) + s.dim * s.vocab_size)
    return 3.0 * per_token * s.tokens_per_step


def build_model(s: BenchSpec, attn: str):
    """A randomly initialised float32 LlamaForCausalLM of the manifest's shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.dim,
        intermediate_size=s.ffn_dim,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.dim // s.heads,
        max_position_embeddings=s.seq_len,
        rms_norm_eps=s.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        tie_word_embeddings=s.tied_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def make_optimizer(model, s: BenchSpec):
    """AdamW with decay on matrices only, as Pipewright's optimizer does."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps
    )


def profile_matmuls(step) -> tuple[float, float]:
    """FLOPs and seconds spent in matrix-product operators during one step.

    Their ratio is the rate of the matmul kernels themselves, the figure that
    `pipewright bench train` reports as matmul_gflops. Products inside a fused
    attention kernel are not seen here, as they are not separate operators.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    flops = 0.0
    micros = 0.0
    for event in prof.key_averages():
        if event.key in MATMUL_OPS:
            flops += event.flops
            micros += event.cpu_time_total
    return flops, micros / 1e6


def run_one(s: BenchSpec, attn: str, steps: int, warmup: int) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(s.threads)
    model = build_model(s, attn)
    optimizer = make_optimizer(model, s)
    params = sum(p.numel() for p in model.parameters())

    generator = torch.Generator().manual_seed(s.seed + 1)
    # seqLen inputs and seqLen next-token targets per sequence, drawn up front
    # so that the timed loop measures only the model.
    batches = [
        torch.randint(
            0,
            s.vocab_size,
            (s.micro_batch_size, s.seq_len + 1),
            generator=generator,
        )
        for _ in range(s.micro_batches)
    ]

    def step() -> float:
        total = 0.0
        for tokens in batches:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(
                logits.reshape(-1, s.vocab_size), targets.reshape(-1)
            )
            (loss / s.micro_batches).backward()
            total += loss.item()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / s.micro_batches

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    loss = 0.0
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - start

    # One more step under the profiler, outside the timed window: the
    # profiler's bookkeeping would slow the timed steps down.
    mm_flops, mm_seconds = profile_matmuls(step)

    step_s = elapsed / steps
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "tokens_per_sec": s.tokens_per_step / step_s,
        "step_ms": step_s * 1e3,
        "matmul_gflops": mm_flops / mm_seconds / 1e9 if mm_seconds > 0 else 0.0,
        "matmul_time_fraction": mm_seconds / step_s,
        "model_gflops": matmul_flops_per_step(s) / step_s / 1e9,
        "peak_rss_mib": peak_kib / 1024.0,
        "params": params,
        "tokens_per_step": s.tokens_per_step,
        "loss": loss,
        "threads": s.threads,
        "attn_implementation": attn,
        "torch_version": torch.__version__,
    }


def run_in_subprocess(args: argparse.Namespace, attn: str) -> dict:
    """Run one attention implementation in a fresh interpreter."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        args.manifest,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--attn",
        attn,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{attn} run printed no result")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="0 or unset: manifest, else all cores"
    )
    parser.add_argument("--attn", choices=("best",) + ATTN_IMPLEMENTATIONS, default="best")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    if args.attn != "best":
        spec = load_spec(args.manifest, args.threads)
        print(json.dumps(run_one(spec, args.attn, args.steps, args.warmup)), flush=True)
        return 0

    results = [run_in_subprocess(args, attn) for attn in ATTN_IMPLEMENTATIONS]
    for r in results:
        print(
            f"torch {r['attn_implementation']}: {r['tokens_per_sec']:.1f} tokens/s, "
            f"{r['step_ms']:.1f} ms/step",
            file=sys.stderr,
        )
    best = max(results, key=lambda r: r["tokens_per_sec"])
    best["variants"] = {
        r["attn_implementation"]: r["tokens_per_sec"] for r in results
    }
    print(json.dumps(best), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
