// The training loop: micro-batches through the model and the fused LM-head loss, gradient
// accumulation with token-exact normalization, clipping, AdamW with a schedule, evaluation,
// metrics as JSONL, atomic checkpoints, resume, and clean stops (SIGINT or an AbortSignal).
//
// Normalization: each micro-batch's loss is the SUM of its token losses; after the last
// micro-batch of a step the gradients hold the sum over every counted token of the step, and the
// optimizer scales them by 1 / (that count). So a step's gradient is exactly the mean over its
// tokens however they were split into micro-batches (padding and masks included), which averaging
// per-micro-batch means would not give. Clipping compares the sum's norm with maxNorm times the
// count, which is the same test on the mean.
//
// Determinism: kernels give the same bits for any thread count, the data source and random
// seeds are part of the checkpoint, so a run killed and resumed ends with the same weights as an
// uninterrupted one.
import { appendFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';

import type { CausalLM } from '../models/llama.js';
import { linearCrossEntropy } from '../ops/loss.js';
import { AdamW, clipGradNorm } from '../optim/adamw.js';
import { memory } from '../runtime.js';
import { tidy } from '../scope.js';
import { tensor, type Tensor } from '../tensor.js';
import { latestCheckpoint, loadCheckpoint, saveCheckpoint } from './checkpoint.js';
import { lrAt, type ScheduleKind } from './schedule.js';

/** One micro-batch: [B, T] row-major, next-token targets already shifted (-100 = ignored). */
export interface Batch {
  ids: Int32Array;
  targets: Int32Array;
  segmentIds?: Int32Array;
  positions?: Int32Array;
  batchSize: number;
  seqLen: number;
  /** Targets that count (not -100). */
  tokens: number;
}

/**
 * Where batches come from; its state goes into checkpoints so a resumed run sees the same data.
 * next() gives null when the data is exhausted, which ends the run.
 */
export interface BatchSource<B = Batch> {
  next(): Promise<B | null>;
  state(): unknown;
  restore(state: unknown): void | Promise<void>;
}

export interface ProgressEvent {
  /** Extra per-step metrics the loss reports (e.g. DPO's reward accuracy). */
  metrics?: Record<string, number>;
  step: number;
  totalSteps: number;
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  elapsedSeconds: number;
  etaSeconds: number;
  /** The process's resident memory. */
  memoryBytes: number;
  /** When the model is on a GPU: the most device memory allocated at once so far (tk.memory()'s peakAllocatedBytes). */
  deviceMemoryBytes?: number;
  eval?: Record<string, number>;
}

/**
 * What one micro-batch contributes: its loss SUMMED over its units (tokens for language
 * modelling, preference pairs for DPO), the number of units, and optional metrics to report: f32
 * tensors read after the step (without stalling the queue), each reduced to a number (default:
 * the sum of its elements), summed over the micro-batches and divided by the step's units.
 */
export interface MicroLoss {
  loss: Tensor;
  units: number;
  metrics?: Record<string, Tensor>;
  reduce?: Record<string, (values: Float32Array) => number>;
}

export type LossFn<B> = (model: CausalLM, batch: B, options: { checkpointLayers: boolean }) => MicroLoss;

export interface TrainerOptions<B = Batch> {
  model: CausalLM;
  data: BatchSource<B>;
  /** The loss of a micro-batch; default: next-token cross entropy (the fused LM-head loss). */
  loss?: LossFn<B>;
  /** Optimizer steps to run in total (a resumed run continues up to this). */
  steps: number;
  /** Micro-batches per optimizer step. Default 1. */
  gradAccum?: number;
  lr?: number;
  schedule?: ScheduleKind;
  warmupSteps?: number;
  minLrRatio?: number;
  weightDecay?: number;
  betas?: [number, number];
  /** Clip the global gradient norm to this (0: no clipping). Default 1. */
  maxGradNorm?: number;
  /** Recompute decoder layers in backward instead of keeping activations. */
  checkpointLayers?: boolean;
  evalEvery?: number;
  evaluate?: (model: CausalLM) => Promise<Record<string, number>>;
  /** Where checkpoints and metrics.jsonl go. */
  outputDir?: string;
  checkpointEvery?: number;
  /** Checkpoints kept on disk (oldest removed first). Default 2. */
  keepCheckpoints?: number;
  /** Resume from the newest checkpoint in outputDir when there is one. Default true. */
  resume?: boolean;
  signal?: AbortSignal;
  /** Stop cleanly on SIGINT: finish the step, write a checkpoint, return. Default false (the CLI turns it on). */
  handleSigint?: boolean;
  onProgress?: (e: ProgressEvent) => void;
}

export interface TrainResult {
  steps: number;
  /** Why the loop ended. */
  stopped: 'done' | 'aborted' | 'interrupted';
  losses: { step: number; loss: number }[];
  evals: { step: number; metrics: Record<string, number> }[];
  lastCheckpoint: string | null;
}

export class TrainError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TrainError';
  }
}

export async function train<B = Batch>(options: TrainerOptions<B>): Promise<TrainResult> {
  const { model, data, steps, gradAccum = 1, lr = 1e-3, schedule = 'cosine', warmupSteps = 0, minLrRatio, maxGradNorm = 1 } = options;
  if (!Number.isInteger(steps) || steps < 0) throw new TrainError(`train: steps must be a non-negative integer, got ${String(steps)}`);
  if (!Number.isInteger(gradAccum) || gradAccum < 1) throw new TrainError(`train: gradAccum must be a positive integer, got ${String(gradAccum)}`);
  if (model.trainableParameters().length === 0) throw new TrainError('train: the model has no trainable parameters (requiresGrad); call model.requiresGrad(true) or tk.applyLora(model, ...)');
  const result: TrainResult = { steps: 0, stopped: 'done', losses: [], evals: [], lastCheckpoint: null };
  let step = 0;
  let tokensSeen = 0;
  // Resume first: it replaces the trainable tensors, which the optimizer then takes.
  const resumeFrom = options.outputDir && options.resume !== false ? await latestCheckpoint(options.outputDir) : null;
  const restored = resumeFrom ? await loadCheckpoint(resumeFrom, model) : null;
  const params = model.trainableParameters();
  const opt = new AdamW(
    params.map(([, p]) => p),
    { lr, weightDecay: options.weightDecay ?? 0.01, betas: options.betas ?? [0.9, 0.999] },
  );
  if (restored) {
    restored.applyOptimizer(opt, params);
    step = restored.state.step;
    tokensSeen = restored.state.tokensSeen;
    await data.restore(restored.state.data);
    result.lastCheckpoint = resumeFrom;
  }
  const metricsFile = options.outputDir ? join(options.outputDir, 'metrics.jsonl') : null;
  if (options.outputDir) await mkdir(options.outputDir, { recursive: true });

  let interrupted = false;
  const onSigint = () => {
    interrupted = true;
  };
  if (options.handleSigint) process.on('SIGINT', onSigint);
  const checkpoint = async () => {
    if (!options.outputDir) return;
    result.lastCheckpoint = await saveCheckpoint(options.outputDir, model, opt, params, { step, tokensSeen, data: data.state() }, options.keepCheckpoints ?? 2);
  };

  const started = performance.now();
  const startStep = step;
  const startTokens = tokensSeen;
  let evalSeconds = 0;
  model.train();
  try {
    while (step < steps) {
      if (options.signal?.aborted) {
        result.stopped = 'aborted';
        break;
      }
      if (interrupted) {
        result.stopped = 'interrupted';
        break;
      }
      opt.lr = lrAt({ lr, kind: schedule, warmupSteps, totalSteps: steps, minLrRatio }, step);
      let tokens = 0;
      let exhausted = false;
      const lossSums: Tensor[] = [];
      const metricSums: Record<string, Tensor[]> = {};
      const reducers: Record<string, (values: Float32Array) => number> = {};
      const lossFn = (options.loss ?? (lmLoss as unknown as LossFn<B>));
      try {
        for (let micro = 0; micro < gradAccum; micro++) {
          const batch = await data.next();
          if (!batch) {
            exhausted = true;
            break;
          }
          let units = 0;
          let names: string[] = [];
          // tidy keeps what is returned (one level deep): the loss and the metrics, detached.
          const [lossSum, ...metricTensors] = tidy(() => {
            const m = lossFn(model, batch, { checkpointLayers: options.checkpointLayers ?? false });
            m.loss.backward();
            units = m.units;
            names = Object.keys(m.metrics ?? {});
            Object.assign(reducers, m.reduce ?? {});
            return [m.loss.detach(), ...Object.values(m.metrics ?? {}).map((t) => t.detach())];
          });
          tokens += units;
          lossSums.push(lossSum!);
          names.forEach((k, i) => (metricSums[k] ??= []).push(metricTensors[i]!));
        }
        // The data ran out: a partial last step still trains on what it got.
        if (exhausted && lossSums.length === 0) break;
        if (tokens === 0) throw new TrainError(`train: step ${step + 1} has no target tokens in any of its ${gradAccum} micro-batches (all labels are -100); check the data's loss masks`);
        const norm = clipGradNorm(opt.params, maxGradNorm > 0 ? maxGradNorm * tokens : 0);
        opt.step({ gradScale: 1 / tokens });
        opt.zeroGrad();
        const sums = await Promise.all(lossSums.map((t) => t.toArray()));
        const gradNorm = (await norm.toArray())[0]! / tokens;
        norm.dispose();
        const loss = sums.reduce((a, s) => a + s[0]!, 0) / tokens;
        const metrics: Record<string, number> = {};
        const sumAll = (v: Float32Array) => v.reduce((a, x) => a + x, 0);
        for (const [k, list] of Object.entries(metricSums)) {
          const values = await Promise.all(list.map((t) => t.toArray() as Promise<Float32Array>));
          metrics[k] = values.reduce((a, v) => a + (reducers[k] ?? sumAll)(v), 0) / tokens;
        }
        if (!Number.isFinite(loss)) throw new TrainError(`train: the loss became ${loss} at step ${step + 1} (lr ${opt.lr}); lower the learning rate or check the data`);
        step++;
        tokensSeen += tokens;
        result.losses.push({ step, loss });
        const elapsed = (performance.now() - started) / 1e3 - evalSeconds;
        const tps = (tokensSeen - startTokens) / Math.max(elapsed, 1e-9);
        const event: ProgressEvent = {
          step,
          totalSteps: steps,
          loss,
          lr: opt.lr,
          gradNorm,
          tokens: tokensSeen,
          tokensPerSecond: tps,
          elapsedSeconds: elapsed,
          etaSeconds: ((steps - step) * elapsed) / Math.max(1, step - startStep),
          memoryBytes: process.memoryUsage().rss,
          ...(model.device === 'cpu' ? {} : { deviceMemoryBytes: memory()[model.device]?.peakAllocatedBytes ?? 0 }),
          ...(Object.keys(metrics).length ? { metrics } : {}),
        };
        if (options.evaluate && options.evalEvery && (step % options.evalEvery === 0 || step === steps)) {
          // Evaluation time does not count as training time (tokens/s, ETA).
          const evalStart = performance.now();
          model.eval();
          event.eval = await options.evaluate(model);
          model.train();
          result.evals.push({ step, metrics: event.eval });
          evalSeconds += (performance.now() - evalStart) / 1e3;
        }
        if (metricsFile) await appendFile(metricsFile, JSON.stringify({ step, loss, lr: opt.lr, gradNorm, tokens: tokensSeen, tokensPerSecond: tps, ...metrics, ...(event.eval ? { eval: event.eval } : {}) }) + '\n');
        options.onProgress?.(event);
        if (options.checkpointEvery && step % options.checkpointEvery === 0) await checkpoint();
        if (exhausted) break;
      } finally {
        for (const t of lossSums) t.dispose();
        for (const list of Object.values(metricSums)) for (const t of list) t.dispose();
      }
    }
    result.steps = step;
    if (result.stopped !== 'done' || (options.checkpointEvery && step % options.checkpointEvery !== 0)) await checkpoint();
  } finally {
    if (options.handleSigint) process.off('SIGINT', onSigint);
    opt.zeroGrad();
    opt.dispose();
  }
  return result;
}

/** Next-token cross entropy of one micro-batch, summed over its counted tokens. */
export function lmLoss(model: CausalLM, b: Batch, options: { checkpointLayers: boolean }): MicroLoss {
  const { targets, h } = batchHidden(model, b, options.checkpointLayers);
  return { loss: linearCrossEntropy(h, model.lmHeadWeight, targets, { reduction: 'sum' }), units: b.tokens };
}

/** The batch's tensors and the model's final hidden states for it (inside the caller's scope). */
export function batchHidden(model: CausalLM, b: Batch, checkpointLayers: boolean): { ids: Tensor; targets: Tensor; h: Tensor } {
  const shape = [b.batchSize, b.seqLen];
  if (b.ids.length !== b.batchSize * b.seqLen || b.targets.length !== b.ids.length)
    throw new TrainError(`train: a batch's ids (${b.ids.length}) and targets (${b.targets.length}) must both hold batchSize x seqLen = ${b.batchSize * b.seqLen} values`);
  const { device } = model;
  const ids = tensor(b.ids, shape, { device });
  const targets = tensor(b.targets, shape, { device });
  const h = model.hidden(ids, {
    positions: b.positions ? tensor(b.positions, shape, { device }) : undefined,
    segmentIds: b.segmentIds ? tensor(b.segmentIds, shape, { device }) : undefined,
    checkpointLayers,
  });
  return { ids, targets, h };
}
