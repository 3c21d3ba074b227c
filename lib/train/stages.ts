// Running a recipe: each stage loads the previous stage's model (or the base, or a preset built from
// scratch), applies LoRA / QLoRA when asked, streams its data through the pipeline, trains, and
// writes <output>/<stage>/model (a full Hugging Face directory that loads on its own; LoRA stages
// merge their adapter into it and also keep it in <output>/<stage>/adapter). A stage whose model
// directory exists is complete and skipped; an interrupted stage resumes from its checkpoints.
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';

import { DataPipeline, type DataPosition, type PipelineBatch } from '../data/index.js';
import { createModel, loadModel, saveModel } from '../models/io.js';
import type { CausalLM } from '../models/llama.js';
import { applyLora, mergeLora, saveAdapter } from '../models/lora.js';
import { setThreads } from '../runtime.js';
import { manualSeed } from '../tensor.js';
import { ByteTokenizer } from '../tokenizer/byte.js';
import { loadTokenizer } from '../tokenizer/load.js';
import type { Tokenizer } from '../tokenizer/types.js';
import type { Recipe, StageConfig } from './recipe.js';
import { train, type Batch, type BatchSource, type ProgressEvent, type TrainResult } from './trainer.js';

export interface RunRecipeOptions {
  /** Resolves relative data and model paths (the recipe file's directory). Default: the working directory. */
  baseDir?: string;
  signal?: AbortSignal;
  handleSigint?: boolean;
  onStageStart?: (stage: StageConfig, info: { index: number; steps: number; trainable: number }) => void;
  onProgress?: (stage: StageConfig, e: ProgressEvent) => void;
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

export async function runRecipe(recipe: Recipe, options: RunRecipeOptions = {}): Promise<StageOutcome[]> {
  const base = options.baseDir ?? process.cwd();
  const at = (p: string) => (isAbsolute(p) ? p : resolve(base, p));
  if (recipe.threads) setThreads(recipe.threads);
  const output = at(recipe.output);
  await mkdir(output, { recursive: true });
  const outcomes: StageOutcome[] = [];
  let previousDir: string | null = typeof recipe.model === 'string' ? at(recipe.model) : null;

  for (const [index, stage] of recipe.stages.entries()) {
    const stageDir = join(output, stage.name);
    const modelDir = join(stageDir, 'model');
    if (await exists(join(modelDir, 'config.json'))) {
      outcomes.push({ name: stage.name, type: stage.type, modelDir, skipped: true, result: null });
      previousDir = modelDir;
      continue;
    }
    // Every stage starts from its own seed (random init, LoRA init, dropout masks), so a stage run
    // in a fresh process is the same run; a resumed stage restores the sequence from its checkpoint.
    manualSeed(stage.seed ?? recipe.seed);
    // The tokenizer comes with the model directory; a preset starts with the byte-level one.
    const tokenizer: Tokenizer = previousDir ? await loadTokenizer(previousDir) : new ByteTokenizer();
    const quantize = stage.lora?.quantize;
    const model: CausalLM = previousDir
      ? await loadModel(previousDir, quantize ? { quantize } : {})
      : createModel({ preset: (recipe.model as { preset: 'micro' | 'tiny' | 'small' }).preset, vocabSize: tokenizer.vocabSize }, { seed: (recipe.model as { seed?: number }).seed ?? recipe.seed });
    try {
      if (stage.lora) {
        const { quantize: _q, ...lora } = stage.lora;
        applyLora(model, { ...lora, seed: stage.seed ?? recipe.seed });
      } else {
        if (quantize) throw new Error(`stage '${stage.name}': quantize needs lora`);
        model.requiresGrad(true);
      }
      const pipeline = new DataPipeline({
        source: typeof stage.data === 'string' ? at(stage.data) : stage.data,
        tokenizer,
        seqLen: stage.seqLen,
        batchSize: stage.batchSize,
        mode: stage.packing === 'pad' ? 'pad' : 'pack',
        splitLong: stage.type === 'pretrain' && stage.packing === 'split',
        // Given steps and no epochs, the data cycles (each pass reshuffled) until the steps are done.
        epochs: stage.epochs ?? (stage.steps ? Number.MAX_SAFE_INTEGER : 1),
        seed: stage.seed ?? recipe.seed,
        formats: stage.type === 'pretrain' ? ['text'] : ['alpaca', 'messages'],
        ...(stage.type === 'pretrain' && stage.replay ? { replay: { source: typeof stage.replay.data === 'string' ? at(stage.replay.data) : stage.replay.data, ratio: stage.replay.ratio } } : {}),
      });
      const steps = stage.steps ?? Math.ceil((await countBatches(pipeline)) / stage.gradAccum);
      options.onStageStart?.(stage, { index, steps, trainable: model.trainableParameters().reduce((n, [, t]) => n + t.size, 0) });
      const result = await train({
        model,
        data: new PipelineSource(pipeline),
        steps,
        gradAccum: stage.gradAccum,
        lr: stage.lr,
        schedule: stage.schedule,
        warmupSteps: stage.warmupSteps,
        minLrRatio: stage.minLrRatio,
        weightDecay: stage.weightDecay,
        maxGradNorm: stage.maxGradNorm,
        checkpointLayers: stage.checkpointLayers,
        outputDir: join(stageDir, 'checkpoints'),
        checkpointEvery: stage.checkpointEvery,
        signal: options.signal,
        handleSigint: options.handleSigint,
        onProgress: (e) => options.onProgress?.(stage, e),
      });
      outcomes.push({ name: stage.name, type: stage.type, modelDir, skipped: false, result });
      if (result.stopped !== 'done') return outcomes;
      await options.afterStage?.(stage, model, tokenizer);
      if (stage.lora) {
        await saveAdapter(model, join(stageDir, 'adapter'), { baseModelNameOrPath: previousDir ?? undefined });
        mergeLora(model);
      }
      await saveModel(model, modelDir, tokenizer instanceof ByteTokenizer || !previousDir ? { tokenizer: tokenizer as ByteTokenizer } : { tokenizerDir: previousDir });
      await writeFile(join(stageDir, 'stage.json'), JSON.stringify({ stage, steps: result.steps, losses: result.losses }, null, 2) + '\n');
      previousDir = modelDir;
    } finally {
      model.dispose();
    }
  }
  return outcomes;
}

/** Batches one pass of the pipeline yields (the default number of steps). */
async function countBatches(p: DataPipeline): Promise<number> {
  let n = 0;
  for await (const _ of p.batches()) n++;
  return n;
}
