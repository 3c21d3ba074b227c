// Loading and saving Hugging Face model directories: config.json + safetensors (single or sharded)
// + the tokenizer files, which transformers loads unchanged.
//
// loadModel validates config.json first, then builds the model with every parameter declared but
// unallocated, then streams the checkpoint tensor by tensor: each is checked against the name and
// shape the config implies (errors name the tensor), converted to the requested dtype, and, with
// quantize: 'nf4', quantized at once, so the dense copy of only one weight exists at a time.
import { mkdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { writeFileAtomic, writeTextAtomic } from '../io/atomic.js';
import { openCheckpoint, writeShardedSafetensors } from '../io/safetensors.js';
import { safetensorsDTypeOf, tunekitDTypeOf, type SafetensorsTensorInfo } from '../io/safetensors-format.js';
import { quantize, type Nf4Weight } from '../nf4.js';
import { detached } from '../scope.js';
import { canonicalDevice, Tensor, tensor, type Device, type DType } from '../tensor.js';
import { ConfigError, parseConfig, presetConfig, type HfConfig, type ModelConfig, type PresetName } from './config.js';
import { CausalLM } from './llama.js';

export interface LoadModelOptions {
  /**
   * Where the weights go: 'cpu' (default), 'cuda' or 'cuda:N'. Each tensor is read on the host,
   * copied to the device in the checkpoint's dtype, and converted (and quantized) there.
   */
  device?: Device;
  /** Parameter dtype. Default: f32 (CPU training computes in fp32; on a GPU, bf16 is the usual choice). */
  dtype?: 'f32' | 'bf16';
  /** Quantize every linear layer of the decoder (not embeddings or lm_head) to NF4 as it is read. */
  quantize?: 'nf4';
  /** NF4 block size. Default 64. */
  blockSize?: number;
}

/** A model together with where it came from (saveModel copies its tokenizer files). */
export interface LoadedModel extends CausalLM {
  sourceDir?: string;
}

const ARCHITECTURES: Record<string, string> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
};

/** Tensors some checkpoints carry that the model does not use. */
const IGNORED = [/\.rotary_emb\.inv_freq$/];

export class ModelLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ModelLoadError';
  }
}

/** Reads config.json of a Hugging Face model directory (validated). */
export async function readConfig(dir: string): Promise<ModelConfig> {
  const path = join(dir, 'config.json');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ModelLoadError(
      code === 'ENOENT' ? `loadModel: ${path} does not exist; pass a Hugging Face model directory (config.json + *.safetensors)` : `loadModel: cannot read ${path}: ${(err as Error).message}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON (${(err as Error).message})`);
  }
  return parseConfig(json, path);
}

export interface CreateModelOptions {
  /** Default 'cpu'. */
  device?: Device;
  /** Default f32. */
  dtype?: 'f32' | 'bf16';
  seed?: number;
  /**
   * Quantize every linear layer of the decoder to NF4 (as loadModel does), e.g. a QLoRA base
   * with random weights for benchmarks. Layers are quantized one at a time after the model is
   * built, so the dense model exists once, briefly.
   */
  quantize?: 'nf4';
  /** NF4 block size. Default 64. */
  blockSize?: number;
}

/** A model with random weights (N(0, 0.02), norms 1) from a config or a preset. */
export function createModel(config: ModelConfig | HfConfig | { preset: PresetName; vocabSize: number }, options: CreateModelOptions = {}): CausalLM {
  const { dtype = 'f32', quantize: q, blockSize = 64 } = options;
  const device = canonicalDevice(options.device ?? 'cpu', 'createModel');
  if (dtype !== 'f32' && dtype !== 'bf16') throw new ModelLoadError(`createModel: dtype must be 'f32' or 'bf16', got ${String(dtype)}`);
  if (q !== undefined && q !== 'nf4') throw new ModelLoadError(`createModel: quantize must be 'nf4' or absent, got ${String(q)}`);
  let c: ModelConfig;
  if ('preset' in config && typeof config.preset === 'string') c = parseConfig(presetConfig(config.preset as PresetName, config.vocabSize as number));
  else if ('modelType' in config) c = config as ModelConfig;
  else c = parseConfig(config);
  const model = new CausalLM(c, { init: 'random', dtype, device, seed: options.seed });
  if (q) {
    try {
      for (const [, layer] of model.linearLayers()) layer.setQuantized(quantizeWeight(layer.weight, blockSize));
    } catch (err) {
      model.dispose();
      throw err;
    }
  }
  return model;
}

/** NF4 with double quantization, owned by the caller (the layer it is given to). */
function quantizeWeight(t: Tensor, blockSize: number): Nf4Weight {
  return detached((s) => {
    const w = quantize(t, { blockSize, doubleQuant: true });
    for (const part of [w.packed, w.absmax, w.scale2, w.offset]) if (part) s.keep(part);
    return w;
  });
}

/** Loads a Hugging Face model directory. */
export async function loadModel(dir: string, options: LoadModelOptions = {}): Promise<LoadedModel> {
  const { dtype = 'f32', quantize: q, blockSize = 64 } = options;
  const device = canonicalDevice(options.device ?? 'cpu', 'loadModel');
  // Fail before reading gigabytes when the device does not exist (no CUDA build, no GPU).
  tensor([0], undefined, { device }).dispose();
  if (dtype !== 'f32' && dtype !== 'bf16') throw new ModelLoadError(`loadModel: dtype must be 'f32' or 'bf16', got ${String(dtype)}`);
  if (q !== undefined && q !== 'nf4') throw new ModelLoadError(`loadModel: quantize must be 'nf4' or absent, got ${String(q)}`);
  const config = await readConfig(dir);
  const ckpt = await openCheckpoint(dir).catch((err: Error) => {
    throw err.name === 'SafetensorsError' ? err : new ModelLoadError(`loadModel: ${dir}: ${err.message}`);
  });
  const model: LoadedModel = new CausalLM(config, { init: 'empty', dtype, device });
  try {
    const declared = new Set(model.declaredParameters());
    const quantized = new Set(q ? model.linearLayers().map(([name]) => `${name}.weight`) : []);
    let staging = new Uint8Array(0);
    for (const name of ckpt.tensors.keys()) {
      if (declared.has(name) || IGNORED.some((re) => re.test(name))) continue;
      if (name === 'lm_head.weight' && config.tieWordEmbeddings) continue;  // some tied checkpoints store it anyway
      throw new ModelLoadError(`loadModel: ${dir}: tensor '${name}' is not part of a ${config.modelType} model with this config.json (${config.numLayers} layers${config.tieWordEmbeddings ? ', tied embeddings' : ''})`);
    }
    for (const name of declared) {
      const info = ckpt.tensors.get(name);
      if (!info) throw new ModelLoadError(`loadModel: ${dir}: the checkpoint has no tensor '${name}', which config.json implies`);
      const want = expectedShape(model, name);
      if (info.shape.join() !== want.join())
        throw new ModelLoadError(`loadModel: ${dir}: tensor '${name}' has shape [${info.shape.join(', ')}], but config.json implies [${want.join(', ')}]`);
      // One staging buffer, reused: the JavaScript heap holds one tensor's bytes at a time.
      if (staging.byteLength < info.byteLength) staging = new Uint8Array(info.byteLength);
      const bytes = staging.subarray(0, info.byteLength);
      await ckpt.readInto(name, bytes);
      const t = detached((s) => {
        const raw = tensorFromBytes(bytes, info, device);
        const cast = raw.dtype === dtype ? raw : raw.to(dtype);
        return s.keep(cast);
      });
      if (quantized.has(name)) {
        const layer = model.getModule(name.slice(0, -'.weight'.length)) as import('../nn/layers.js').Linear;
        const w = quantizeWeight(t, blockSize);
        layer.setQuantized(w);
        t.dispose();
        // Reading outpaces quantizing: wait for this weight's kernel (without blocking the event
        // loop), so dense weights never pile up in the queue and the peak stays one layer above
        // the quantized model.
        await (w.offset ?? w.absmax).toArray();
      } else {
        model.setParameter(name, t);
      }
    }
  } catch (err) {
    model.dispose();
    throw err;
  } finally {
    await ckpt.close();
  }
  model.sourceDir = dir;
  return model;
}

function expectedShape(model: CausalLM, name: string): number[] {
  const dot = name.lastIndexOf('.');
  const owner = model.getModule(name.slice(0, dot)) as unknown as Record<string, unknown>;
  const leaf = name.slice(dot + 1);
  if ('inFeatures' in owner) return leaf === 'bias' ? [owner.outFeatures as number] : [owner.outFeatures as number, owner.inFeatures as number];
  if ('numEmbeddings' in owner) return [owner.numEmbeddings as number, owner.dim as number];
  if ('eps' in owner) return [owner.dim as number];
  throw new ModelLoadError(`loadModel: no known shape for '${name}'`);
}

/** A tensor (owned by the current scope, on `device`) from a safetensors entry's bytes: F32, BF16 or F16. */
export function tensorFromBytes(bytes: Uint8Array, info: SafetensorsTensorInfo, device: Device = 'cpu'): Tensor {
  const dtype = tunekitDTypeOf(info.dtype);
  if (dtype !== 'f32' && dtype !== 'bf16' && dtype !== 'f16')
    throw new ModelLoadError(`loadModel: tensor '${info.name}' has dtype ${info.dtype}; model weights must be F32, BF16 or F16`);
  // Typed arrays need aligned offsets; a fresh copy is aligned.
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  const shape = [...info.shape];
  if (dtype === 'f32') return tensor(new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4), shape, { device });
  return tensor(new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 2), shape, { dtype, device });
}

export interface SaveModelOptions {
  /** Tensor dtype in the files. Default: each parameter's own (NF4 weights are saved dequantized in f32). */
  dtype?: 'f32' | 'bf16';
  /** Largest shard in bytes. Default 5 GB, as transformers' save_pretrained. */
  maxShardBytes?: number;
  /** Where to copy tokenizer files from. Default: the directory the model was loaded from. */
  tokenizerDir?: string;
  /** A tokenizer that saves itself (e.g. a ByteTokenizer for a model built from scratch). */
  tokenizer?: { save(dir: string): Promise<unknown> };
}

const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja', 'tokenizer.model', 'vocab.json', 'merges.txt', 'generation_config.json'];

/**
 * Writes a Hugging Face model directory: config.json, model.safetensors (or shards with an index)
 * and the tokenizer files. Files are written under temporary names and renamed, so an interrupted
 * save never leaves a file that looks complete.
 */
export async function saveModel(model: CausalLM & { sourceDir?: string }, dir: string, options: SaveModelOptions = {}): Promise<void> {
  if (model.linearLayers().some(([, l]) => l.hasLora))
    throw new ModelLoadError('saveModel: the model has LoRA adapters; save them with tk.saveAdapter(model, dir), or merge them first with tk.mergeLora(model)');
  await mkdir(dir, { recursive: true });
  const entries: { name: string; dtype: ReturnType<typeof safetensorsDTypeOf>; shape: number[]; data: Uint8Array }[] = [];
  let stored: DType | undefined;
  for (const name of model.declaredParameters()) {
    const dot = name.lastIndexOf('.');
    const owner = model.getModule(name.slice(0, dot)) as import('../nn/layers.js').Linear;
    const t = owner.quantized && name.endsWith('.weight') ? null : model.namedParameters().find(([n]) => n === name)?.[1];
    const source = t ?? owner.denseWeight('f32').weight;
    const want = options.dtype ?? source.dtype;
    const out = want === source.dtype ? source : source.to(want);
    const bytes = new Uint8Array(await out.handle('saveModel').read());
    entries.push({ name, dtype: safetensorsDTypeOf(want), shape: [...source.shape], data: bytes });
    stored ??= want;
    if (out !== source) out.dispose();
    if (!t) source.dispose();
  }
  const raw: Record<string, unknown> = { ...model.config.raw };
  raw.architectures = [ARCHITECTURES[model.config.modelType]];
  raw.torch_dtype = stored === 'bf16' ? 'bfloat16' : 'float32';
  await writeShardedSafetensors(dir, entries, { maxShardBytes: options.maxShardBytes ?? 5e9, metadata: { format: 'pt' } });
  if (options.tokenizer) {
    await options.tokenizer.save(dir);
  } else {
    const from = options.tokenizerDir ?? model.sourceDir;
    if (from && from !== dir) {
      for (const f of TOKENIZER_FILES) {
        const src = join(from, f);
        if (!(await stat(src).catch(() => null))) continue;
        await writeFileAtomic(join(dir, f), async (fh) => fh.writeFile(await readFile(src)));
      }
    }
  }
  await writeTextAtomic(join(dir, 'config.json'), JSON.stringify(raw, null, 2) + '\n');
}

/** @internal Raw bytes of a tensor (bf16 as bits). */
export async function tensorBytes(t: Tensor): Promise<Uint8Array> {
  return new Uint8Array(await t.handle('tensorBytes').read());
}
