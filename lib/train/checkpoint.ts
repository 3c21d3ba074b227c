// Training checkpoints: a directory checkpoint-<step>/ holding
//   the weights        model.safetensors + config.json (full training), or the adapter in PEFT's
//                      layout (LoRA / QLoRA: only A and B change)
//   optimizer.safetensors   AdamW's moments, <param>.exp_avg and <param>.exp_avg_sq (f32)
//   trainer_state.json      step, optimizer step, tokens seen, the data position, the random seed state
// It is written as checkpoint-<step>.tmp-<pid>-<n> and renamed when complete, so a process killed
// mid-write leaves only a .tmp directory, which resuming ignores (and the next save removes).
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import { openCheckpoint, writeSafetensors } from '../io/safetensors.js';
import type { CausalLM } from '../models/llama.js';
import { loadAdapter, loraState, saveAdapter } from '../models/lora.js';
import { saveModel, tensorFromBytes } from '../models/io.js';
import { owned } from '../nn/module.js';
import type { AdamW } from '../optim/adamw.js';
import { tidy } from '../scope.js';
import { restoreSeedState, seedState, tensor, type Tensor } from '../tensor.js';

export interface TrainerState {
  step: number;
  tokensSeen: number;
  data: unknown;
}

const NAME = /^checkpoint-(\d+)$/;

/** The newest complete checkpoint directory in dir, or null. */
export async function latestCheckpoint(dir: string): Promise<string | null> {
  const entries = await readdir(dir).catch(() => [] as string[]);
  let best: [number, string] | null = null;
  for (const e of entries) {
    const m = NAME.exec(e);
    if (m && (!best || Number(m[1]) > best[0])) best = [Number(m[1]), e];
  }
  return best ? join(dir, best[1]) : null;
}

let tmpCounter = 0;

export async function saveCheckpoint(dir: string, model: CausalLM, opt: AdamW, params: [string, Tensor][], state: TrainerState, keep: number): Promise<string> {
  await mkdir(dir, { recursive: true });
  const final = join(dir, `checkpoint-${state.step}`);
  const tmp = `${final}.tmp-${process.pid}-${tmpCounter++}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  if (loraState(model)) await saveAdapter(model, tmp);
  else await saveModel(model, tmp);
  const moments = opt.state();
  const entries = [];
  for (let i = 0; i < params.length; i++) {
    const mv = moments.moments[i];
    if (!mv) continue;
    const [name] = params[i]!;
    entries.push({ name: `${name}.exp_avg`, dtype: 'F32' as const, shape: [...mv.m.shape], data: new Uint8Array(await mv.m.handle().read()) });
    entries.push({ name: `${name}.exp_avg_sq`, dtype: 'F32' as const, shape: [...mv.v.shape], data: new Uint8Array(await mv.v.handle().read()) });
  }
  await writeSafetensors(join(tmp, 'optimizer.safetensors'), entries, { format: 'pt' });
  await writeFile(join(tmp, 'trainer_state.json'), JSON.stringify({ ...state, optimizerStep: moments.step, seedState: seedState(), format: 'tunekit-checkpoint-1' }, null, 2) + '\n');
  await rm(final, { recursive: true, force: true });
  await rename(tmp, final);
  await prune(dir, keep);
  return final;
}

/** Removes all but the newest `keep` checkpoints, and leftovers of interrupted saves. */
async function prune(dir: string, keep: number): Promise<void> {
  const entries = await readdir(dir);
  const done = entries
    .map((e) => [NAME.exec(e), e] as const)
    .filter(([m]) => m)
    .sort((a, b) => Number(b[0]![1]) - Number(a[0]![1]));
  for (const [, e] of done.slice(Math.max(1, keep))) await rm(join(dir, e), { recursive: true, force: true });
  for (const e of entries) if (/^checkpoint-\d+\.tmp-/.test(e) && !e.includes(`.tmp-${process.pid}-`)) await rm(join(dir, e), { recursive: true, force: true });
}

export interface RestoredCheckpoint {
  state: TrainerState & { optimizerStep: number };
  /** Puts the saved moments into the optimizer (built on the model's restored parameters). */
  applyOptimizer(opt: AdamW, params: [string, Tensor][]): void;
}

/** Loads a checkpoint's weights into the model (replacing its trainable tensors) and returns the rest. */
export async function loadCheckpoint(path: string, model: CausalLM): Promise<RestoredCheckpoint> {
  const state = JSON.parse(await readFile(join(path, 'trainer_state.json'), 'utf8')) as TrainerState & { optimizerStep: number; seedState: number };
  if (loraState(model)) {
    await loadAdapter(model, path);
  } else {
    const ckpt = await openCheckpoint(path);
    try {
      for (const [name, t] of model.namedParameters()) {
        const info = ckpt.tensors.get(name);
        if (!info) throw new Error(`resume: ${path} has no tensor '${name}'`);
        const bytes = await ckpt.read(name);
        const fresh = owned(() => {
          const raw = tensorFromBytes(bytes, info, t.device);
          return raw.dtype === t.dtype ? raw : raw.to(t.dtype);
        });
        fresh.requiresGrad = t.requiresGrad;
        model.setParameter(name, fresh);
      }
    } finally {
      await ckpt.close();
    }
  }
  restoreSeedState(state.seedState);
  const opt = await openCheckpoint(path, { prefix: 'optimizer' }).catch(() => null);
  const moments = new Map<string, Uint8Array>();
  if (opt) {
    for (const name of opt.tensors.keys()) moments.set(name, await opt.read(name));
    await opt.close();
  }
  return {
    state,
    applyOptimizer(o, params) {
      tidy(() =>
        o.loadState({
          step: state.optimizerStep,
          moments: params.map(([name, p]) => {
            const m = moments.get(`${name}.exp_avg`);
            const v = moments.get(`${name}.exp_avg_sq`);
            if (!m || !v) return null;
            const f = (b: Uint8Array) => tensor(new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)), [...p.shape]);
            return { m: f(m), v: f(v) };
          }),
        }),
      );
    },
  };
}
