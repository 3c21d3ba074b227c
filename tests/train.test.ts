// The trainer: it learns, token-exact gradient accumulation, bit-exact resume from a checkpoint,
// aborting, schedules and bad input.
import { mkdtemp, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM } from '../lib/index.js';
import { lrAt, train, type Batch, type BatchSource } from '../lib/train/index.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-train-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Cycles through fixed batches; its state is the index of the next one. */
class ListSource implements BatchSource {
  i = 0;
  constructor(readonly batches: Batch[]) {}
  async next() {
    return this.batches[this.i++ % this.batches.length]!;
  }
  state() {
    return { i: this.i };
  }
  restore(s: unknown) {
    this.i = (s as { i: number }).i;
  }
}

function batch(rows: number[][], mask: (t: number) => boolean = () => true): Batch {
  const B = rows.length;
  const T = rows[0]!.length;
  const ids = new Int32Array(B * T);
  const targets = new Int32Array(B * T).fill(-100);
  let tokens = 0;
  rows.forEach((r, b) => {
    r.forEach((id, t) => {
      ids[b * T + t] = id;
      if (t + 1 < T && mask(t)) {
        targets[b * T + t] = r[t + 1]!;
        tokens++;
      }
    });
  });
  return { ids, targets, batchSize: B, seqLen: T, tokens };
}

const pattern = (start: number, T: number, V: number) => Array.from({ length: T }, (_, t) => (start + 3 * t) % V);

async function weights(model: CausalLM): Promise<Buffer[]> {
  return Promise.all(model.namedParameters().map(async ([, t]) => Buffer.from(await t.handle().read())));
}

describe('train', () => {
  it('learns a repeating pattern', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 1 });
    model.requiresGrad(true);
    const data = new ListSource([batch([pattern(0, 16, 32), pattern(5, 16, 32)]), batch([pattern(9, 16, 32), pattern(2, 16, 32)])]);
    const r = await train({ model, data, steps: 40, lr: 3e-3, warmupSteps: 5 });
    expect(r.stopped).toBe('done');
    expect(r.losses[0]!.loss).toBeGreaterThan(3);
    expect(r.losses.at(-1)!.loss).toBeLessThan(0.5 * r.losses[0]!.loss);
    model.dispose();
  });

  it('accumulation is token-exact: two micro-batches equal one batch holding both', async () => {
    const rowsA = [pattern(1, 12, 32), pattern(4, 12, 32)];
    const rowsB = [pattern(7, 12, 32)];
    // Different numbers of counted tokens per micro-batch: a mean of means would weigh them wrongly.
    const a = batch(rowsA, (t) => t % 2 === 0);
    const b = batch(rowsB);
    const both = batch([...rowsA, ...rowsB], () => true);
    both.targets.set(a.targets, 0);
    both.tokens = a.tokens + b.tokens;
    const run = async (source: BatchSource, gradAccum: number) => {
      const model = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 2 });
      model.requiresGrad(true);
      await train({ model, data: source, steps: 1, gradAccum, lr: 1e-2, maxGradNorm: 0 });
      const w = await Promise.all(model.namedParameters().map(async ([, t]) => (await t.toArray()) as Float32Array));
      model.dispose();
      return w;
    };
    const split = await run(new ListSource([a, b]), 2);
    const whole = await run(new ListSource([both]), 1);
    split.forEach((w, i) => w.forEach((v, j) => expect(v).toBeCloseTo(whole[i]![j]!, 5)));
  });

  it('a run stopped and resumed from its checkpoint ends with the same weights, bit for bit', async () => {
    const batches = [batch([pattern(0, 16, 32)]), batch([pattern(3, 16, 32)]), batch([pattern(6, 16, 32)])];
    const straight = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 3 });
    tk.applyLora(straight, { r: 4, targetModules: 'all-linear', dropout: 0.1, seed: 1 });
    tk.manualSeed(99);
    await train({ model: straight, data: new ListSource(batches), steps: 6, lr: 5e-3, warmupSteps: 2, gradAccum: 2 });

    const out = join(dir, 'resume');
    const controller = new AbortController();
    const first = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 3 });
    tk.applyLora(first, { r: 4, targetModules: 'all-linear', dropout: 0.1, seed: 1 });
    tk.manualSeed(99);
    const r1 = await train({
      model: first,
      data: new ListSource(batches),
      steps: 6,
      lr: 5e-3,
      warmupSteps: 2,
      gradAccum: 2,
      outputDir: out,
      checkpointEvery: 2,
      signal: controller.signal,
      onProgress: (e) => {
        if (e.step === 3) controller.abort();
      },
    });
    expect(r1.stopped).toBe('aborted');
    expect(r1.steps).toBe(3);
    expect(await readdir(out)).toContain('checkpoint-3');
    // A leftover of a save killed half-way is never resumed from.
    await mkdir(join(out, 'checkpoint-9.tmp-1-0'), { recursive: true });

    const second = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 3 });
    tk.applyLora(second, { r: 4, targetModules: 'all-linear', dropout: 0.1, seed: 1 });
    tk.manualSeed(12345);  // overwritten by the checkpoint's seed state
    const r2 = await train({ model: second, data: new ListSource(batches), steps: 6, lr: 5e-3, warmupSteps: 2, gradAccum: 2, outputDir: out, checkpointEvery: 2 });
    expect(r2.steps).toBe(6);
    expect(r2.losses[0]!.step).toBe(4);
    const w1 = await weights(straight);
    const w2 = await weights(second);
    w1.forEach((w, i) => expect(w.equals(w2[i]!), straight.namedParameters()[i]![0]).toBe(true));
    const metrics = (await readFile(join(out, 'metrics.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
    expect(metrics.map((m) => m.step)).toEqual([1, 2, 3, 4, 5, 6]);
    for (const m of [straight, first, second]) m.dispose();
  });

  it('full-parameter checkpoints resume too', async () => {
    const batches = [batch([pattern(1, 10, 32)]), batch([pattern(2, 10, 32)])];
    const make = () => {
      const m = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 4 });
      m.requiresGrad(true);
      return m;
    };
    const straight = make();
    await train({ model: straight, data: new ListSource(batches), steps: 4, lr: 2e-3 });
    const out = join(dir, 'resume-full');
    const first = make();
    const c = new AbortController();
    await train({ model: first, data: new ListSource(batches), steps: 4, lr: 2e-3, outputDir: out, signal: c.signal, onProgress: (e) => e.step === 2 && c.abort() });
    const second = make();
    await train({ model: second, data: new ListSource(batches), steps: 4, lr: 2e-3, outputDir: out });
    const w1 = await weights(straight);
    const w2 = await weights(second);
    w1.forEach((w, i) => expect(w.equals(w2[i]!)).toBe(true));
    for (const m of [straight, first, second]) m.dispose();
  });

  it('live tensors and bytes stay flat over 200 steps', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 32 }, { seed: 6 });
    tk.applyLora(model, { r: 2, targetModules: 'all-linear', dropout: 0.1 });
    const seen: { tensors: number; bytes: number }[] = [];
    await train({
      model,
      data: new ListSource([batch([pattern(0, 16, 32), pattern(1, 16, 32)]), batch([pattern(2, 16, 32)])]),
      steps: 200,
      lr: 1e-3,
      gradAccum: 2,
      onProgress: () => {
        const m = tk.memory().cpu!;
        seen.push({ tensors: m.tensors, bytes: m.bytes });
      },
    });
    expect(seen).toHaveLength(200);
    // From the second step on (the optimizer's moments exist), nothing grows.
    for (const m of seen.slice(1)) expect(m).toEqual(seen[1]);
    model.dispose();
  });

  it('schedules: warmup, cosine and linear decay to the floor, constant', () => {
    const s = { lr: 1, warmupSteps: 4, totalSteps: 14, minLrRatio: 0.1 };
    expect([0, 1, 2, 3].map((i) => lrAt(s, i))).toEqual([0.25, 0.5, 0.75, 1]);
    expect(lrAt(s, 4)).toBeCloseTo(1);
    expect(lrAt(s, 9)).toBeCloseTo(0.55);
    expect(lrAt(s, 14)).toBeCloseTo(0.1);
    expect(lrAt({ ...s, kind: 'linear' }, 9)).toBeCloseTo(0.55);
    expect(lrAt({ ...s, kind: 'constant' }, 12)).toBe(1);
  });

  it('rejects a model with nothing to train and batches with no targets', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 32 });
    await expect(train({ model, data: new ListSource([batch([pattern(0, 8, 32)])]), steps: 1 })).rejects.toThrow(/no trainable parameters/);
    model.requiresGrad(true);
    await expect(train({ model, data: new ListSource([batch([pattern(0, 8, 32)], () => false)]), steps: 1 })).rejects.toThrow(/no target tokens/);
    model.dispose();
  });
});

describe('activation checkpointing (checkpointLayers)', () => {
  // A QLoRA model with LoRA dropout: the recomputation in backward must redraw the same masks.
  function qloraModel(): CausalLM {
    const model = tk.createModel({ preset: 'tiny', vocabSize: 260 }, { seed: 21, quantize: 'nf4' });
    tk.applyLora(model, { r: 8, dropout: 0.1, targetModules: 'all-linear', seed: 5 });
    return model;
  }

  /** LoRA gradients of one forward + backward, and the peak allocation above what was live before it. */
  async function step(model: CausalLM, checkpointLayers: boolean): Promise<{ grads: Float32Array[]; peak: number }> {
    const B = 2;
    const T = 512;
    const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 37 + 11) % 260);
    const targets = Int32Array.from({ length: B * T }, (_, i) => (i * 53 + 7) % 260);
    const params = model.trainableParameters().map(([, t]) => t);
    tk.synchronize();
    tk.resetPeakMemory();
    const before = tk.memory().cpu!.allocatedBytes;
    tk.manualSeed(77);
    tk.tidy(() => {
      const x = tk.tensor(ids, [B, T]);
      const h = model.hidden(x, { checkpointLayers });
      tk.ops.linearCrossEntropy(h, model.lmHeadWeight, tk.tensor(targets, [B, T]), { reduction: 'sum' }).backward();
    });
    tk.synchronize();
    const peak = tk.memory().cpu!.peakAllocatedBytes - before;
    const grads = await Promise.all(params.map((p) => p.grad!.toArray() as Promise<Float32Array>));
    for (const p of params) p.grad = null;
    return { grads, peak };
  }

  it('gives the same LoRA gradients, bit for bit, with a fraction of the activation memory', async () => {
    const model = qloraModel();
    try {
      const plain = await step(model, false);
      const checkpointed = await step(model, true);
      expect(checkpointed.grads.length).toBe(4 * 7 * 2);
      expect(checkpointed.grads).toEqual(plain.grads);
      expect(plain.grads.some((g) => g.some((v) => v !== 0))).toBe(true);
      // Without checkpointing every layer's activations are alive at the start of backward; with
      // it only the layer inputs are, plus one layer's activations while it is recomputed.
      expect(checkpointed.peak).toBeLessThan(0.5 * plain.peak);
      console.log(`checkpointLayers: peak activation memory ${(checkpointed.peak / 2 ** 20).toFixed(1)} MiB vs ${(plain.peak / 2 ** 20).toFixed(1)} MiB`);
    } finally {
      model.dispose();
    }
  });
});
