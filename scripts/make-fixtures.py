#!/usr/bin/python3
"""Golden fixtures for tests/golden.test.ts, computed by an independent implementation (PyTorch).

Run from the repository root with Debian's Python (torch 1.13 from python3-torch):

    /usr/bin/python3 scripts/make-fixtures.py

Writes small JSON files into tests/fixtures/. Each holds the inputs (float32 values, stored with 9
significant digits so they round-trip exactly), the op's options, and the expected outputs computed in
float64 by PyTorch from those float32 inputs. The output is deterministic (torch.manual_seed), so
re-running it must leave the committed fixtures unchanged.

References reimplemented here (own code, same formulas):
  * attention: softmax(q k^T * scale + mask) v, grouped-query heads by repeat_interleave of kv heads
    (torch 1.13 predates torch.nn.functional.scaled_dot_product_attention, so it is written out).
  * rope: Hugging Face transformers modeling_rope_utils (_compute_default / linear / dynamic_ntk / yarn /
    llama3 parameters) and apply_rotary_pos_emb with rotate_half.
  * cross entropy: torch.nn.functional.cross_entropy with ignore_index=-100.
  * DPO: TRL's DPOTrainer.dpo_loss for loss types sigmoid (with label smoothing), ipo, hinge.
  * NF4: the QLoRA / bitsandbytes NF4 code table.
"""

import json
import math
import os
import subprocess
import sys

GENERATOR = "scripts/make-fixtures.py"


def import_torch():
    try:
        import torch  # noqa: F401
        return torch
    except ImportError:
        pass
    print("make-fixtures: `import torch` failed; installing Debian's python3-torch "
          "(apt-get install -y python3-torch) and retrying ...", file=sys.stderr)
    cmd = ["apt-get", "install", "-y", "python3-torch"]
    if os.geteuid() != 0:
        cmd = ["sudo"] + cmd
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit("make-fixtures: could not install python3-torch (apt-get exited with %d); "
                 "install it by hand and run this script with /usr/bin/python3" % rc)
    try:
        import torch  # noqa: F401
        return torch
    except ImportError as e:
        sys.exit("make-fixtures: python3-torch installed but `import torch` still fails: %s "
                 "(run this script with /usr/bin/python3)" % e)


torch = import_torch()
F = torch.nn.functional
torch.manual_seed(20240611)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")


def r9(x):
    return float("%.9g" % x)


def flat(t):
    """A tensor as a flat list of floats with 9 significant digits."""
    return [r9(v) for v in t.detach().double().reshape(-1).tolist()]


def ints(t):
    return [int(v) for v in t.reshape(-1).tolist()]


def randf32(*shape, scale=1.0):
    """float32 normal values (what tunekit receives); used in float64 for the references."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).float().double()


def write(name, cases, **extra):
    os.makedirs(OUT_DIR, exist_ok=True)
    doc = {"generator": GENERATOR, "torch": torch.__version__}
    doc.update(extra)
    doc["cases"] = cases
    path = os.path.join(OUT_DIR, name)
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print("wrote %s (%d bytes)" % (os.path.relpath(path, ROOT), os.path.getsize(path)))


# ---------------------------------------------------------------------------------------------------
# 1. attention
# ---------------------------------------------------------------------------------------------------

def attention_ref(q, k, v, causal, scale, segment_ids=None):
    """q [B,T,H,D], k/v [B,S,Hkv,D] -> [B,T,H,D], float64."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    rep = H // Hkv
    kk = k.repeat_interleave(rep, dim=2)  # query head h uses kv head h // rep
    vv = v.repeat_interleave(rep, dim=2)
    qh, kh, vh = q.permute(0, 2, 1, 3), kk.permute(0, 2, 1, 3), vv.permute(0, 2, 1, 3)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B,H,T,S]
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        t = torch.arange(T).view(T, 1)
        s = torch.arange(S).view(1, S)
        allowed = allowed & (s <= t + (S - T)).view(1, 1, T, S)
    if segment_ids is not None:
        same = segment_ids.view(B, 1, T, 1) == segment_ids.view(B, 1, 1, S)
        allowed = allowed & same
    mask = torch.zeros(B, 1, T, S, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores + mask, dim=-1)
    return torch.matmul(p, vh).permute(0, 2, 1, 3).contiguous()


def attention_case(name, B, T, S, H, Hkv, D, causal, scale=None, segments=None):
    q = randf32(B, T, H, D)
    k = randf32(B, S, Hkv, D)
    v = randf32(B, S, Hkv, D)
    seg = None if segments is None else torch.tensor(segments, dtype=torch.int64).view(B, T)
    out = attention_ref(q, k, v, causal, scale, seg)
    opts = {"causal": causal}
    if scale is not None:
        opts["scale"] = scale
    case = {"name": name, "options": opts,
            "q": {"shape": [B, T, H, D], "data": flat(q)},
            "k": {"shape": [B, S, Hkv, D], "data": flat(k)},
            "v": {"shape": [B, S, Hkv, D], "data": flat(v)},
            "expected": {"shape": [B, T, H, D], "data": flat(out)}}
    if seg is not None:
        case["segmentIds"] = {"shape": [B, T], "data": ints(seg)}
    return case


def make_attention():
    cases = [
        attention_case("causal T=S=7 H=4 Hkv=2 D=8", 2, 7, 7, 4, 2, 8, True),
        attention_case("causal S>T (T=3 S=9): query t sees keys s <= t + S - T", 2, 3, 9, 4, 2, 8, True),
        attention_case("non-causal scale 0.3", 2, 5, 6, 4, 2, 8, False, scale=0.3),
        attention_case("packed segments [0,0,0,1,1,2,2,2] causal", 2, 8, 8, 4, 2, 8, True,
                       segments=[0, 0, 0, 1, 1, 2, 2, 2] * 2),
    ]
    write("attention.json", cases)


# ---------------------------------------------------------------------------------------------------
# 2. rope (Hugging Face modeling_rope_utils, in float64)
# ---------------------------------------------------------------------------------------------------

def default_inv_freq(dim, base):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_params(dim, base, scaling, max_pos, seq_len):
    """(inv_freq [dim/2] float64, attention_factor)."""
    kind = scaling.get("rope_type", "default") if scaling else "default"
    if kind == "default":
        return default_inv_freq(dim, base), 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return default_inv_freq(dim, base) / factor, 1.0
    if kind == "dynamic":
        # dynamic_rope_update recomputes with seq_len = max(position_ids) + 1 once it exceeds
        # max_position_embeddings; below that the default frequencies apply.
        sl = seq_len if seq_len > max_pos else max_pos
        b = base * ((factor * sl / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(dim, b), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_pos
        att = scaling.get("attention_factor")
        mscale = scaling.get("mscale")
        mscale_all_dim = scaling.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if att is None:
            if mscale and mscale_all_dim:
                att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                att = get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        extra = 1.0 / pos_freqs
        inter = 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        return inter * (1 - extra_factor) + extra * extra_factor, att
    if kind == "llama3":
        inv = default_inv_freq(dim, base)
        low_ff, high_ff = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / low_ff, old / high_ff
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, inv_l), 1.0
    raise ValueError(kind)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_ref(x, base, scaling, max_pos):
    """x [B,T,H,D], positions 0..T-1 -> [B,T,H,D], float64."""
    B, T, H, D = x.shape
    pos = torch.arange(T, dtype=torch.float64)
    inv, att = rope_params(D, base, scaling, max_pos, T)
    freqs = pos.view(T, 1) * inv.view(1, -1)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * att).view(1, T, 1, D)
    sin = (emb.sin() * att).view(1, T, 1, D)
    return x * cos + rotate_half(x) * sin, inv, att


# tunekit options (camelCase) <- Hugging Face rope_scaling keys
CAMEL = {"rope_type": "ropeType", "factor": "factor",
         "original_max_position_embeddings": "originalMaxPositionEmbeddings",
         "low_freq_factor": "lowFreqFactor", "high_freq_factor": "highFreqFactor",
         "beta_fast": "betaFast", "beta_slow": "betaSlow", "attention_factor": "attentionFactor",
         "truncate": "truncate", "mscale": "mscale", "mscale_all_dim": "mscaleAllDim"}


def rope_case(name, theta, scaling=None, max_pos=None):
    B, T, H, D = 2, 7, 3, 16
    x = randf32(B, T, H, D)
    out, inv, att = rope_ref(x, theta, scaling, max_pos)
    opts = {"theta": theta}
    if scaling is not None:
        opts["scaling"] = {CAMEL[k]: v for k, v in scaling.items()}
    if max_pos is not None:
        opts["maxPositionEmbeddings"] = max_pos
    return {"name": name, "options": opts, "hfRopeScaling": scaling,
            "invFreq": flat(inv), "attentionFactor": r9(att),
            "x": {"shape": [B, T, H, D], "data": flat(x)},
            "expected": {"shape": [B, T, H, D], "data": flat(out)}}


def make_rope():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
            "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.1 * math.log(4.0) + 1.0,
            "truncate": True}
    yarn64 = dict(yarn, original_max_position_embeddings=64)  # a fractional ramp: truncate matters
    yarn64_nt = dict(yarn64, truncate=False)
    yarn_mscale = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                   "mscale": 1.0, "mscale_all_dim": 0.5}  # attention factor from mscale / mscale_all_dim
    cases = [
        rope_case("default theta 10000", 10000.0),
        rope_case("default theta 500000", 500000.0),
        rope_case("linear factor 4", 10000.0, {"rope_type": "linear", "factor": 4.0}),
        rope_case("dynamic factor 2, max_position_embeddings 4, T=7", 10000.0,
                  {"rope_type": "dynamic", "factor": 2.0}, max_pos=4),
        rope_case("yarn factor 4, original 8, beta 32/1, truncate", 10000.0, yarn),
        rope_case("yarn factor 4, original 64, beta 32/1, truncate", 10000.0, yarn64),
        rope_case("yarn factor 4, original 64, beta 32/1, no truncate", 10000.0, yarn64_nt),
        rope_case("yarn factor 4, original 64, mscale 1, mscale_all_dim 0.5", 10000.0, yarn_mscale),
        rope_case("llama3 factor 8, low 1, high 4, original 16", 10000.0,
                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}),
    ]
    write("rope.json", cases)


# ---------------------------------------------------------------------------------------------------
# 3. cross entropy, 4. sequence log-probs
# ---------------------------------------------------------------------------------------------------

def make_cross_entropy():
    N, V = 9, 33
    logits = randf32(N, V, scale=2.0)
    targets = torch.randint(0, V, (N,), dtype=torch.int64)
    targets[2] = -100
    targets[6] = -100
    cases = []
    for red in ("mean", "sum", "none"):
        out = F.cross_entropy(logits, targets, ignore_index=-100, reduction=red)
        cases.append({"name": "cross entropy " + red, "options": {"ignoreIndex": -100, "reduction": red},
                      "logits": {"shape": [N, V], "data": flat(logits)},
                      "targets": {"shape": [N], "data": ints(targets)},
                      "expected": {"shape": [] if red != "none" else [N], "data": flat(out)}})
    write("cross_entropy.json", cases)


def make_sequence_logprobs():
    B, T, V = 2, 4, 17
    logits = randf32(B, T, V, scale=2.0)
    targets = torch.randint(0, V, (B, T), dtype=torch.int64)
    targets[0, 0] = -100
    targets[1, 0] = -100
    targets[1, 1] = -100
    lp = F.log_softmax(logits, dim=-1)
    keep = targets != -100
    gathered = lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out = (gathered * keep).sum(-1)
    write("sequence_logprobs.json", [{
        "name": "sequence log-probs [2,4,17], 3 ignored", "options": {"ignoreIndex": -100},
        "logits": {"shape": [B, T, V], "data": flat(logits)},
        "targets": {"shape": [B, T], "data": ints(targets)},
        "expected": {"shape": [B], "data": flat(out)}}])


# ---------------------------------------------------------------------------------------------------
# 5. DPO (TRL formulas)
# ---------------------------------------------------------------------------------------------------

def make_dpo():
    n = 4
    pc = (randf32(n) * 3 - 20).float().double()
    pr = (randf32(n) * 3 - 22).float().double()
    rc = (randf32(n) * 3 - 21).float().double()
    rr = (randf32(n) * 3 - 21).float().double()
    beta = 0.5
    logits = (pc - pr) - (rc - rr)
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    cases = []
    for kind, ls in (("sigmoid", 0.1), ("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0)):
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        elif kind == "hinge":
            losses = torch.relu(1 - beta * logits)
        else:
            losses = (logits - 1 / (2 * beta)) ** 2
        opts = {"beta": beta, "kind": kind, "labelSmoothing": ls}
        cases.append({"name": "dpo %s label_smoothing %g" % (kind, ls), "options": opts,
                      "policyChosen": flat(pc), "policyRejected": flat(pr),
                      "refChosen": flat(rc), "refRejected": flat(rr),
                      "expected": {"loss": r9(losses.mean().item()), "losses": flat(losses),
                                   "chosenRewards": flat(chosen), "rejectedRewards": flat(rejected)}})
    write("dpo.json", cases)


# ---------------------------------------------------------------------------------------------------
# 6. NF4: code table and values that must round-trip exactly
# ---------------------------------------------------------------------------------------------------

NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def make_nf4():
    # A full NF4 round trip (bitsandbytes kernels) is not available in torch; instead: blocks of 64
    # whose values are code[i] * absmax with a power-of-two absmax per block (so every product is
    # exact in float32) and each block holding +-absmax (so the block's absmax is exactly absmax).
    # Quantizing without double quantization then picks exactly those codes and dequantizes exactly.
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    block = 64
    absmaxes = [1.0, 0.5, 2.0, 0.0078125, 16.0, 0.25]
    idx_all, vals = [], []
    for b, a in enumerate(absmaxes):
        idx = torch.randint(0, 16, (block,), dtype=torch.int64)
        if b == 0:
            idx[:16] = torch.arange(16)  # every code once: block 0 dequantizes to the table itself
        idx[block - 1 - b] = 15 if b % 2 == 0 else 0  # +absmax or -absmax in every block
        idx_all += ints(idx)
        vals.append(code[idx] * torch.tensor(a, dtype=torch.float32))
    w = torch.cat(vals)
    assert torch.equal(w.double(), code.double()[torch.tensor(idx_all)] * torch.tensor(
        [a for a in absmaxes for _ in range(block)], dtype=torch.float64)), "products not exact"
    rows = 6
    write("nf4.json", [{
        "name": "nf4 code * absmax, blocks of 64, no double quantization",
        "options": {"doubleQuant": False, "blockSize": block},
        "absmax": absmaxes, "codeIndices": idx_all,
        "w": {"shape": [rows, len(idx_all) // rows], "data": [float(v) for v in w.tolist()]},
        "expected": {"shape": [rows, len(idx_all) // rows], "data": [float(v) for v in w.tolist()]}}],
        code=[float(torch.tensor(c, dtype=torch.float32).item()) for c in NF4_CODE])


def main():
    make_attention()
    make_rope()
    make_cross_entropy()
    make_sequence_logprobs()
    make_dpo()
    make_nf4()
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR) if f.endswith(".json"))
    print("total %d bytes in tests/fixtures/" % total)


if __name__ == "__main__":
    main()
