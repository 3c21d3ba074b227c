// Tiny random checkpoints in Hugging Face layout, written by scripts/make-model-fixtures.py with
// plain PyTorch following Hugging Face's modeling code (llama with llama3 RoPE scaling, tied
// llama, qwen2 with q/k/v biases, qwen3 with q/k norms): tunekit's logits, loss and gradients
// must match them to fp32 precision.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import { nmse } from './helpers.js';

interface Fixture {
  inputIds: { shape: number[]; data: number[] };
  logits: { shape: number[]; data: number[] };
  loss: number;
  grads: Record<string, { shape: number[]; stride: number; data: number[] }>;
}

const root = join(import.meta.dirname, 'fixtures', 'models');

describe.each(['llama3-untied', 'llama-tied', 'qwen2', 'qwen3'])('%s checkpoint', (name) => {
  const fx = JSON.parse(readFileSync(join(root, name, 'fixture.json'), 'utf8')) as Fixture;

  it('logits, loss and gradients match PyTorch', async () => {
    const model = await tk.loadModel(join(root, name));
    model.requiresGrad(true);
    const [B, T] = fx.inputIds.shape as [number, number];
    const ids = tk.tensor(Int32Array.from(fx.inputIds.data), [B, T]);
    // The loss predicts ids[:, 1:] from logits[:, :-1]: targets are the ids shifted left, and the
    // last position is ignored.
    const shifted = new Int32Array(B * T).fill(-100);
    for (let b = 0; b < B; b++) for (let t = 0; t + 1 < T; t++) shifted[b * T + t] = fx.inputIds.data[b * T + t + 1]!;
    const targets = tk.tensor(shifted, [B, T]);
    tk.tidy(() => {
      const logits = model.forward(ids);
      expect(logits.shape).toEqual(fx.logits.shape);
      expect(nmse(logits.toArraySync(), fx.logits.data)).toBeLessThan(1e-10);
      const loss = tk.ops.crossEntropy(logits, targets);
      expect(loss.toArraySync()[0]).toBeCloseTo(fx.loss, 5);
      loss.backward();
    });
    for (const [param, g] of Object.entries(fx.grads)) {
      const p = model.namedParameters().find(([n]) => n === param)?.[1];
      expect(p, param).toBeDefined();
      expect([...p!.shape], param).toEqual(g.shape);
      const all = p!.grad!.toArraySync();
      const sampled = g.data.map((_, i) => all[i * g.stride]!);
      expect(nmse(sampled, g.data), param).toBeLessThan(1e-9);
    }
    ids.dispose();
    targets.dispose();
    model.dispose();
  });
});
