// Running a recipe: each stage loads the previous stage's model (or the base, or a preset built from
// scratch), applies LoRA / QLoRA when asked, trains on its data with its loss, and writes
// <output>/<stage>/model (a full Hugging Face directory that loads on its own; LoRA stages merge
// their adapter into it and also keep it in <output>/<stage>/adapter). A stage whose model
// directory exists is complete and skipped; an interrupted stage resumes from its checkpoints.
//
// Stage types: pretrain (text, optional replay), sft (alpaca or messages, assistant tokens only),
// dpo (preference pairs, or iterative: generate, judge, pair, train), distill (a teacher's
// distribution, mixed with cross entropy), average (per-phase averaging of earlier stages).
// Any training stage may first rewrite the RoPE base or scaling (context extension).
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

import { DataPipeline, type DataPosition, type PipelineBatch } from '../data/index.js';
import { readJsonl } from '../data/jsonl.js';
import * as synthetic from '../data/synthetic/index.js';
import { averageCheckpoints } from '../models/average.js';
import { createModel, loadModel, saveModel } from '../models/io.js';
import type { CausalLM } from '../models/llama.js';
import { applyLora, mergeLora, saveAdapter } from '../models/lora.js';
import { setThreads } from '../runtime.js';
import { manualSeed, type Device } from '../tensor.js';
import { ByteTokenizer } from '../tokenizer/byte.js';
import { loadTokenizer } from '../tokenizer/load.js';
import type { Tokenizer } from '../tokenizer/types.js';
import { checkTeacher, distillLossFn } from './distill.js';
import { dpoLossFn, PreferenceSource, readPreferences, referenceLogprobs, samplePreferencePairs, tokenizePair, type Judge, type TokenizedPair } from './dpo.js';
import type { Recipe, StageConfig } from './recipe.js';
import { train, TrainError, type Batch, type BatchSource, type LossFn, type ProgressEvent, type TrainResult } from './trainer.js';

type TrainingStage = Exclude<StageConfig, { type: 'average' }>;

export interface RunRecipeOptions {
  /** Resolves relative data and model paths (the recipe file's directory). Default: the working directory. */
  baseDir?: string;
  signal?: AbortSignal;
  handleSigint?: boolean;
  onStageStart?: (stage: StageConfig, info: { index: number; steps: number; trainable: number }) => void;
  onProgress?: (stage: StageConfig, e: ProgressEvent) => void;
  /** Called with a training stage's model before it trains (a baseline measurement). */
  beforeStage?: (stage: StageConfig, model: CausalLM, tokenizer: Tokenizer) => Promise<void>;
  /** Called with each stage's model after training, before it is saved (evaluation, reports). */
  afterStage?: (stage: StageConfig, model: CausalLM, tokenizer: Tokenizer) => Promise<void>;
}

export interface StageOutcome {
  name: string;
  type: StageConfig['type'];
  /** The stage's model directory. */
  modelDir: string;
  skipped: boolean;
  result: TrainResult | null;
}

/** Adapts the data pipeline to the trainer: batches with their resume position. */
class PipelineSource implements BatchSource {
  #iter: AsyncGenerator<PipelineBatch>;
  #position: DataPosition;

  constructor(readonly pipeline: DataPipeline) {
    this.#position = pipeline.initialPosition();
    this.#iter = pipeline.batches();
  }

  async next(): Promise<Batch | null> {
    const r = await this.#iter.next();
    if (r.done) return null;
    this.#position = r.value.position;
    return { ...r.value, tokens: r.value.targetCount };
  }

  state(): unknown {
    return this.#position;
  }

  restore(state: unknown): void {
    this.#position = state as DataPosition;
    this.#iter = this.pipeline.batches(this.#position);
  }
}

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => null)) !== null;
}

/** Rewrites the model's RoPE base or scaling, in the config it saves too (context extension). */
export function applyRope(model: CausalLM, rope: NonNullable<TrainingStage['rope']>): void {
  const c = model.config;
  const raw = c.raw as Record<string, unknown>;
  if ('theta' in rope) {
    c.ropeTheta = rope.theta;
    raw.rope_theta = rope.theta;
    if (raw.rope_parameters && typeof raw.rope_parameters === 'object') (raw.rope_parameters as Record<string, unknown>).rope_theta = rope.theta;
    return;
  }
  const s = rope.scaling;
  c.ropeScaling = {
    ropeType: s.rope_type,
    factor: s.factor,
    ...(s.original_max_position_embeddings !== undefined ? { originalMaxPositionEmbeddings: s.original_max_position_embeddings } : {}),
    ...(s.low_freq_factor !== undefined ? { lowFreqFactor: s.low_freq_factor } : {}),
    ...(s.high_freq_factor !== undefined ? { highFreqFactor: s.high_freq_factor } : {}),
    ...(s.beta_fast !== undefined ? { betaFast: s.beta_fast } : {}),
    ...(s.beta_slow !== undefined ? { betaSlow: s.beta_slow } : {}),
    ...(s.attention_factor !== undefined ? { attentionFactor: s.attention_factor } : {}),
  };
  raw.rope_scaling = { ...s, type: s.rope_type };
  delete raw.rope_parameters;
  if (rope.maxPositionEmbeddings) {
    c.maxPositionEmbeddings = rope.maxPositionEmbeddings;
    raw.max_position_embeddings = rope.maxPositionEmbeddings;
  }
}

async function loadJudge(judge: { task: string } | { module: string }, at: (p: string) => string): Promise<Judge> {
  if ('module' in judge) {
    const mod = (await import(pathToFileURL(at(judge.module)).href)) as { default?: unknown };
    if (typeof mod.default !== 'function') throw new TrainError(`iterative DPO: ${judge.module} must export a default function (prompt, response) => number`);
    return mod.default as Judge;
  }
  // A toy-world task: regenerate the expected answer from the prompt by exact match.
  const tasks: Record<string, synthetic.Task> = {
    arithmetic: synthetic.arithmetic({ max: 49, ops: ['+'] }),
    keyValue: synthetic.keyValue({ pairs: 3 }),
    copy: synthetic.copyString(),
    reverse: synthetic.reverseString(),
  };
  const task = tasks[judge.task]!;
  const name = judge.task as 'arithmetic' | 'keyValue' | 'copy' | 'reverse';
  return (prompt, response) => {
    const answer = synthetic.solvePrompt(name, prompt);
    return answer !== null && task.score(response, answer) ? 1 : 0;
  };
}

export async function runRecipe(recipe: Recipe, options: RunRecipeOptions = {}): Promise<StageOutcome[]> {
  const base = options.baseDir ?? process.cwd();
  const at = (p: string) => (isAbsolute(p) ? p : resolve(base, p));
  if (recipe.threads) setThreads(recipe.threads);
  const output = at(recipe.output);
  await mkdir(output, { recursive: true });
  const outcomes: StageOutcome[] = [];
  const dirs = new Map<string, string>();
  let previousDir: string | null = typeof recipe.model === 'string' ? at(recipe.model) : null;

  for (const [index, stage] of recipe.stages.entries()) {
    const stageDir = join(output, stage.name);
    const modelDir = join(stageDir, 'model');
    if (await exists(join(modelDir, 'config.json'))) {
      outcomes.push({ name: stage.name, type: stage.type, modelDir, skipped: true, result: null });
      dirs.set(stage.name, modelDir);
      previousDir = modelDir;
      continue;
    }
    if (stage.type === 'average') {
      options.onStageStart?.(stage, { index, steps: 0, trainable: 0 });
      await averageCheckpoints(stage.stages.map((n) => dirs.get(n)!), modelDir, stage.weights ? { weights: stage.weights } : {});
      outcomes.push({ name: stage.name, type: stage.type, modelDir, skipped: false, result: null });
      dirs.set(stage.name, modelDir);
      previousDir = modelDir;
      continue;
    }
    const outcome = await runTrainingStage(recipe, stage, index, { previousDir, stageDir, modelDir, at, options });
    outcomes.push(outcome);
    if (outcome.result?.stopped !== 'done') return outcomes;
    dirs.set(stage.name, modelDir);
    previousDir = modelDir;
  }
  return outcomes;
}

interface StageContext {
  previousDir: string | null;
  stageDir: string;
  modelDir: string;
  at: (p: string) => string;
  options: RunRecipeOptions;
}

async function runTrainingStage(recipe: Recipe, stage: TrainingStage, index: number, ctx: StageContext): Promise<StageOutcome> {
  const { previousDir, stageDir, modelDir, at, options } = ctx;
  const seed = stage.seed ?? recipe.seed;
  // Every stage starts from its own seed (random init, LoRA init, dropout masks), so a stage run
  // in a fresh process is the same run; a resumed stage restores the sequence from its checkpoint.
  manualSeed(seed);
  // The tokenizer comes with the model directory; a preset starts with the byte-level one.
  const tokenizer: Tokenizer = previousDir ? await loadTokenizer(previousDir) : new ByteTokenizer();
  const quantize = stage.lora?.quantize;
  const fresh = stage.type === 'distill' && stage.student ? stage.student : !previousDir ? (recipe.model as { preset: 'micro' | 'mini' | 'tiny' | 'small'; seed?: number }) : null;
  // recipe.dtype is the dtype of frozen weights. Trainable weights stay f32 (the optimizer's master
  // copy): all of them without LoRA, and the LoRA pairs, which are f32 whatever the base's dtype.
  const device = recipe.device as Device;
  const frozen = { device, dtype: recipe.dtype };
  const placement = stage.lora ? frozen : { device, dtype: 'f32' as const };
  const model: CausalLM = fresh
    ? createModel({ preset: fresh.preset, vocabSize: tokenizer.vocabSize }, { ...placement, seed: fresh.seed ?? seed })
    : await loadModel(previousDir!, { ...placement, ...(quantize ? { quantize } : {}) });
  const teacher = stage.type === 'distill' ? await loadModel(at(stage.teacher), frozen).catch((err: unknown) => {
    model.dispose();
    throw err;
  }) : null;
  try {
    if (teacher) checkTeacher(model, teacher);
    if (stage.rope) applyRope(model, stage.rope);
    if (stage.lora) {
      const { quantize: _q, ...lora } = stage.lora;
      applyLora(model, { ...lora, seed });
    } else {
      if (quantize) throw new TrainError(`stage '${stage.name}': quantize needs lora`);
      model.requiresGrad(true);
    }
    await options.beforeStage?.(stage, model, tokenizer);
    const common = {
      model,
      gradAccum: stage.gradAccum,
      lr: stage.lr,
      schedule: stage.schedule,
      warmupSteps: stage.warmupSteps,
      minLrRatio: stage.minLrRatio,
      weightDecay: stage.weightDecay,
      maxGradNorm: stage.maxGradNorm,
      checkpointLayers: stage.checkpointLayers,
      checkpointEvery: stage.checkpointEvery,
      signal: options.signal,
      handleSigint: options.handleSigint,
      onProgress: (e: ProgressEvent) => options.onProgress?.(stage, e),
    };
    const trainable = model.trainableParameters().reduce((n, [, t]) => n + t.size, 0);
    let result: TrainResult;
    if (stage.type === 'dpo') {
      result = await runDpo(stage, model, tokenizer, { ...common, outputDir: join(stageDir, 'checkpoints') }, { index, trainable, at, options, seed });
    } else {
      const pipeline = new DataPipeline({
        source: typeof stage.data === 'string' ? at(stage.data) : stage.data,
        tokenizer,
        seqLen: stage.seqLen,
        batchSize: stage.batchSize,
        mode: stage.packing === 'pad' ? 'pad' : 'pack',
        splitLong: stage.type !== 'sft' && stage.packing === 'split',
        // Given steps and no epochs, the data cycles (each pass reshuffled) until the steps are done.
        epochs: stage.epochs ?? (stage.steps ? Number.MAX_SAFE_INTEGER : 1),
        seed,
        formats: stage.type === 'pretrain' ? ['text'] : stage.type === 'sft' ? ['alpaca', 'messages'] : ['text', 'alpaca', 'messages'],
        ...(stage.type === 'pretrain' && stage.replay ? { replay: { source: typeof stage.replay.data === 'string' ? at(stage.replay.data) : stage.replay.data, ratio: stage.replay.ratio } } : {}),
      });
      const steps = stage.steps ?? Math.ceil((await countBatches(pipeline)) / stage.gradAccum);
      options.onStageStart?.(stage, { index, steps, trainable });
      const loss: LossFn<Batch> | undefined = teacher && stage.type === 'distill' ? distillLossFn(teacher, { alpha: stage.alpha, kind: stage.kind, temperature: stage.temperature, beta: stage.beta }) : undefined;
      result = await train({ ...common, data: new PipelineSource(pipeline), steps, loss, outputDir: join(stageDir, 'checkpoints') });
    }
    if (result.stopped === 'done') {
      await options.afterStage?.(stage, model, tokenizer);
      if (stage.lora) {
        await saveAdapter(model, join(stageDir, 'adapter'), { baseModelNameOrPath: previousDir ?? undefined });
        mergeLora(model);
      }
      await saveModel(model, modelDir, tokenizer instanceof ByteTokenizer || !previousDir ? { tokenizer: tokenizer as ByteTokenizer } : { tokenizerDir: previousDir });
      await writeFile(join(stageDir, 'stage.json'), JSON.stringify({ stage, steps: result.steps, losses: result.losses, evals: result.evals }, null, 2) + '\n');
    }
    return { name: stage.name, type: stage.type, modelDir, skipped: false, result };
  } finally {
    model.dispose();
    teacher?.dispose();
  }
}

type DpoStage = Extract<StageConfig, { type: 'dpo' }>;

async function runDpo(
  stage: DpoStage,
  model: CausalLM,
  tokenizer: Tokenizer,
  common: Omit<Parameters<typeof train<Batch>>[0], 'data' | 'steps' | 'loss'>,
  info: { index: number; trainable: number; at: (p: string) => string; options: RunRecipeOptions; seed: number },
): Promise<TrainResult> {
  const source = typeof stage.data === 'string' ? info.at(stage.data) : stage.data;
  const loss = dpoLossFn({ beta: stage.beta, kind: stage.loss, labelSmoothing: stage.labelSmoothing });
  const trainOn = async (pairs: TokenizedPair[], steps: number | undefined, outputDir: string) => {
    // The reference: the model before this round trains (LoRA's B = 0 makes it the base).
    const ref = await referenceLogprobs(model, pairs, { seqLen: stage.seqLen, batchSize: stage.batchSize });
    const epochs = stage.epochs ?? (stage.steps ? Number.MAX_SAFE_INTEGER : 1);
    const total = steps ?? Math.ceil((Math.ceil(pairs.length / stage.batchSize) * (stage.epochs ?? 1)) / stage.gradAccum);
    info.options.onStageStart?.(stage, { index: info.index, steps: total, trainable: info.trainable });
    return train({ ...common, outputDir, data: new PreferenceSource(pairs, ref, { batchSize: stage.batchSize, seqLen: stage.seqLen, epochs, seed: info.seed }), steps: total, loss });
  };
  if (!stage.iterative) return trainOn(await readPreferences(source, tokenizer), stage.steps, common.outputDir!);

  const judge = await loadJudge(stage.iterative.judge, info.at);
  const prompts: string[] = [];
  for await (const { value, file, line } of readJsonl(source)) {
    if (typeof value.prompt !== 'string') throw new TrainError(`${file}:${line}: iterative DPO reads prompts: each record needs a "prompt" string`);
    prompts.push(value.prompt);
  }
  let last: TrainResult | null = null;
  for (let round = 0; round < stage.iterative.rounds; round++) {
    const records = await samplePreferencePairs(model, tokenizer, prompts, judge, { samples: stage.iterative.samples, temperature: stage.iterative.temperature, maxNewTokens: stage.iterative.maxNewTokens, seed: info.seed + round });
    if (records.length === 0) continue;  // every prompt's samples tied: nothing to prefer this round
    const pairs = records.map((r) => tokenizePair(tokenizer, r));
    last = await trainOn(pairs, stage.steps, join(common.outputDir!, `round-${round + 1}`));
    if (last.stopped !== 'done') return last;
  }
  return last ?? { steps: 0, stopped: 'done', losses: [], evals: [], lastCheckpoint: null };
}

/** Batches one pass of the pipeline yields (the default number of steps). */
async function countBatches(p: DataPipeline): Promise<number> {
  let n = 0;
  for await (const _ of p.batches()) n++;
  return n;
}
