// Forward throughput of the model ops at training shapes, as GB/s (memory-bound ops, against the
// measured copy bandwidth) or GFLOP/s (attention, against the measured fp32 FMA peak). With
// --quick the shapes shrink and may fit in cache. The copy probe (memcpy, read + write) is a
// reference point, not a hard ceiling: ops that read more than they write can pass it.
import { Bench } from 'tinybench';

import * as tk from '../dist/index.js';

export async function benchOps({ peak, quick = false }) {
  const s = quick ? 4 : 1; // shrink factor for a smoke run
  const T = 1024 / s, H = 8, D = 64;
  const rows = 8192 / s, dim = 4096;
  const N = 4096 / s, V = 32000;
  const t = {
    q: tk.randn([1, T, H, D], { seed: 1 }),
    k: tk.randn([1, T, H / 2, D], { seed: 2 }),
    v: tk.randn([1, T, H / 2, D], { seed: 3 }),
    x: tk.randn([rows, dim], { seed: 4 }),
    w: tk.randn([dim], { seed: 5 }),
    up: tk.randn([rows, dim], { seed: 9 }),
    ropeX: tk.randn([1, 4096 / s, 32, 128], { seed: 6 }),
    logits: tk.randn([N, V], { seed: 7 }),
    targets: tk.tensor(Int32Array.from({ length: N }, (_, i) => (i * 7919) % V), [N]),
    weight: tk.randn([4096 / s, 4096], { seed: 8 }),
  };
  const q4 = tk.nf4.quantize(t.weight);
  const cases = [
    // [name, run, figure, unit]: figure = work units per call (bytes moved, or flops)
    [`attention causal fwd f32 q [1,${T},8,64], kv heads 4`, () => tk.ops.attention(t.q, t.k, t.v), 2 * T * T * D * H, 'GFLOP/s'],
    [`rmsNorm f32 [${rows},${dim}]`, () => tk.ops.rmsNorm(t.x, t.w), 2 * rows * dim * 4, 'GB/s'],
    [`swiglu f32 [${rows},${dim}]`, () => tk.ops.swiglu(t.x, t.up), 3 * rows * dim * 4, 'GB/s'],
    [`rope f32 [${t.ropeX.shape.join(',')}]`, () => tk.ops.rope(t.ropeX, { theta: 500000 }), 2 * t.ropeX.size * 4, 'GB/s'],
    [`crossEntropy f32 [${N},${V}]`, () => tk.ops.crossEntropy(t.logits, t.targets), N * V * 4, 'GB/s'],
    [`nf4.dequantize [${t.weight.shape.join(',')}] -> f32`, () => tk.nf4.dequantize(q4), t.weight.size * 4.5, 'GB/s'],
  ];
  const bench = new Bench({ time: quick ? 200 : 1000, iterations: 3, warmupIterations: 1, warmupTime: 0 });
  for (const [name, run] of cases)
    bench.add(name, () => {
      const out = run();
      tk.synchronize();
      out.dispose();
    });
  await bench.run();
  const table = cases.map(([name, , work, unit], i) => {
    const seconds = bench.tasks[i].result.latency.min / 1e3;
    const rate = work / seconds / 1e9;
    const limit = unit === 'GFLOP/s' ? peak.fp32Gflops : peak.copyGBs;
    return { op: name, ms: +(seconds * 1e3).toFixed(2), rate: `${rate.toFixed(1)} ${unit}`, 'vs limit': `${((100 * rate) / limit).toFixed(0)}%` };
  });
  console.log(`\nOps (forward), ${tk.info().cpu.threads} threads; limits: fp32 peak ${peak.fp32Gflops.toFixed(0)} GFLOP/s, copy ${peak.copyGBs.toFixed(1)} GB/s`);
  console.table(table);
  for (const x of Object.values(t)) x.dispose();
  q4.dispose();
  return table;
}
