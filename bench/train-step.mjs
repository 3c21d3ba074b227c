// Training-step throughput (forward, backward, AdamW) of a small Llama (d = 256, 4 layers, 8 heads
// / 4 KV heads, T = 256, batch 8, vocabulary 256), tokens/s, beside the same step in PyTorch eager
// (bench/torch_train_step.py) at the same thread count. Goal: >= 2x PyTorch (the project's: 3x).
import { spawnSync } from 'node:child_process';

import * as tk from '../dist/index.js';

import { torchPython } from './gemm.mjs';

export async function benchTrainStep({ quick = false } = {}) {
  const [B, T, V] = [8, 256, 256];
  const model = tk.createModel(tk.presetConfig('small', V, { max_position_embeddings: 2048 }), { seed: 1 });
  model.requiresGrad(true);
  const params = model.parameters();
  const opt = new tk.optim.AdamW(params, { lr: 1e-4 });
  const ids = new Int32Array(B * T).map((_, i) => (i * 7 + 3) % V);
  const targets = new Int32Array(B * T).map((_, i) => (i * 7 + 10) % V);
  const step = () => {
    tk.tidy(() => {
      const x = tk.tensor(ids, [B, T]);
      const y = tk.tensor(targets, [B, T]);
      const loss = tk.ops.linearCrossEntropy(model.hidden(x), model.lmHeadWeight, y);
      loss.backward();
    });
    tk.optim.clipGradNorm(params, 1).dispose();
    opt.step();
    opt.zeroGrad();
    tk.synchronize();
  };
  step();
  step();
  const times = [];
  const until = performance.now() + (quick ? 1500 : 10000);
  while (times.length < 3 || performance.now() < until) {
    const t0 = performance.now();
    step();
    times.push((performance.now() - t0) / 1e3);
    if (times.length >= (quick ? 3 : 30)) break;
  }
  times.sort((a, b) => a - b);
  const best = times[0];
  const median = times[Math.floor(times.length / 2)];
  const threads = tk.info().cpu.threads;
  const nParams = params.reduce((n, t) => n + t.size, 0);
  opt.dispose();
  model.dispose();
  // Debian's torch threads its own ops with OpenMP and its matmuls with OpenBLAS's own pool, which
  // torch.set_num_threads does not govern: at 2 + 2 threads on 2 cores they fight. Give PyTorch its
  // best of two fair settings (OpenBLAS single-threaded under 2 torch threads; 1 thread overall).
  let torch = null;
  const py = torchPython();
  if (py && !quick) {
    const variants = [
      { threads: threads, env: { OMP_NUM_THREADS: String(threads), OPENBLAS_NUM_THREADS: '1', MKL_NUM_THREADS: '1' } },
      { threads: 1, env: { OMP_NUM_THREADS: '1', OPENBLAS_NUM_THREADS: '1', MKL_NUM_THREADS: '1' } },
    ];
    for (const v of variants) {
      const r = spawnSync(py, [new URL('./torch_train_step.py', import.meta.url).pathname, '--threads', String(v.threads), '--batch', String(B), '--seq', String(T), '--vocab', String(V), '--dim', '256', '--layers', '4', '--heads', '8', '--kv-heads', '4', '--intermediate', '688', '--seconds', '10'], {
        encoding: 'utf8',
        env: { ...process.env, ...v.env },
      });
      if (r.status !== 0) continue;
      const res = JSON.parse(r.stdout.trim().split('\n').pop());
      if (!torch || res.tokens_per_s > torch.tokens_per_s) torch = { ...res, setting: `${v.threads} torch thread(s), OpenBLAS 1` };
    }
  }
  const row = {
    model: `llama d256 L4 h8/4 V${V}, ${(nParams / 1e6).toFixed(2)}M params`,
    batch: `${B} x ${T}`,
    'step ms (best)': +(best * 1e3).toFixed(1),
    'step ms (median)': +(median * 1e3).toFixed(1),
    'tokens/s': Math.round((B * T) / median),
    'torch tokens/s': torch ? Math.round(torch.tokens_per_s) : 'n/a',
    'torch setting': torch ? torch.setting : 'n/a',
    speedup: torch ? `${((B * T) / median / torch.tokens_per_s).toFixed(2)}x` : 'n/a',
  };
  console.log(`\nTraining step (forward + backward + AdamW), fp32, ${threads} threads (goal: >= 2x PyTorch eager)`);
  console.table([row]);
  return row;
}

if (process.argv[1] === new URL(import.meta.url).pathname) await benchTrainStep({ quick: process.argv.includes('--quick') });
