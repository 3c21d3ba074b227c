// Needle-in-a-haystack evaluation: the report's grid, log-likelihoods against an independent
// full-logits computation, scoring through a stub generator, the heatmaps, table and HTML, the
// command-line entry point on a saved checkpoint, and input errors.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM } from '../lib/index.js';
import { answerLogLikelihoods, evaluateNiah, niahHeatmapSvg, niahTable, runNiahCommand, writeNiahReport, type NiahReport } from '../lib/eval/index.js';
import { niahGrid } from '../lib/data/synthetic/needle.js';

/** log p(continuation | prompt) from the full [1, T, V] logits of model.forward on the unpadded sequence. */
function referenceLogLikelihood(model: CausalLM, promptIds: number[], answerIds: number[]): number {
  const seq = [...promptIds, ...answerIds];
  const T = seq.length;
  const targets = new Int32Array(T).fill(-100);
  // Position t's logits predict token t + 1.
  for (let j = 0; j < answerIds.length; j++) targets[promptIds.length - 1 + j] = answerIds[j]!;
  return tk.tidy(() =>
    tk.noGrad(() => {
      const logits = model.forward(tk.tensor(Int32Array.from(seq), [1, T]));
      const nll = tk.ops.crossEntropy(logits, tk.tensor(targets, [1, T]), { reduction: 'sum' });
      return -nll.toArraySync()[0]!;
    }),
  );
}

const magicNumber = (prompt: string) => /The magic number is (\d+)\./.exec(prompt)![1]!;

describe('needle in a haystack', () => {
  const tok = new tk.ByteTokenizer();
  let model: CausalLM;
  let report: NiahReport;
  const lengths = [80, 130];
  const depths = [0, 0.5, 1];

  beforeAll(async () => {
    model = tk.createModel({ preset: 'micro', vocabSize: tok.vocabSize }, { seed: 5 });
    // batchSize 5 over 12 cases ordered by length: the second batch mixes both lengths, so left
    // padding is exercised.
    report = await evaluateNiah(model, tok, { lengths, depths, perCell: 2, seed: 3, maxNewTokens: 4, batchSize: 5 });
  });
  afterAll(() => model.dispose());

  it('reports a cell for every length × depth, with totals', () => {
    expect(report.cells.map((c) => [c.length, c.depth])).toEqual(lengths.flatMap((l) => depths.map((d) => [l, d])));
    expect(report.cases).toHaveLength(12);
    for (const c of report.cells) {
      expect(c.total).toBe(2);
      expect(c.exact).toBe(c.correct / 2);
      expect(c.logLikelihood).toBeLessThan(0);
      // " 4821": the separator and four digits, one byte each.
      expect(c.perTokenLogLikelihood).toBeCloseTo(c.logLikelihood / 5, 5);
      // The byte tokenizer adds BOS; the haystack is within one sentence of the requested length.
      expect(c.promptTokens).toBeLessThanOrEqual(c.length + 1);
      expect(c.promptTokens).toBeGreaterThan(c.length - 60);
    }
    expect(report.overall.total).toBe(12);
    expect(report.overall.correct).toBe(report.cases.filter((c) => c.correct).length);
    const mean = report.cases.reduce((s, c) => s + c.logLikelihood, 0) / 12;
    expect(report.overall.logLikelihood).toBeCloseTo(mean, 5);
    expect(report.overall.perTokenLogLikelihood).toBeCloseTo(mean / 5, 5);
    for (const c of report.cases) {
      expect(c.answer).toMatch(/^\d{4}$/);
      expect(c.output).not.toContain('\n');
      expect(c.correct).toBe(c.output.trim() === c.answer);
    }
    expect({ lengths: report.lengths, depths: report.depths, perCell: report.perCell, seed: report.seed, digits: report.digits, chat: report.chat }).toEqual({
      lengths,
      depths,
      perCell: 2,
      seed: 3,
      digits: 4,
      chat: false,
    });
  });

  it('log-likelihoods equal cross entropy over full logits of the same sequence', async () => {
    const cases = niahGrid({ lengths, depths, perCell: 2, seed: 3 });
    expect(cases.map((c) => c.answer)).toEqual(report.cases.map((c) => c.answer));
    for (const [i, c] of cases.entries()) {
      const ref = referenceLogLikelihood(model, tok.encode(c.prompt), tok.encode(` ${c.answer}`, { addSpecialTokens: false }));
      expect(report.cases[i]!.logLikelihood).toBeCloseTo(ref, 3);
    }
    // Chat prompts: the rendered template, then the value alone.
    const pairs = cases.slice(0, 3).map((c) => ({ prompt: c.prompt, continuation: c.answer }));
    const got = await answerLogLikelihoods(model, tok, pairs, { chat: true, batchSize: 3 });
    pairs.forEach((p, i) => {
      const promptIds = tok.encode(tok.applyChatTemplate([{ role: 'user', content: p.prompt }], { addGenerationPrompt: true }), { addSpecialTokens: false });
      expect(got[i]!.answerTokens).toBe(4);
      expect(got[i]!.promptTokens).toBe(promptIds.length);
      expect(got[i]!.logLikelihood).toBeCloseTo(referenceLogLikelihood(model, promptIds, tok.encode(p.continuation, { addSpecialTokens: false })), 3);
    });
  });

  it('scores a generator that finds the needle only in the short haystacks', async () => {
    const calls: number[] = [];
    const generate = async (prompts: string[]) => {
      calls.push(prompts.length);
      // A trailing line is what a model rambling past its answer produces; scoring stops at the newline.
      return prompts.map((p) => (p.length <= 80 ? ` ${magicNumber(p)}\nWhat is` : ' 1234'));
    };
    const r = await evaluateNiah(model, tok, { lengths, depths, perCell: 2, seed: 3, generate, batchSize: 4 });
    expect(calls).toEqual([4, 4, 4]);
    expect(r.cells.map((c) => c.exact)).toEqual([1, 1, 1, 0, 0, 0]);
    expect(r.overall).toMatchObject({ exact: 0.5, correct: 6, total: 12 });
    expect(r.cases[0]!.output).toBe(` ${r.cases[0]!.answer}`);
    // The generator does not touch the log-likelihoods.
    r.cases.forEach((c, i) => expect(c.logLikelihood).toBeCloseTo(report.cases[i]!.logLikelihood, 3));

    await expect(evaluateNiah(model, tok, { lengths: [80], depths: [0], generate: async () => [] })).rejects.toThrow(/generate returned 0 outputs for 1 prompts/);

    // Chat mode: the generator still sees the plain prompt (it applies any template itself); the
    // log-likelihood is of the value alone after the rendered template.
    const seen: string[] = [];
    const chat = await evaluateNiah(model, tok, { lengths: [80], depths: [0.5], chat: true, generate: async (p) => (seen.push(...p), p.map(magicNumber)) });
    expect(seen[0]).toMatch(/What is the magic number\?$/);
    expect(chat).toMatchObject({ chat: true, overall: { exact: 1 } });
    expect(chat.cases[0]!.answerTokens).toBe(4);
    expect(chat.cases[0]!.promptTokens).toBe(tok.encode(tok.applyChatTemplate([{ role: 'user', content: seen[0]! }], { addGenerationPrompt: true }), { addSpecialTokens: false }).length);
  });

  it('is deterministic, and a token budget splits batches without changing the results', async () => {
    const a = await evaluateNiah(model, tok, { lengths: [130], depths: [0.25], perCell: 3, seed: 9, maxNewTokens: 3 });
    const b = await evaluateNiah(model, tok, { lengths: [130], depths: [0.25], perCell: 3, seed: 9, maxNewTokens: 3, maxBatchTokens: 100 });
    expect(b.cases.map((c) => c.output)).toEqual(a.cases.map((c) => c.output));
    b.cases.forEach((c, i) => expect(c.logLikelihood).toBeCloseTo(a.cases[i]!.logLikelihood, 3));
  });

  it('draws heatmaps, a table and an HTML report', async () => {
    const exact = niahHeatmapSvg(report, { metric: 'exact' });
    const ll = niahHeatmapSvg(report, { metric: 'logLikelihood' });
    for (const svg of [exact, ll]) {
      expect(svg.startsWith('<svg')).toBe(true);
      expect(svg.trim().endsWith('</svg>')).toBe(true);
      expect(svg).toContain('130');
      expect(svg).toContain('50%');
      expect(svg.match(/<rect [^>]*><title>/g)).toHaveLength(6);
    }
    expect(exact).toContain('Needle recall');
    expect(() => niahHeatmapSvg(report, { metric: 'nope' as 'exact' })).toThrow(/metric must be/);

    const table = niahTable(report);
    const lines = table.split('\n');
    expect(lines[1]).toMatch(/^depth\s+80\s+130$/);
    expect(lines[2]).toMatch(/^0%\s+\d+%\s+\d+%$/);
    expect(table).toContain(`overall: ${report.overall.correct}/12 exact`);

    const dir = await mkdtemp(join(tmpdir(), 'tunekit-niah-'));
    try {
      const path = join(dir, 'sub', 'niah.html');
      await writeNiahReport(path, report, { title: 'micro <model>' });
      const html = await readFile(path, 'utf8');
      expect(html).toContain('<title>micro &lt;model&gt;</title>');
      expect(html.match(/<svg/g)).toHaveLength(2);
      expect(html).toContain('<th>correct / total</th>');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('rejects bad grids and options by name', async () => {
    const bad = (options: Record<string, unknown>) => evaluateNiah(model, tok, { lengths: [80], depths: [0.5], ...options });
    await expect(bad({ lengths: [] })).rejects.toThrow(/lengths must be a non-empty list/);
    await expect(bad({ depths: [] })).rejects.toThrow(/depths must be a non-empty list/);
    await expect(bad({ depths: [0, 1.5] })).rejects.toThrow(/depths must be in \[0, 1\], got 1.5/);
    await expect(bad({ depths: [-0.1] })).rejects.toThrow(/depths must be in \[0, 1\], got -0.1/);
    await expect(bad({ depths: [Number.NaN] })).rejects.toThrow(/depths must be in \[0, 1\]/);
    await expect(bad({ lengths: [40] })).rejects.toThrow(/length 40 is too short: the needle and the question alone take 51 characters/);
    await expect(bad({ lengths: [80, 80] })).rejects.toThrow(/lengths has a repeated value/);
    await expect(bad({ lengths: [80.5] })).rejects.toThrow(/lengths must be positive integers/);
    await expect(bad({ perCell: 0 })).rejects.toThrow(/perCell must be a positive integer/);
    await expect(bad({ maxNewTokens: 0 })).rejects.toThrow(/maxNewTokens must be a positive integer/);
    await expect(bad({ batchSize: 1.5 })).rejects.toThrow(/batchSize must be a positive integer/);
    await expect(bad({ digits: 12 })).rejects.toThrow(/digits must be an integer in \[1, 9\]/);
    const other = tk.createModel({ preset: 'micro', vocabSize: 100 }, { seed: 1 });
    try {
      await expect(evaluateNiah(other, tok, { lengths: [80], depths: [0] })).rejects.toThrow(/outside the model's vocabulary \[0, 100\)/);
    } finally {
      other.dispose();
    }
    // The grid is checked before the checkpoint is read.
    await expect(runNiahCommand({ modelDir: '/nonexistent', lengths: [80], depths: [2] })).rejects.toThrow(/depths must be in \[0, 1\]/);
    await expect(runNiahCommand({ modelDir: '/nonexistent', lengths: [80], depths: [0], out: 'x.png' })).rejects.toThrow(/PNG output is not supported/);
  });

  it('leaves memory as it found it; a long haystack needs one layer\'s activations, not the stack\'s', async () => {
    const live = () => ({ tensors: tk.memory().cpu!.tensors, bytes: tk.memory().cpu!.bytes });
    const before = live();
    await evaluateNiah(model, tok, { lengths: [90], depths: [0, 1], maxNewTokens: 2 });
    tk.synchronize();
    expect(live()).toEqual(before);

    // Six layers, so that the whole stack's activations clearly outweigh one layer's.
    const deep = tk.createModel(tk.presetConfig('micro', tok.vocabSize, { num_hidden_layers: 6 }), { seed: 2 });
    try {
      const [c] = niahGrid({ lengths: [3000], depths: [0.5] });
      const promptIds = tok.encode(c!.prompt);
      const answerIds = tok.encode(` ${c!.answer}`, { addSpecialTokens: false });
      tk.resetPeakMemory();
      const base = tk.memory().cpu!.peakAllocatedBytes;
      const [got] = await answerLogLikelihoods(deep, tok, [{ prompt: c!.prompt, continuation: ` ${c!.answer}` }]);
      tk.synchronize();
      const peak = tk.memory().cpu!.peakAllocatedBytes - base;
      tk.resetPeakMemory();
      const ref = referenceLogLikelihood(deep, promptIds, answerIds);
      tk.synchronize();
      const fullPeak = tk.memory().cpu!.peakAllocatedBytes - base;
      expect(got!.logLikelihood).toBeCloseTo(ref, 3);
      const fullLogits = (promptIds.length + answerIds.length) * tok.vocabSize * 4;
      expect(fullPeak).toBeGreaterThan(fullLogits);
      expect(peak).toBeLessThan(fullPeak / 3);
    } finally {
      deep.dispose();
    }
  });

  it('runs from a saved checkpoint with an adapter, prints the table and writes the files', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunekit-niah-cli-'));
    try {
      const modelDir = join(dir, 'model');
      await tk.saveModel(model, modelDir, { tokenizer: tok });
      // A fresh adapter (B = 0) leaves the model's outputs as they were.
      const adapted = tk.createModel({ preset: 'micro', vocabSize: tok.vocabSize }, { seed: 5 });
      try {
        tk.applyLora(adapted, { r: 2, alpha: 4 });
        await tk.saveAdapter(adapted, join(dir, 'adapter'));
      } finally {
        adapted.dispose();
      }
      const lines: string[] = [];
      const out = join(dir, 'out');
      const r = await runNiahCommand({ modelDir, adapterDir: join(dir, 'adapter'), lengths, depths, perCell: 2, seed: 3, maxNewTokens: 4, out, log: (l) => lines.push(l) });
      expect(lines[0]).toBe(r.table);
      expect(r.table).toBe(niahTable(r));
      expect(r.files.map((f) => f.slice(out.length + 1))).toEqual(['niah.html', 'niah-exact.svg', 'niah-loglik.svg', 'niah.json']);
      expect(lines.slice(1)).toEqual(r.files.map((f) => `wrote ${f}`));
      r.cases.forEach((c, i) => expect(c.logLikelihood).toBeCloseTo(report.cases[i]!.logLikelihood, 3));
      const json = JSON.parse(await readFile(join(out, 'niah.json'), 'utf8')) as NiahReport;
      expect(json.cells).toHaveLength(6);
      expect((await readFile(join(out, 'niah-exact.svg'), 'utf8')).startsWith('<svg')).toBe(true);

      const single = await runNiahCommand({ modelDir, lengths: [80], depths: [0], maxNewTokens: 2, out: join(dir, 'one.svg'), log: () => {} });
      expect(single.files).toEqual([join(dir, 'one.svg')]);
      expect(single.cells).toHaveLength(1);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
