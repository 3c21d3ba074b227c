"""PyTorch's naive attention (scores materialized, softmax, backward through autograd) on the
shapes tunekit's attention benchmark uses, for side-by-side time and memory.

argv: threads B T H D. Prints JSON {seconds (best fwd+bwd), peak_bytes (growth of the process's
max RSS over the first fwd+bwd, inputs already allocated), torch}. Run one shape per process so
the RSS high-water mark belongs to that shape.
"""
import json
import resource
import sys
import time

import torch


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

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
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
