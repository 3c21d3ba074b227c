// qloraLinear (NF4 weight dequantized inside the GEMM, plus the LoRA path) against a dense fp32
// GEMM of the same shape: forward, and forward + backward (dense: dx only, as W is frozen in both).
// Goal: qlora / dense <= 1.3.
import { Bench } from 'tinybench';

import * as tk from '../dist/index.js';

export async function benchQlora({ quick = false } = {}) {
  const shapes = quick ? [[128, 512, 512, 16]] : [[512, 4096, 4096, 16], [2048, 2048, 2048, 16]];
  const rows = [];
  for (const [N, IN, OUT, R] of shapes) {
    const w = tk.randn([OUT, IN], { seed: 1, std: 0.02 });
    const q = tk.nf4.quantize(w);
    const x = tk.randn([N, IN], { seed: 2, requiresGrad: true });
    const a = tk.randn([R, IN], { seed: 3, std: 0.02, requiresGrad: true });
    const b = tk.randn([OUT, R], { seed: 4, std: 0.02, requiresGrad: true });
    const dy = tk.randn([N, OUT], { seed: 5 });
    const run = (f, backward) => () => {
      tk.tidy(() => {
        const y = backward ? f() : tk.noGrad(f);
        if (backward) y.backward(dy);
      });
      tk.synchronize();
      for (const t of [x, a, b]) t.grad = null;
    };
    const cases = {
      'dense fwd': run(() => tk.ops.matmul(x, w, { transB: true }), false),
      'qlora fwd': run(() => tk.ops.qloraLinear(x, q, a, b, { scale: 2 }), false),
      'dense fwd+bwd': run(() => tk.ops.matmul(x, w, { transB: true }), true),
      'qlora fwd+bwd': run(() => tk.ops.qloraLinear(x, q, a, b, { scale: 2 }), true),
    };
    const bench = new Bench({ time: quick ? 200 : 1500, iterations: 3, warmupIterations: 1, warmupTime: 0 });
    for (const [name, fn] of Object.entries(cases)) bench.add(name, fn);
    await bench.run();
    const ms = Object.fromEntries(bench.tasks.map((t) => [t.name, t.result.latency.min]));
    rows.push({
      shape: `N ${N}, in ${IN}, out ${OUT}, r ${R}`,
      'dense fwd ms': +ms['dense fwd'].toFixed(1),
      'qlora fwd ms': +ms['qlora fwd'].toFixed(1),
      'fwd ratio': +(ms['qlora fwd'] / ms['dense fwd']).toFixed(2),
      'dense fwd+bwd ms': +ms['dense fwd+bwd'].toFixed(1),
      'qlora fwd+bwd ms': +ms['qlora fwd+bwd'].toFixed(1),
      'fwd+bwd ratio': +(ms['qlora fwd+bwd'] / ms['dense fwd+bwd']).toFixed(2),
    });
    for (const t of [w, x, a, b, dy]) t.dispose();
    q.dispose();
  }
  console.log(`\nqloraLinear vs dense fp32 GEMM, ${tk.info().cpu.threads} threads (goal: ratio <= 1.3)`);
  console.table(rows);
  return rows;
}
