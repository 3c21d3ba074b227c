// `tunekit eval niah`: needle-in-a-haystack recall over a grid of prompt lengths × needle depths.
//
// Every case gets two scores. Exact match of the greedy answer is what a user sees, but it is all or
// nothing; log p(answer | prompt) from one teacher-forced pass is graded, so it shows retrieval
// degrading (past the trained context, deep in the haystack) before the answers turn wrong, and it
// separates two models that both score zero.
//
// Lengths are in characters of the prompt text (before any chat template), the unit niahGrid builds
// haystacks in: the task's length guarantees hold in characters whatever the tokenizer. For the
// byte-level tokenizer a character is a token (plus the BOS token); for other tokenizers each cell
// reports the mean prompt length in tokens as well.
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, extname, join } from 'node:path';

import { noGrad } from '../autograd.js';
import { evaluate, type Generate } from '../data/synthetic/evaluate.js';
import { minNeedleLength, needle, niahGrid, type NeedleExample } from '../data/synthetic/needle.js';
import { exactMatch } from '../data/synthetic/score.js';
import { generate as generateText } from '../generate/index.js';
import { loadModel } from '../models/io.js';
import type { CausalLM } from '../models/llama.js';
import { loadAdapter } from '../models/lora.js';
import { sequenceLogprobs } from '../ops/loss.js';
import { narrow } from '../ops/shape.js';
import { heatmapSvg } from '../report/charts.js';
import { formatNumber } from '../report/escape.js';
import { writeReport, type Report } from '../report/report.js';
import { tidy } from '../scope.js';
import { tensor, type Device, type Tensor } from '../tensor.js';
import { loadTokenizer } from '../tokenizer/load.js';
import type { Tokenizer } from '../tokenizer/types.js';

export type { Generate } from '../data/synthetic/evaluate.js';

export interface NiahOptions {
  /** Prompt lengths in characters (= tokens, plus BOS, for the byte-level tokenizer). */
  lengths: readonly number[];
  /** Needle depths in [0, 1]: 0 is the start of the haystack, 1 just before the question. */
  depths: readonly number[];
  /** Cases per (length, depth) cell. Default 1. */
  perCell?: number;
  /** Seed of the haystacks and needles. Default 0. */
  seed?: number;
  /** Digits of the magic number. Default 4. */
  digits?: number;
  /**
   * Wrap each prompt in the tokenizer's chat template as one user message. Default false: the raw
   * prompt, as the toy world's long-context pretraining writes it ("... magic number? 4821").
   */
  chat?: boolean;
  /** Tokens generated at most per answer. Default 16. */
  maxNewTokens?: number;
  /** Cases per forward pass at most. Default 8. */
  batchSize?: number;
  /** Padded tokens (rows × longest row) per forward pass at most; a longer case runs alone. Default 32768. */
  maxBatchTokens?: number;
  /**
   * Completes prompts instead of greedy generation with the model (a stub in tests, a sampler, a
   * remote model). Only the exact-match score uses it; the log-likelihood always comes from the model.
   */
  generate?: Generate;
  /** Called after each batch with the cases scored so far. */
  onProgress?: (done: number, total: number) => void;
}

export interface NiahCaseResult {
  length: number;
  depth: number;
  /** Where the needle landed (the needle goes in at a sentence boundary). */
  actualDepth: number;
  answer: string;
  /** The generated text, up to its first newline. */
  output: string;
  correct: boolean;
  /** log p(answer tokens | prompt), natural log, summed over the answer's tokens. */
  logLikelihood: number;
  answerTokens: number;
  promptTokens: number;
}

export interface NiahSummary {
  /** Fraction of cases answered exactly. */
  exact: number;
  correct: number;
  total: number;
  /** Mean over cases of log p(answer | prompt) summed over the answer's tokens. */
  logLikelihood: number;
  /** Summed log-likelihood over all answer tokens divided by their number. */
  perTokenLogLikelihood: number;
}

export interface NiahCellResult extends NiahSummary {
  length: number;
  depth: number;
  /** Mean prompt length in tokens (after the chat template, when chat is on). */
  promptTokens: number;
}

export interface NiahReport {
  lengths: number[];
  depths: number[];
  perCell: number;
  seed: number;
  digits: number;
  chat: boolean;
  /** By length, then depth: one per (length, depth). */
  cells: NiahCellResult[];
  overall: NiahSummary;
  /** In the order of cells. */
  cases: NiahCaseResult[];
}

/** The text a model should produce after a prompt and the tokens it is scored on. */
interface EncodedCase {
  prompt: number[];
  answer: number[];
}

function checkPositiveInt(name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new RangeError(`evaluateNiah: ${name} must be a positive integer, got ${String(v)}`);
  return v;
}

function checkGrid(lengths: unknown, depths: unknown, digits: number): { lengths: number[]; depths: number[] } {
  if (!Array.isArray(lengths) || lengths.length === 0) throw new RangeError('evaluateNiah: lengths must be a non-empty list of prompt lengths');
  if (!Array.isArray(depths) || depths.length === 0) throw new RangeError('evaluateNiah: depths must be a non-empty list of depths in [0, 1]');
  const min = minNeedleLength(digits);
  for (const l of lengths) {
    if (typeof l !== 'number' || !Number.isSafeInteger(l) || l < 1) throw new RangeError(`evaluateNiah: lengths must be positive integers, got ${String(l)}`);
    if (l < min) throw new RangeError(`evaluateNiah: length ${l} is too short: the needle and the question alone take ${min} characters`);
  }
  for (const d of depths) {
    if (typeof d !== 'number' || !(d >= 0 && d <= 1)) throw new RangeError(`evaluateNiah: depths must be in [0, 1], got ${String(d)}`);
  }
  // A repeated value would draw the same cases twice and give the grid two cells with one label.
  if (new Set(lengths).size !== lengths.length) throw new RangeError(`evaluateNiah: lengths has a repeated value: [${lengths.join(', ')}]`);
  if (new Set(depths).size !== depths.length) throw new RangeError(`evaluateNiah: depths has a repeated value: [${depths.join(', ')}]`);
  return { lengths: [...(lengths as number[])], depths: [...(depths as number[])] };
}

function startsWith(a: readonly number[], prefix: readonly number[]): boolean {
  if (prefix.length > a.length) return false;
  for (let i = 0; i < prefix.length; i++) if (a[i] !== prefix[i]) return false;
  return true;
}

/**
 * The prompt's tokens exactly as generate() encodes them, and the continuation's tokens after them.
 * The continuation is taken from the encoding of the whole text when that extends the prompt's, so
 * a subword tokenizer scores the answer as it would tokenize a training document; where merges cross
 * the boundary it is encoded on its own.
 */
function encodeCase(tokenizer: Tokenizer, prompt: string, continuation: string, chat: boolean): EncodedCase {
  const text = chat ? tokenizer.applyChatTemplate([{ role: 'user', content: prompt }], { addGenerationPrompt: true }) : prompt;
  const options = chat ? { addSpecialTokens: false } : {};
  const promptIds = tokenizer.encode(text, options);
  const whole = tokenizer.encode(text + continuation, options);
  const answer = whole.length > promptIds.length && startsWith(whole, promptIds) ? whole.slice(promptIds.length) : tokenizer.encode(continuation, { addSpecialTokens: false });
  if (promptIds.length === 0) throw new RangeError('evaluateNiah: a prompt encodes to no tokens');
  if (answer.length === 0) throw new RangeError(`evaluateNiah: the answer ${JSON.stringify(continuation)} encodes to no tokens`);
  return { prompt: promptIds, answer };
}

/**
 * Consecutive runs of items, each at most `batchSize` long with rows × longest row within
 * `maxTokens`. Cases come ordered by length, so a batch holds one length and its padding is small.
 */
function batches<T>(items: readonly T[], size: (item: T) => number, batchSize: number, maxTokens: number): T[][] {
  const out: T[][] = [];
  let current: T[] = [];
  let longest = 0;
  for (const item of items) {
    const n = size(item);
    const wider = Math.max(longest, n);
    if (current.length > 0 && (current.length >= batchSize || (current.length + 1) * wider > maxTokens)) {
      out.push(current);
      current = [];
      longest = 0;
    }
    current.push(item);
    longest = Math.max(longest, n);
  }
  if (current.length > 0) out.push(current);
  return out;
}

/**
 * log p(answer | prompt) summed over each row's answer tokens, for one batch. Rows are left-padded
 * (padding in segment 0, which real tokens never attend to; positions restart at each row's first
 * real token), so every answer ends at the last column and the LM head runs only on the last
 * (longest answer) positions: the [B, T, V] logits of a long haystack never exist.
 *
 * The decoder runs one layer at a time, each in its own scope, as model.hidden would compute it;
 * between layers it waits for the queue, since buffers are allocated when work is queued and freed
 * when the queue reaches the free: otherwise every layer's activations could be queued before the
 * first one's are released, and a long haystack would need the whole stack's at once.
 */
async function batchLogLikelihoods(model: CausalLM, rows: readonly EncodedCase[]): Promise<Float64Array> {
  const B = rows.length;
  const T = Math.max(...rows.map((r) => r.prompt.length + r.answer.length));
  const A = Math.max(...rows.map((r) => r.answer.length));
  const ids = new Int32Array(B * T);
  const seg = new Int32Array(B * T);
  const pos = new Int32Array(B * T);
  // The window is positions T-1-A .. T-2, whose logits predict tokens T-A .. T-1; prompt positions
  // and the short answers' leading window slots are ignored.
  const targets = new Int32Array(B * A).fill(-100);
  rows.forEach((r, b) => {
    const seq = [...r.prompt, ...r.answer];
    const pad = T - seq.length;
    for (let t = pad; t < T; t++) {
      ids[b * T + t] = seq[t - pad]!;
      seg[b * T + t] = 1;
      pos[b * T + t] = t - pad;
    }
    const a = r.answer.length;
    for (let j = 0; j < a; j++) targets[b * A + A - a + j] = r.answer[j]!;
  });
  const { device } = model;
  const inputs = noGrad(() => ({ ids: tensor(ids, [B, T], { device }), positions: tensor(pos, [B, T], { device }), segmentIds: tensor(seg, [B, T], { device }), targets: tensor(targets, [B, A], { device }) }));
  const options = { positions: inputs.positions, segmentIds: inputs.segmentIds };
  let h: Tensor | null = null;
  try {
    h = noGrad(() => tidy(() => model.model.embedTokens.forward(inputs.ids)));
    for (const [i, layer] of model.model.layers.entries()) {
      const x: Tensor = h;
      const next = noGrad(() => tidy(() => layer.forward(x, options, i)));
      x.dispose();
      h = next;
      await drain(next);
    }
    const last: Tensor = h;
    const sums = noGrad(() =>
      tidy(() => {
        const window = model.model.norm.forward(narrow(last, 1, T - 1 - A, A));
        const lp = sequenceLogprobs(model.logits(window), inputs.targets, { ignoreIndex: -100 });
        return lp.dtype === 'f32' ? lp : lp.to('f32');
      }),
    );
    try {
      return Float64Array.from((await sums.toArray()) as Float32Array);
    } finally {
      sums.dispose();
    }
  } finally {
    h?.dispose();
    for (const t of Object.values(inputs)) t.dispose();
  }
}

/** Resolves once the queue has run everything queued before it (one element of `t` is read back). */
async function drain(t: Tensor): Promise<void> {
  const probe = noGrad(() => tidy(() => narrow(narrow(t, 0, 0, 1), 1, 0, 1)));
  try {
    await probe.toArray();
  } finally {
    probe.dispose();
  }
}

function checkVocab(model: CausalLM, c: EncodedCase): void {
  const V = model.config.vocabSize;
  for (const id of [...c.prompt, ...c.answer]) {
    if (!Number.isInteger(id) || id < 0 || id >= V) throw new RangeError(`evaluateNiah: the tokenizer produced id ${id}, outside the model's vocabulary [0, ${V}); are they from the same checkpoint?`);
  }
}

export interface AnswerLogLikelihoodOptions {
  chat?: boolean;
  batchSize?: number;
  maxBatchTokens?: number;
}

/**
 * log p(continuation | prompt) for each pair, summed over the continuation's tokens, with the token
 * counts: teacher-forced, batched, under noGrad. The prompt is encoded as generate() encodes it.
 */
export async function answerLogLikelihoods(
  model: CausalLM,
  tokenizer: Tokenizer,
  pairs: ReadonlyArray<{ prompt: string; continuation: string }>,
  options: AnswerLogLikelihoodOptions = {},
): Promise<{ logLikelihood: number; answerTokens: number; promptTokens: number }[]> {
  const batchSize = checkPositiveInt('batchSize', options.batchSize ?? 8);
  const maxBatchTokens = checkPositiveInt('maxBatchTokens', options.maxBatchTokens ?? 32768);
  const encoded = pairs.map((p) => encodeCase(tokenizer, p.prompt, p.continuation, options.chat ?? false));
  for (const c of encoded) checkVocab(model, c);
  const indexed = encoded.map((c, i) => ({ c, i }));
  const out = new Array<{ logLikelihood: number; answerTokens: number; promptTokens: number }>(pairs.length);
  const wasTraining = model.training;
  model.eval();
  try {
    for (const batch of batches(indexed, (x) => x.c.prompt.length + x.c.answer.length, batchSize, maxBatchTokens)) {
      const ll = await batchLogLikelihoods(model, batch.map((x) => x.c));
      batch.forEach((x, k) => (out[x.i] = { logLikelihood: ll[k]!, answerTokens: x.c.answer.length, promptTokens: x.c.prompt.length }));
    }
  } finally {
    model.train(wasTraining);
  }
  return out;
}

function firstLine(text: string): string {
  const at = text.indexOf('\n');
  return at < 0 ? text : text.slice(0, at);
}

function summarize(cases: readonly NiahCaseResult[]): NiahSummary {
  const total = cases.length;
  const correct = cases.filter((c) => c.correct).length;
  const ll = cases.reduce((s, c) => s + c.logLikelihood, 0);
  const tokens = cases.reduce((s, c) => s + c.answerTokens, 0);
  return {
    exact: total === 0 ? 0 : correct / total,
    correct,
    total,
    logLikelihood: total === 0 ? 0 : ll / total,
    perTokenLogLikelihood: tokens === 0 ? 0 : ll / tokens,
  };
}

/**
 * Needle recall of `model` over lengths × depths: niahGrid's held-out cases, answered greedily
 * (stopping at a newline or EOS) and scored by exact match, and the log-likelihood of each answer.
 */
export async function evaluateNiah(model: CausalLM, tokenizer: Tokenizer, options: NiahOptions): Promise<NiahReport> {
  if (options === null || typeof options !== 'object') throw new TypeError('evaluateNiah: options must be an object with lengths and depths');
  const digits = options.digits ?? 4;
  // needle() validates digits (any length that fits every digit count will do), so a bad value is
  // reported before the grid's length check uses it.
  const separator = needle({ length: 1000, depth: 0, digits }).separator;
  const { lengths, depths } = checkGrid(options.lengths, options.depths, digits);
  const perCell = checkPositiveInt('perCell', options.perCell ?? 1);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw new RangeError(`evaluateNiah: seed must be an integer, got ${String(seed)}`);
  const maxNewTokens = checkPositiveInt('maxNewTokens', options.maxNewTokens ?? 16);
  const batchSize = checkPositiveInt('batchSize', options.batchSize ?? 8);
  const maxBatchTokens = checkPositiveInt('maxBatchTokens', options.maxBatchTokens ?? 32768);
  const chat = options.chat ?? false;
  if (options.generate !== undefined && typeof options.generate !== 'function') throw new TypeError('evaluateNiah: generate must be a function (prompts) => Promise<string[]>');

  const examples = niahGrid({ lengths, depths, perCell, seed, digits, split: 'eval' });
  // In raw mode the answer follows the prompt as it does in the pretraining text (separator, then
  // the value); a chat model answers with the value alone.
  const encoded = examples.map((e) => encodeCase(tokenizer, e.prompt, chat ? e.answer : separator + e.answer, chat));
  for (const c of encoded) checkVocab(model, c);

  const newline = tokenizer.encode('\n', { addSpecialTokens: false });
  const generate: Generate =
    options.generate ??
    ((prompts) => generateText(model, tokenizer, prompts, { chat, maxNewTokens, stopTokens: newline.length === 1 ? newline : [], stopStrings: ['\n'] }));
  const score = (output: string, answer: string) => exactMatch(firstLine(output), answer);

  const cases = new Array<NiahCaseResult>(examples.length);
  const indexed = examples.map((e, i) => ({ e, c: encoded[i]!, i }));
  const wasTraining = model.training;
  model.eval();
  let done = 0;
  try {
    for (const batch of batches(indexed, (x) => x.c.prompt.length + x.c.answer.length, batchSize, maxBatchTokens)) {
      const scored = await evaluate(generate, batch.map((x) => x.e), { batchSize: batch.length, score });
      const ll = await batchLogLikelihoods(model, batch.map((x) => x.c));
      batch.forEach((x, k) => {
        const e: NeedleExample = x.e;
        cases[x.i] = {
          length: e.length,
          depth: e.depth,
          actualDepth: e.actualDepth,
          answer: e.answer,
          output: firstLine(scored.results[k]!.output),
          correct: scored.results[k]!.correct,
          logLikelihood: ll[k]!,
          answerTokens: x.c.answer.length,
          promptTokens: x.c.prompt.length,
        };
      });
      done += batch.length;
      options.onProgress?.(done, examples.length);
    }
  } finally {
    model.train(wasTraining);
  }

  const cells: NiahCellResult[] = [];
  for (const length of lengths) {
    for (const depth of depths) {
      const mine = cases.filter((c) => c.length === length && c.depth === depth);
      cells.push({ length, depth, ...summarize(mine), promptTokens: mine.reduce((s, c) => s + c.promptTokens, 0) / mine.length });
    }
  }
  return { lengths, depths, perCell, seed, digits, chat, cells, overall: summarize(cases), cases };
}

// ---- presentation --------------------------------------------------------------------------------

export type NiahMetric = 'exact' | 'logLikelihood' | 'perTokenLogLikelihood';

const METRIC_TITLES: Record<NiahMetric, string> = {
  exact: 'Needle recall (exact match)',
  logLikelihood: 'log p(answer | prompt), summed over the answer',
  perTokenLogLikelihood: 'log p(answer | prompt) per answer token',
};

function percent(v: number): string {
  return `${Math.round(100 * v)}%`;
}

function depthLabel(d: number): string {
  return `${formatNumber(100 * d, 3)}%`;
}

function checkReport(report: NiahReport, what: string): void {
  if (!report || !Array.isArray(report.cells) || !Array.isArray(report.lengths) || !Array.isArray(report.depths)) throw new TypeError(`${what}: expected a report from evaluateNiah`);
}

/** values[depth][length] of one metric; NaN where the grid has no cell. */
function grid(report: NiahReport, metric: NiahMetric): number[][] {
  const byKey = new Map(report.cells.map((c) => [`${c.length}:${c.depth}`, c]));
  return report.depths.map((d) => report.lengths.map((l) => byKey.get(`${l}:${d}`)?.[metric] ?? Number.NaN));
}

export interface NiahHeatmapOptions {
  /** Default 'exact'. */
  metric?: NiahMetric;
  title?: string;
  width?: number;
}

/** The grid as an SVG heatmap: one row per depth (0% at the top), one column per length. */
export function niahHeatmapSvg(report: NiahReport, options: NiahHeatmapOptions = {}): string {
  checkReport(report, 'niahHeatmapSvg');
  const metric = options.metric ?? 'exact';
  if (!(metric in METRIC_TITLES)) throw new TypeError(`niahHeatmapSvg: metric must be 'exact', 'logLikelihood' or 'perTokenLogLikelihood', got ${String(metric)}`);
  const exact = metric === 'exact';
  return heatmapSvg({
    title: options.title ?? METRIC_TITLES[metric],
    xLabels: report.lengths,
    yLabels: report.depths.map(depthLabel),
    values: grid(report, metric),
    xLabel: 'prompt length (characters)',
    yLabel: 'needle depth',
    // Recall has fixed ends, so two heatmaps compare by color; log-likelihoods have no natural ends.
    ...(exact ? { min: 0, max: 1, format: percent } : { format: (v: number) => formatNumber(v, 3) }),
    ...(options.width === undefined ? {} : { width: options.width }),
  });
}

function textGrid(report: NiahReport, metric: NiahMetric, format: (v: number) => string): string {
  const values = grid(report, metric);
  const header = ['depth', ...report.lengths.map(String)];
  const rows = report.depths.map((d, r) => [depthLabel(d), ...values[r]!.map((v) => (Number.isFinite(v) ? format(v) : '-'))]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  return [header, ...rows].map((row) => row.map((v, i) => (i === 0 ? v.padEnd(widths[i]!) : v.padStart(widths[i]!))).join('  ')).join('\n');
}

function overallLine(s: NiahSummary): string {
  return `overall: ${s.correct}/${s.total} exact (${(100 * s.exact).toFixed(1)}%), log-likelihood ${s.logLikelihood.toFixed(3)} per answer (${s.perTokenLogLikelihood.toFixed(3)} per token)`;
}

/** The report for a terminal: recall and mean log-likelihood grids (rows: depth; columns: length). */
export function niahTable(report: NiahReport): string {
  checkReport(report, 'niahTable');
  return [
    `exact match, ${report.perCell} case${report.perCell === 1 ? '' : 's'} per cell (rows: needle depth; columns: prompt length in characters)`,
    textGrid(report, 'exact', percent),
    '',
    'mean log p(answer | prompt), nats summed over the answer tokens',
    textGrid(report, 'logLikelihood', (v) => v.toFixed(2)),
    '',
    overallLine(report.overall),
  ].join('\n');
}

/** The report as a page: settings, both heatmaps and every cell in a table. */
export function niahHtmlReport(report: NiahReport, options: { title?: string } = {}): Report {
  checkReport(report, 'niahHtmlReport');
  return {
    title: options.title ?? 'Needle in a haystack',
    subtitle: `${report.lengths.length} lengths × ${report.depths.length} depths, ${report.perCell} case${report.perCell === 1 ? '' : 's'} per cell, ${report.digits}-digit needles, seed ${report.seed}, ${report.chat ? 'chat template' : 'raw prompts'}`,
    sections: [
      {
        heading: 'Recall',
        text: `${overallLine(report.overall)}.\n\nEach case hides "The magic number is N." at the given depth of filler prose and ends with "What is the magic number?". Exact match: the greedy answer, up to its first newline, equals N. Log-likelihood: log p(N | prompt) from one teacher-forced pass, in nats; 0 is certainty.`,
        svg: niahHeatmapSvg(report, { metric: 'exact' }),
      },
      { heading: 'Log-likelihood of the needle', svg: niahHeatmapSvg(report, { metric: 'logLikelihood' }) },
      {
        heading: 'Cells',
        table: {
          columns: ['length (characters)', 'depth', 'prompt tokens', 'exact', 'correct / total', 'log-likelihood', 'per token'],
          rows: report.cells.map((c) => [c.length, depthLabel(c.depth), Math.round(c.promptTokens), percent(c.exact), `${c.correct} / ${c.total}`, c.logLikelihood, c.perTokenLogLikelihood]),
        },
      },
    ],
  };
}

/** Writes the HTML report (heatmaps and table) to `path`. */
export async function writeNiahReport(path: string, report: NiahReport, options: { title?: string } = {}): Promise<void> {
  await writeReport(path, niahHtmlReport(report, options));
}

// ---- command line --------------------------------------------------------------------------------

export interface NiahCommandOptions {
  /** A Hugging Face model directory with its tokenizer. */
  modelDir: string;
  /** A PEFT adapter directory to load on top. */
  adapterDir?: string;
  lengths: readonly number[];
  depths: readonly number[];
  perCell?: number;
  seed?: number;
  digits?: number;
  chat?: boolean;
  maxNewTokens?: number;
  batchSize?: number;
  maxBatchTokens?: number;
  /** Parameter dtype of the loaded model. Default 'f32'. */
  dtype?: 'f32' | 'bf16';
  /** Where the model runs. Default 'cpu'. */
  device?: Device;
  /**
   * Where to write: a path ending in .html (the report), .svg (the recall heatmap) or .json (the
   * report's data); any other path is a directory that receives niah.html, niah-exact.svg,
   * niah-loglik.svg and niah.json.
   */
  out?: string;
  title?: string;
  /** Where the table and the written paths are printed. Default: stdout. */
  log?: (line: string) => void;
}

export interface NiahCommandResult extends NiahReport {
  /** The table as printed. */
  table: string;
  /** The files written. */
  files: string[];
}

async function writeText(path: string, text: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, text);
}

/** `tunekit eval niah`: loads a model (and adapter), evaluates, prints the table, writes the report. */
export async function runNiahCommand(options: NiahCommandOptions): Promise<NiahCommandResult> {
  const log = options.log ?? ((line: string) => void process.stdout.write(`${line}\n`));
  if (typeof options.modelDir !== 'string' || options.modelDir.length === 0) throw new TypeError('eval niah: modelDir must be a model directory');
  const ext = options.out === undefined ? '' : extname(options.out).toLowerCase();
  if (ext === '.png') throw new RangeError('eval niah: PNG output is not supported; write .svg (or .html) and convert it if a raster image is needed');
  const evalOptions: NiahOptions = {
    lengths: options.lengths,
    depths: options.depths,
    ...(options.perCell === undefined ? {} : { perCell: options.perCell }),
    ...(options.seed === undefined ? {} : { seed: options.seed }),
    ...(options.digits === undefined ? {} : { digits: options.digits }),
    ...(options.chat === undefined ? {} : { chat: options.chat }),
    ...(options.maxNewTokens === undefined ? {} : { maxNewTokens: options.maxNewTokens }),
    ...(options.batchSize === undefined ? {} : { batchSize: options.batchSize }),
    ...(options.maxBatchTokens === undefined ? {} : { maxBatchTokens: options.maxBatchTokens }),
  };
  // Bad grids fail here, before minutes go into loading a checkpoint.
  checkGrid(options.lengths, options.depths, options.digits ?? 4);
  const tokenizer = await loadTokenizer(options.modelDir);
  const model = await loadModel(options.modelDir, { dtype: options.dtype ?? 'f32', device: options.device ?? 'cpu' });
  let report: NiahReport;
  try {
    if (options.adapterDir) await loadAdapter(model, options.adapterDir);
    report = await evaluateNiah(model, tokenizer, evalOptions);
  } finally {
    model.dispose();
  }
  const table = niahTable(report);
  log(table);
  const files: string[] = [];
  if (options.out !== undefined) {
    const title = options.title ?? `Needle in a haystack: ${options.modelDir}${options.adapterDir ? ` + ${options.adapterDir}` : ''}`;
    const json = `${JSON.stringify(report, null, 2)}\n`;
    if (ext === '.html' || ext === '.htm') {
      await writeNiahReport(options.out, report, { title });
      files.push(options.out);
    } else if (ext === '.svg') {
      await writeText(options.out, niahHeatmapSvg(report, { metric: 'exact' }));
      files.push(options.out);
    } else if (ext === '.json') {
      await writeText(options.out, json);
      files.push(options.out);
    } else {
      const at = (name: string) => join(options.out!, name);
      await writeNiahReport(at('niah.html'), report, { title });
      await writeText(at('niah-exact.svg'), niahHeatmapSvg(report, { metric: 'exact' }));
      await writeText(at('niah-loglik.svg'), niahHeatmapSvg(report, { metric: 'logLikelihood' }));
      await writeText(at('niah.json'), json);
      files.push(at('niah.html'), at('niah-exact.svg'), at('niah-loglik.svg'), at('niah.json'));
    }
    for (const f of files) log(`wrote ${f}`);
  }
  return { ...report, table, files };
}
