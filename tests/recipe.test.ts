// Recipes: validation errors that point at the key, a two-stage run through the CLI, and a run
// killed with SIGKILL (at any moment, checkpoint writes included) that resumes to the same
// weights, bit for bit, as an uninterrupted run.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { latestCheckpoint } from '../lib/train/checkpoint.js';
import { parseRecipe, readRecipe } from '../lib/train/recipe.js';
import * as tk from '../lib/index.js';

const cli = join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-recipe-'));
  const text = tk.synthetic.pretrainCorpus(120, 3, { mix: { arithmetic: 1, prose: 1 } });
  const sft = tk.synthetic.instructionSet(tk.synthetic.arithmetic({ max: 20, ops: ['+'] }), 60, 4, { form: 'alpaca' });
  await tk.synthetic.writeJsonl(join(dir, 'text.jsonl'), text);
  await tk.synthetic.writeJsonl(join(dir, 'sft.jsonl'), sft);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const recipe = (output: string, steps = 8) => ({
  model: { preset: 'micro', seed: 2 },
  output,
  seed: 5,
  stages: [
    { name: 'pre', type: 'pretrain', data: 'text.jsonl', seqLen: 64, batchSize: 4, steps, lr: 3e-3, checkpointEvery: 1 },
    { name: 'sft', type: 'sft', data: 'sft.jsonl', seqLen: 64, batchSize: 4, steps: 4, lr: 2e-3, lora: { r: 4, targetModules: 'all-linear', quantize: 'nf4', dropout: 0.1 }, checkpointEvery: 1 },
  ],
});

describe('recipe validation', () => {
  it('points at the key that is wrong', async () => {
    expect(() => parseRecipe({ ...recipe('x'), stages: [{ ...recipe('x').stages[0], lr: 'fast' }] }, 'r.yaml')).toThrow(/r\.yaml: invalid recipe:\n {2}stages\[0\]\.lr: .*number/);
    expect(() => parseRecipe({ ...recipe('x'), stages: [{ ...recipe('x').stages[0], learningRate: 1 }] }, 'r.yaml')).toThrow(/stages\[0\]: .*unknown key 'learningRate'/);
    expect(() => parseRecipe({ ...recipe('x'), stages: [{ ...recipe('x').stages[1], lora: { r: 0 } }] }, 'r.yaml')).toThrow(/stages\[0\]\.lora\.r/);
    expect(() => parseRecipe({ ...recipe('x'), stages: [{ ...recipe('x').stages[0], type: 'rlhf' }] }, 'r.yaml')).toThrow(/stages\[0\]\.type/);
    expect(() => parseRecipe({ ...recipe('x'), stages: [recipe('x').stages[0], recipe('x').stages[0]] }, 'r.yaml')).toThrow(/stages\[1\]\.name: 'pre' is used by an earlier stage/);
    await writeFile(join(dir, 'bad.yaml'), 'model: [unclosed\n');
    await expect(readRecipe(join(dir, 'bad.yaml'))).rejects.toThrow(/bad\.yaml: not valid YAML/);
    await writeFile(join(dir, 'ok.yaml'), 'model: { preset: micro }\noutput: out\nstages:\n  - { name: a, type: pretrain, data: text.jsonl }\n');
    expect((await readRecipe(join(dir, 'ok.yaml'))).stages[0]!.seqLen).toBe(512);
  });

  it('the CLI reports a bad recipe and a bad data line with exit codes', async () => {
    await writeFile(join(dir, 'broken.json'), JSON.stringify({ ...recipe('out-broken'), stages: [{ ...recipe('x').stages[0], steps: -1 }] }));
    const r = spawnSync(process.execPath, [cli, 'train', join(dir, 'broken.json')], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/stages\[0\]\.steps/);
    await writeFile(join(dir, 'badline.jsonl'), '{"text": "ok"}\n{"text": oops}\n');
    await writeFile(join(dir, 'badline.json'), JSON.stringify({ ...recipe('out-badline'), stages: [{ ...recipe('x').stages[0], data: 'badline.jsonl' }] }));
    const b = spawnSync(process.execPath, [cli, 'train', join(dir, 'badline.json')], { encoding: 'utf8' });
    expect(b.status).toBe(1);
    expect(b.stderr).toMatch(/badline\.jsonl:2/);
  });
});

async function modelBytes(modelDir: string): Promise<Buffer> {
  return readFile(join(modelDir, 'model.safetensors'));
}

describe('running a recipe', () => {
  it('two stages (pretrain, QLoRA SFT) through `tunekit train`; each stage loads on its own', async () => {
    await writeFile(join(dir, 'two.json'), JSON.stringify(recipe('out-two')));
    const r = spawnSync(process.execPath, [cli, 'train', join(dir, 'two.json')], { encoding: 'utf8' });
    expect(r.stderr).not.toMatch(/Error/);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/pre: 8 steps/);
    expect(r.stdout).toMatch(/sft: 4 steps/);
    for (const stage of ['pre', 'sft']) {
      const m = await tk.loadModel(join(dir, 'out-two', stage, 'model'));
      expect(m.config.vocabSize).toBe(262);
      m.dispose();
    }
    expect(existsSync(join(dir, 'out-two', 'sft', 'adapter', 'adapter_config.json'))).toBe(true);
    // Running it again finds both stages complete.
    const again = spawnSync(process.execPath, [cli, 'train', join(dir, 'two.json')], { encoding: 'utf8' });
    expect(again.stdout).toMatch(/pre: already complete/);

    // `tunekit merge` folds the SFT stage's adapter into the pretrained model: the result is the
    // SFT stage's own (merged) model, to float rounding.
    const merged = join(dir, 'out-two', 'merged');
    const m = spawnSync(process.execPath, [cli, 'merge', '--model', join(dir, 'out-two', 'pre', 'model'), '--adapter', join(dir, 'out-two', 'sft', 'adapter'), '--out', merged], { encoding: 'utf8' });
    expect(m.stderr).toBe('');
    expect(m.status).toBe(0);
    const a = await tk.loadModel(merged);
    const b = await tk.loadModel(join(dir, 'out-two', 'sft', 'model'));
    const ids = tk.tensor(new Int32Array([72, 105, 33, 10]), [1, 4]);
    const la = tk.tidy(() => tk.noGrad(() => a.forward(ids).toArraySync()));
    const lb = tk.tidy(() => tk.noGrad(() => b.forward(ids).toArraySync()));
    let worst = 0;
    for (let i = 0; i < la.length; i++) worst = Math.max(worst, Math.abs(la[i]! - lb[i]!));
    // The SFT stage merged into the NF4 base dequantized, merge here into the dense pretrained base.
    expect(worst).toBeLessThan(0.5);
    for (const t of [a, b]) t.dispose();
    ids.dispose();

    const g = spawnSync(process.execPath, [cli, 'generate', '--model', merged, '--prompt', '3+4=', '--prompt', 'hello', '--chat', '--max-new-tokens', '4'], { encoding: 'utf8' });
    expect(g.status).toBe(0);
    expect(g.stdout.split('\n').length).toBeGreaterThanOrEqual(2);
    const bad = spawnSync(process.execPath, [cli, 'generate', '--prompt', 'x'], { encoding: 'utf8' });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/generate needs --model DIR/);
  });

  it('killed with SIGKILL at random moments, then resumed: the same weights as an uninterrupted run', async () => {
    await writeFile(join(dir, 'straight.json'), JSON.stringify(recipe('out-straight', 10)));
    expect(spawnSync(process.execPath, [cli, 'train', join(dir, 'straight.json')], { encoding: 'utf8' }).status).toBe(0);

    await writeFile(join(dir, 'killed.json'), JSON.stringify(recipe('out-killed', 10)));
    const ckpts = join(dir, 'out-killed', 'pre', 'checkpoints');
    let kills = 0;
    for (let attempt = 0; attempt < 6 && !existsSync(join(dir, 'out-killed', 'sft', 'model', 'config.json')); attempt++) {
      const child = spawn(process.execPath, [cli, 'train', join(dir, 'killed.json')], { stdio: 'ignore' });
      // Kill at a varying moment: early, mid-step, or while a checkpoint is being written.
      const delay = 300 + ((attempt * 467) % 900);
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        kills++;
      }, delay);
      await exited;
      clearTimeout(timer);
      // Whatever the moment, the newest checkpoint directory is complete and loads.
      const latest = await latestCheckpoint(ckpts);
      if (latest) {
        const state = JSON.parse(await readFile(join(latest, 'trainer_state.json'), 'utf8'));
        expect(state.step).toBeGreaterThan(0);
        const m = tk.createModel({ preset: 'micro', vocabSize: 262 });
        m.requiresGrad(true);
        const { loadCheckpoint } = await import('../lib/train/checkpoint.js');
        await loadCheckpoint(latest, m);
        m.dispose();
      }
    }
    expect(kills).toBeGreaterThan(0);
    const finish = spawnSync(process.execPath, [cli, 'train', join(dir, 'killed.json')], { encoding: 'utf8' });
    expect(finish.status).toBe(0);
    for (const stage of ['pre', 'sft']) {
      const a = await modelBytes(join(dir, 'out-straight', stage, 'model'));
      const b = await modelBytes(join(dir, 'out-killed', stage, 'model'));
      expect(a.equals(b), stage).toBe(true);
    }
    expect((await readdir(ckpts)).filter((e) => e.includes('.tmp-'))).toEqual([]);
  });
});
