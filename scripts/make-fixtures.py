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
  * distillation: KL(p || q), KL(q || p) and Liger-Kernel's generalized JSD (LigerJSD: beta weights the
    teacher, beta = 0 / 1 stand for forward / reverse KL) at a temperature, scaled by T^2, averaged over
    the rows whose target is not ignore_index; gradients by torch.autograd.
  * NF4 with double quantization: bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=True)
    and dequantize_4bit (kQuantizeBlockwise with dQuantizeNF4, then quantize_blockwise of the absmaxes
    with create_dynamic_map(signed=True) and dQuantize<0>), written out in torch.
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


# ---------------------------------------------------------------------------------------------------
# 7. distillation losses (native/cpu/distill.h; Liger-Kernel's LigerJSD for the generalized JSD)
# ---------------------------------------------------------------------------------------------------

def distill_ref(student, teacher, kind, beta, temperature, counted):
    """student, teacher [..., V] float64; counted [...] bool. Returns (loss [], losses [...]).

    log q = log_softmax(s / T) (student), log p = log_softmax(t / T) (teacher, a constant):
      forward_kl  D = KL(p || q) = sum p (log p - log q)
      reverse_kl  D = KL(q || p) = sum q (log q - log p)
      jsd         D = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                  (LigerJSD; beta = 0 is forward_kl and beta = 1 reverse_kl, as in Liger)
    losses = T^2 D on counted rows, 0 elsewhere; loss = sum(losses) / #counted (0 if none count).
    """
    T = temperature
    lq = F.log_softmax(student / T, dim=-1)
    lp = F.log_softmax(teacher.detach() / T, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        d = (lp.exp() * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(math.log(beta) + lp, math.log(1 - beta) + lq)  # log m, in log space
        d = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    losses = torch.where(counted, T * T * d, torch.zeros_like(d))
    n = int(counted.sum().item())
    loss = losses.sum() / n if n > 0 else losses.sum() * 0.0
    return loss, losses


def distill_grad_formula(student, teacher, kind, beta, temperature, counted):
    """distill.h's closed-form backward (dloss = 1), to cross-check autograd."""
    T = temperature
    lq = F.log_softmax(student / T, dim=-1)
    lp = F.log_softmax(teacher / T, dim=-1)
    q, p = lq.exp(), lp.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        g = q - p
    elif kind == "reverse_kl":
        d = (q * (lq - lp)).sum(-1, keepdim=True)
        g = q * (lq - lp - d)
    else:
        lm = torch.logaddexp(math.log(beta) + lp, math.log(1 - beta) + lq)
        gg = (1 - beta) * q * (lq - lm)
        g = gg - q * gg.sum(-1, keepdim=True)
    n = max(int(counted.sum().item()), 1)
    return g * (T / n) * counted.unsqueeze(-1).double()


def distill_case(name, inputs, input_name, kind, beta, temperature, ignore_index=-100):
    inp = inputs[input_name]
    student, teacher, targets = inp["student"], inp["teacher"], inp.get("targets")
    s = student.clone().requires_grad_(True)
    counted = (targets != ignore_index) if targets is not None else torch.ones(student.shape[:-1], dtype=torch.bool)
    loss, losses = distill_ref(s, teacher, kind, beta, temperature, counted)
    loss.backward()
    g = s.grad.detach()
    ref = distill_grad_formula(student, teacher, kind, beta, temperature, counted)
    assert torch.allclose(g, ref, rtol=1e-9, atol=1e-14), "%s: autograd and distill.h's gradient differ" % name
    shape = list(student.shape)
    opts = {"kind": kind, "beta": beta, "temperature": temperature, "ignoreIndex": ignore_index}
    return {"name": name, "input": input_name, "options": opts,
            "expected": {"loss": r9(loss.item()), "losses": {"shape": shape[:-1], "data": flat(losses)},
                         "gradStudent": {"shape": shape, "data": flat(g)}}}


def make_distill():
    B, T, V = 2, 4, 33
    # A teacher that agrees with the student in part, so that the divergences are moderate.
    student = randf32(B, T, V, scale=2.0)
    teacher = (0.6 * student + randf32(B, T, V, scale=1.5)).float().double()
    targets = torch.randint(0, V, (B, T), dtype=torch.int64)
    targets[0, 1] = -100
    targets[1, 0] = -100
    targets[1, 3] = -100
    inputs = {
        "masked": {"student": student, "teacher": teacher, "targets": targets},
        "masked-1": {"student": student, "teacher": teacher, "targets": targets.masked_fill(targets == -100, -1)},
        # no targets: every row counts; sharper distributions
        "all": {"student": randf32(3, V, scale=3.0), "teacher": randf32(3, V, scale=3.0)},
    }
    cases = []
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)):
        for temp in (1.0, 2.0):
            tag = kind if kind != "jsd" else "jsd beta %g" % beta
            cases.append(distill_case("%s T=%g, 3 of 8 rows ignored" % (tag, temp), inputs, "masked", kind, beta, temp))
    cases.append(distill_case("jsd beta 0 is forward_kl (Liger), T=2", inputs, "masked", "jsd", 0.0, 2.0))
    cases.append(distill_case("jsd beta 1 is reverse_kl (Liger), T=2", inputs, "masked", "jsd", 1.0, 2.0))
    cases.append(distill_case("forward_kl T=1, ignore_index -1", inputs, "masked-1", "forward_kl", 0.5, 1.0,
                              ignore_index=-1))
    cases.append(distill_case("jsd beta 0.5 T=2, no targets, [3,33]", inputs, "all", "jsd", 0.5, 2.0))
    cases.append(distill_case("reverse_kl T=1, no targets, [3,33]", inputs, "all", "reverse_kl", 0.5, 1.0))
    by_name = {c["name"]: c["expected"]["loss"] for c in cases}
    assert by_name["jsd beta 0 is forward_kl (Liger), T=2"] == by_name["forward_kl T=2, 3 of 8 rows ignored"]
    assert by_name["jsd beta 1 is reverse_kl (Liger), T=2"] == by_name["reverse_kl T=2, 3 of 8 rows ignored"]
    assert by_name["forward_kl T=1, ignore_index -1"] == by_name["forward_kl T=1, 3 of 8 rows ignored"]
    stored = {}
    for key, inp in inputs.items():
        stored[key] = {"student": {"shape": list(inp["student"].shape), "data": flat(inp["student"])},
                       "teacher": {"shape": list(inp["teacher"].shape), "data": flat(inp["teacher"])}}
        if "targets" in inp:
            stored[key]["targets"] = {"shape": list(inp["targets"].shape), "data": ints(inp["targets"])}
    # Each case names its logits in "inputs" (shared, to keep the file small).
    write("distill.json", cases, inputs=stored)


# ---------------------------------------------------------------------------------------------------
# 8. NF4 with double quantization (bitsandbytes' algorithm, every fp32 operation written out)
# ---------------------------------------------------------------------------------------------------
# fp32 arithmetic: an fp32 +, -, * or / computed in float64 and rounded once to float32 is the correctly
# rounded fp32 result (53 >= 2 * 24 + 2), so f32(a.double() OP b.double()) is exactly what the
# bitsandbytes kernels compute, independently of torch's SIMD paths.

def f32(t):
    return t.float().double()


# bitsandbytes csrc/kernels.cu dQuantizeNF4: the decision tree's pivots in ascending order, as the
# decimal float literals of the source (x > 0.8614784181118011f ...). The tree returns the number of
# them that x exceeds (strictly: ties go to the lower code). A C compiler rounds such a literal to
# fp32 directly; float32(float(literal)) rounds twice and differs for 4 of the 15, so nf4_thresholds()
# rounds the exact decimal value once.
NF4_THRESHOLDS = ["-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
                  "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
                  "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                  "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]


def nf4_thresholds():
    from fractions import Fraction
    return torch.tensor([fp32_round(Fraction(t)) for t in NF4_THRESHOLDS], dtype=torch.float64)


def fp32_round(q):
    """A Fraction rounded to the nearest float32 (ties to even), as a Python float."""
    import struct
    from fractions import Fraction

    def bits(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    def from_bits(b):
        return struct.unpack("<f", struct.pack("<I", b))[0]

    x = struct.unpack("<f", struct.pack("<f", float(q)))[0]  # within one float32 ulp of q
    cands = [x]
    b = bits(x)
    if x != 0.0:
        cands += [from_bits(b - 1), from_bits(b + 1)]
    else:
        cands += [from_bits(1), from_bits(0x80000001)]
    return min(cands, key=lambda v: (abs(Fraction(v) - q), bits(v) & 1))


def fma32(a, b, c):
    """fp32 fused multiply-add a * b + c, rounded once."""
    from fractions import Fraction
    return fp32_round(Fraction(a) * Fraction(b) + Fraction(c))


def linspace32(start, end, steps, fused):
    """torch.linspace in float32: step = (end - start) / (steps - 1); element j is start + step * j
    below steps // 2 and end - step * (steps - 1 - j) from there. fused: each element one fused
    multiply-add; else the product and the sum rounded separately (torch's scalar kernel). The fused
    variant reproduces kDynamicMap8, which native/cpu/nf4.h says is what torch 2's AVX2 / AVX-512
    kernels give (an inference from the table: no torch 2 was at hand to confirm it). torch 1.13's own
    linspace on this CPU gives neither (its vectorized kernel fuses some products and not others)."""
    st = f32(torch.tensor([(f32(torch.tensor([end])) - f32(torch.tensor([start]))).item()]) / (steps - 1)).item()
    start, end = f32(torch.tensor([start])).item(), f32(torch.tensor([end])).item()
    out = []
    for j in range(steps):
        if j < steps // 2:
            out.append(fma32(st, float(j), start) if fused else
                       f32(torch.tensor([start]) + f32(torch.tensor([st * j]))).item())
        else:
            out.append(fma32(-st, float(steps - 1 - j), end) if fused else
                       f32(torch.tensor([end]) - f32(torch.tensor([st * (steps - 1 - j)]))).item())
    return torch.tensor(out, dtype=torch.float64)


def create_dynamic_map(linspace, max_exponent_bits=7, total_bits=8):
    """bitsandbytes.functional.create_dynamic_map(signed=True) (no additional items for 8 bits),
    with the linspace given; values float32 (as float64), sorted."""
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = linspace(0.1, 1.0, fraction_items)
        means = f32((boundaries[:-1] + boundaries[1:]) / 2.0)
        scale = f32(torch.tensor([10.0 ** (-(max_exponent_bits - 1) + i)])).item()  # the scalar, as fp32
        data += f32(scale * means).tolist()
        data += f32(-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2 ** total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float64)


def tunekit_dynamic_map():
    """kDynamicMap8 as native/cpu/nf4.cpp states it (hex float literals), for comparison only."""
    import re
    with open(os.path.join(ROOT, "native", "cpu", "nf4.cpp")) as f:
        src = f.read()
    body = src[src.index("kDynamicMap8[256] = {"):]
    body = body[body.index("{") + 1:body.index("};")]
    vals = [float.fromhex(v[:-1]) if "x" in v else float(v[:-1]) for v in re.findall(r"-?0x[0-9a-fA-Fp.+-]+f|-?0\.0f", body)]
    return torch.tensor(vals, dtype=torch.float64)


def dynamic_map8():
    """The signed dynamic 8-bit map. bitsandbytes builds it at run time with torch.linspace in fp32, whose
    last bits depend on torch's CPU kernel; tunekit fixes the table that torch 2's vectorized kernel gives
    (each linspace element one fused multiply-add). Compares the variants and returns that one."""
    fused = create_dynamic_map(lambda a, b, n: linspace32(a, b, n, fused=True))
    plain = create_dynamic_map(lambda a, b, n: linspace32(a, b, n, fused=False))
    here = create_dynamic_map(lambda a, b, n: f32(torch.linspace(a, b, n)))  # this torch, this CPU
    tk_map = tunekit_dynamic_map()
    assert len(tk_map) == 256
    for label, m in (("fused linspace", fused), ("unfused linspace", plain), ("torch.linspace here", here)):
        print("nf4: create_dynamic_map with %s: %d of 256 entries differ from native/cpu/nf4.cpp kDynamicMap8"
              % (label, int((m != tk_map).sum())))
    if not torch.equal(fused, tk_map):
        print("nf4: WARNING: kDynamicMap8 is not create_dynamic_map with a fused linspace", file=sys.stderr)
    return fused


def dquantize8(code, x):
    """bitsandbytes dQuantize<0> (kernels.cu): binary search of x in the sorted map, then the nearer
    neighbour by an fp32 midpoint (x > midpoint picks the upper, x < midpoint the lower)."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = -1.0, 1.0
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = f32(torch.tensor([upper + val])).item() * 0.5
        return upper_pivot if x > midpoint else pivot
    midpoint = f32(torch.tensor([lower + val])).item() * 0.5
    return lower_pivot if x < midpoint else pivot


FLT_MIN = 2.0 ** -126


def nf4_double_quant_ref(w, block, dmap):
    """w: float32 values (float64 tensor), flattened. Returns a dict of the quantized parts and the
    dequantized weight, following bitsandbytes step for step (fp32 operations via f32)."""
    n = w.numel()
    nb = (n + block - 1) // block
    padded = torch.zeros(nb * block, dtype=torch.float64)
    padded[:n] = w.reshape(-1)
    blocks = padded.view(nb, block)
    absmax = blocks.abs().amax(1)  # exact
    thr = nf4_thresholds()
    code = f32(torch.tensor(NF4_CODE, dtype=torch.float64))
    inv = f32(1.0 / absmax)  # the fp32 reciprocal, then a multiply (kQuantizeBlockwise)
    normed = f32(blocks * inv.view(nb, 1))
    idx = (normed.unsqueeze(-1) > thr).sum(-1)
    # tunekit's documented deviation: a block with absmax < FLT_MIN stores code 7 (0.0) everywhere
    # (bitsandbytes would multiply by inf and store code 0).
    idx[absmax < FLT_MIN] = 7
    idx = idx.reshape(-1)[:n]
    # cross-check the count against a nearest-code search away from the threshold ties
    nearest = (normed.reshape(-1)[:n].unsqueeze(-1) - code).abs().argmin(-1)
    ok = (absmax.repeat_interleave(block)[:n] < FLT_MIN) | (nearest == idx)
    assert int((~ok).sum()) <= 16, "threshold codes disagree with the nearest code too often"
    codes = idx.tolist() + ([7] if n % 2 else [])
    packed = [(codes[2 * j] << 4) | codes[2 * j + 1] for j in range(len(codes) // 2)]

    # double quantization: offset = mean(absmax) (tunekit: summed in float64, rounded once)
    offset = f32(torch.tensor([absmax.sum().item() / nb])).item()
    torch_mean = absmax.float().mean().item()  # bitsandbytes: absmax.mean() in fp32
    c = f32(absmax - offset)
    nb2 = (nb + 255) // 256
    scale2, qabsmax = [], []
    for s in range(nb2):
        cs = c[s * 256:(s + 1) * 256]
        m = cs.abs().max().item()
        scale2.append(m)
        if not m >= FLT_MIN:
            qabsmax += [127] * len(cs)
            continue
        inv2 = f32(torch.tensor([1.0 / m])).item()
        xs = f32(cs * inv2).tolist()
        qabsmax += [dquantize8(dmap.tolist(), x) for x in xs]
    qa = torch.tensor(qabsmax)
    sc2 = torch.tensor(scale2, dtype=torch.float64).repeat_interleave(256)[:nb]
    absmax2 = f32(f32(dmap[qa] * sc2) + offset)  # dequantize_blockwise, then absmax += offset
    deq = f32(code[idx] * absmax2.repeat_interleave(block)[:n])
    layout_bytes = (n + 1) // 2 + nb + 4 * nb2 + 4
    return {"absmax": absmax, "packed": packed, "offset": offset, "offsetTorchMean": torch_mean,
            "scale2": scale2, "qabsmax": qabsmax, "absmaxDequantized": absmax2, "deq": deq,
            "bytes": layout_bytes, "bitsPerParameter": 8.0 * layout_bytes / n}


def nf4_double_case(name, w, block, dmap):
    r = nf4_double_quant_ref(w, block, dmap)
    if r["offsetTorchMean"] != r["offset"]:
        print("nf4: %s: bitsandbytes' fp32 torch mean %r differs from the float64-summed offset %r"
              % (name, r["offsetTorchMean"], r["offset"]))
    shape = list(w.shape)
    return {"name": name, "options": {"doubleQuant": True, "blockSize": block},
            "w": {"shape": shape, "data": flat(w)},
            "packed": r["packed"], "qabsmax": r["qabsmax"], "scale2": [r9(v) for v in r["scale2"]],
            "offset": r9(r["offset"]), "absmax": flat(r["absmax"]),
            "absmaxDequantized": flat(r["absmaxDequantized"]),
            "bytes": r["bytes"], "bitsPerParameter": r["bitsPerParameter"],
            "expected": {"shape": shape, "data": flat(r["deq"].view(*shape))}}


def make_nf4_double():
    dmap = dynamic_map8()
    # Case 1: bitsandbytes' defaults on a weight of 16637 elements (odd): 260 blocks of 64 (the last
    # holds 61), so the double quantization has two 256-blocks (the second holds 4 absmaxes). Rows
    # have different scales so that the absmaxes spread around their mean.
    rows, cols = 131, 127
    row_scale = torch.exp(0.5 * torch.randn(rows, 1, dtype=torch.float64))
    w1 = f32(torch.randn(rows, cols, dtype=torch.float64) * row_scale)
    # Case 2: 205 elements (odd: the last low nibble is the pad code 7), 4 blocks:
    #   block 0: absmax exactly 1 (so n = w exactly): the 15 thresholds as fp32 (ties go down), the
    #            next fp32 value above each (goes up), +-1, 0 and values near the ends;
    #   block 1: all zeros (absmax 0: code 7 everywhere, dequantizes to exact zeros);
    #   block 2: N(0, 3); block 3: 13 values N(0, 0.001).
    thr = nf4_thresholds()
    above = torch.tensor([torch.nextafter(t.float(), torch.tensor(2.0)).item() for t in thr], dtype=torch.float64)
    b0 = torch.cat([thr, above, torch.tensor([1.0, -1.0, 0.0, -0.0, 0.99, -0.99])])
    b0 = torch.cat([b0, f32(torch.rand(64 - len(b0), dtype=torch.float64) * 1.8 - 0.9)])
    w2 = torch.cat([b0, torch.zeros(64, dtype=torch.float64),
                    f32(torch.randn(64, dtype=torch.float64) * 3.0), f32(torch.randn(13, dtype=torch.float64) * 1e-3)])
    cases = [nf4_double_case("nf4 double quant [131,127]: 260 blocks of 64, two 256-blocks of absmaxes", w1, 64, dmap),
             nf4_double_case("nf4 double quant [5,41]: thresholds, a zero block, ragged last block, odd size",
                             w2.view(5, 41), 64, dmap)]
    write("nf4_double.json", cases, code=[float(c) for c in f32(torch.tensor(NF4_CODE, dtype=torch.float64))],
          thresholds=[float(t) for t in nf4_thresholds()],
          dynamicMap8=[float(v) for v in dmap.tolist()])


def main():
    make_attention()
    make_rope()
    make_cross_entropy()
    make_sequence_logprobs()
    make_dpo()
    make_nf4()
    make_distill()
    make_nf4_double()
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR) if f.endswith(".json"))
    print("total %d bytes in tests/fixtures/" % total)


if __name__ == "__main__":
    main()
