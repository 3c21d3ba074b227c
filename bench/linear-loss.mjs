// linearCrossEntropy (fused, chunked) against crossEntropy on materialized logits: peak memory
// and time of a forward + backward at N = 2048 rows, D = 1024, V = 32k and 128k, f32. Each run is
// a child process so its peak RSS (VmHWM) is its own; the figure counts what the step adds over
// the inputs (hidden, weight) and includes the gradients both paths must produce.
//   node bench/linear-loss.mjs              run and print the table
//   node bench/linear-loss.mjs --child MODE V N D   (internal)
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import * as tk from '../dist/index.js';

const hwm = () => Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;

function child(mode, V, N, D) {
  const h = tk.randn([N, D], { seed: 1, std: 0.5, requiresGrad: true });
  const w = tk.randn([V, D], { seed: 2, std: 0.05, requiresGrad: true });
  const targets = tk.tensor(Int32Array.from({ length: N }, (_, i) => (i * 7919) % V), [N]);
  tk.synchronize();
  const base = rss();
  const t0 = performance.now();
  tk.tidy(() => {
    const loss = mode === 'fused' ? tk.ops.linearCrossEntropy(h, w, targets) : tk.ops.crossEntropy(tk.ops.matmul(h, w, { transB: true }), targets);
    loss.backward();
  });
  tk.synchronize();
  const seconds = (performance.now() - t0) / 1e3;
  console.log(JSON.stringify({ seconds, peak: hwm() - base }));
}

export function benchLinearLoss({ quick = false } = {}) {
  const self = fileURLToPath(import.meta.url);
  const [N, D] = quick ? [256, 256] : [2048, 1024];
  const rows = [];
  for (const V of quick ? [32000] : [32000, 128000]) {
    const r = {};
    for (const mode of ['fused', 'materialized']) {
      const p = spawnSync(process.execPath, [self, '--child', mode, String(V), String(N), String(D)], { encoding: 'utf8' });
      if (p.status !== 0) throw new Error(`linear-loss child failed:\n${p.stderr}`);
      r[mode] = JSON.parse(p.stdout.trim().split('\n').pop());
    }
    rows.push({
      shape: `N ${N}, D ${D}, V ${V}`,
      'fused peak MiB': +(r.fused.peak / 2 ** 20).toFixed(0),
      'materialized peak MiB': +(r.materialized.peak / 2 ** 20).toFixed(0),
      'memory ratio': +(r.fused.peak / r.materialized.peak).toFixed(3),
      'fused s': +r.fused.seconds.toFixed(2),
      'materialized s': +r.materialized.seconds.toFixed(2),
    });
  }
  console.log(`\nlinearCrossEntropy forward + backward vs materialized logits, f32 (goal: memory ratio <= 0.25; peaks include the [V, D] and [N, D] gradients)`);
  console.table(rows);
  return rows;
}

if (process.argv[2] === '--child') child(process.argv[3], +process.argv[4], +process.argv[5], +process.argv[6]);
else if (process.argv[1] === fileURLToPath(import.meta.url)) benchLinearLoss({ quick: process.argv.includes('--quick') });
