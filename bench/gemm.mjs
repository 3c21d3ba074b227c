// GEMM throughput at training shapes, as GFLOP/s, as a fraction of this machine's measured FMA
// peak, and beside PyTorch's CPU matmul (same shapes, same thread count) where torch imports.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Bench } from 'tinybench';

import * as tk from '../dist/index.js';

const here = dirname(fileURLToPath(import.meta.url));

export const gemmShapes = [
  { name: 'square 512', m: 512, n: 512, k: 512 },
  { name: 'square 1024', m: 1024, n: 1024, k: 1024 },
  { name: 'square 2048', m: 2048, n: 2048, k: 2048 },
  { name: 'square 4096', m: 4096, n: 4096, k: 4096 },
  // A transformer MLP up-projection: [B*T, d] x [d, 4d].
  { name: 'mlp 2048x1024x4096', m: 2048, n: 4096, k: 1024 },
  { name: 'mlp 8192x512x2048', m: 8192, n: 2048, k: 512 },
];

// The first Python that imports torch: $TUNEKIT_PYTHON, python3 on PATH, then Debian's own
// /usr/bin/python3 (where python3-torch installs, even when a pyenv python3 comes first on PATH).
export function torchPython() {
  const candidates = [process.env.TUNEKIT_PYTHON, 'python3', '/usr/bin/python3'].filter(Boolean);
  return candidates.find((py) => spawnSync(py, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0);
}

function torchTimes(cases, threads) {
  const python = torchPython();
  if (!python) return { missing: 'no python3 imports torch (apt-get install python3-torch, or set TUNEKIT_PYTHON)' };
  // torch.set_num_threads governs its own pool; BLAS libraries read their own variables.
  const n = String(threads);
  const r = spawnSync(python, [join(here, 'torch_matmul.py'), n], {
    env: { ...process.env, OMP_NUM_THREADS: n, OPENBLAS_NUM_THREADS: n, MKL_NUM_THREADS: n },
    input: JSON.stringify(cases),
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  if (r.status !== 0) return { missing: `torch benchmark failed: ${r.stderr.trim().split('\n').pop()}` };
  return JSON.parse(r.stdout);
}

export async function benchGemm({ peak, quick = false }) {
  const threads = tk.info().cpu.threads;
  const shapes = quick ? gemmShapes.filter((s) => s.m <= 1024) : gemmShapes;
  const cases = shapes.flatMap((s) => ['f32', 'bf16'].map((dtype) => ({ ...s, dtype, name: `${s.name} ${dtype}` })));

  const bench = new Bench({ time: quick ? 200 : 1500, iterations: 3, warmupIterations: 1, warmupTime: 0 });
  const operands = new Map();
  for (const c of cases) {
    const a = tk.randn([c.m, c.k], { seed: 1, dtype: c.dtype });
    const b = tk.randn([c.k, c.n], { seed: 2, dtype: c.dtype });
    operands.set(c.name, [a, b]);
    bench.add(c.name, () => {
      const out = tk.ops.matmul(a, b);
      tk.synchronize();
      out.dispose();
    });
  }
  await bench.run();
  for (const [a, b] of operands.values()) {
    a.dispose();
    b.dispose();
  }

  const torch = torchTimes(cases, threads);
  const rows = cases.map((c, i) => {
    const task = bench.tasks[i];
    // Best time on both sides: on a shared machine the minimum is the stable estimate of what
    // each implementation can do; medians drift with whatever else runs.
    const seconds = task.result.latency.min / 1e3;
    const gflops = (2 * c.m * c.n * c.k) / seconds / 1e9;
    const torchSeconds = torch.results?.[c.name];
    const torchGflops = torchSeconds ? (2 * c.m * c.n * c.k) / torchSeconds / 1e9 : undefined;
    return {
      shape: c.name,
      'ms': +(seconds * 1e3).toFixed(2),
      'GFLOP/s': +gflops.toFixed(1),
      'of peak': `${((100 * gflops) / (c.dtype === 'bf16' && peak.bf16Gflops ? peak.bf16Gflops : peak.fp32Gflops)).toFixed(0)}%`,
      'torch GFLOP/s': torchGflops ? +torchGflops.toFixed(1) : '-',
      'vs torch': torchGflops ? `${(gflops / torchGflops).toFixed(2)}x` : '-',
    };
  });
  console.log(`\nGEMM, ${threads} threads, ISA ${tk.info().cpu.isa}${tk.info().cpu.bf16 ? '+bf16' : ''}` +
    (torch.torch ? `; PyTorch ${torch.torch} (BLAS_INFO=${torch.blas}) with ${torch.threads} threads` : `; PyTorch: ${torch.missing}`));
  console.table(rows);
  return rows;
}
