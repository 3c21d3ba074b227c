// Evaluation against a caller-supplied generate function: this module knows nothing of models, so the
// same code scores a tiny CPU model in the demo, a loaded checkpoint, or a stub in a test. Whatever
// prompt wrapping (a chat template, a stop at newline or EOS) the model needs happens inside generate.
import { exactMatch } from './score.js';
import { heldOutSet, type Example, type Task } from './tasks.js';
import type { NeedleExample } from './needle.js';

/** Completes each prompt; returns one output per prompt, in order. */
export type Generate = (prompts: string[]) => Promise<string[]>;

export interface EvaluateOptions {
  /** Prompts per generate call, default 32. */
  batchSize?: number;
  /** Default exact match after whitespace normalization. */
  score?: (output: string, answer: string) => boolean;
}

export interface ScoredExample {
  prompt: string;
  answer: string;
  output: string;
  correct: boolean;
}

export interface EvalResult {
  correct: number;
  total: number;
  /** correct / total, 0 when there is nothing to score. */
  accuracy: number;
  results: ScoredExample[];
}

async function generateAll(generate: Generate, prompts: string[], batchSize: number): Promise<string[]> {
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new RangeError(`batchSize must be a positive integer, got ${String(batchSize)}`);
  const outputs: string[] = [];
  for (let start = 0; start < prompts.length; start += batchSize) {
    const batch = prompts.slice(start, start + batchSize);
    const got = await generate(batch);
    if (!Array.isArray(got) || got.length !== batch.length) {
      throw new Error(`generate returned ${Array.isArray(got) ? `${got.length} outputs` : typeof got} for ${batch.length} prompts`);
    }
    for (const [i, output] of got.entries()) {
      if (typeof output !== 'string') throw new TypeError(`generate returned a ${typeof output} for prompt ${start + i}, not a string`);
      outputs.push(output);
    }
  }
  return outputs;
}

/** Exact-match accuracy of `generate` on `examples`. */
export async function evaluate(
  generate: Generate,
  examples: ReadonlyArray<Pick<Example, 'prompt' | 'answer'>>,
  options: EvaluateOptions = {},
): Promise<EvalResult> {
  const score = options.score ?? exactMatch;
  const outputs = await generateAll(generate, examples.map((e) => e.prompt), options.batchSize ?? 32);
  const results = examples.map((e, i) => ({ prompt: e.prompt, answer: e.answer, output: outputs[i]!, correct: score(outputs[i]!, e.answer) }));
  const correct = results.filter((r) => r.correct).length;
  return { correct, total: results.length, accuracy: results.length === 0 ? 0 : correct / results.length, results };
}

export interface EvaluateTaskOptions {
  /** Held-out examples, default 100. */
  n?: number;
  /** Default 0. */
  seed?: number;
  batchSize?: number;
}

/** Accuracy on `n` distinct held-out examples of `task`, scored by the task's own scorer. */
export async function evaluateTask(task: Task, generate: Generate, options: EvaluateTaskOptions = {}): Promise<EvalResult> {
  const examples = heldOutSet(task, options.n ?? 100, options.seed ?? 0);
  return evaluate(generate, examples, { score: (o, a) => task.score(o, a), ...(options.batchSize === undefined ? {} : { batchSize: options.batchSize }) });
}

/** One heatmap cell: the requested length and depth, and how many of its cases were answered. */
export interface NiahCell {
  length: number;
  depth: number;
  correct: number;
  total: number;
}

export interface NiahResult extends EvalResult {
  /** In the order the cells first appear among the cases (niahGrid's: by length, then depth). */
  cells: NiahCell[];
}

/** Needle recall per (length, depth) cell. */
export async function evaluateNiah(
  generate: Generate,
  cases: ReadonlyArray<Pick<NeedleExample, 'prompt' | 'answer' | 'length' | 'depth'>>,
  options: EvaluateOptions = {},
): Promise<NiahResult> {
  const result = await evaluate(generate, cases, options);
  const cells = new Map<string, NiahCell>();
  cases.forEach((c, i) => {
    const id = `${c.length}:${c.depth}`;
    let cell = cells.get(id);
    if (!cell) {
      cell = { length: c.length, depth: c.depth, correct: 0, total: 0 };
      cells.set(id, cell);
    }
    cell.total++;
    if (result.results[i]!.correct) cell.correct++;
  });
  return { ...result, cells: [...cells.values()] };
}

/**
 * The cells as a text heatmap: one row per depth, one column per length, each entry the percentage
 * recalled ('-' where a cell has no cases).
 */
export function formatNiahTable(cells: readonly NiahCell[]): string {
  const lengths = [...new Set(cells.map((c) => c.length))].sort((a, b) => a - b);
  const depths = [...new Set(cells.map((c) => c.depth))].sort((a, b) => a - b);
  const sums = new Map<string, { correct: number; total: number }>();
  for (const c of cells) {
    const id = `${c.length}:${c.depth}`;
    const s = sums.get(id) ?? { correct: 0, total: 0 };
    s.correct += c.correct;
    s.total += c.total;
    sums.set(id, s);
  }
  const header = ['depth', ...lengths.map(String)];
  const rows = depths.map((d) => [
    d.toFixed(2),
    ...lengths.map((l) => {
      const s = sums.get(`${l}:${d}`);
      return s && s.total > 0 ? `${Math.round((100 * s.correct) / s.total)}%` : '-';
    }),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [header, ...rows].map((r) => r.map((v, i) => v.padStart(widths[i]!)).join('  ')).join('\n');
}
