"""PyTorch's side of issue 8 (b)-(d): the yardsticks tunekit's CUDA kernels are held against, on the
shapes bench/cuda-kernels.mjs and the native --perf tests use.

(b) copy: device-to-device copy bandwidth, dst.copy_(src) of a large bf16 buffer, counted as bytes
    read + bytes written (the ceiling NF4 dequantization is compared with).
(c) gemm: bf16 dense GEMMs of a frozen linear layer, x [N, in] and W [out, in]:
        fwd  y  = x W^T          dx = dy W           (dW = dy^T x, timed apart: a frozen base needs none)
    "fwd+dx" is the dense reference for qloraLinear forward + backward.
(d) ce: cross entropy on materialized logits at N rows, D = 4096, V = 128256, bf16 hidden and head,
    forward + backward including the LM-head GEMMs:
        hf:   logits = h W^T (bf16), loss = cross_entropy(logits.float(), y)   (what HF's loss does)
        bf16: loss = cross_entropy(logits, y) on the bf16 logits                (the frugal variant)
    each with the head frozen (LoRA SFT: dh only) and trained (dh and dW). Peak memory is
    max_memory_allocated during the call minus what was allocated before it (h, W, targets), so it
    counts the logits, their gradient, the fp32 copies and the gradients dh (and dW) the call makes.

Times are medians of CUDA-event-timed repetitions after a warm-up, inputs random (never zeros).
    python3 bench/torch_cuda_kernels.py                     the issue's shapes on cuda
    /usr/bin/python3 bench/torch_cuda_kernels.py --device cpu --small    a check that it runs
Prints readable lines, then one JSON line (the last line of stdout) with every figure.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    if a.small:
        a.copy_mib, a.gemm = 8, [(64, 128, 128), (64, 128, 256)]
        a.ce = (256, 64, 1000)
        a.reps = min(a.reps, 3)
    else:
        a.copy_mib = 1024
        a.gemm = [(2048, 4096, 4096), (4096, 4096, 4096), (2048, 4096, 14336), (4096, 4096, 14336)]
        a.ce = (8192, 4096, 128256)
    return a


class Timer:
    """Median seconds of fn over reps after one warm-up call: CUDA events, or perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            if self.cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def copy_bandwidth(a, dev, timer):
    n = a.copy_mib * 2**20 // 2
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), a.reps)
    moved = 2 * src.numel() * 2
    return {"bytes": src.numel() * 2, "ms": t * 1e3, "gbs": moved / t / 1e9}


def dense_gemms(a, dev, timer):
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for N, IN, OUT in a.gemm:
        x = torch.randn(N, IN, device=dev, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(OUT, IN, device=dev, dtype=torch.bfloat16, generator=g) * 0.02)
        dy = torch.randn(N, OUT, device=dev, dtype=torch.bfloat16, generator=g)
        y = torch.empty(N, OUT, device=dev, dtype=torch.bfloat16)
        dx = torch.empty(N, IN, device=dev, dtype=torch.bfloat16)
        dw = torch.empty(OUT, IN, device=dev, dtype=torch.bfloat16)
        t_fwd = timer(lambda: torch.mm(x, w.t(), out=y), a.reps)
        t_dx = timer(lambda: torch.mm(dy, w, out=dx), a.reps)
        t_dw = timer(lambda: torch.mm(dy.t(), x, out=dw), a.reps)
        # The same layer through autograd (F.linear, W frozen): what eager PyTorch runs for it.
        xg = x.clone().requires_grad_(True)

        def autograd_step():
            F.linear(xg, w).backward(dy)
            xg.grad = None

        t_auto = timer(autograd_step, a.reps)
        flop = 2.0 * N * IN * OUT
        rows.append({
            "N": N, "in": IN, "out": OUT,
            "fwd_ms": t_fwd * 1e3, "dx_ms": t_dx * 1e3, "dw_ms": t_dw * 1e3,
            "fwd_dx_ms": (t_fwd + t_dx) * 1e3, "autograd_fwd_bwd_ms": t_auto * 1e3,
            "fwd_tflops": flop / t_fwd / 1e12, "dx_tflops": flop / t_dx / 1e12,
        })
        del x, w, dy, y, dx, dw, xg
    return rows


def cross_entropy(a, dev, timer):
    N, D, V = a.ce
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    h0 = torch.randn(N, D, device=dev, dtype=torch.bfloat16, generator=g)
    w0 = torch.randn(V, D, device=dev, dtype=torch.bfloat16, generator=g) * (2.5 / D**0.5)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    rows = []
    for variant in ("hf", "bf16"):
        for train_head in (False, True):
            h = h0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(train_head)

            def step():
                logits = h @ w.t()
                loss = F.cross_entropy(logits.float() if variant == "hf" else logits, y)
                loss.backward()
                h.grad = None
                w.grad = None

            t = timer(step, a.reps)
            peak = 0
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            flop = (3.0 if train_head else 2.0) * 2.0 * N * D * V
            rows.append({"variant": variant, "head": "trained" if train_head else "frozen", "N": N, "D": D, "V": V,
                         "ms": t * 1e3, "tflops": flop / t / 1e12, "peak_bytes": peak})
            del h, w
    return rows


def main():
    a = parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_cuda_kernels: --device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    timer = Timer(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} kernels on {name} (medians of {a.reps})")

    copy = copy_bandwidth(a, dev, timer)
    print(f"  copy bf16 {copy['bytes'] / 2**20:.0f} MiB: {copy['ms']:.3f} ms, {copy['gbs']:.0f} GB/s (read + write)")

    gemm = dense_gemms(a, dev, timer)
    for r in gemm:
        print(f"  gemm bf16 N {r['N']} in {r['in']} out {r['out']}: fwd {r['fwd_ms']:.3f} ms ({r['fwd_tflops']:.0f} TFLOP/s)"
              f"  dx {r['dx_ms']:.3f} ms ({r['dx_tflops']:.0f})  fwd+dx {r['fwd_dx_ms']:.3f} ms"
              f"  [dW {r['dw_ms']:.3f} ms; autograd F.linear fwd+bwd {r['autograd_fwd_bwd_ms']:.3f} ms]")

    ce = cross_entropy(a, dev, timer)
    for r in ce:
        print(f"  cross entropy on materialized logits ({r['variant']}, head {r['head']}) N {r['N']} D {r['D']} V {r['V']}:"
              f" {r['ms']:.2f} ms ({r['tflops']:.0f} TFLOP/s), peak {r['peak_bytes'] / 2**20:.0f} MiB above inputs")

    print(json.dumps({"bench": "torch_cuda_kernels", "torch": torch.__version__, "device": name, "reps": a.reps,
                      "copy": copy, "gemm": gemm, "ce": ce}))


if __name__ == "__main__":
    main()
