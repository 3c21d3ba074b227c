// Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens,
// batches of prompts of different lengths.
//
// A batch is left-padded to its longest prompt. Padding gets segment id 0 and real tokens 1, so
// the fused attention (which takes separate query and key segment ids) never lets a real token
// see padding; positions count from 0 at each row's first real token. The prompt is run once
// (prefill), then one token per step for every row, appending keys and values to the cache.
// Only the last position's logits are computed and read back.
import { noGrad } from '../autograd.js';
import type { CausalLM, KvCache } from '../models/llama.js';
import { concat, narrow } from '../ops/shape.js';
import { tidy } from '../scope.js';
import { ones, tensor, type Tensor } from '../tensor.js';
import type { ChatMessage, Tokenizer } from '../tokenizer/types.js';

export interface SamplingOptions {
  /** Tokens to generate at most per prompt. Default 64. */
  maxNewTokens?: number;
  /** 0 (default) picks the most likely token (greedy); otherwise logits are divided by it and sampled. */
  temperature?: number;
  /** Sample among the k most likely tokens only (0: all). */
  topK?: number;
  /** Sample among the most likely tokens whose probabilities add up to p (1: all). */
  topP?: number;
  /** Generation of a row ends at any of these ids (not included in the output). */
  stopTokens?: readonly number[];
  /** Seed of the sampler. Default 0. */
  seed?: number;
}

export class GenerateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GenerateError';
  }
}

/** New token ids for each prompt (token ids, none empty). */
export async function generateTokens(model: CausalLM, prompts: readonly (readonly number[])[], options: SamplingOptions = {}): Promise<number[][]> {
  const { maxNewTokens = 64, temperature = 0, topK = 0, topP = 1, stopTokens = [], seed = 0 } = options;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) throw new GenerateError(`generate: maxNewTokens must be a non-negative integer, got ${String(maxNewTokens)}`);
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new GenerateError(`generate: temperature must be a finite number >= 0, got ${String(temperature)}`);
  if (!Number.isInteger(topK) || topK < 0) throw new GenerateError(`generate: topK must be a non-negative integer, got ${String(topK)}`);
  if (!(topP > 0 && topP <= 1)) throw new GenerateError(`generate: topP must be in (0, 1], got ${String(topP)}`);
  const V = model.config.vocabSize;
  prompts.forEach((p, i) => {
    if (p.length === 0) throw new GenerateError(`generate: prompt ${i} is empty; it needs at least one token`);
    for (const id of p) if (!Number.isInteger(id) || id < 0 || id >= V) throw new GenerateError(`generate: prompt ${i} holds token ${id}, outside the vocabulary [0, ${V})`);
  });
  const B = prompts.length;
  if (B === 0 || maxNewTokens === 0) return prompts.map(() => []);
  const P = Math.max(...prompts.map((p) => p.length));
  const stops = new Set(stopTokens);
  const rng = mulberry32(seed);
  const out: number[][] = prompts.map(() => []);
  const done = new Array<boolean>(B).fill(false);

  const wasTraining = model.training;
  model.eval();
  const cache = model.newCache();
  try {
    // Prefill: the left-padded prompts.
    const ids = new Int32Array(B * P);
    const seg = new Int32Array(B * P);
    const pos = new Int32Array(B * P);
    prompts.forEach((p, b) => {
      const pad = P - p.length;
      for (let t = 0; t < P; t++) {
        ids[b * P + t] = t < pad ? 0 : p[t - pad]!;
        seg[b * P + t] = t < pad ? 0 : 1;
        pos[b * P + t] = t < pad ? 0 : t - pad;
      }
    });
    const { device } = model;
    let keySeg = noGrad(() => tensor(seg, [B, P], { device }));
    let logits = await lastLogits(model, ids, [B, P], seg, pos, keySeg, cache);
    for (let step = 0; step < maxNewTokens; step++) {
      const next = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        const row = logits.subarray(b * V, (b + 1) * V);
        const id = temperature === 0 ? argmax(row) : sample(row, temperature, topK, topP, rng);
        next[b] = id;
        if (done[b]) continue;
        if (stops.has(id)) done[b] = true;
        else out[b]!.push(id);
      }
      if (done.every(Boolean) || step + 1 === maxNewTokens) break;
      // Every row feeds one token per step (finished rows too, their tokens dropped), so the
      // batch stays rectangular and the token fed now sits at position promptLength + step.
      const stepPos = Int32Array.from(prompts, (p) => p.length + step);
      const grown: Tensor = noGrad(() => tidy(() => concat([keySeg, ones([B, 1], { dtype: 'i32', device })], 1)));
      keySeg.dispose();
      keySeg = grown;
      logits = await lastLogits(model, next, [B, 1], new Int32Array(B).fill(1), stepPos, keySeg, cache);
    }
    keySeg.dispose();
  } finally {
    cache.dispose();
    model.train(wasTraining);
  }
  return out;
}

/** Runs the model on ids [B, T] with the cache and returns the last position's logits [B, V]. */
async function lastLogits(model: CausalLM, ids: Int32Array, shape: [number, number], seg: Int32Array, pos: Int32Array, keySeg: Tensor, cache: KvCache): Promise<Float32Array> {
  const [B, T] = shape;
  const logits = noGrad(() =>
    tidy(() => {
      const { device } = model;
      const h = model.hidden(tensor(ids, shape, { device }), { positions: tensor(pos, shape, { device }), segmentIds: tensor(seg, shape, { device }), keySegmentIds: keySeg, cache });
      const last = T === 1 ? h : narrow(h, 1, T - 1, 1);
      return model.logits(last).to('f32');
    }),
  );
  try {
    const values = (await logits.toArray()) as Float32Array;
    if (values.length !== B * model.config.vocabSize) throw new GenerateError('generate: unexpected logits size');
    return values;
  } finally {
    logits.dispose();
  }
}

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

function sample(row: Float32Array, temperature: number, topK: number, topP: number, rng: () => number): number {
  let order = Array.from(row.keys());
  order.sort((a, b) => row[b]! - row[a]!);
  if (topK > 0) order = order.slice(0, topK);
  const max = row[order[0]!]!;
  let probs = order.map((i) => Math.exp((row[i]! - max) / temperature));
  let total = probs.reduce((a, b) => a + b, 0);
  if (topP < 1) {
    let acc = 0;
    let keep = 0;
    while (keep < probs.length && acc < topP * total) acc += probs[keep++]!;
    order = order.slice(0, Math.max(1, keep));
    probs = probs.slice(0, Math.max(1, keep));
    total = probs.reduce((a, b) => a + b, 0);
  }
  let u = rng() * total;
  for (let i = 0; i < probs.length; i++) {
    u -= probs[i]!;
    if (u <= 0) return order[i]!;
  }
  return order[order.length - 1]!;
}

function mulberry32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface GenerateOptions extends SamplingOptions {
  /** Render each prompt with the tokenizer's chat template (a string becomes one user message). */
  chat?: boolean;
  /** Passed to the chat template (e.g. enable_thinking). */
  templateVars?: Record<string, unknown>;
  /** Generation of a row also ends when its text contains one of these (cut before it). */
  stopStrings?: readonly string[];
}

/** Generates text for each prompt (a string, or chat messages) and returns the new text. */
export async function generate(model: CausalLM, tokenizer: Tokenizer, prompts: readonly (string | readonly ChatMessage[])[], options: GenerateOptions = {}): Promise<string[]> {
  const encoded = prompts.map((p) => {
    if (typeof p !== 'string' || options.chat) {
      const messages: ChatMessage[] = typeof p === 'string' ? [{ role: 'user', content: p }] : [...p];
      return tokenizer.encode(tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true, vars: options.templateVars }), { addSpecialTokens: false });
    }
    return tokenizer.encode(p);
  });
  const stopTokens = [...(options.stopTokens ?? []), ...(tokenizer.eosId !== null ? [tokenizer.eosId] : []), ...model.config.eosTokenIds];
  const ids = await generateTokens(model, encoded, { ...options, stopTokens });
  return ids.map((t) => {
    let text = tokenizer.decode(t, { skipSpecialTokens: true });
    for (const s of options.stopStrings ?? []) {
      const at = text.indexOf(s);
      if (at >= 0) text = text.slice(0, at);
    }
    return text;
  });
}
