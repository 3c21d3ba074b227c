#!/usr/bin/python3
"""Tiny random checkpoints in Hugging Face layout, with reference logits, loss and gradients, for the
model loader's tests; and (--big DIR) a ~100M-parameter sharded Llama checkpoint for a memory benchmark.

Run from the repository root with Debian's Python (torch 1.13 from python3-torch; no transformers, no
safetensors package: both are written out here):

    /usr/bin/python3 scripts/make-model-fixtures.py              # tests/fixtures/models/<name>/
    /usr/bin/python3 scripts/make-model-fixtures.py --big DIR    # ~100M parameters, 2 shards (not committed)
    /usr/bin/python3 scripts/make-model-fixtures.py --check      # the self-consistency checks only

Each tests/fixtures/models/<name>/ holds
  config.json        the keys transformers writes for the model type (sorted, indent 2, as
                     PretrainedConfig.to_json_string does)
  model.safetensors  float32 weights under Hugging Face's names (tied models have no lm_head.weight,
                     as save_pretrained drops the shared tensor)
  fixture.json       input ids [2, 11], the logits [2, 11, V] of the forward pass, the mean
                     cross-entropy of predicting ids[:, 1:] from logits[:, :-1], and the gradients of
                     that loss with respect to a few named parameters (see FIXTURE FORMAT below).

The reference is computed in float64 from the float32 weights (the style of make-fixtures.py), so a
float32 implementation should land within NMSE ~1e-12 of it. Deterministic: re-running must leave the
committed files unchanged.

Hugging Face semantics reimplemented here (transformers' modeling_llama / modeling_qwen2 /
modeling_qwen3 and modeling_rope_utils, as of transformers 4.4x-4.5x):
  * embed_tokens -> per layer:
        h = x + o_proj(attn(input_layernorm(x)))
        x = h + down_proj(silu(gate_proj(y)) * up_proj(y)),  y = post_attention_layernorm(h)
    -> norm -> lm_head (lm_head.weight is embed_tokens.weight when tie_word_embeddings).
  * RMSNorm (LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm): in fp32 (here float64),
    weight * (x * rsqrt(mean(x^2, -1) + eps)); the weight multiplies after normalizing.
  * attention: q = q_proj(x), k = k_proj(x), v = v_proj(x) viewed [B, T, heads, head_dim];
    qwen3 applies q_norm / k_norm (RMSNorm over head_dim, weight [head_dim], same eps) to q and k
    per head BEFORE RoPE; qwen2 has biases on q/k/v (none on o_proj, hard-wired by model type, no
    config key); llama has them only with attention_bias (false here).
    RoPE: inv_freq from rope_theta (and rope_scaling), freqs = pos * inv_freq, emb = cat(freqs, freqs),
    x * cos(emb) + rotate_half(x) * sin(emb) with rotate_half(x) = cat(-x2, x1) (first / second halves
    of head_dim: dimension i pairs with i + head_dim / 2, not with i + 1).
    GQA: repeat_kv repeats each kv head n_rep = heads / kv_heads times, so query head h reads kv
    head h // n_rep. Scores q k^T * head_dim^-0.5, causal mask, softmax in fp32, times v, heads
    concatenated back to [B, T, heads * head_dim], o_proj.
  * head_dim = config.head_dim when present, else hidden_size // num_attention_heads.
  * llama3 rope_scaling: _compute_llama3_parameters (wavelen = 2 pi / inv_freq; wavelengths above
    original / low_freq_factor are divided by factor, below original / high_freq_factor kept, in
    between smoothly interpolated); attention factor 1.
  * loss: ForCausalLMLoss without ignored labels = mean cross entropy of ids[:, 1:] given logits[:, :-1].

FIXTURE FORMAT (fixture.json):
  generator, torch           as in make-fixtures.py
  name, modelType            the directory name and config.json's model_type
  config                     the config.json written, as an object
  inputIds   {shape, data}   int, [2, 11]
  logits     {shape, data}   [2, 11, V], 9 significant digits
  loss       number          mean cross entropy over the 2 x 10 predicted positions
  invFreq    [head_dim / 2]  the RoPE inverse frequencies used (after rope_scaling)
  grads      {name: {shape, stride, data}}  for each named parameter, data = the flattened (row-major)
             gradient sampled with the given stride: data[i] = grad.flat[i * stride] (stride 1: all of it;
             the strides are coprime with the row lengths, so every row and every column is sampled).
             For tied models the gradient of model.embed_tokens.weight includes the lm_head use.
"""

import argparse
import json
import math
import os
import struct
import sys

import torch

GENERATOR = "scripts/make-model-fixtures.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "models")

F = torch.nn.functional


def r9(x):
    return float("%.9g" % x)


def flat(t):
    return [r9(v) for v in t.detach().double().reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------------
# configs: the keys transformers writes for each model type
# ---------------------------------------------------------------------------------------------------

COMMON = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
          "torch_dtype": "float32"}


def llama_config(tied, rope_theta, rope_scaling, max_pos, head_dim=None):
    c = dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
             mlp_bias=False, pretraining_tp=1, bos_token_id=1, eos_token_id=2, rope_theta=rope_theta,
             rope_scaling=rope_scaling, max_position_embeddings=max_pos, tie_word_embeddings=tied)
    if head_dim is not None:  # transformers >= 4.45 writes head_dim for llama; older configs lack it
        c["head_dim"] = head_dim
    return c


def qwen2_config():
    # Qwen2Config has no attention_bias key (the q/k/v biases are hard-wired) and writes a
    # sliding_window even when use_sliding_window is false.
    return dict(COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos_token_id=95, eos_token_id=96,
                rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, max_window_layers=2,
                sliding_window=4096, use_sliding_window=False, tie_word_embeddings=True)


def qwen3_config():
    # head_dim 16 != hidden_size / heads = 12 (as in the real Qwen3 models, where it is larger).
    return dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                head_dim=16, bos_token_id=95, eos_token_id=96, rope_theta=10000.0, rope_scaling=None,
                max_position_embeddings=4096, max_window_layers=2, sliding_window=None,
                use_sliding_window=False, tie_word_embeddings=True)


LLAMA3_SCALING = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 1024, "rope_type": "llama3"}

MODELS = [
    # name, config, seed
    ("llama3-untied", llama_config(False, 500000.0, LLAMA3_SCALING, 8192, head_dim=12), 101),
    ("llama-tied", llama_config(True, 10000.0, None, 2048), 102),
    ("qwen2", qwen2_config(), 103),
    ("qwen3", qwen3_config(), 104),
]


def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def qkv_bias(cfg):
    return cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias", False))


def qk_norm(cfg):
    return cfg["model_type"] == "qwen3"


# ---------------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------------

def param_shapes(cfg):
    """[(Hugging Face name, shape)] in the model's order (embed, layers, norm, lm_head)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim_of(cfg)
    out = [("model.embed_tokens.weight", [V, H])]
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        out += [(p + "input_layernorm.weight", [H]),
                (p + "self_attn.q_proj.weight", [nh * D, H]),
                (p + "self_attn.k_proj.weight", [nkv * D, H]),
                (p + "self_attn.v_proj.weight", [nkv * D, H]),
                (p + "self_attn.o_proj.weight", [H, nh * D])]
        if qkv_bias(cfg):
            out += [(p + "self_attn.q_proj.bias", [nh * D]),
                    (p + "self_attn.k_proj.bias", [nkv * D]),
                    (p + "self_attn.v_proj.bias", [nkv * D])]
        if cfg.get("attention_bias", False) and cfg["model_type"] != "qwen2":
            out += [(p + "self_attn.o_proj.bias", [H])]
        if qk_norm(cfg):
            out += [(p + "self_attn.q_norm.weight", [D]), (p + "self_attn.k_norm.weight", [D])]
        out += [(p + "post_attention_layernorm.weight", [H]),
                (p + "mlp.gate_proj.weight", [I, H]),
                (p + "mlp.up_proj.weight", [I, H]),
                (p + "mlp.down_proj.weight", [H, I])]
    out.append(("model.norm.weight", [H]))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", [V, H]))
    return out


def is_norm(name):
    return name.endswith("norm.weight")


QK_STD = 0.2


def init_params(cfg, seed):
    """float32 values (held as float64): weights and biases N(0, 0.02), norms 1 + N(0, 0.1), except
    q_proj and k_proj weights N(0, QK_STD): with 0.02 the scores q.k / sqrt(head_dim) would be ~0.07
    and every attention row nearly uniform, so RoPE (and its scaling) would hardly move the logits;
    with 0.2 they are O(1)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(cfg):
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        if is_norm(name):
            v = 1.0 + 0.1 * z
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            v = QK_STD * z
        else:
            v = 0.02 * z
        params[name] = v.float().double()
    return params


# ---------------------------------------------------------------------------------------------------
# the model (float64), Hugging Face semantics
# ---------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg):
    """modeling_rope_utils: _compute_default_rope_parameters, or _compute_llama3_parameters."""
    D, base = head_dim_of(cfg), cfg["rope_theta"]
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    sc = cfg.get("rope_scaling")
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    assert kind == "llama3", kind
    factor, low_ff, high_ff = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    low_wl, high_wl = old / low_ff, old / high_ff
    wavelen = 2 * math.pi / inv
    # wavelen < high_freq_wavelen: kept; wavelen > low_freq_wavelen: divided by factor
    inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
    # otherwise interpolated with a smooth factor
    smooth = (old / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, inv_l)


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_cos_sin(inv_freq, T):
    pos = torch.arange(T, dtype=torch.float64)
    freqs = pos.view(T, 1) * inv_freq.view(1, -1)
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x [B, heads, T, D] (apply_rotary_pos_emb with unsqueeze_dim=1)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """[B, kv, T, D] -> [B, kv * n_rep, T, D]: kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1."""
    B, kv, T, D = x.shape
    return x[:, :, None, :, :].expand(B, kv, n_rep, T, D).reshape(B, kv * n_rep, T, D)


def linear(x, p, name):
    y = x @ p[name + ".weight"].t()
    b = p.get(name + ".bias")
    return y if b is None else y + b


def attention_hf(x, p, cfg, li, variant=None):
    """LlamaAttention / Qwen2Attention / Qwen3Attention with eager_attention_forward. x [B, T, H]."""
    variant = variant or {}
    B, T, _ = x.shape
    nh, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim_of(cfg)
    pre = "model.layers.%d.self_attn." % li
    q = linear(x, p, pre + "q_proj").view(B, T, nh, D)
    k = linear(x, p, pre + "k_proj").view(B, T, nkv, D)
    v = linear(x, p, pre + "v_proj").view(B, T, nkv, D)
    if qk_norm(cfg) and not variant.get("no_qk_norm"):
        q = rms_norm(q, p[pre + "q_norm.weight"], cfg["rms_norm_eps"])
        k = rms_norm(k, p[pre + "k_norm.weight"], cfg["rms_norm_eps"])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    inv = variant.get("inv_freq", rope_inv_freq(cfg))
    cos, sin = rope_cos_sin(inv, T)
    if variant.get("interleaved_rope"):  # GPT-J pairs (2i, 2i+1): NOT Hugging Face's convention
        def rot(z):
            z2 = z.reshape(*z.shape[:-1], D // 2, 2)
            c, s = cos[:, :D // 2].unsqueeze(-1), sin[:, :D // 2].unsqueeze(-1)
            a, b = z2[..., 0:1], z2[..., 1:2]
            return torch.cat((a * c - b * s, a * s + b * c), -1).reshape(z.shape)
        q, k = rot(q), rot(k)
    else:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n_rep = nh // nkv
    if variant.get("gqa_modulo"):  # kv head h % kv: NOT Hugging Face's repeat_kv
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    else:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(2, 3)) * D ** -0.5
    if not variant.get("no_causal"):
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(B, T, nh * D)
    return linear(o, p, pre + "o_proj")


def attention_einsum(x, p, cfg, li):
    """The same attention written differently, to cross-check attention_hf: query heads grouped as
    [kv, n_rep] (no repeat), RoPE as a complex rotation of the pairs (i, i + D/2), the causal mask by
    index comparison, softmax via logsumexp."""
    B, T, _ = x.shape
    nh, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim_of(cfg)
    rep = nh // nkv
    pre = "model.layers.%d.self_attn." % li
    Wq, Wk, Wv = p[pre + "q_proj.weight"], p[pre + "k_proj.weight"], p[pre + "v_proj.weight"]
    q = torch.einsum("bth,oh->bto", x, Wq)
    k = torch.einsum("bth,oh->bto", x, Wk)
    v = torch.einsum("bth,oh->bto", x, Wv)
    if qkv_bias(cfg):
        q, k, v = q + p[pre + "q_proj.bias"], k + p[pre + "k_proj.bias"], v + p[pre + "v_proj.bias"]
    q = q.reshape(B, T, nkv, rep, D)
    k = k.reshape(B, T, nkv, D)
    v = v.reshape(B, T, nkv, D)
    if qk_norm(cfg):
        eps = cfg["rms_norm_eps"]
        q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + eps) * p[pre + "q_norm.weight"]
        k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + eps) * p[pre + "k_norm.weight"]
    ang = torch.outer(torch.arange(T, dtype=torch.float64), rope_inv_freq(cfg))  # [T, D/2]
    rot = torch.polar(torch.ones_like(ang), ang)

    def crot(z, t_axis_shape):
        zc = torch.complex(z[..., :D // 2], z[..., D // 2:])
        zc = zc * rot.view(t_axis_shape)
        return torch.cat((zc.real, zc.imag), -1)

    q = crot(q, (1, T, 1, 1, D // 2))
    k = crot(k, (1, T, 1, D // 2))
    s = torch.einsum("btgrd,bsgd->bgrts", q, k) / math.sqrt(D)
    t_idx = torch.arange(T).view(T, 1)
    s_idx = torch.arange(T).view(1, T)
    s = s.masked_fill(s_idx > t_idx, float("-inf"))
    pr = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
    o = torch.einsum("bgrts,bsgd->btgrd", pr, v).reshape(B, T, nh * D)
    return torch.einsum("bti,oi->bto", o, p[pre + "o_proj.weight"])


def forward(ids, p, cfg, attn=attention_hf, variant=None):
    """LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM forward -> logits [B, T, V]."""
    variant = variant or {}
    eps = variant.get("eps", cfg["rms_norm_eps"])
    x = p["model.embed_tokens.weight"][ids]
    for li in range(cfg["num_hidden_layers"]):
        pre = "model.layers.%d." % li
        h = rms_norm(x, p[pre + "input_layernorm.weight"], eps)
        x = x + (attn(h, p, cfg, li, variant) if attn is attention_hf else attn(h, p, cfg, li))
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], eps)
        mlp = linear(F.silu(linear(h, p, pre + "mlp.gate_proj")) * linear(h, p, pre + "mlp.up_proj"),
                     p, pre + "mlp.down_proj")
        x = x + mlp
    x = rms_norm(x, p["model.norm.weight"], eps)
    head = p["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else p["lm_head.weight"]
    return x @ head.t()


def causal_lm_loss(logits, ids):
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def nmse(a, b):
    return ((a - b) ** 2).sum().item() / max((b ** 2).sum().item(), 1e-300)


# ---------------------------------------------------------------------------------------------------
# safetensors, written by hand: u64 LE header length, the JSON header padded with spaces to a
# multiple of 8, then the tensors' bytes back to back in header order (offsets relative to the data).
# ---------------------------------------------------------------------------------------------------

DTYPE_SIZE = {"F32": 4, "BF16": 2}


def tensor_bytes(t, dtype):
    assert sys.byteorder == "little"
    if dtype == "F32":
        return t.detach().to(torch.float32).contiguous().numpy().tobytes()
    if dtype == "BF16":  # round to nearest even, as torch does
        return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    raise ValueError(dtype)


def safetensors_header(entries, metadata=None):
    """entries: [(name, dtype, shape)] in file order. Returns the padded header bytes."""
    header = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        n = DTYPE_SIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h, off


def write_safetensors(path, tensors, dtype="F32"):
    """tensors: {name: tensor}; written sorted by name (as the safetensors library orders one dtype)."""
    names = sorted(tensors)
    head, _ = safetensors_header([(n, dtype, list(tensors[n].shape)) for n in names])
    with open(path, "wb") as f:
        f.write(head)
        for n in names:
            f.write(tensor_bytes(tensors[n], dtype))


def read_safetensors(path):
    """The reader used to check the writer: {name: float64 tensor}."""
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert hlen % 8 == 0
    header = json.loads(raw[8:8 + hlen].decode("utf-8"))
    data = raw[8 + hlen:]
    out, end = {}, 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        assert a == end, "offsets not contiguous"
        end = b
        assert e["dtype"] == "F32" and b - a == 4 * math.prod(e["shape"])
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype="<f4").copy()).double().view(*e["shape"])
    assert end == len(data)
    return out


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------

def input_ids(V, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 11), generator=g, dtype=torch.int64)
    ids[0, 7] = ids[0, 2]  # a repeated token in each row: the embedding gradient must accumulate
    ids[1, 9] = ids[1, 4]
    ids[1, 5] = ids[0, 3]  # and one shared across rows
    return ids


def grad_names(cfg):
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.layers.1.post_attention_layernorm.weight",
             "model.norm.weight"]
    if qkv_bias(cfg):
        names.append("model.layers.0.self_attn.k_proj.bias")
    if qk_norm(cfg):
        names += ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    if not cfg["tie_word_embeddings"]:
        names.append("lm_head.weight")
    return names


def grad_stride(shape):
    """1 for vectors; for matrices the smallest stride >= 7 coprime with the row length."""
    if len(shape) == 1:
        return 1
    s = 7
    while math.gcd(s, shape[-1]) != 1:
        s += 1
    return s


def reference(cfg, params, ids):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits = forward(ids, p, cfg)
    loss = causal_lm_loss(logits, ids)
    loss.backward()
    return logits.detach(), loss.detach(), {k: v.grad.detach() for k, v in p.items()}


def check_model(name, cfg, params, ids, logits, loss, grads, verbose=True):
    """Self-consistency checks of the reference (raises on failure) and how much each plausible
    mistake would move the logits (printed: a fixture is only useful if they are far above 1e-10)."""
    # 1. attention written two ways
    alt = forward(ids, params, cfg, attn=attention_einsum)
    e = nmse(alt, logits)
    assert e < 1e-26, "%s: einsum attention differs (nmse %g)" % (name, e)
    # 2. causality: the logits at t from the prefix ids[:, :t+1] alone are the full run's logits at t
    for t in (0, 4, 10):
        pre = forward(ids[:, :t + 1], params, cfg)
        assert nmse(pre[:, t], logits[:, t]) < 1e-26, "%s: prefix %d differs" % (name, t)
    # 3. batch independence: each row alone
    for b in range(ids.shape[0]):
        assert nmse(forward(ids[b:b + 1], params, cfg)[0], logits[b]) < 1e-26
    # 4. the loss against a log_softmax gather written out
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert abs(-lp.mean().item() - loss.item()) < 1e-13
    # 5. gradients against central differences (float64), a few entries of each named tensor
    g = torch.Generator().manual_seed(7)
    for pname in grad_names(cfg):
        numel = params[pname].numel()
        picks = torch.randint(0, numel, (4,), generator=g).tolist()
        if pname == "model.embed_tokens.weight":  # a row that is looked up, and one that is not
            H = params[pname].shape[1]
            used = int(ids[0, 2])
            unused = next(v for v in range(cfg["vocab_size"]) if v not in ids.view(-1).tolist())
            picks += [used * H + 3, unused * H + 5]
        for i in picks:
            h = 1e-6
            pp = dict(params)
            w = params[pname].clone().view(-1)
            w[i] += h
            pp[pname] = w.view(params[pname].shape)
            lplus = causal_lm_loss(forward(ids, pp, cfg), ids).item()
            w[i] -= 2 * h
            lminus = causal_lm_loss(forward(ids, pp, cfg), ids).item()
            fd = (lplus - lminus) / (2 * h)
            an = grads[pname].view(-1)[i].item()
            assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)) + 1e-9, "%s %s[%d]: fd %g vs autograd %g" % (
                name, pname, i, fd, an)
    if not verbose:
        return
    # 6. sensitivity: NMSE of the logits under plausible implementation mistakes
    sens = {}
    if cfg.get("rope_scaling"):
        D, base = head_dim_of(cfg), cfg["rope_theta"]
        plain = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        sens["rope_scaling ignored"] = forward(ids, params, cfg, variant={"inv_freq": plain})
        scaled = rope_inv_freq(cfg)
        medium = (scaled != plain) & (scaled != plain / cfg["rope_scaling"]["factor"])
        assert int(medium.sum()) >= 1, "no frequency in llama3's smoothed band"
        sens["llama3 band not smoothed"] = forward(ids, params, cfg, variant={
            "inv_freq": torch.where(medium, plain, scaled)})
    sens["interleaved (GPT-J) rope"] = forward(ids, params, cfg, variant={"interleaved_rope": True})
    sens["kv head h % kv (not h // rep)"] = forward(ids, params, cfg, variant={"gqa_modulo": True})
    sens["no causal mask"] = forward(ids, params, cfg, variant={"no_causal": True})
    sens["rms eps 1e-5"] = forward(ids, params, cfg, variant={"eps": 1e-5})
    D, base = head_dim_of(cfg), cfg["rope_theta"]
    other = 10000.0 if base != 10000.0 else 500000.0
    sens["rope_theta %g" % other] = forward(ids, params, cfg, variant={
        "inv_freq": 1.0 / (other ** (torch.arange(0, D, 2, dtype=torch.float64) / D))})
    if qk_norm(cfg):
        sens["no q_norm / k_norm"] = forward(ids, params, cfg, variant={"no_qk_norm": True})
    if qkv_bias(cfg):
        nob = {k: (torch.zeros_like(v) if k.endswith("_proj.bias") else v) for k, v in params.items()}
        sens["q/k/v biases dropped"] = forward(ids, nob, cfg)
    if cfg["tie_word_embeddings"]:
        rnd = torch.Generator().manual_seed(1)
        fake = dict(params, **{"lm_head.weight": (0.02 * torch.randn(*params["model.embed_tokens.weight"].shape,
                                                                     generator=rnd, dtype=torch.float64))})
        sens["untied (a random lm_head)"] = forward(ids, fake, dict(cfg, tie_word_embeddings=False))
    print("  %s: logits NMSE under mistakes: %s" % (name, ", ".join(
        "%s %.2g" % (k, nmse(v, logits)) for k, v in sens.items())))


def check_rope_against_fixture():
    """rope_inv_freq's llama3 branch against the llama3 case of tests/fixtures/rope.json (which tunekit
    passes and make-fixtures.py wrote from its own implementation)."""
    path = os.path.join(ROOT, "tests", "fixtures", "rope.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        doc = json.load(f)
    for c in doc["cases"]:
        sc = c.get("hfRopeScaling")
        if not sc or sc.get("rope_type") != "llama3":
            continue
        D = c["x"]["shape"][3]
        cfg = {"hidden_size": D, "num_attention_heads": 1, "rope_theta": c["options"]["theta"], "rope_scaling": sc}
        got = rope_inv_freq(cfg)
        want = torch.tensor(c["invFreq"], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-8, atol=0), "llama3 inv_freq differs from rope.json"
        print("  llama3 inv_freq matches tests/fixtures/rope.json (%s)" % c["name"])


def make_fixtures(write=True):
    print("checks:")
    check_rope_against_fixture()
    for name, cfg, seed in MODELS:
        params = init_params(cfg, seed)
        ids = input_ids(cfg["vocab_size"], seed + 1000)
        logits, loss, grads = reference(cfg, params, ids)
        check_model(name, cfg, params, ids, logits, loss, grads)
        if not write:
            continue
        d = os.path.join(OUT_DIR, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")  # PretrainedConfig.to_json_string
        st = os.path.join(d, "model.safetensors")
        write_safetensors(st, params)
        back = read_safetensors(st)
        assert sorted(back) == sorted(params) and all(torch.equal(back[k], params[k]) for k in params)
        gr = {}
        for gname in grad_names(cfg):
            shape = list(params[gname].shape)
            s = grad_stride(shape)
            gr[gname] = {"shape": shape, "stride": s, "data": flat(grads[gname].reshape(-1)[::s])}
        doc = {"generator": GENERATOR, "torch": torch.__version__, "name": name, "modelType": cfg["model_type"],
               "config": cfg,
               "inputIds": {"shape": list(ids.shape), "data": [int(v) for v in ids.view(-1).tolist()]},
               "logits": {"shape": list(logits.shape), "data": flat(logits)},
               "loss": r9(loss.item()),
               "invFreq": flat(rope_inv_freq(cfg)),
               "grads": gr}
        with open(os.path.join(d, "fixture.json"), "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        sizes = {fn: os.path.getsize(os.path.join(d, fn)) for fn in sorted(os.listdir(d))}
        print("wrote %s: %s (loss %.6f)" % (os.path.relpath(d, ROOT),
                                           ", ".join("%s %d" % kv for kv in sizes.items()), loss.item()))
    if write:
        total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT_DIR) for fn in fns)
        print("total %d bytes in %s" % (total, os.path.relpath(OUT_DIR, ROOT)))


# ---------------------------------------------------------------------------------------------------
# --big: a ~100M-parameter llama, two shards + model.safetensors.index.json, streamed tensor by tensor
# ---------------------------------------------------------------------------------------------------

BIG = dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=768,
           intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
           head_dim=64, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, pretraining_tp=1,
           bos_token_id=1, eos_token_id=2, rope_theta=500000.0, rope_scaling=None, max_position_embeddings=4096,
           tie_word_embeddings=True)


def make_big(out, dtype):
    cfg = dict(BIG, torch_dtype={"F32": "float32", "BF16": "bfloat16"}[dtype])
    os.makedirs(out, exist_ok=True)
    shapes = param_shapes(cfg)
    nbytes = [DTYPE_SIZE[dtype] * math.prod(s) for _, s in shapes]
    total = sum(nbytes)
    # shard 1: tensors in model order until half the bytes; shard 2: the rest
    split, acc = len(shapes), 0
    for i, n in enumerate(nbytes):
        if acc >= total / 2:
            split = i
            break
        acc += n
    shards = [shapes[:split], shapes[split:]]
    files = ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))]
    weight_map = {}
    seeds = {name: 1000 + i for i, (name, _) in enumerate(shapes)}
    for fname, group in zip(files, shards):
        group = sorted(group)
        head, _ = safetensors_header([(n, dtype, s) for n, s in group])
        with open(os.path.join(out, fname), "wb") as f:
            f.write(head)
            for name, shape in group:
                g = torch.Generator().manual_seed(seeds[name])
                rows = shape[0]
                chunk = max(1, (1 << 20) // max(1, math.prod(shape[1:])))  # ~1M elements at a time
                for r0 in range(0, rows, chunk):
                    sub = [min(chunk, rows - r0)] + list(shape[1:])
                    z = torch.randn(*sub, generator=g, dtype=torch.float32)
                    f.write(tensor_bytes(1.0 + 0.1 * z if is_norm(name) else 0.02 * z, dtype))
                weight_map[name] = fname
        print("wrote %s (%d bytes)" % (os.path.join(out, fname), os.path.getsize(os.path.join(out, fname))))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    nparams = sum(math.prod(s) for _, s in shapes)
    print("big llama: %d parameters (%.1fM), %d bytes of %s tensors in %d shards -> %s"
          % (nparams, nparams / 1e6, total, dtype, len(shards), out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", metavar="DIR", help="write a ~100M-parameter sharded llama checkpoint into DIR")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="--big tensors' dtype (default f32)")
    ap.add_argument("--check", action="store_true", help="run the checks only, write nothing")
    args = ap.parse_args()
    if args.big:
        make_big(args.big, args.dtype.upper())
    else:
        make_fixtures(write=not args.check)


if __name__ == "__main__":
    main()
