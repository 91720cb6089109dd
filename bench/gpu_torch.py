"""PyTorch reference for `pipewright bench gpu`: the same Llama shapes,
trained the usual eager way on one GPU (f32 master weights, bf16 autocast,
scaled_dot_product_attention with causal masking and grouped-query heads,
fused AdamW), on the same synthetic tokens. Prints one JSON line with the
same keys as `pipewright bench gpu`.

Usage: python3 bench/gpu_torch.py [--dim 2048 --layers 22 ... same flags]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

H100_BF16_PEAK_TFLOPS = 989.0


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        hd = a.dim // a.heads
        self.a, self.hd = a, hd
        self.attn_norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.q = nn.Linear(a.dim, a.heads * hd, bias=False)
        self.k = nn.Linear(a.dim, a.kv_heads * hd, bias=False)
        self.v = nn.Linear(a.dim, a.kv_heads * hd, bias=False)
        self.o = nn.Linear(a.heads * hd, a.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.gate = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.up = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.down = nn.Linear(a.ffn_dim, a.dim, bias=False)

    def forward(self, x, cos, sin):
        a, hd = self.a, self.hd
        b, t, _ = x.shape
        xn = self.attn_norm(x)
        q = self.q(xn).view(b, t, a.heads, hd).transpose(1, 2)
        k = self.k(xn).view(b, t, a.kv_heads, hd).transpose(1, 2)
        v = self.v(xn).view(b, t, a.kv_heads, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + self.o(o.transpose(1, 2).reshape(b, t, a.heads * hd))
        hn = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(hn)) * self.up(hn))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.dim)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.head = nn.Linear(a.dim, a.vocab, bias=False)
        hd = a.dim // a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(a.seq_len, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        cos, sin = self.cos.to(torch.bfloat16), self.sin.to(torch.bfloat16)
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    for name, default in [("dim", 2048), ("layers", 22), ("heads", 32), ("kv-heads", 4),
                          ("ffn-dim", 5632), ("vocab", 32000), ("seq-len", 1024),
                          ("batch", 8), ("steps", 10), ("warmup", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Model(a).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=True)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), device=dev)
    inp, tgt = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inp, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    hd = a.dim // a.heads
    block_params = a.dim * hd * (2 * a.heads + 2 * a.kv_heads) + 3 * a.dim * a.ffn_dim
    flops_per_token = a.layers * (6.0 * block_params + 6.0 * a.seq_len * a.dim) + 6.0 * a.vocab * a.dim
    tps = a.batch * a.seq_len * a.steps / secs
    tflops = flops_per_token * tps / 1e12
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} eager",
        "gpu": torch.cuda.get_device_name(),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_sec": tps,
        "step_ms": secs * 1e3 / a.steps,
        "model_tflops": tflops,
        "mfu": tflops / a.peak_tflops,
        "flops_per_token": flops_per_token,
        "device_memory_gib": torch.cuda.max_memory_reserved() / 2**30,
        "last_loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
