"""PyTorch's side of tunekit's training-throughput benchmark: one full training step (forward,
backward, AdamW update) of a Llama-style decoder shaped like tunekit's 'small' preset, written in
plain eager PyTorch the way a user without `transformers` would write it.

The model matches what tunekit builds from `presetConfig('small', 256)`: tied embeddings,
RMSNorm (eps 1e-5), RoPE with the Hugging Face half-rotation (theta 10000), grouped-query
attention, a SwiGLU MLP, no biases. Only the shapes matter for throughput, so inputs are random
token ids and the targets are the next tokens of the same random sequence.

Run with the interpreter that has torch (here /usr/bin/python3):
    /usr/bin/python3 bench/torch_train_step.py --threads 2
Prints one JSON object: tokens_per_s (from the median step), step_s {best, median}, threads,
torch, params, plus the configuration that was measured.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--seconds", type=float, default=10.0, help="minimum timed duration")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.dim % args.heads:
        p.error("--dim must be divisible by --heads")
    if args.heads % args.kv_heads:
        p.error("--heads must be divisible by --kv-heads")
    return args


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(seq, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    # The HF convention pairs dimension i with i + head_dim/2, so each frequency appears twice,
    # once per half.
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if rep > 1:
            # Query head h reads KV head h // rep, as in HF's repeat_kv.
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if SDPA is not None:
            out = SDPA(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
            out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, intermediate, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, intermediate)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, vocab, dim, layers, heads, kv_heads, intermediate, eps=1e-5):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, intermediate, eps) for _ in range(layers))
        self.norm = RMSNorm(dim, eps)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids, cos, sin, mask):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        # Tied embeddings: the output projection is the embedding table itself, so its gradient
        # accumulates from both ends, as in tunekit.
        return self.norm(x) @ self.embed_tokens.weight.t()


SDPA = getattr(F, "scaled_dot_product_attention", None)
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def make_adamw(params):
    params = list(params)
    # Fused AdamW arrived after 1.13 and is CUDA-only for a while after that; foreach (the
    # multi-tensor path) is the fastest CPU implementation the installed version offers.
    kwargs = {"lr": 3e-4, "weight_decay": 0.01}
    for extra in ({"fused": True}, {"foreach": True}):
        try:
            opt = torch.optim.AdamW(params, **kwargs, **extra)
            return opt, next(iter(extra))
        except (TypeError, RuntimeError, ValueError):
            continue
    return torch.optim.AdamW(params, **kwargs), "default"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = Decoder(args.vocab, args.dim, args.layers, args.heads, args.kv_heads, args.intermediate)
    params = sum(p.numel() for p in model.parameters())
    opt, adamw_impl = make_adamw(model.parameters())

    B, T = args.batch, args.seq
    tokens = torch.randint(0, args.vocab, (B, T + 1))
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    cos, sin = rope_tables(T, args.dim // args.heads, 10000.0)
    mask = torch.full((T, T), float("-inf")).triu(1)

    def step():
        logits = model(ids, cos, sin, mask)
        loss = F.cross_entropy(logits.view(-1, args.vocab), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()

    times = []
    start = time.perf_counter()
    while len(times) < args.min_steps or time.perf_counter() - start < args.seconds:
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    print(json.dumps({
        "tokens_per_s": B * T / median,
        "step_s": {"best": min(times), "median": median},
        "steps": len(times),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": params,
        "config": {
            "batch": B, "seq": T, "dim": args.dim, "layers": args.layers, "heads": args.heads,
            "kv_heads": args.kv_heads, "vocab": args.vocab, "intermediate": args.intermediate,
            "attention": "sdpa" if SDPA is not None else "explicit", "adamw": adamw_impl,
            "dtype": "float32",
        },
        "final_loss": loss,
        # With a pthread OpenBLAS under libgomp, BLAS threads and spinning OpenMP threads compete
        # for the same cores, and these variables change the figure severalfold: record them.
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }))


if __name__ == "__main__":
    main()
