// Device placement, checked without a GPU on the 'cuda-standin' device: CPU memory and kernels,
// but a device of its own that refuses ops without a CUDA kernel. A run on it fails if any tensor
// the library builds (a batch, a LoRA pair, an optimizer moment, a KV-cache segment id) lands on
// 'cpu' instead of the model's device, or if any op it uses lacks a CUDA kernel; and since its
// kernels are the CPU's, its results must be bit-identical to the same run on 'cpu'.
// The kernels themselves are checked by the CUDA native tests, which need a GPU.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM } from '../lib/index.js';
import { parseRecipe, runRecipe, type RecipeInput } from '../lib/train/index.js';

process.env.TUNEKIT_CUDA_STANDIN = '1';
const STANDIN = 'cuda-standin';
const cudaBuild = tk.info().cuda.compiled;

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-device-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const tok = new tk.ByteTokenizer();

function devicesOf(model: CausalLM): Set<string> {
  const out = new Set(model.namedParameters().map(([, t]) => t.device));
  for (const [, l] of model.linearLayers()) if (l.quantized) for (const t of [l.quantized.packed, l.quantized.absmax]) out.add(t.device);
  return out;
}

async function logitsOf(model: CausalLM, ids: number[]): Promise<Float32Array> {
  const logits = tk.tidy(() => tk.noGrad(() => model.forward(tk.tensor(Int32Array.from(ids), [1, ids.length], { device: model.device })).to('f32')));
  try {
    return (await logits.toArray()) as Float32Array;
  } finally {
    logits.dispose();
  }
}

describe.skipIf(!cudaBuild)('the cuda-standin device', () => {
  it('is a device of its own: mixing it with cpu tensors is an error that names both', async () => {
    using scope = tk.scope();
    const a = tk.tensor([[1, 2], [3, 4]], undefined, { device: STANDIN });
    const b = tk.tensor([[1, 0], [0, 1]]);
    expect(a.device).toBe(STANDIN);
    const c = tk.ops.matmul(a, a);
    expect(c.device).toBe(STANDIN);
    expect(await c.toArray()).toEqual(new Float32Array([7, 10, 15, 22]));
    expect(() => tk.ops.matmul(a, b)).toThrow(/operands are on different devices \(\[2, 2\] f32 on cuda-standin and \[2, 2\] f32 on cpu\); move one with t.to\('cuda-standin'\)/);
    const back = a.to('cpu');
    expect(back.device).toBe('cpu');
    expect(await back.toArray()).toEqual(new Float32Array([1, 2, 3, 4]));
    expect(tk.memory()[STANDIN]!.tensors).toBe(2);
    expect(tk.memory().cpu!.tensors).toBe(2);
    void scope;
  });

  it('needs TUNEKIT_CUDA_STANDIN=1, and says so', () => {
    delete process.env.TUNEKIT_CUDA_STANDIN;
    try {
      expect(() => tk.zeros([2], { device: STANDIN })).toThrow(/'cuda-standin' is a testing device; set TUNEKIT_CUDA_STANDIN=1/);
    } finally {
      process.env.TUNEKIT_CUDA_STANDIN = '1';
    }
  });

  it('createModel and loadModel put every weight (NF4 parts too) on the device, with the CPU\'s logits', async () => {
    const config = { preset: 'micro' as const, vocabSize: tok.vocabSize };
    const cpu = tk.createModel(config, { seed: 4 });
    const dense = join(dir, 'dense');
    await tk.saveModel(cpu, dense, { tokenizer: tok });
    const created = tk.createModel(config, { seed: 4, device: STANDIN, quantize: 'nf4' });
    const loaded = await tk.loadModel(dense, { device: STANDIN, quantize: 'nf4' });
    const loadedCpu = await tk.loadModel(dense, { quantize: 'nf4' });
    try {
      expect(created.device).toBe(STANDIN);
      expect(devicesOf(created)).toEqual(new Set([STANDIN]));
      expect(devicesOf(loaded)).toEqual(new Set([STANDIN]));
      expect(loaded.linearLayers().every(([, l]) => l.quantized !== null)).toBe(true);
      const ids = [5, 9, 2, 77, 31];
      const want = await logitsOf(loadedCpu, ids);
      expect(await logitsOf(loaded, ids)).toEqual(want);
      // Same seed, same weights: created on the device and quantized there, or loaded and quantized.
      expect(await logitsOf(created, ids)).toEqual(want);
    } finally {
      for (const m of [cpu, created, loaded, loadedCpu]) m.dispose();
    }
  });

  it('loadModel on a device that does not exist fails before reading, naming the device', async () => {
    const d = join(dir, 'small');
    const m = tk.createModel({ preset: 'micro', vocabSize: tok.vocabSize }, { seed: 1 });
    await tk.saveModel(m, d, { tokenizer: tok });
    m.dispose();
    const devices = tk.info().cuda.devices.length;
    await expect(tk.loadModel(d, { device: `cuda:${devices}` as 'cuda' })).rejects.toThrow(new RegExp(`device 'cuda:${devices}' (is not available|does not exist)`));
    await expect(tk.loadModel(d, { device: 'gpu' as 'cuda' })).rejects.toThrow(/loadModel: unknown device 'gpu'; use 'cpu', 'cuda' or 'cuda:N'/);
    expect(() => tk.createModel({ preset: 'micro', vocabSize: 300 }, { device: 'tpu' as 'cuda' })).toThrow(/createModel: unknown device 'tpu'/);
  });

  // The whole recipe book on the device: full pretraining, QLoRA SFT with layer checkpointing and
  // LoRA dropout (the recomputation must replay the masks), DPO with LoRA, distillation into a
  // fresh student; then generation from the result. Every loss equals the CPU run's bit for bit.
  const stages = (out: string): RecipeInput['stages'] => {
    const text = tk.synthetic.pretrainCorpus(120, 5, { mix: { arithmetic: 1, prose: 1 } });
    const sft = Array.from({ length: 48 }, (_, i) => ({ instruction: `add ${i} and ${i + 1}`, output: String(2 * i + 1) }));
    const pairs = Array.from({ length: 24 }, (_, i) => ({ prompt: `pick ${i}`, chosen: String(2 * i), rejected: String(2 * i + 1) }));
    return [
      { name: 'pre', type: 'pretrain', data: text, seqLen: 64, batchSize: 4, steps: 3, lr: 1e-3 },
      { name: 'sft', type: 'sft', data: sft, seqLen: 64, batchSize: 4, gradAccum: 2, steps: 3, lr: 1e-3, checkpointLayers: true, lora: { r: 4, quantize: 'nf4', dropout: 0.1, targetModules: 'all-linear' } },
      { name: 'dpo', type: 'dpo', data: pairs, seqLen: 32, batchSize: 4, steps: 2, lr: 1e-3, lora: { r: 4 } },
      { name: 'distill', type: 'distill', teacher: join(out, 'sft', 'model'), student: { preset: 'micro', seed: 9 }, data: text, seqLen: 64, batchSize: 4, steps: 2 },
    ];
  };

  async function runOn(device: string, dtype: 'f32' | 'bf16') {
    const out = join(dir, `book-${device}-${dtype}`);
    const trained: string[] = [];
    const outcomes = await runRecipe(parseRecipe({ model: { preset: 'micro', seed: 3 }, output: out, device, dtype, stages: stages(out) }), {
      // What each stage trains (always f32: the optimizer's master copy) and what it computes in.
      beforeStage: (stage, model) => {
        trained.push(`${stage.name}: ${[...new Set(model.trainableParameters().map(([, t]) => t.dtype))].join()} trained, ${model.lmHeadWeight.dtype} head`);
      },
    });
    const model = await tk.loadModel(join(out, 'sft', 'model'), { device: device as 'cpu', dtype });
    try {
      const [text] = await tk.generate(model, tok, ['add 3 and 4'], { maxNewTokens: 6, temperature: 0.8, seed: 2 });
      return { losses: outcomes.map((o) => o.result!.losses.map((l) => l.loss)), text, params: devicesOf(model), trained };
    } finally {
      model.dispose();
    }
  }

  for (const dtype of ['f32', 'bf16'] as const) {
    it(`runs pretrain, QLoRA SFT (checkpointed layers), DPO, distillation and generation in ${dtype}, as on the CPU`, async () => {
      const cpuBefore = tk.memory().cpu!.tensors;
      const onDevice = await runOn(STANDIN, dtype);
      // Nothing the run left behind, and nothing it kept on the CPU.
      expect(tk.memory()[STANDIN]!.tensors).toBe(0);
      expect(tk.memory().cpu!.tensors).toBe(cpuBefore);
      const onCpu = await runOn('cpu', dtype);
      expect(onDevice.params).toEqual(new Set([STANDIN]));
      expect(onDevice.losses.map((l) => l.length)).toEqual([3, 3, 2, 2]);
      expect(onDevice.losses.flat().every(Number.isFinite)).toBe(true);
      expect(onDevice.losses).toEqual(onCpu.losses);
      expect(onDevice.text).toBe(onCpu.text);
      // LoRA stages keep their base in the recipe's dtype; full training keeps f32 weights.
      expect(onDevice.trained).toEqual(['pre: f32 trained, f32 head', `sft: f32 trained, ${dtype} head`, `dpo: f32 trained, ${dtype} head`, 'distill: f32 trained, f32 head']);
    });
  }

  it('the progress events of a run on a device report its peak memory', async () => {
    const out = join(dir, 'progress');
    const peaks: number[] = [];
    await runRecipe(
      parseRecipe({ model: { preset: 'micro', seed: 3 }, output: out, device: STANDIN, stages: [stages(out)[0]!] }),
      { onProgress: (_, e) => peaks.push(e.deviceMemoryBytes ?? -1) },
    );
    expect(peaks.length).toBe(3);
    for (const p of peaks) expect(p).toBeGreaterThan(0);
  });
});

describe('recipes name a bad device', () => {
  it('rejects an unknown device with the key path', () => {
    expect(() => parseRecipe({ model: { preset: 'micro' }, output: 'x', device: 'tpu', stages: [{ name: 'a', type: 'pretrain', data: ['x'] }] })).toThrow(/device: use 'cpu', 'cuda' or 'cuda:N'/);
  });
});
