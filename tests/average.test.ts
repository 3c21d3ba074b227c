// Checkpoint averaging: weighted means of f32, bf16, f16 and sharded checkpoints against a float64
// reference computed from the loaded models, the result loading as a model, the rounding of the
// number formats the averager encodes itself, and every rejection of bad input, each named.
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { SafetensorsTensorInput } from '../lib/io/safetensors-format.js';
import { AverageError, averageCheckpoints, bf16FromNumber, f16FromNumber, f16Table } from '../lib/models/average.js';
import { lcg, roundBf16 } from './helpers.js';

const V = 40;
let root: string;
let A: string;
let B: string;
let C: string;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'tunekit-average-'));
  [A, B, C] = ['a', 'b', 'c'].map((n) => join(root, n)) as [string, string, string];
  for (const [dir, seed] of [[A, 1], [B, 2], [C, 3]] as const) {
    const model = tk.createModel({ preset: 'micro', vocabSize: V }, { seed });
    // Only B has a tokenizer: the average must take it from the first directory that has one.
    await tk.saveModel(model, dir, dir === B ? { tokenizer: new tk.ByteTokenizer() } : {});
    model.dispose();
  }
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Every parameter of a saved model, widened to float32 by the loader. */
async function params(dir: string): Promise<Map<string, Float32Array>> {
  const model = await tk.loadModel(dir);
  const out = new Map(model.namedParameters().map(([n, t]) => [n, (t.toArraySync() as Float32Array).slice()]));
  model.dispose();
  return out;
}

/** sum_i w_i x_i in float64, with the weights normalized to sum 1. */
function reference(inputs: Map<string, Float32Array>[], weights: number[]): Map<string, Float64Array> {
  const total = weights.reduce((a, b) => a + b, 0);
  const out = new Map<string, Float64Array>();
  for (const name of inputs[0]!.keys()) {
    const r = new Float64Array(inputs[0]!.get(name)!.length);
    for (const [i, p] of inputs.entries()) {
      const x = p.get(name)!;
      for (let j = 0; j < r.length; j++) r[j] += (weights[i]! / total) * x[j]!;
    }
    out.set(name, r);
  }
  return out;
}

/** Every value within `rel` of the reference, relative to its magnitude (half an ulp of the output format). */
function expectClose(got: Map<string, Float32Array>, ref: Map<string, Float64Array>, rel: number): void {
  expect([...got.keys()].sort()).toEqual([...ref.keys()].sort());
  for (const [name, r] of ref) {
    const g = got.get(name)!;
    expect(g.length, name).toBe(r.length);
    let worst = 0;
    for (let j = 0; j < r.length; j++) {
      const err = Math.abs(g[j]! - r[j]!) - rel * Math.abs(r[j]!) * (1 + 1e-9);
      worst = Math.max(worst, err);
    }
    expect(worst, name).toBeLessThanOrEqual(1e-45);
  }
}

async function dtypesOf(dir: string): Promise<Set<string>> {
  const ckpt = await tk.io.openCheckpoint(dir);
  const out = new Set([...ckpt.tensors.values()].map((t) => t.dtype));
  await ckpt.close();
  return out;
}

async function expectFiniteLogits(dir: string): Promise<void> {
  const model = await tk.loadModel(dir);
  const ids = tk.tensor(new Int32Array([1, 5, 9, 33, 2, 0]), [2, 3]);
  const logits = tk.tidy(() => tk.noGrad(() => model.forward(ids).toArraySync() as Float32Array));
  expect(logits.length).toBe(2 * 3 * V);
  expect(logits.every(Number.isFinite)).toBe(true);
  ids.dispose();
  model.dispose();
}

/** A copy of a single-file checkpoint directory with its tensor list edited. */
async function rewrite(src: string, dst: string, edit: (list: SafetensorsTensorInput[]) => SafetensorsTensorInput[]): Promise<string> {
  await mkdir(dst, { recursive: true });
  await copyFile(join(src, 'config.json'), join(dst, 'config.json'));
  const ckpt = await tk.io.openCheckpoint(src);
  const list: SafetensorsTensorInput[] = [];
  for (const info of ckpt.tensors.values()) list.push({ name: info.name, dtype: info.dtype, shape: [...info.shape], data: await ckpt.read(info.name) });
  await ckpt.close();
  await tk.io.writeSafetensors(join(dst, 'model.safetensors'), edit(list));
  return dst;
}

describe('averageCheckpoints', () => {
  it('averages two f32 checkpoints uniformly; the result loads, with config.json and the tokenizer', async () => {
    const out = join(root, 'avg-ab');
    const result = await averageCheckpoints([A, B], out);
    const [pa, pb, got] = await Promise.all([params(A), params(B), params(out)]);
    expectClose(got, reference([pa, pb], [1, 1]), 2 ** -24);
    const elements = [...pa.values()].reduce((n, x) => n + x.length, 0);
    expect(result).toEqual({ tensors: pa.size, bytes: elements * 4, files: [join(out, 'model.safetensors')] });
    expect(await dtypesOf(out)).toEqual(new Set(['F32']));

    expect(JSON.parse(await readFile(join(out, 'config.json'), 'utf8'))).toEqual(JSON.parse(await readFile(join(A, 'config.json'), 'utf8')));
    const files = (await readdir(out)).sort();
    expect(files).toEqual(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect(await readFile(join(out, 'tokenizer.json'), 'utf8')).toBe(await readFile(join(B, 'tokenizer.json'), 'utf8'));
    await expectFiniteLogits(out);
  });

  it('averages three checkpoints with weights, normalized; zero weights and repeats are exact', async () => {
    const [pa, pb, pc] = await Promise.all([params(A), params(B), params(C)]);
    const progress: number[] = [];
    const out = join(root, 'avg-abc');
    await averageCheckpoints([A, B, C], out, { weights: [1, 2, 5], onProgress: (p) => progress.push(p.tensorsDone) });
    expectClose(await params(out), reference([pa, pb, pc], [1, 2, 5]), 2 ** -24);
    expect(progress).toEqual(Array.from({ length: pa.size }, (_, i) => i + 1));

    await averageCheckpoints([A, B, C], join(root, 'avg-abc-uniform'));
    expectClose(await params(join(root, 'avg-abc-uniform')), reference([pa, pb, pc], [1, 1, 1]), 2 ** -24);

    // A weight of 1 on one checkpoint, or the same checkpoint twice, must reproduce it bit for bit.
    await averageCheckpoints([A, B, C], join(root, 'only-b'), { weights: [0, 3, 0] });
    await averageCheckpoints([C, C, C], join(root, 'c-thrice'));
    expect(await readFile(join(root, 'only-b', 'model.safetensors'))).toEqual(await readFile(join(B, 'model.safetensors')));
    expect(await readFile(join(root, 'c-thrice', 'model.safetensors'))).toEqual(await readFile(join(C, 'model.safetensors')));
  });

  it('bf16 checkpoints average to bf16; dtype: bf16 converts; mixed inputs take the first dtype', async () => {
    const models = await Promise.all([A, B].map((d) => tk.loadModel(d)));
    const [A16, B16] = [join(root, 'a16'), join(root, 'b16')];
    await tk.saveModel(models[0]!, A16, { dtype: 'bf16' });
    await tk.saveModel(models[1]!, B16, { dtype: 'bf16' });
    for (const m of models) m.dispose();
    const [pa16, pb16, pa, pb] = await Promise.all([params(A16), params(B16), params(A), params(B)]);

    const out = join(root, 'avg-bf16');
    await averageCheckpoints([A16, B16], out, { weights: [3, 1] });
    expect(await dtypesOf(out)).toEqual(new Set(['BF16']));
    expect(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')).torch_dtype).toBe('bfloat16');
    const got = await params(out);
    expectClose(got, reference([pa16, pb16], [3, 1]), 2 ** -8);
    for (const x of got.values()) expect(roundBf16(x)).toEqual(x);
    await expectFiniteLogits(out);

    const converted = join(root, 'avg-to-bf16');
    await averageCheckpoints([A, B], converted, { dtype: 'bf16' });
    expect(await dtypesOf(converted)).toEqual(new Set(['BF16']));
    expect(JSON.parse(await readFile(join(converted, 'config.json'), 'utf8')).torch_dtype).toBe('bfloat16');
    expectClose(await params(converted), reference([pa, pb], [1, 1]), 2 ** -8);

    const mixed = join(root, 'avg-mixed');
    await averageCheckpoints([A, B16], mixed);
    expect(await dtypesOf(mixed)).toEqual(new Set(['F32']));
    expectClose(await params(mixed), reference([pa, pb16], [1, 1]), 2 ** -24);
  });

  it('reads sharded checkpoints and writes shards with an index; stale files of an earlier save go', async () => {
    const model = await tk.loadModel(A);
    const sharded = join(root, 'a-sharded');
    await tk.saveModel(model, sharded, { maxShardBytes: 20000 });
    model.dispose();
    expect((await readdir(sharded)).filter((f) => f.endsWith('.safetensors')).length).toBeGreaterThan(1);
    const [pa, pc] = await Promise.all([params(A), params(C)]);

    const out = join(root, 'avg-sharded');
    const single = await averageCheckpoints([sharded, C], out, { weights: [2, 1] });
    expect(single.files).toEqual([join(out, 'model.safetensors')]);
    expectClose(await params(out), reference([pa, pc], [2, 1]), 2 ** -24);

    // The same directory again, now sharded: the single file of the first run must not survive.
    const again = await averageCheckpoints([sharded, C], out, { weights: [2, 1], maxShardBytes: 16000 });
    expect(again.files.length).toBeGreaterThan(1);
    const index = JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8'));
    expect(index.metadata.total_size).toBe(again.bytes);
    expect(new Set(Object.values(index.weight_map))).toEqual(new Set(again.files.map((f) => f.slice(out.length + 1))));
    expect((await readdir(out)).includes('model.safetensors')).toBe(false);
    expectClose(await params(out), reference([pa, pc], [2, 1]), 2 ** -24);
    await expectFiniteLogits(out);

    // And back to one file: the index and the shards must go.
    await averageCheckpoints([sharded, C], out, { weights: [2, 1] });
    expect((await readdir(out)).filter((f) => f.startsWith('model')).sort()).toEqual(['model.safetensors']);
  });

  it('streams a tensor larger than one chunk, across inputs of different dtypes', async () => {
    // 1.1M elements: more than the averager's 2^20-element chunk, so the chunk offsets (in
    // elements, read at 4 bytes in one input and 2 in the other) are exercised.
    const n = 1100 * 1000;
    const big = lcg(n, 21);
    const big16 = new Uint16Array(new Uint32Array(roundBf16(lcg(n, 22)).buffer).map((u) => u >>> 16));
    const x = await rewrite(A, join(root, 'big-f32'), (l) => [...l, { name: 'big', dtype: 'F32', shape: [1100, 1000], data: big }]);
    const y = await rewrite(A, join(root, 'big-bf16'), (l) => [...l, { name: 'big', dtype: 'BF16', shape: [1100, 1000], data: big16 }]);
    const out = join(root, 'avg-big');
    await averageCheckpoints([x, y], out, { weights: [1, 3] });
    const ckpt = await tk.io.openCheckpoint(out);
    const bytes = await ckpt.read('big');
    await ckpt.close();
    const got = new Float32Array(bytes.buffer, bytes.byteOffset, n);
    const y32 = new Float32Array(new Uint32Array(big16).map((h) => h << 16).buffer);
    let bad = 0;
    for (let j = 0; j < n; j++) if (got[j] !== Math.fround(0.25 * big[j]! + 0.75 * y32[j]!)) bad++;
    expect(bad).toBe(0);
  });

  it('f16 checkpoints average to f16, rounded to nearest', async () => {
    // f16 values from random bits (exponents 5..24: magnitudes 2^-10 to 2^9), decoded here by formula.
    const decode = (h: number) => {
      const e = (h >> 10) & 31;
      const m = h & 1023;
      const v = e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15);
      return h & 0x8000 ? -v : v;
    };
    const ckpt = await tk.io.openCheckpoint(A);
    const infos = [...ckpt.tensors.values()];
    await ckpt.close();
    const dirs: string[] = [];
    const values: Map<string, Float32Array>[] = [];
    for (const seed of [11, 12]) {
      const dir = join(root, `f16-${seed}`);
      const vals = new Map<string, Float32Array>();
      dirs.push(
        await rewrite(A, dir, () =>
          infos.map((info) => {
            const n = info.shape.reduce((a, b) => a * b, 1);
            const r = lcg(2 * n, seed * 1000 + info.name.length);
            const bits = new Uint16Array(n);
            for (let j = 0; j < n; j++) bits[j] = (r[2 * j]! < 0 ? 0x8000 : 0) | ((5 + Math.floor((r[2 * j + 1]! + 1) * 10)) << 10) | Math.floor(((r[2 * j]! + 1) * 1e4) % 1024);
            vals.set(info.name, Float32Array.from(bits, decode));
            return { name: info.name, dtype: 'F16' as const, shape: [...info.shape], data: bits };
          }),
        ),
      );
      values.push(vals);
    }
    const out = join(root, 'avg-f16');
    await averageCheckpoints(dirs, out, { weights: [1, 2] });
    expect(await dtypesOf(out)).toEqual(new Set(['F16']));
    expect(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')).torch_dtype).toBe('float16');
    const ref = reference(values, [1, 2]);
    const result = await tk.io.openCheckpoint(out);
    for (const [name, r] of ref) {
      const bytes = await result.read(name);
      const got = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
      for (let j = 0; j < r.length; j++) {
        const g = decode(got[j]!);
        // Half an ulp: ulps are 2^-10 of the binade, and subnormals 2^-24.
        const ulp = Math.max(2 ** (Math.floor(Math.log2(Math.abs(r[j]!) || 1)) - 10), 2 ** -24);
        if (Math.abs(g - r[j]!) > ulp / 2 + 1e-12 * Math.abs(r[j]!)) expect.fail(`${name}[${j}]: ${g} vs ${r[j]}`);
      }
    }
    await result.close();
  });

  it('rejects bad input, naming the directory and the key or tensor, before writing anything', async () => {
    const out = join(root, 'never-written');
    const rejects = (p: Promise<unknown>, message: string) => expect(p).rejects.toThrow(message);

    await rejects(averageCheckpoints([], out), 'averageCheckpoints: no checkpoint directories given; pass at least one');
    await expect(averageCheckpoints([], out)).rejects.toBeInstanceOf(AverageError);
    const missing = join(root, 'no-such-dir');
    await rejects(averageCheckpoints([A, missing], out), `averageCheckpoints: ${missing} does not exist`);
    const empty = join(root, 'empty');
    await mkdir(empty, { recursive: true });
    await rejects(averageCheckpoints([A, empty], out), `averageCheckpoints: ${empty} has no config.json`);
    await rejects(averageCheckpoints([A, join(A, 'config.json')], out), 'is not a directory');
    await rejects(averageCheckpoints([A, B], A), `averageCheckpoints: the output directory ${A} is also an input (${A})`);
    const link = join(root, 'link-to-b');
    await symlink(B, link);
    await rejects(averageCheckpoints([A, B], link), `averageCheckpoints: the output directory ${link} is also an input (${B})`);

    // Weights.
    await rejects(averageCheckpoints([A, B], out, { weights: [1] }), 'averageCheckpoints: 1 weight for 2 checkpoints; give one weight per directory');
    await rejects(averageCheckpoints([A, B], out, { weights: [1, -0.5] }), 'averageCheckpoints: weights[1] is -0.5; weights must be finite and non-negative');
    await rejects(averageCheckpoints([A, B], out, { weights: [NaN, 1] }), 'weights[0] is NaN');
    await rejects(averageCheckpoints([A, B], out, { weights: [1, Infinity] }), 'weights[1] is Infinity');
    await rejects(averageCheckpoints([A, B], out, { weights: [0, 0] }), 'averageCheckpoints: the weights are all zero; at least one checkpoint needs a positive weight');
    await rejects(averageCheckpoints([A, B], out, { dtype: 'f16' as 'f32' }), `dtype must be 'f32' or 'bf16', got "f16"`);

    // Architectures: each differing key named, with both directories.
    const wide = join(root, 'vocab48');
    const deep = join(root, 'layers3');
    const qwen = join(root, 'qwen2');
    for (const [dir, config] of [
      [wide, tk.presetConfig('micro', 48)],
      [deep, tk.presetConfig('micro', V, { num_hidden_layers: 3 })],
      [qwen, tk.presetConfig('micro', V, { model_type: 'qwen2' })],
    ] as const) {
      const m = tk.createModel(config, { seed: 4 });
      await tk.saveModel(m, dir);
      m.dispose();
    }
    await rejects(averageCheckpoints([A, wide], out), `averageCheckpoints: ${A} and ${wide} are different architectures: vocab_size is 40 in ${A} but 48 in ${wide}`);
    await rejects(averageCheckpoints([A, B, deep], out), `averageCheckpoints: ${A} and ${deep} are different architectures: num_hidden_layers is 2 in ${A} but 3 in ${deep}`);
    await rejects(averageCheckpoints([qwen, A], out), `different architectures: model_type is "qwen2" in ${qwen} but "llama" in ${A}`);
    const badConfig = join(root, 'bad-config');
    await rewrite(A, badConfig, (l) => l);
    await writeFile(join(badConfig, 'config.json'), JSON.stringify({ model_type: 'llama', vocab_size: -1 }));
    await rejects(averageCheckpoints([A, badConfig], out), `${join(badConfig, 'config.json')}: invalid model config`);

    // Tensors: a missing one, an extra one, a different shape, a dtype that cannot be averaged.
    const name = 'model.norm.weight';
    const noNorm = await rewrite(A, join(root, 'no-norm'), (l) => l.filter((t) => t.name !== name));
    await rejects(averageCheckpoints([A, noNorm], out), `averageCheckpoints: tensor "${name}" is in ${A} but not in ${noNorm}`);
    await rejects(averageCheckpoints([noNorm, A], out), `averageCheckpoints: tensor "${name}" is in ${A} but not in ${noNorm}`);
    const extra = await rewrite(A, join(root, 'extra'), (l) => [...l, { name: 'extra.weight', dtype: 'F32', shape: [2], data: new Float32Array(2) }]);
    await rejects(averageCheckpoints([A, extra], out), `averageCheckpoints: tensor "extra.weight" is in ${extra} but not in ${A}`);
    const narrow = await rewrite(A, join(root, 'narrow'), (l) => l.map((t) => (t.name === name ? { ...t, shape: [31], data: new Float32Array(31) } : t)));
    await rejects(averageCheckpoints([A, narrow], out), `averageCheckpoints: tensor "${name}" has shape [32] in ${A} but [31] in ${narrow}`);
    const ints = await rewrite(A, join(root, 'ints'), (l) => l.map((t) => (t.name === name ? { ...t, dtype: 'I32' as const, data: new Int32Array(32) } : t)));
    await rejects(averageCheckpoints([A, ints], out), `averageCheckpoints: tensor "${name}" in ${ints} has dtype I32; only F32, BF16, F16 tensors can be averaged`);
    // A broken file is the reader's error, which names the file.
    const broken = await rewrite(A, join(root, 'broken'), (l) => l);
    await writeFile(join(broken, 'model.safetensors'), new Uint8Array(4));
    await rejects(averageCheckpoints([A, broken], out), join(broken, 'model.safetensors'));

    expect(await stat(out).catch(() => null)).toBeNull();
  });
});

describe('number formats', () => {
  it('f16: every finite value round-trips; ties go to even; overflow and underflow', () => {
    const table = f16Table();
    for (let h = 0; h < 65536; h++) {
      if (((h >> 10) & 31) === 31 && (h & 1023) !== 0) {
        expect(Number.isNaN(table[h])).toBe(true);
        continue;
      }
      if (f16FromNumber(table[h]!) !== h) expect.fail(`f16 ${h.toString(16)}: ${table[h]} encodes to ${f16FromNumber(table[h]!).toString(16)}`);
    }
    expect(f16FromNumber(1 + 2 ** -11)).toBe(0x3c00);
    expect(f16FromNumber(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(f16FromNumber(1 + 2 ** -11 + 2 ** -40)).toBe(0x3c01);
    expect(f16FromNumber(65519)).toBe(0x7bff);
    expect(f16FromNumber(65520)).toBe(0x7c00);
    expect(f16FromNumber(-1e9)).toBe(0xfc00);
    expect(f16FromNumber(2 ** -25)).toBe(0);
    expect(f16FromNumber(3 * 2 ** -25)).toBe(2);
    expect(f16FromNumber(2 ** -14 - 2 ** -26)).toBe(0x0400);
    expect(f16FromNumber(-0)).toBe(0x8000);
    expect(Number.isNaN(table[f16FromNumber(NaN)])).toBe(true);
  });

  it('bf16: matches round-to-nearest-even of float32, and rounds float64 once', () => {
    const x = lcg(4096, 9).map((v, i) => v * 2 ** ((i % 60) - 30));
    const want = new Uint32Array(roundBf16(x).buffer);
    for (let i = 0; i < x.length; i++) expect(bf16FromNumber(x[i]!), String(x[i])).toBe(want[i]! >>> 16);
    expect(bf16FromNumber(1 + 2 ** -8)).toBe(0x3f80);
    expect(bf16FromNumber(1 + 3 * 2 ** -8)).toBe(0x3f82);
    // Rounded to float32 first, this would be the tie 1 + 2^-8 and go down to 1.
    expect(bf16FromNumber(1 + 2 ** -8 + 2 ** -40)).toBe(0x3f81);
    expect(bf16FromNumber(1 + 2 ** -8 - 2 ** -40)).toBe(0x3f80);
    expect(bf16FromNumber(-(1 + 2 ** -8 + 2 ** -40))).toBe(0xbf81);
    expect(bf16FromNumber(3.4e38)).toBe(0x7f80);
    expect(bf16FromNumber(-Infinity)).toBe(0xff80);
    expect(bf16FromNumber(NaN) & 0x7fc0).toBe(0x7fc0);
  });
});
