"""PyTorch's CPU matmul on the shapes tunekit's GEMM benchmark uses, for a side-by-side ratio.

Reads a JSON list of {"name", "m", "n", "k", "dtype"} on stdin and prints a JSON object
{name: best seconds}. The thread count comes from argv[1], to match tunekit's.
"""
import json
import os
import sys
import time

import torch


def best_seconds(fn, min_time=1.0, min_reps=3):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return min(times)


def main():
    torch.set_num_threads(int(sys.argv[1]))
    cases = json.load(sys.stdin)
    # Which BLAS serves fp32 matmul matters more than anything else here: Debian's python3-torch
    # uses the system libblas.so.3, which is the slow reference BLAS unless OpenBLAS is installed.
    blas = next((line.split("BLAS_INFO=")[1].split(",")[0] for line in torch.__config__.show().splitlines() if "BLAS_INFO=" in line), "?")
    system_blas = "/usr/lib/x86_64-linux-gnu/libblas.so.3"
    if blas == "generic" and os.path.exists(system_blas):
        blas = os.path.realpath(system_blas)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "blas": blas, "results": {}}
    for c in cases:
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
        g = torch.Generator().manual_seed(0)
        a = torch.randn(c["m"], c["k"], generator=g).to(dtype)
        b = torch.randn(c["k"], c["n"], generator=g).to(dtype)
        out["results"][c["name"]] = best_seconds(lambda: torch.matmul(a, b))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
