// Peak memory of loading a ~100M-parameter Llama checkpoint in fp32 and with quantize: 'nf4'
// (each load in its own process, so max RSS belongs to it). The checkpoint is written once by
// tunekit itself (random weights, two shards) into a temporary directory.
//   node bench/load-memory.mjs            write, load both ways, print the table
//   node bench/load-memory.mjs --child DIR fp32|nf4   (internal)
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as tk from '../dist/index.js';

// ~101M parameters: hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocabulary 32000.
const CONFIG = { hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 12, num_attention_heads: 12, num_key_value_heads: 4, max_position_embeddings: 2048, tie_word_embeddings: false };

async function child(dir, mode) {
  const t0 = performance.now();
  const model = await tk.loadModel(dir, mode === 'nf4' ? { quantize: 'nf4' } : {});
  const seconds = (performance.now() - t0) / 1e3;
  const params = model.namedParameters().reduce((n, [, t]) => n + t.size, 0);
  tk.synchronize();
  const mem = tk.memory().cpu;
  // VmHWM, not getrusage's maxRSS: the latter carries over the parent's RSS at fork.
  const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN) * 1024;
  console.log(JSON.stringify({ seconds, maxRss: hwm, tensorBytes: mem.bytes, peakAllocated: mem.peakAllocatedBytes, denseParams: params }));
  model.dispose();
}

export async function benchLoadMemory() {
  const dir = await mkdtemp(join(tmpdir(), 'tunekit-100m-'));
  try {
    const model = tk.createModel(tk.presetConfig('small', 32000, CONFIG), { seed: 1 });
    const params = model.parameters().reduce((n, t) => n + t.size, 0);
    await tk.saveModel(model, dir, { maxShardBytes: 250e6 });
    model.dispose();
    const self = fileURLToPath(import.meta.url);
    const rows = [];
    for (const mode of ['fp32', 'nf4']) {
      const r = spawnSync(process.execPath, [self, '--child', dir, mode], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`load-memory child (${mode}) failed:\n${r.stderr}`);
      const m = JSON.parse(r.stdout.trim().split('\n').pop());
      rows.push({ load: mode, 'seconds': +m.seconds.toFixed(2), 'peak RSS MiB': +(m.maxRss / 2 ** 20).toFixed(0), 'tensor MiB after load': +(m.tensorBytes / 2 ** 20).toFixed(0), 'tensor peak MiB': +(m.peakAllocated / 2 ** 20).toFixed(0) });
    }
    console.log(`\nLoading a ${(params / 1e6).toFixed(1)}M-parameter llama checkpoint (fp32 on disk, 2 shards)`);
    console.table(rows);
    return rows;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--child') await child(process.argv[3], process.argv[4]);
else if (process.argv[1] === fileURLToPath(import.meta.url)) await benchLoadMemory();
