// The second half of the recipe book on micro setups, each test failing if the stage's effect is
// not there: DPO raises held-out reward accuracy, distillation lowers the student's KL to its
// teacher, context extension (ABF + longer training) improves likelihood past the original length,
// and per-phase averaging writes the weighted average. Plus each stage's bad input.
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM } from '../lib/index.js';
import { preferenceAccuracy, readPreferences, referenceLogprobs, samplePreferencePairs, type TokenizedPair } from '../lib/train/dpo.js';
import { parseRecipe, runRecipe } from '../lib/train/index.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-stages-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const tok = new tk.ByteTokenizer();

/** Pairs whose chosen answer is an even number and rejected an odd one: a learnable preference. */
function parityPairs(n: number, seed: number) {
  let s = seed;
  const r = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  return Array.from({ length: n }, () => {
    const a = Math.floor(r() * 90) + 10;
    const even = Math.floor(r() * 45) * 2 + 10;
    const odd = Math.floor(r() * 45) * 2 + 11;
    return { prompt: `pick ${a}`, chosen: String(even), rejected: String(odd) };
  });
}

async function rewardAccuracy(policy: CausalLM, ref: { chosen: Float32Array; rejected: Float32Array }, pairs: TokenizedPair[]): Promise<number> {
  const lp = await referenceLogprobs(policy, pairs, { seqLen: 64, batchSize: 16 });
  let correct = 0;
  for (let i = 0; i < pairs.length; i++) correct += lp.chosen[i]! - ref.chosen[i]! > lp.rejected[i]! - ref.rejected[i]! ? 1 : 0;
  return correct / pairs.length;
}

describe('dpo stage', () => {
  it('raises held-out reward accuracy (LoRA; the reference is the base with adapters off)', async () => {
    const out = join(dir, 'dpo');
    const recipe = parseRecipe({
      model: { preset: 'micro', seed: 3 },
      output: out,
      stages: [{ name: 'dpo', type: 'dpo', data: parityPairs(96, 1), seqLen: 64, batchSize: 8, epochs: 3, lr: 5e-3, beta: 0.5, lora: { r: 8, targetModules: 'all-linear' } }],
    });
    const heldOut = await readPreferences(parityPairs(48, 777), tok);
    let ref!: { chosen: Float32Array; rejected: Float32Array };
    let before = -1;
    let after = -1;
    const metrics: number[] = [];
    await runRecipe(recipe, {
      beforeStage: async (_, model) => {
        ref = await referenceLogprobs(model, heldOut, { seqLen: 64, batchSize: 16 });
        before = await rewardAccuracy(model, ref, heldOut);
      },
      onProgress: (_, e) => metrics.push(e.metrics!.rewardAccuracy!),
      afterStage: async (_, model) => {
        after = await rewardAccuracy(model, ref, heldOut);
      },
    });
    expect(before).toBe(0);  // the policy equals its reference: no margin anywhere
    expect(after).toBeGreaterThan(0.8);
    expect(metrics.at(-1)).toBeGreaterThan(0.8);
    const saved = await tk.loadModel(join(out, 'dpo', 'model'));
    expect(await preferenceAccuracy(saved, heldOut, { seqLen: 64 })).toBeGreaterThan(0.8);
    saved.dispose();
  });

  it("iterative DPO: samples k answers, pairs the judge's best with its worst, trains each round", async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: tok.vocabSize }, { seed: 5 });
    // A judge that prefers longer answers: it must see k distinct samples per prompt.
    const seen: string[][] = [];
    const pairs = await samplePreferencePairs(model, tok, ['a', 'b', 'c'], (p, r) => {
      (seen[p.charCodeAt(0) - 97] ??= []).push(r);
      return r.length;
    }, { samples: 4, temperature: 1.5, maxNewTokens: 6, seed: 3 });
    model.dispose();
    expect(seen.map((s) => s.length)).toEqual([4, 4, 4]);
    for (const p of pairs) expect(p.chosen.length).toBeGreaterThan(p.rejected.length);
    expect(pairs.length).toBeGreaterThan(0);

    const judge = join(dir, 'judge.mjs');
    await writeFile(judge, 'export default (prompt, response) => response.length;\n');
    const out = join(dir, 'idpo');
    const recipe = parseRecipe({
      model: { preset: 'micro', seed: 3 },
      output: out,
      stages: [{ name: 'idpo', type: 'dpo', data: [{ prompt: 'x' }, { prompt: 'y' }, { prompt: 'z' }], seqLen: 64, batchSize: 4, steps: 2, lr: 1e-3, lora: { r: 2 }, iterative: { rounds: 2, samples: 3, judge: { module: judge }, maxNewTokens: 5 } }],
    });
    const outcomes = await runRecipe(recipe);
    expect(outcomes[0]!.result!.stopped).toBe('done');
    expect(await readFile(join(out, 'idpo', 'model', 'config.json'), 'utf8')).toMatch(/llama/);
    await expect(runRecipe(parseRecipe({ ...recipe, output: join(dir, 'idpo-bad'), stages: [{ ...recipe.stages[0]!, data: [{ question: 'x' }] }] }))).rejects.toThrow(/<records>:1: iterative DPO reads prompts/);
  });

  it('names a preference record missing a field, and a pair longer than seqLen', async () => {
    await expect(readPreferences([{ prompt: 'a', chosen: 'b' }], tok)).rejects.toThrow(/<records>:1: a preference record needs prompt, chosen and rejected .*rejected/);
    const recipe = parseRecipe({ model: { preset: 'micro' }, output: join(dir, 'dpo-long'), stages: [{ name: 'd', type: 'dpo', data: [{ prompt: 'x'.repeat(80), chosen: 'a', rejected: 'b' }], seqLen: 32 }] });
    await expect(runRecipe(recipe)).rejects.toThrow(/<records>:1: a preference pair is \d+ tokens long, more than seqLen 32/);
  });
});

describe('distill stage', () => {
  it("lowers the student's KL to the teacher on held-out text", async () => {
    // The teacher: a micro model briefly pretrained, so its distribution is not the student's.
    const text = tk.synthetic.pretrainCorpus(300, 5, { mix: { arithmetic: 1, prose: 1 } });
    const out = join(dir, 'distill');
    const teacherRecipe = parseRecipe({ model: { preset: 'micro', seed: 11 }, output: out, stages: [{ name: 'teacher', type: 'pretrain', data: text, seqLen: 64, batchSize: 8, steps: 30, lr: 3e-3 }] });
    await runRecipe(teacherRecipe);
    const teacherDir = join(out, 'teacher', 'model');
    const heldOut = tk.synthetic.pretrainCorpus(8, 99, { mix: { arithmetic: 1, prose: 1 } }).map((r) => r.text);
    const kl = async (studentDir: string) => {
      const [s, t] = [await tk.loadModel(studentDir), await tk.loadModel(teacherDir)];
      let total = 0;
      for (const line of heldOut) {
        const ids = tk.tensor(Int32Array.from(tok.encode(line).slice(0, 64)), [1, Math.min(64, tok.encode(line).length)]);
        total += tk.tidy(() => tk.noGrad(() => tk.ops.distillLoss(s.forward(ids), t.forward(ids), { kind: 'forward_kl' }).toArraySync()[0]!));
        ids.dispose();
      }
      s.dispose();
      t.dispose();
      return total / heldOut.length;
    };
    const recipe = parseRecipe({
      model: teacherDir,
      output: out,
      stages: [
        { name: 'student0', type: 'distill', teacher: teacherDir, student: { preset: 'micro', seed: 12 }, data: text, seqLen: 64, batchSize: 8, steps: 1, lr: 1e-9 },
        { name: 'student', type: 'distill', teacher: teacherDir, student: { preset: 'micro', seed: 12 }, data: text, seqLen: 64, batchSize: 8, steps: 40, lr: 3e-3, alpha: 0, temperature: 2 },
      ],
    });
    await runRecipe(recipe);
    const before = await kl(join(out, 'student0', 'model'));
    const after = await kl(join(out, 'student', 'model'));
    expect(after).toBeLessThan(0.6 * before);
  });

  it('rejects a teacher whose vocabulary differs from the student', async () => {
    const other = tk.createModel({ preset: 'micro', vocabSize: 300 });
    const teacherDir = join(dir, 'teacher-300');
    await tk.saveModel(other, teacherDir, { tokenizer: tok });
    other.dispose();
    const recipe = parseRecipe({ model: { preset: 'micro' }, output: join(dir, 'bad-distill'), stages: [{ name: 's', type: 'distill', teacher: teacherDir, data: [{ text: 'abc' }], seqLen: 16, batchSize: 1, steps: 1 }] });
    await expect(runRecipe(recipe)).rejects.toThrow(/teacher's vocabulary \(300 tokens\) differs from the student's \(262\)/);
  });
});

describe('context extension', () => {
  it('ABF + training at a longer length raises the needle likelihood past the original length', async () => {
    const out = join(dir, 'abf');
    const short = tk.synthetic.needleCorpus(200, 1, { length: 56 });
    const long = tk.synthetic.needleCorpus(200, 2, { length: [90, 120] });
    const recipe = parseRecipe({
      model: { preset: 'micro', seed: 4 },
      output: out,
      stages: [
        { name: 'short', type: 'pretrain', data: short, seqLen: 64, batchSize: 8, steps: 40, lr: 3e-3 },
        { name: 'extend', type: 'pretrain', data: long, seqLen: 128, batchSize: 8, steps: 40, lr: 2e-3, rope: { theta: 100000 } },
      ],
    });
    await runRecipe(recipe);
    const config = JSON.parse(await readFile(join(out, 'extend', 'model', 'config.json'), 'utf8'));
    expect(config.rope_theta).toBe(100000);
    const cases = tk.synthetic.niahGrid({ lengths: [120], depths: [0.2, 0.5, 0.8], perCell: 4, seed: 9 });
    const loglik = async (modelDir: string) => {
      const m = await tk.loadModel(modelDir);
      let total = 0;
      for (const c of cases) {
        const prompt = tok.encode(c.prompt + ' ');
        const answer = tok.encode(c.answer, { addSpecialTokens: false });
        const ids = [...prompt, ...answer];
        const targets = ids.map((_, i) => (i + 1 >= prompt.length && i + 1 < ids.length ? ids[i + 1]! : -100));
        total += tk.tidy(() => tk.noGrad(() => tk.ops.sequenceLogprobs(m.forward(tk.tensor(Int32Array.from(ids), [1, ids.length])), tk.tensor(Int32Array.from(targets), [1, ids.length])).toArraySync()[0]!));
      }
      m.dispose();
      return total / cases.length;
    };
    expect(await loglik(join(out, 'extend', 'model'))).toBeGreaterThan(await loglik(join(out, 'short', 'model')));
  });

  it('rejects a theta <= 1 and a scaling without its factor, naming the key', () => {
    const base = { model: { preset: 'micro' }, output: 'x' };
    expect(() => parseRecipe({ ...base, stages: [{ name: 'e', type: 'pretrain', data: 'a.jsonl', rope: { theta: 0 } }] })).toThrow(/stages\[0\]\.rope\.theta: theta must be > 1/);
    expect(() => parseRecipe({ ...base, stages: [{ name: 'e', type: 'pretrain', data: 'a.jsonl', rope: { scaling: { rope_type: 'yarn' } } }] })).toThrow(/stages\[0\]\.rope/);
  });
});

describe('average stage', () => {
  it('writes the weighted average of earlier stages, and rejects unknown stage names', async () => {
    const out = join(dir, 'avg');
    const text = [{ text: 'hello world' }, { text: 'more text here' }];
    const recipe = parseRecipe({
      model: { preset: 'micro', seed: 8 },
      output: out,
      stages: [
        { name: 'a', type: 'pretrain', data: text, seqLen: 16, batchSize: 2, steps: 2, lr: 1e-2 },
        { name: 'b', type: 'pretrain', data: text, seqLen: 16, batchSize: 2, steps: 2, lr: 1e-2 },
        { name: 'avg', type: 'average', stages: ['a', 'b'], weights: [3, 1] },
      ],
    });
    await runRecipe(recipe);
    const [a, b, avg] = await Promise.all(['a', 'b', 'avg'].map((n) => tk.loadModel(join(out, n, 'model'))));
    const pa = a!.namedParameters();
    const pb = b!.namedParameters();
    for (const [i, [name, t]] of avg!.namedParameters().entries()) {
      const va = pa[i]![1].toArraySync();
      const vb = pb[i]![1].toArraySync();
      const v = t.toArraySync();
      for (let j = 0; j < v.length; j += 7) expect(v[j], name).toBeCloseTo(0.75 * va[j]! + 0.25 * vb[j]!, 5);
    }
    for (const m of [a, b, avg]) m!.dispose();
    expect(() => parseRecipe({ model: { preset: 'micro' }, output: 'x', stages: [{ name: 'avg', type: 'average', stages: ['a', 'b'] }] })).toThrow(/stages\[0\]\.stages\[0\]: 'a' is not an earlier stage/);

    // The same from the command line, and the NIAH evaluation of the result.
    const cli = join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
    const r = spawnSync(process.execPath, [cli, 'average', join(out, 'a', 'model'), join(out, 'b', 'model'), '--weights', '3,1', '--out', join(out, 'cli-avg')], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/averaged 2 checkpoints/);
    expect((await readFile(join(out, 'cli-avg', 'model.safetensors'))).equals(await readFile(join(out, 'avg', 'model', 'model.safetensors')))).toBe(true);
    const e = spawnSync(process.execPath, [cli, 'eval', 'niah', '--model', join(out, 'avg', 'model'), '--lengths', '60,90', '--depths', '0,1', '--per-cell', '1', '--out', join(out, 'niah.html')], { encoding: 'utf8' });
    expect(e.stderr).toBe('');
    expect(e.status).toBe(0);
    expect(await readFile(join(out, 'niah.html'), 'utf8')).toMatch(/<svg/);
    const bad = spawnSync(process.execPath, [cli, 'average', join(out, 'a', 'model'), '--out', join(out, 'x'), '--weights', 'a,b'], { encoding: 'utf8' });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--weights must be a comma-separated list of numbers/);
  });
});
