"""PyTorch's side of issue 8 (e): LoRA SFT throughput and peak memory of a Llama-shaped model with
random weights, the way a Python user runs it: transformers' LlamaForCausalLM in bf16 (SDPA
attention) with a PEFT LoRA adapter on every linear projection (q, k, v, o, gate, up, down;
r 16, alpha 32, no dropout), AdamW on the adapter, gradient clipping at 1.0 as HF's Trainer does.
tunekit's side is bench/qlora-sft.mjs with the same arguments.

When transformers or peft does not import (e.g. Debian's python3-torch 1.13 on a CPU machine), a
small hand-written Llama + LoRA with the same math runs instead ("impl": "plain" in the JSON), so
the script can be checked anywhere; only "hf+peft" figures are the baseline.

One step = forward + backward + clip + AdamW update + zero_grad on a fresh batch of random token
ids (labels = the ids, shifted inside the loss as HF does). Steps are timed with CUDA events (or
perf_counter on the CPU); the figure is the median step after the warm-up steps. Peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights, adapter, optimizer state and
activations; not the allocator's cached-but-free blocks, which are reported as reserved).

    python3 bench/torch_lora_sft.py --hidden 2048 --intermediate 8192 --layers 16 --heads 32 \
        --kv-heads 8 --vocab 128256 --seq 2048 --batch 4 --tie-word-embeddings
    /usr/bin/python3 bench/torch_lora_sft.py --device cpu --hidden 64 --intermediate 128 \
        --layers 2 --heads 4 --kv-heads 2 --vocab 512 --seq 32 --batch 2 --steps 3 --warmup 1

Prints a few readable lines, then one JSON line (the last line of stdout) with every figure.
"""
import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tie-word-embeddings", action="store_true", help="Llama-3.2-1B ties them; Llama-3-8B does not")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop timing after this many seconds (at least one timed step); 0: no limit")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--impl", default="auto", choices=["auto", "hf", "plain"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return a


# ---- the hand-written fallback: HF Llama semantics, PEFT LoRA math ---------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # HF computes the norm in fp32 and casts back before the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LoraLinear(nn.Module):
    """y = x W^T + (alpha / r) (x A^T) B^T with W frozen; A [r, in] random, B [out, r] zero (PEFT)."""

    def __init__(self, inf, outf, r, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outf, inf), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(r, inf))
        self.lora_B = nn.Parameter(torch.zeros(outf, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x):
        # PEFT keeps the adapter in fp32 beside a bf16 base (autocast_adapter_dtype) and casts the
        # input to the adapter's dtype; the fallback does the same.
        lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return F.linear(x, self.weight) + lora.to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.kv, self.hd = a.heads, a.kv_heads, a.hidden // a.heads
        self.q_proj = LoraLinear(a.hidden, self.h * self.hd, a.r, a.alpha)
        self.k_proj = LoraLinear(a.hidden, self.kv * self.hd, a.r, a.alpha)
        self.v_proj = LoraLinear(a.hidden, self.kv * self.hd, a.r, a.alpha)
        self.o_proj = LoraLinear(self.h * self.hd, a.hidden, a.r, a.alpha)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        sdpa = getattr(F, "scaled_dot_product_attention", None)
        if sdpa is not None:
            o = sdpa(q, k, v, is_causal=True)
        else:  # torch < 2.0
            s = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.hd)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            o = s.softmax(-1).to(v.dtype) @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden)
        self.gate_proj = LoraLinear(a.hidden, a.intermediate, a.r, a.alpha)
        self.up_proj = LoraLinear(a.hidden, a.intermediate, a.r, a.alpha)
        self.down_proj = LoraLinear(a.intermediate, a.hidden, a.r, a.alpha)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class PlainLlama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden)
        self.lm_head = None if a.tie_word_embeddings else nn.Linear(a.hidden, a.vocab, bias=False)
        for m in self.modules():
            if isinstance(m, LoraLinear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, (nn.Embedding, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
                m.weight.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(False)

    def forward(self, ids, labels):
        T = ids.shape[1]
        hd = self.a.hidden // self.a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=ids.device, dtype=torch.float32) / hd))
        f = torch.outer(torch.arange(T, device=ids.device, dtype=torch.float32), inv)
        emb = torch.cat((f, f), -1)
        x = self.embed_tokens(ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            if self.a.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(x), w)
        # HF's ForCausalLMLoss: upcast the logits to fp32, shift, mean over the counted tokens.
        return F.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ---- the baseline proper: transformers + peft ------------------------------------------------------


def build_hf(a, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(2048, a.seq),
        rms_norm_eps=1e-5,
        tie_word_embeddings=a.tie_word_embeddings,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    # Initialize straight on the device, in the target dtype where torch allows it as the default:
    # a 2B-parameter fp32 init on the CPU would cost more than the measurement.
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
    except (TypeError, RuntimeError):
        pass
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(device=device, dtype=dtype)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    import transformers
    import peft

    versions = {"transformers": transformers.__version__, "peft": peft.__version__}

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss_fn, versions


def build_plain(a, dtype, device):
    torch.manual_seed(a.seed)
    model = PlainLlama(a)
    # Base weights in the compute dtype, the adapter in fp32 (as PEFT leaves it).
    for name, p in model.named_parameters():
        p.data = p.data.to(device=device, dtype=torch.float32 if "lora_" in name else dtype)

    def loss_fn(ids):
        return model(ids, ids)

    return model, loss_fn, {}


def main():
    a = parse_args()
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("torch_lora_sft: --device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(a.seed)

    impl, note = a.impl, None
    if impl == "auto":
        try:
            import transformers  # noqa: F401
            import peft  # noqa: F401

            impl = "hf"
        except ImportError as e:
            impl, note = "plain", f"transformers/peft not importable ({e}); hand-written Llama + LoRA"
    if impl == "hf":
        try:
            model, loss_fn, versions = build_hf(a, dtype, device)
        except Exception as e:  # an API change in transformers or peft: say so, measure the fallback
            if a.impl == "hf":
                raise
            impl, note = "plain", f"transformers + peft failed ({type(e).__name__}: {e}); hand-written Llama + LoRA"
            print(f"torch_lora_sft: {note}", file=sys.stderr)
            gc.collect()  # the half-built model's memory, before the fallback allocates its own
            if cuda:
                torch.cuda.empty_cache()
    if impl == "plain":
        model, loss_fn, versions = build_plain(a, dtype, device)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    adapter_dtype = str(params[0].dtype).replace("torch.", "") if params else "none"
    kw = {"lr": a.lr, "weight_decay": 0.01}
    # The multi-tensor AdamW is torch's default on CUDA; ask for it by name where it exists.
    try:
        opt = torch.optim.AdamW(params, foreach=True, **kw)
    except TypeError:
        opt = torch.optim.AdamW(params, **kw)

    B, T = a.batch, a.seq
    gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)

    def step(ids):
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def batch():
        return torch.randint(0, a.vocab, (B, T), generator=gen).to(device, non_blocking=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses = []
    for _ in range(a.warmup):
        losses.append(float(step(batch())))
    sync()
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times = []
    started = time.perf_counter()
    for i in range(a.steps):
        ids = batch()
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            loss = step(ids)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = step(ids)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if a.budget_s > 0 and time.perf_counter() - started > a.budget_s:
            break
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0

    res = {
        "bench": "torch_lora_sft",
        "impl": "hf+peft" if impl == "hf" else "plain",
        "note": note,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        **versions,
        "shape": {"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "heads": a.heads,
                  "kv_heads": a.kv_heads, "vocab": a.vocab, "tie_word_embeddings": a.tie_word_embeddings},
        "seq": T, "batch": B, "dtype": a.dtype, "grad_checkpointing": a.grad_checkpointing,
        "lora": {"r": a.r, "alpha": a.alpha, "targets": TARGETS, "adapter_dtype": adapter_dtype},
        "params_total": total, "params_trainable": trainable,
        "steps_timed": len(times), "warmup": a.warmup,
        "step_ms": {"median": med * 1e3, "min": min(times) * 1e3, "max": max(times) * 1e3},
        "tokens_per_s": B * T / med,
        "peak_bytes": peak, "peak_reserved_bytes": reserved, "resident_bytes_after_warmup": weights_bytes,
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    gib = 2.0 ** 30
    print(f"torch LoRA SFT ({res['impl']}{', ' + note if note else ''}) on {res['device']}, torch {torch.__version__}")
    print(f"  llama d{a.hidden} i{a.intermediate} L{a.layers} h{a.heads}/{a.kv_heads} V{a.vocab}"
          f"{' tied' if a.tie_word_embeddings else ''}, {total / 1e9:.3f}B params, {trainable / 1e6:.2f}M trainable"
          f" ({adapter_dtype}), batch {B} x {T}, {a.dtype}{', grad checkpointing' if a.grad_checkpointing else ''}")
    print(f"  step {med * 1e3:.1f} ms median of {len(times)} (min {min(times) * 1e3:.1f}), "
          f"{B * T / med:,.0f} tokens/s; peak {peak / gib:.2f} GiB allocated ({reserved / gib:.2f} GiB reserved); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
