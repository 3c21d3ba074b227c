// LoRA (Hu et al.) and QLoRA on a causal LM, in PEFT's layout so adapters move between tunekit and
// the Python ecosystem:
//   adapter_config.json      peft_type LORA, r, lora_alpha, lora_dropout, target_modules (a list
//                            or a regex string), use_rslora, base_model_name_or_path, task_type
//   adapter_model.safetensors base_model.model.<module>.lora_A.weight [r, in],
//                            base_model.model.<module>.lora_B.weight [out, r]
// The scale is alpha / r, or alpha / sqrt(r) with rsLoRA. Applying LoRA freezes every base
// parameter; A starts random and B at zero, so the model is unchanged until it trains.
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { writeTextAtomic } from '../io/atomic.js';
import { openCheckpoint, writeSafetensors } from '../io/safetensors.js';
import { safetensorsDTypeOf } from '../io/safetensors-format.js';
import { owned } from '../nn/module.js';
import { add, scale } from '../ops/elementwise.js';
import { matmul } from '../ops/matmul.js';
import { noGrad } from '../autograd.js';
import { tensor, type Tensor } from '../tensor.js';
import type { CausalLM } from './llama.js';

export interface LoraOptions {
  r: number;
  /** Default: r (scale 1). */
  alpha?: number;
  /** Dropout on the LoRA input while training. Default 0. */
  dropout?: number;
  /**
   * Which linear layers get adapters: module names matched as PEFT does (a list of names, each
   * matching a module whose dotted path ends with it, e.g. 'q_proj'), or a regex string matched
   * against the whole dotted path. Default ['q_proj', 'v_proj'] (PEFT's default for Llama);
   * 'all-linear' targets every linear layer of the decoder.
   */
  targetModules?: readonly string[] | string;
  /** Scale alpha / sqrt(r) instead of alpha / r (rank-stabilized LoRA). Default false. */
  rslora?: boolean;
  seed?: number;
}

export interface LoraState {
  r: number;
  alpha: number;
  dropout: number;
  targetModules: readonly string[] | string;
  rslora: boolean;
  /** The adapted modules' dotted paths. */
  modules: string[];
  /** adapter_config.json as read by loadAdapter (unknown keys kept), when loaded. */
  config?: Record<string, unknown>;
}

const loraStates = new WeakMap<CausalLM, LoraState>();

/** The LoRA settings of a model, or undefined. */
export function loraState(model: CausalLM): LoraState | undefined {
  return loraStates.get(model);
}

export class AdapterError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AdapterError';
  }
}

function matches(path: string, target: readonly string[] | string): boolean {
  if (target === 'all-linear') return true;
  if (typeof target === 'string') return new RegExp(`^(?:${target})$`).test(path);
  return target.some((t) => path === t || path.endsWith(`.${t}`));
}

/** Adds LoRA adapters to the targeted linear layers and freezes everything else. */
export function applyLora(model: CausalLM, options: LoraOptions): LoraState {
  const { r } = options;
  if (!Number.isInteger(r) || r < 1) throw new AdapterError(`applyLora: r must be a positive integer, got ${String(r)}`);
  const alpha = options.alpha ?? r;
  const dropout = options.dropout ?? 0;
  const rslora = options.rslora ?? false;
  const targetModules = options.targetModules ?? ['q_proj', 'v_proj'];
  if (!Number.isFinite(alpha) || alpha <= 0) throw new AdapterError(`applyLora: alpha must be a finite number > 0, got ${String(alpha)}`);
  if (!(dropout >= 0 && dropout < 1)) throw new AdapterError(`applyLora: dropout must be in [0, 1), got ${String(dropout)}`);
  if (typeof targetModules === 'string' && targetModules !== 'all-linear') {
    try {
      new RegExp(targetModules);
    } catch (err) {
      throw new AdapterError(`applyLora: targetModules '${targetModules}' is not a valid regex: ${(err as Error).message}`);
    }
  }
  if (loraStates.has(model)) throw new AdapterError('applyLora: the model already has LoRA adapters; merge them (tk.mergeLora) or load a fresh model');
  const layers = model.linearLayers().filter(([path]) => matches(path, targetModules));
  if (layers.length === 0) {
    const names = [...new Set(model.linearLayers().map(([p]) => p.split('.').pop()))].join(', ');
    throw new AdapterError(`applyLora: targetModules ${JSON.stringify(targetModules)} matches no linear layer; the model's are ${names}`);
  }
  model.requiresGrad(false);
  const s = rslora ? alpha / Math.sqrt(r) : alpha / r;
  layers.forEach(([, layer], i) => layer.addLora(r, s, dropout, { seed: options.seed === undefined ? undefined : options.seed + i }));
  const state: LoraState = { r, alpha, dropout, targetModules, rslora, modules: layers.map(([p]) => p) };
  loraStates.set(model, state);
  return state;
}

const PREFIX = 'base_model.model.';

/** Writes adapter_config.json and adapter_model.safetensors in PEFT's layout. */
export async function saveAdapter(model: CausalLM & { sourceDir?: string }, dir: string, options: { baseModelNameOrPath?: string } = {}): Promise<void> {
  const state = loraStates.get(model);
  if (!state) throw new AdapterError('saveAdapter: the model has no LoRA adapters; call tk.applyLora(model, { r }) first');
  await mkdir(dir, { recursive: true });
  const entries = [];
  for (const path of state.modules) {
    const layer = model.getModule(path) as import('../nn/layers.js').Linear;
    for (const [part, t] of [['lora_A', layer.loraA], ['lora_B', layer.loraB]] as const) {
      entries.push({ name: `${PREFIX}${path}.${part}.weight`, dtype: safetensorsDTypeOf(t.dtype), shape: [...t.shape], data: new Uint8Array(await t.handle('saveAdapter').read()) });
    }
  }
  const config = {
    ...(state.config ?? {}),
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    r: state.r,
    lora_alpha: state.alpha,
    lora_dropout: state.dropout,
    target_modules: state.targetModules === 'all-linear' ? 'all-linear' : state.targetModules,
    use_rslora: state.rslora,
    base_model_name_or_path: options.baseModelNameOrPath ?? model.sourceDir ?? null,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    modules_to_save: null,
    use_dora: false,
  };
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), entries, { format: 'pt' });
  await writeTextAtomic(join(dir, 'adapter_config.json'), JSON.stringify(config, null, 2) + '\n');
}

/**
 * Reads a PEFT LoRA adapter into the model: applies LoRA with the adapter's settings when the
 * model has none, then loads every A and B (names and shapes checked). Unknown config keys are
 * kept (in loraState(model).config) and otherwise ignored.
 */
export async function loadAdapter(model: CausalLM, dir: string): Promise<LoraState> {
  const path = join(dir, 'adapter_config.json');
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new AdapterError(code === 'ENOENT' ? `loadAdapter: ${path} does not exist; pass a directory written by tk.saveAdapter or PEFT's save_pretrained` : `loadAdapter: ${path}: ${(err as Error).message}`);
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new AdapterError(`loadAdapter: ${path} must hold a JSON object`);
  if (config.peft_type !== 'LORA') throw new AdapterError(`loadAdapter: ${path}: peft_type is ${JSON.stringify(config.peft_type)}; only 'LORA' adapters are supported`);
  const r = config.r;
  const alpha = config.lora_alpha ?? r;
  const target = config.target_modules;
  if (typeof r !== 'number' || !Number.isInteger(r) || r < 1) throw new AdapterError(`loadAdapter: ${path}: r must be a positive integer, got ${JSON.stringify(r)}`);
  if (typeof alpha !== 'number') throw new AdapterError(`loadAdapter: ${path}: lora_alpha must be a number, got ${JSON.stringify(alpha)}`);
  if (!(typeof target === 'string' || (Array.isArray(target) && target.every((t) => typeof t === 'string'))))
    throw new AdapterError(`loadAdapter: ${path}: target_modules must be a list of names or a regex string, got ${JSON.stringify(target)}`);
  if (config.use_dora === true) throw new AdapterError(`loadAdapter: ${path}: DoRA adapters (use_dora) are not supported`);
  let state = loraStates.get(model);
  if (!state) {
    state = applyLora(model, { r, alpha, dropout: typeof config.lora_dropout === 'number' ? config.lora_dropout : 0, targetModules: target as string[] | string, rslora: config.use_rslora === true });
  } else if (state.r !== r) {
    throw new AdapterError(`loadAdapter: the model's adapters have r = ${state.r}, the adapter in ${dir} has r = ${r}`);
  }
  state.config = config;
  const ckpt = await openCheckpoint(dir, { prefix: 'adapter_model' }).catch((err: Error) => {
    throw new AdapterError(`loadAdapter: ${dir}: ${err.message}`);
  });
  try {
    const wanted = new Map<string, [import('../nn/layers.js').Linear, 'A' | 'B']>();
    for (const m of state.modules) {
      const layer = model.getModule(m) as import('../nn/layers.js').Linear;
      wanted.set(`${PREFIX}${m}.lora_A.weight`, [layer, 'A']);
      wanted.set(`${PREFIX}${m}.lora_B.weight`, [layer, 'B']);
    }
    for (const name of ckpt.tensors.keys()) {
      // PEFT writes names without the adapter name; some versions keep '.default'.
      if (!wanted.has(name.replace('.default.weight', '.weight')))
        throw new AdapterError(`loadAdapter: ${dir}: tensor '${name}' does not belong to a targeted module of this model (${state.modules.length} modules targeted)`);
    }
    for (const [name, [layer, which]] of wanted) {
      const info = ckpt.tensors.get(name) ?? ckpt.tensors.get(name.replace('.weight', '.default.weight'));
      if (!info) throw new AdapterError(`loadAdapter: ${dir}: missing tensor '${name}'`);
      const target = which === 'A' ? layer.loraA : layer.loraB;
      if (info.shape.join() !== target.shape.join())
        throw new AdapterError(`loadAdapter: ${dir}: tensor '${info.name}' has shape [${info.shape.join(', ')}], the model expects [${target.shape.join(', ')}]`);
      const bytes = await ckpt.read(info.name);
      const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
      const device = target.device;
      const t = owned(() => {
        const raw =
          info.dtype === 'F32'
            ? tensor(new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4), [...info.shape], { device })
            : info.dtype === 'BF16' || info.dtype === 'F16'
              ? tensor(new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 2), [...info.shape], { dtype: info.dtype === 'BF16' ? 'bf16' : 'f16', device })
              : null;
        if (!raw) throw new AdapterError(`loadAdapter: ${dir}: tensor '${info.name}' has dtype ${info.dtype}; LoRA weights must be F32, BF16 or F16`);
        return raw.dtype === target.dtype ? raw : raw.to(target.dtype);
      });
      t.requiresGrad = true;
      (layer.getModule(which === 'A' ? 'lora_A' : 'lora_B') as import('../nn/layers.js').LoraWeight).setParameter('weight', t);
    }
  } finally {
    await ckpt.close();
  }
  return state;
}

/**
 * Folds every adapter into its base weight, W' = W + scale * B A, and removes the adapters. The
 * sum is formed in f32 and rounded once to the layer's dtype; an NF4 base is dequantized first,
 * so the result is a dense model in the dtype it was loaded in.
 */
export function mergeLora(model: CausalLM): void {
  const state = loraStates.get(model);
  if (!state) throw new AdapterError('mergeLora: the model has no LoRA adapters');
  for (const path of state.modules) {
    const layer = model.getModule(path) as import('../nn/layers.js').Linear;
    const { weight, temporary } = layer.denseWeight('f32');
    const dtype = layer.quantized ? layer.dtype : weight.dtype;
    const f32 = (t: Tensor) => (t.dtype === 'f32' ? t : t.to('f32'));
    const merged = noGrad(() => owned(() => add(f32(weight), scale(matmul(f32(layer.loraB), f32(layer.loraA)), layer.loraScale)).to(dtype)));
    if (temporary) weight.dispose();
    if (layer.quantized) {
      layer.quantized.dispose();
      layer.quantized = null;
    }
    layer.setParameter('weight', merged);
    layer.removeLora();
  }
  loraStates.delete(model);
}
