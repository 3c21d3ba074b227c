// Generation with the KV cache against recomputing the whole sequence every step, batched prompts
// of different lengths against each prompt alone, sampling options and stop tokens.
import { afterAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM } from '../lib/index.js';
import { generate, generateTokens } from '../lib/generate/index.js';

function greedyWithoutCache(model: CausalLM, prompt: number[], n: number): number[] {
  const seq = [...prompt];
  for (let i = 0; i < n; i++) {
    const logits = tk.tidy(() => tk.noGrad(() => model.forward(tk.tensor(Int32Array.from(seq), [1, seq.length])).toArraySync()));
    const V = model.config.vocabSize;
    const row = logits.subarray((seq.length - 1) * V, seq.length * V);
    let best = 0;
    for (let v = 1; v < V; v++) if (row[v]! > row[best]!) best = v;
    seq.push(best);
  }
  return seq.slice(prompt.length);
}

describe('generate', () => {
  // Made once for the whole file (tests/setup.ts checks memory per test, against its start).
  const model = tk.createModel(tk.presetConfig('micro', 50, { model_type: 'qwen3', head_dim: 8 }), { seed: 11 });
  afterAll(() => model.dispose());

  it('greedy decoding with the cache equals recomputing the whole sequence', async () => {
    const prompt = [3, 14, 15, 9, 2, 6];
    const [got] = await generateTokens(model, [prompt], { maxNewTokens: 12 });
    expect(got).toEqual(greedyWithoutCache(model, prompt, 12));
  });

  it('a batch of prompts of different lengths gives what each prompt gives alone', async () => {
    const prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]];
    const batched = await generateTokens(model, prompts, { maxNewTokens: 8 });
    for (let i = 0; i < prompts.length; i++) expect(batched[i]).toEqual((await generateTokens(model, [prompts[i]!], { maxNewTokens: 8 }))[0]);
  });

  it('sampling: seeded, topK 1 is greedy, stop tokens end a row', async () => {
    const prompt = [[5, 6, 7]];
    const greedy = (await generateTokens(model, prompt, { maxNewTokens: 10 }))[0]!;
    expect((await generateTokens(model, prompt, { maxNewTokens: 10, temperature: 1.3, topK: 1, seed: 5 }))[0]).toEqual(greedy);
    const a = await generateTokens(model, prompt, { maxNewTokens: 10, temperature: 1.5, topP: 0.9, seed: 7 });
    const b = await generateTokens(model, prompt, { maxNewTokens: 10, temperature: 1.5, topP: 0.9, seed: 7 });
    expect(a).toEqual(b);
    const stopAt = greedy[3]!;
    const stopped = (await generateTokens(model, prompt, { maxNewTokens: 10, stopTokens: [stopAt] }))[0]!;
    expect(stopped).toEqual(greedy.slice(0, greedy.indexOf(stopAt)));
  });

  it('text prompts and chat prompts through a tokenizer', async () => {
    const tok = new tk.ByteTokenizer();
    const m = tk.createModel({ preset: 'micro', vocabSize: tok.vocabSize }, { seed: 3 });
    const [plain, chat] = await generate(m, tok, ['12+3=', [{ role: 'user', content: 'hi' }]], { maxNewTokens: 5 });
    expect(typeof plain).toBe('string');
    expect(typeof chat).toBe('string');
    m.dispose();
  });

  it('rejects bad prompts and options by name', async () => {
    await expect(generateTokens(model, [[]])).rejects.toThrow(/prompt 0 is empty/);
    await expect(generateTokens(model, [[1, 99]])).rejects.toThrow(/token 99, outside the vocabulary \[0, 50\)/);
    await expect(generateTokens(model, [[1]], { topP: 0 })).rejects.toThrow(/topP must be in \(0, 1\]/);
  });
});
