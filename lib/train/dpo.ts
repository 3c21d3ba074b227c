// Direct preference optimization (Rafailov et al.) and its iterative form.
//
// Data: preference records { prompt, chosen, rejected }, each a string (the prompt becomes one
// user message, the answers one assistant message) or a list of chat messages, as TRL takes them.
// Each side is the conversation prompt + answer through the chat template, with only the answer's
// tokens counted (the same masks as SFT).
//
// Reference log-probabilities are computed in a first pass over the data with the model as it is
// before training, so only one model is ever in memory: with LoRA the adapters start at B = 0, so
// that model IS the base with adapters off. Chosen and rejected answers of a pair sit in one batch
// (rows 0..P-1 chosen, P..2P-1 rejected), so one forward pass scores both.
//
// Iterative DPO: each round generates k answers per prompt with the current policy (KV-cache
// sampling, in process), scores them with a judge (a TypeScript function), pairs the best against
// the worst, and trains on those pairs for a round.
import { z } from 'zod';

import { noGrad } from '../autograd.js';
import { tokenizeConversation } from '../data/chat-mask.js';
import { DataError, type RecordOrigin } from '../data/errors.js';
import { readJsonl, type DataSource } from '../data/jsonl.js';
import type { ChatTurn } from '../data/records.js';
import { generate } from '../generate/index.js';
import type { CausalLM } from '../models/llama.js';
import { dpoLoss, linearCrossEntropy } from '../ops/loss.js';
import { concat, narrow } from '../ops/shape.js';
import { scale, sub } from '../ops/elementwise.js';
import { tidy } from '../scope.js';
import { tensor, type Tensor } from '../tensor.js';
import type { Tokenizer } from '../tokenizer/types.js';
import type { BatchSource, LossFn, MicroLoss } from './trainer.js';

const turn = z.object({ role: z.enum(['system', 'user', 'assistant']), content: z.string() });
const side = z.union([z.string(), z.array(turn).min(1)]);
export const preferenceSchema = z.object({ prompt: side, chosen: side, rejected: side });
export type PreferenceRecord = z.infer<typeof preferenceSchema>;

/** One tokenized pair: ids and labels (-100 outside the answer) of each side. */
export interface TokenizedPair {
  chosen: { ids: number[]; labels: number[] };
  rejected: { ids: number[]; labels: number[] };
  origin?: RecordOrigin;
}

function messages(v: string | ChatTurn[], role: 'user' | 'assistant'): ChatTurn[] {
  return typeof v === 'string' ? [{ role, content: v }] : v;
}

export function tokenizePair(tokenizer: Tokenizer, r: PreferenceRecord, origin?: RecordOrigin): TokenizedPair {
  const prompt = messages(r.prompt, 'user').map((m) => ({ ...m, train: false }));
  const side = (answer: string | ChatTurn[]) => tokenizeConversation(tokenizer, [...prompt, ...messages(answer, 'assistant')], {}, origin);
  return { chosen: side(r.chosen), rejected: side(r.rejected), ...(origin ? { origin } : {}) };
}

/** Reads and tokenizes preference records (errors name file:line and the missing field). */
export async function readPreferences(source: DataSource, tokenizer: Tokenizer): Promise<TokenizedPair[]> {
  const out: TokenizedPair[] = [];
  for await (const { value, file, line } of readJsonl(source)) {
    const parsed = preferenceSchema.safeParse(value);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      throw new DataError(`a preference record needs prompt, chosen and rejected (strings or message lists): ${issue.path.join('.') || '(record)'}: ${issue.message}`, { file, line });
    }
    out.push(tokenizePair(tokenizer, parsed.data, { file, line }));
  }
  if (out.length === 0) throw new DataError(`no preference records in ${typeof source === 'string' ? source : 'the given records'}`);
  return out;
}

/** Pairs batched for DPO: 2P rows [chosen x P, rejected x P] of seqLen, and the reference log-probs. */
export interface PreferenceBatch {
  ids: Int32Array;
  targets: Int32Array;
  pairs: number;
  seqLen: number;
  refChosen: Float32Array;
  refRejected: Float32Array;
}

function rowsOf(pairs: readonly TokenizedPair[], seqLen: number): { ids: Int32Array; targets: Int32Array; T: number } {
  const longest = Math.max(...pairs.flatMap((p) => [p.chosen.ids.length, p.rejected.ids.length]));
  if (longest > seqLen) {
    const bad = pairs.find((p) => p.chosen.ids.length > seqLen || p.rejected.ids.length > seqLen)!;
    const where = bad.origin ? `${bad.origin.file}:${bad.origin.line}: ` : '';
    throw new DataError(`${where}a preference pair is ${Math.max(bad.chosen.ids.length, bad.rejected.ids.length)} tokens long, more than seqLen ${seqLen}; raise seqLen or shorten the record`);
  }
  // Rows as long as the batch's longest sequence (not seqLen): less padding to compute.
  const T = longest;
  const P = pairs.length;
  const ids = new Int32Array(2 * P * T);
  const targets = new Int32Array(2 * P * T).fill(-100);
  const put = (row: number, s: { ids: number[]; labels: number[] }) => {
    for (let t = 0; t < s.ids.length; t++) ids[row * T + t] = s.ids[t]!;
    for (let t = 0; t + 1 < s.ids.length; t++) targets[row * T + t] = s.labels[t + 1]!;
  };
  pairs.forEach((p, i) => {
    put(i, p.chosen);
    put(P + i, p.rejected);
  });
  return { ids, targets, T };
}

/**
 * Sequence log-probs of the answers of a batch of pairs: [2P] (chosen first), with gradients when
 * recording. A row's log-prob is minus its summed cross entropy, computed by the fused, chunked
 * LM-head loss one row at a time, so the [2P, T, V] logits (gigabytes at a 128k vocabulary) never
 * exist.
 */
function pairLogprobs(model: CausalLM, ids: Int32Array, targets: Int32Array, rows: number, T: number): Tensor {
  const { device } = model;
  const h = model.hidden(tensor(ids, [rows, T], { device }));
  const t = tensor(targets, [rows, T], { device });
  const perRow = Array.from({ length: rows }, (_, r) =>
    scale(linearCrossEntropy(narrow(h, 0, r, 1), model.lmHeadWeight, narrow(t, 0, r, 1), { reduction: 'sum' }), -1).reshape([1]),
  );
  return concat(perRow, 0);
}

/** The reference log-probs of every pair under the model as it is now (no gradients). */
export async function referenceLogprobs(model: CausalLM, pairs: readonly TokenizedPair[], options: { seqLen: number; batchSize: number }): Promise<{ chosen: Float32Array; rejected: Float32Array }> {
  const chosen = new Float32Array(pairs.length);
  const rejected = new Float32Array(pairs.length);
  const wasTraining = model.training;
  model.eval();
  try {
    for (let i = 0; i < pairs.length; i += options.batchSize) {
      const group = pairs.slice(i, i + options.batchSize);
      const { ids, targets, T } = rowsOf(group, options.seqLen);
      const lp = noGrad(() => tidy(() => pairLogprobs(model, ids, targets, 2 * group.length, T)));
      const values = (await lp.toArray()) as Float32Array;
      lp.dispose();
      chosen.set(values.subarray(0, group.length), i);
      rejected.set(values.subarray(group.length), i);
    }
  } finally {
    model.train(wasTraining);
  }
  return { chosen, rejected };
}

/** Batches of pairs in a seeded shuffled order, epoch after epoch; its state is (epoch, index). */
export class PreferenceSource implements BatchSource<PreferenceBatch> {
  #epoch = 0;
  #index = 0;
  #order: number[] = [];

  constructor(
    readonly pairs: readonly TokenizedPair[],
    readonly ref: { chosen: Float32Array; rejected: Float32Array },
    readonly options: { batchSize: number; seqLen: number; epochs: number; seed: number },
  ) {
    this.#order = this.#shuffle(0);
  }

  #shuffle(epoch: number): number[] {
    const order = this.pairs.map((_, i) => i);
    let s = (this.options.seed * 2654435761 + epoch * 40503 + 1) >>> 0;
    for (let i = order.length - 1; i > 0; i--) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      const j = s % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    return order;
  }

  async next(): Promise<PreferenceBatch | null> {
    if (this.#index >= this.pairs.length) {
      if (this.#epoch + 1 >= this.options.epochs) return null;
      this.#epoch++;
      this.#index = 0;
      this.#order = this.#shuffle(this.#epoch);
    }
    const picked = this.#order.slice(this.#index, this.#index + this.options.batchSize);
    this.#index += picked.length;
    const group = picked.map((i) => this.pairs[i]!);
    const { ids, targets, T } = rowsOf(group, this.options.seqLen);
    return { ids, targets, pairs: group.length, seqLen: T, refChosen: Float32Array.from(picked, (i) => this.ref.chosen[i]!), refRejected: Float32Array.from(picked, (i) => this.ref.rejected[i]!) };
  }

  state(): unknown {
    return { epoch: this.#epoch, index: this.#index };
  }

  restore(state: unknown): void {
    const s = state as { epoch: number; index: number };
    this.#epoch = s.epoch;
    this.#index = s.index;
    this.#order = this.#shuffle(s.epoch);
  }
}

export interface DpoOptions {
  beta?: number;
  kind?: 'sigmoid' | 'ipo' | 'hinge';
  labelSmoothing?: number;
}

/** The DPO loss of a batch of pairs, summed over pairs, with reward accuracy and margin as metrics. */
export function dpoLossFn(options: DpoOptions = {}): LossFn<PreferenceBatch> {
  const { beta = 0.1, kind = 'sigmoid', labelSmoothing = 0 } = options;
  return (model, b): MicroLoss => {
    const P = b.pairs;
    const lp = pairLogprobs(model, b.ids, b.targets, 2 * P, b.seqLen);
    const pc = narrow(lp, 0, 0, P);
    const pr = narrow(lp, 0, P, P);
    const { device } = model;
    const r = dpoLoss(pc, pr, tensor(b.refChosen, [P], { device }), tensor(b.refRejected, [P], { device }), { beta, kind, labelSmoothing });
    const margins = sub(r.chosenRewards, r.rejectedRewards);
    return {
      loss: scale(r.loss, P),
      units: P,
      // Per-pair margins, reduced after the step: the accuracy counts the positive ones.
      metrics: { rewardAccuracy: margins, rewardMargin: margins, chosenLogprob: pc, rejectedLogprob: pr },
      reduce: { rewardAccuracy: (v) => v.reduce((n, m) => n + (m > 0 ? 1 : 0), 0) },
    };
  };
}

/**
 * Held-out preference accuracy: the fraction of pairs whose chosen answer the model gives a
 * higher log-probability than the rejected one (no reference needed).
 */
export async function preferenceAccuracy(model: CausalLM, pairs: readonly TokenizedPair[], options: { seqLen: number; batchSize?: number }): Promise<number> {
  const lp = await referenceLogprobs(model, pairs, { seqLen: options.seqLen, batchSize: options.batchSize ?? 16 });
  let correct = 0;
  for (let i = 0; i < pairs.length; i++) correct += lp.chosen[i]! > lp.rejected[i]! ? 1 : 0;
  return correct / pairs.length;
}

/** A judge scores a response to a prompt; higher is better. */
export type Judge = (prompt: string, response: string) => number | Promise<number>;

/**
 * One round of iterative DPO's data: k sampled responses per prompt, the best and the worst by the
 * judge as a pair (prompts whose responses all score the same give no pair).
 */
export async function samplePreferencePairs(model: CausalLM, tokenizer: Tokenizer, prompts: readonly string[], judge: Judge, options: { samples: number; temperature?: number; maxNewTokens?: number; seed?: number }): Promise<PreferenceRecord[]> {
  const k = options.samples;
  if (!Number.isInteger(k) || k < 2) throw new DataError(`iterative DPO needs at least 2 samples per prompt, got ${String(k)}`);
  const expanded = prompts.flatMap((p) => Array.from({ length: k }, () => p));
  const responses = await generate(model, tokenizer, expanded, { chat: true, temperature: options.temperature ?? 1, maxNewTokens: options.maxNewTokens ?? 16, seed: options.seed ?? 0 });
  const pairs: PreferenceRecord[] = [];
  for (let i = 0; i < prompts.length; i++) {
    const scored = await Promise.all(responses.slice(i * k, (i + 1) * k).map(async (r) => ({ r, s: await judge(prompts[i]!, r) })));
    scored.sort((a, b) => b.s - a.s);
    if (scored[0]!.s > scored[scored.length - 1]!.s) pairs.push({ prompt: prompts[i]!, chosen: scored[0]!.r, rejected: scored[scored.length - 1]!.r });
  }
  return pairs;
}
