// Attention forward + backward (causal, fp32) against PyTorch's naive attention, which
// materializes the [T, T] scores: time and peak memory. Both peaks are measured the same way: the
// process's peak RSS during one step (Linux VmHWM, reset through /proc/self/clear_refs) above its
// RSS before it, inputs already allocated; tunekit's tensor allocator peak is shown beside it.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';

import { Bench } from 'tinybench';

import * as tk from '../dist/index.js';

import { torchPython } from './gemm.mjs';

function status(key) {
  return Number(new RegExp(`${key}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
}

export async function benchAttention({ peak, quick = false }) {
  const threads = tk.info().cpu.threads;
  const py = torchPython();
  const H = 8, D = 64, B = 1;
  const rows = [];
  for (const T of quick ? [256] : [1024, 2048]) {
    const q = tk.randn([B, T, H, D], { seed: 1, requiresGrad: true });
    const k = tk.randn([B, T, H, D], { seed: 2, requiresGrad: true });
    const v = tk.randn([B, T, H, D], { seed: 3, requiresGrad: true });
    const dout = tk.randn([B, T, H, D], { seed: 4 });
    const step = () => {
      tk.tidy(() => tk.ops.attention(q, k, v).backward(dout));
      tk.synchronize();
      q.grad = k.grad = v.grad = null;
    };
    step();
    tk.resetPeakMemory();
    const base = tk.memory().cpu.allocatedBytes;
    writeFileSync('/proc/self/clear_refs', '5');
    const rss0 = status('VmRSS');
    step();
    const rssPeak = status('VmHWM') - rss0;
    const peakBytes = tk.memory().cpu.peakAllocatedBytes - base;
    const bench = new Bench({ time: quick ? 200 : 2000, iterations: 3, warmupIterations: 0, warmupTime: 0 });
    bench.add('attention', step);
    await bench.run();
    const seconds = bench.tasks[0].result.latency.min / 1e3;
    // Causal: half the scores; forward 2 GEMM-like products, backward 5 (recomputing the scores).
    const flops = (7 * 2 * B * H * T * T * D) / 2;
    let torch = null;
    if (py) {
      const n = String(threads);
      const r = spawnSync(py, [new URL('./torch_attention.py', import.meta.url).pathname, n, String(B), String(T), String(H), String(D)], {
        encoding: 'utf8',
        env: { ...process.env, OMP_NUM_THREADS: n, OPENBLAS_NUM_THREADS: n, MKL_NUM_THREADS: n },
      });
      if (r.status === 0) torch = JSON.parse(r.stdout.trim().split('\n').pop());
    }
    rows.push({
      shape: `[${B},${T},${H},${D}] causal`,
      'tunekit ms': +(seconds * 1e3).toFixed(1),
      'GFLOP/s': +(flops / seconds / 1e9).toFixed(1),
      'of fp32 peak': `${((100 * flops) / seconds / 1e9 / peak.fp32Gflops).toFixed(0)}%`,
      'tunekit RSS growth MiB': +(rssPeak / 2 ** 20).toFixed(1),
      'tunekit tensors MiB': +(peakBytes / 2 ** 20).toFixed(1),
      'torch naive ms': torch ? +(torch.seconds * 1e3).toFixed(1) : 'n/a',
      'torch RSS growth MiB': torch ? +(torch.peak_bytes / 2 ** 20).toFixed(1) : 'n/a',
      speedup: torch ? `${(torch.seconds / seconds).toFixed(2)}x` : 'n/a',
    });
    for (const t of [q, k, v, dout]) t.dispose();
  }
  console.log(`\nAttention forward + backward, fp32, ${threads} threads (goal: >= 2x PyTorch's naive attention)`);
  console.table(rows);
  return rows;
}
