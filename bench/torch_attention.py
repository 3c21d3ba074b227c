"""PyTorch's naive attention (scores materialized, softmax, backward through autograd) on the
shapes tunekit's attention benchmark uses, for side-by-side time and memory.

argv: threads B T H D. Prints JSON {seconds (best fwd+bwd), peak_bytes (the process's peak RSS
during one fwd+bwd above its RSS before it, inputs already allocated), torch}. The peak is Linux's
VmHWM, reset just before the step through /proc/self/clear_refs.
"""
import json
import sys
import time

import torch


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main():
    threads, B, T, H, D = (int(x) for x in sys.argv[1:6])
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    scale = D ** -0.5

    def step():
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(-1) @ v
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    step()  # warm-up: the allocator's first-use costs are not the step's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    rss0 = status_bytes("VmRSS")
    step()
    peak = status_bytes("VmHWM") - rss0
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < 2.0:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if len(times) >= 20:
            break
    print(json.dumps({"seconds": min(times), "peak_bytes": peak, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
