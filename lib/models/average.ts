// Weighted averaging of checkpoints of one architecture (model soups; per-phase averaging of the
// outputs of several recipe stages), in plain JavaScript, without the native addon.
//
// Everything is validated before the first byte is written: the configs describe one architecture,
// the checkpoints hold the same tensor names with the same shapes, every dtype is a float one.
// Then the average is streamed: each tensor is processed in chunks of CHUNK_ELEMENTS, reading that
// chunk from every checkpoint with positioned reads, so memory stays a few MB per checkpoint
// whatever the model's size (and tensors larger than one JavaScript buffer are no special case).
//
// Arithmetic is in float64: JavaScript numbers are doubles anyway, so it costs nothing in speed,
// and accumulating in doubles and rounding once at the end makes the result the exact weighted
// mean rounded to the output dtype (within a few float64 ulps), independent of the order of the
// checkpoints. A float32 accumulator would round after every addition instead.
import { mkdir, open, readFile, readdir, realpath, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';

import { syncDirectory, temporaryPath, writeFileAtomic, writeTextAtomic } from '../io/atomic.js';
import { openCheckpoint, type SafetensorsCheckpoint } from '../io/safetensors.js';
import { MAX_HEADER_BYTES, SAFETENSORS_DTYPES, formatShape, quote, type SafetensorsDType, type SafetensorsTensorInfo } from '../io/safetensors-format.js';
import { ConfigError, parseConfig, type ModelConfig } from './config.js';

export interface AverageOptions {
  /** One non-negative weight per directory, normalized to sum 1. Default: uniform. */
  weights?: readonly number[];
  /** Output dtype of every tensor. Default: each tensor's dtype in the first checkpoint. */
  dtype?: 'f32' | 'bf16';
  /** The most tensor bytes per output file, as saveModel. Default 5 GB; below that, one model.safetensors. */
  maxShardBytes?: number;
  /** Called after each tensor is written. */
  onProgress?: (progress: AverageProgress) => void;
}

export interface AverageProgress {
  tensor: string;
  tensorsDone: number;
  tensorsTotal: number;
  bytesDone: number;
  bytesTotal: number;
}

export interface AverageResult {
  /** How many tensors were written. */
  tensors: number;
  /** Tensor bytes written (the index's total_size; headers excluded). */
  bytes: number;
  /** The safetensors files written, in order. */
  files: string[];
}

/** Bad arguments or checkpoints that cannot be averaged; the message names the directories and the tensor or key. */
export class AverageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AverageError';
  }
}

const FLOAT_DTYPES: readonly SafetensorsDType[] = ['F32', 'BF16', 'F16'];

/** The config.json keys that decide the tensors' meaning; a difference in any of them makes an average meaningless. */
const ARCHITECTURE_KEYS: ReadonlyArray<readonly [string, (c: ModelConfig) => unknown]> = [
  ['model_type', (c) => c.modelType],
  ['vocab_size', (c) => c.vocabSize],
  ['hidden_size', (c) => c.hiddenSize],
  ['intermediate_size', (c) => c.intermediateSize],
  ['num_hidden_layers', (c) => c.numLayers],
  ['num_attention_heads', (c) => c.numHeads],
  ['num_key_value_heads', (c) => c.numKvHeads],
  ['head_dim', (c) => c.headDim],
  ['tie_word_embeddings', (c) => c.tieWordEmbeddings],
];

// The files of one tokenizer belong together, so they are all taken from one directory.
const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja', 'tokenizer.model', 'vocab.json', 'merges.txt', 'generation_config.json'];

// 1M elements: 8 MB of float64 accumulator and at most 4 MB per checkpoint in flight; large
// enough that per-read overhead vanishes, small enough that a 70B average runs in little memory.
const CHUNK_ELEMENTS = 1 << 20;

const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

interface Source {
  dir: string;
  config: ModelConfig;
  configText: string;
  weight: number;
}

interface PlannedTensor {
  name: string;
  shape: readonly number[];
  elements: number;
  dtype: SafetensorsDType;
  bytes: number;
}

/**
 * Writes to `out` the weighted average of the checkpoints in `dirs` (Hugging Face model
 * directories, single-file or sharded): the tensors, config.json of the first directory, and the
 * tokenizer files of the first directory that has any.
 */
export async function averageCheckpoints(dirs: readonly string[], out: string, options: AverageOptions = {}): Promise<AverageResult> {
  if (!Array.isArray(dirs) || dirs.length === 0) throw new AverageError('averageCheckpoints: no checkpoint directories given; pass at least one');
  for (const [i, d] of dirs.entries())
    if (typeof d !== 'string' || d === '') throw new AverageError(`averageCheckpoints: dirs[${i}] must be a directory path, got ${JSON.stringify(d)}`);
  if (typeof out !== 'string' || out === '') throw new AverageError(`averageCheckpoints: the output directory must be a path, got ${JSON.stringify(out)}`);
  const { dtype, maxShardBytes = DEFAULT_MAX_SHARD_BYTES, onProgress } = options;
  if (dtype !== undefined && dtype !== 'f32' && dtype !== 'bf16') throw new AverageError(`averageCheckpoints: dtype must be 'f32' or 'bf16', got ${JSON.stringify(dtype)}`);
  if (!Number.isSafeInteger(maxShardBytes) || maxShardBytes <= 0) throw new AverageError(`averageCheckpoints: maxShardBytes must be a positive integer, got ${maxShardBytes}`);
  const weights = normalizeWeights(options.weights, dirs.length);
  // Writing into an input would replace files that are still being read (and, for a sharded
  // input, leave a single file beside its index).
  // realpath where the path exists, so a symlink to an input is caught too.
  const canonical = (p: string) => realpath(p).catch(() => resolve(p));
  const outPath = await canonical(out);
  const inPaths = await Promise.all(dirs.map(canonical));
  const clash = dirs.find((_, i) => inPaths[i] === outPath);
  if (clash !== undefined) throw new AverageError(`averageCheckpoints: the output directory ${out} is also an input (${clash}); write the average somewhere else`);

  const sources: Source[] = [];
  for (const [i, dir] of dirs.entries()) sources.push({ dir, ...(await readSourceConfig(dir)), weight: weights[i]! });
  for (const s of sources.slice(1)) checkSameArchitecture(sources[0]!, s);
  const tokenizerDir = await findTokenizerDir(dirs);

  const checkpoints: SafetensorsCheckpoint[] = [];
  try {
    for (const dir of dirs) checkpoints.push(await openCheckpoint(dir));
    const plan = planTensors(sources, checkpoints, dtype);
    const shards = planShards(plan, maxShardBytes);
    const names = shardNames(shards.length);
    const heads = shards.map((s, i) => encodeHead(s, join(out, names[i]!)));

    await mkdir(out, { recursive: true });
    const files = await writeShards(out, shards, names, heads, sources, checkpoints, plan, onProgress);
    if (tokenizerDir !== null) await copyTokenizer(tokenizerDir, out);
    // config.json last: its presence marks a complete model directory (the recipe runner skips
    // a stage whose model has one), so an interrupted average is redone, not taken as finished.
    await writeConfig(out, sources[0]!.configText, plan, dtype);
    return { tensors: plan.length, bytes: plan.reduce((n, t) => n + t.bytes, 0), files };
  } finally {
    await Promise.all(checkpoints.map((c) => c.close().catch(() => {})));
  }
}

function normalizeWeights(weights: readonly number[] | undefined, n: number): number[] {
  if (weights === undefined) return new Array<number>(n).fill(1 / n);
  if (!Array.isArray(weights)) throw new AverageError(`averageCheckpoints: weights must be an array of numbers, got ${typeof weights}`);
  if (weights.length !== n)
    throw new AverageError(`averageCheckpoints: ${weights.length} weight${weights.length === 1 ? '' : 's'} for ${n} checkpoint${n === 1 ? '' : 's'}; give one weight per directory`);
  for (const [i, w] of weights.entries())
    if (typeof w !== 'number' || !Number.isFinite(w) || w < 0)
      throw new AverageError(`averageCheckpoints: weights[${i}] is ${String(w)}; weights must be finite and non-negative`);
  // Scaling by the largest first keeps the sum finite for weights near the float64 limit.
  const max = Math.max(...weights);
  if (max === 0) throw new AverageError('averageCheckpoints: the weights are all zero; at least one checkpoint needs a positive weight');
  const scaled = weights.map((w) => w / max);
  const sum = scaled.reduce((a, b) => a + b, 0);
  return scaled.map((w) => w / sum);
}

async function readSourceConfig(dir: string): Promise<{ config: ModelConfig; configText: string }> {
  const st = await stat(dir).catch(() => null);
  if (st === null) throw new AverageError(`averageCheckpoints: ${dir} does not exist`);
  if (!st.isDirectory()) throw new AverageError(`averageCheckpoints: ${dir} is not a directory; pass Hugging Face model directories (config.json + *.safetensors)`);
  const path = join(dir, 'config.json');
  let configText: string;
  try {
    configText = await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new AverageError(
      code === 'ENOENT' ? `averageCheckpoints: ${dir} has no config.json; pass Hugging Face model directories (config.json + *.safetensors)` : `averageCheckpoints: cannot read ${path}: ${(err as Error).message}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(configText);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON (${(err as Error).message})`);
  }
  return { config: parseConfig(json, path), configText };
}

function checkSameArchitecture(a: Source, b: Source): void {
  for (const [key, get] of ARCHITECTURE_KEYS) {
    const x = get(a.config);
    const y = get(b.config);
    if (x !== y)
      throw new AverageError(`averageCheckpoints: ${a.dir} and ${b.dir} are different architectures: ${key} is ${JSON.stringify(x)} in ${a.dir} but ${JSON.stringify(y)} in ${b.dir}`);
  }
}

async function findTokenizerDir(dirs: readonly string[]): Promise<string | null> {
  for (const dir of dirs) {
    for (const f of TOKENIZER_FILES) if (await isFile(join(dir, f))) return dir;
  }
  return null;
}

/** Every tensor of the first checkpoint, in its order, after checking that the others agree. */
function planTensors(sources: readonly Source[], checkpoints: readonly SafetensorsCheckpoint[], dtype: 'f32' | 'bf16' | undefined): PlannedTensor[] {
  const first = checkpoints[0]!;
  const firstDir = sources[0]!.dir;
  for (const [i, ckpt] of checkpoints.entries()) {
    const dir = sources[i]!.dir;
    for (const info of ckpt.tensors.values()) {
      if (!FLOAT_DTYPES.includes(info.dtype))
        throw new AverageError(`averageCheckpoints: tensor ${quote(info.name)} in ${dir} has dtype ${info.dtype}; only ${FLOAT_DTYPES.join(', ')} tensors can be averaged`);
    }
    if (i === 0) continue;
    for (const name of first.tensors.keys())
      if (!ckpt.tensors.has(name)) throw new AverageError(`averageCheckpoints: tensor ${quote(name)} is in ${firstDir} but not in ${dir}`);
    for (const name of ckpt.tensors.keys())
      if (!first.tensors.has(name)) throw new AverageError(`averageCheckpoints: tensor ${quote(name)} is in ${dir} but not in ${firstDir}`);
    for (const [name, a] of first.tensors) {
      const b = ckpt.tensors.get(name)!;
      if (a.shape.join() !== b.shape.join() || a.shape.length !== b.shape.length)
        throw new AverageError(`averageCheckpoints: tensor ${quote(name)} has shape ${formatShape(a.shape)} in ${firstDir} but ${formatShape(b.shape)} in ${dir}`);
    }
  }
  const outDType: SafetensorsDType | undefined = dtype === 'f32' ? 'F32' : dtype === 'bf16' ? 'BF16' : undefined;
  return [...first.tensors.values()].map((info) => {
    const elements = info.shape.reduce((n, d) => n * d, 1);
    const dt = outDType ?? info.dtype;
    return { name: info.name, shape: info.shape, elements, dtype: dt, bytes: elements * SAFETENSORS_DTYPES[dt].bytes };
  });
}

/** Greedy, in order, as writeShardedSafetensors: a new file when the next tensor would overflow this one. */
function planShards(plan: readonly PlannedTensor[], maxShardBytes: number): PlannedTensor[][] {
  const shards: PlannedTensor[][] = [];
  let current: PlannedTensor[] = [];
  let bytes = 0;
  for (const t of plan) {
    if (current.length > 0 && bytes + t.bytes > maxShardBytes) {
      shards.push(current);
      current = [];
      bytes = 0;
    }
    current.push(t);
    bytes += t.bytes;
  }
  if (current.length > 0 || shards.length === 0) shards.push(current);
  return shards;
}

function shardNames(count: number): string[] {
  if (count === 1) return ['model.safetensors'];
  return Array.from({ length: count }, (_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(count).padStart(5, '0')}.safetensors`);
}

/**
 * The length prefix and header of a file holding `tensors` in order. Every name, dtype and shape
 * is known from the inputs' headers, so the header can be written before any data exists.
 */
function encodeHead(tensors: readonly PlannedTensor[], path: string): Uint8Array {
  // transformers expects { format: 'pt' } in __metadata__, as saveModel writes it.
  const parts = ['"__metadata__":{"format":"pt"}'];
  let offset = 0;
  for (const t of tensors) {
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${offset},${offset + t.bytes}]}`);
    offset += t.bytes;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  // Padded with spaces so the data buffer starts 8-byte aligned, as the reference writers do.
  const n = Math.ceil(json.length / 8) * 8;
  if (n > MAX_HEADER_BYTES) throw new AverageError(`averageCheckpoints: ${path}: the header would be ${n} bytes, over the ${MAX_HEADER_BYTES}-byte limit readers enforce; lower maxShardBytes`);
  const head = new Uint8Array(8 + n).fill(0x20);
  new DataView(head.buffer).setBigUint64(0, BigInt(n), true);
  head.set(json, 8);
  return head;
}

async function writeShards(
  out: string,
  shards: readonly PlannedTensor[][],
  names: readonly string[],
  heads: readonly Uint8Array[],
  sources: readonly Source[],
  checkpoints: readonly SafetensorsCheckpoint[],
  plan: readonly PlannedTensor[],
  onProgress: AverageOptions['onProgress'],
): Promise<string[]> {
  const single = shards.length === 1;
  // A stale index is removed before any shard it may list is replaced, so a crash part-way can
  // never pair an old index with a mix of old and new shards (as writeShardedSafetensors does).
  if (!single) await unlink(join(out, 'model.safetensors.index.json')).catch(() => {});

  // Checkpoints with weight 0 were validated but contribute nothing, so they are not read.
  const active = sources.map((s, i) => ({ weight: s.weight, ckpt: checkpoints[i]! })).filter((a) => a.weight > 0);
  const staging = active.map(() => new Uint8Array(CHUNK_ELEMENTS * 4));
  const acc = new Float64Array(CHUNK_ELEMENTS);
  const decoded = new Float32Array(CHUNK_ELEMENTS);
  const encoded = new Uint8Array(CHUNK_ELEMENTS * 4);
  const bytesTotal = plan.reduce((n, t) => n + t.bytes, 0);
  let tensorsDone = 0;
  let bytesDone = 0;

  const files: string[] = [];
  for (const [s, shard] of shards.entries()) {
    const path = join(out, names[s]!);
    const size = heads[s]!.length + shard.reduce((n, t) => n + t.bytes, 0);
    const file = await PendingFile.create(path, size);
    try {
      await file.write(heads[s]!);
      for (const t of shard) {
        const outBytes = SAFETENSORS_DTYPES[t.dtype].bytes;
        const infos = active.map((a) => a.ckpt.tensors.get(t.name)!);
        for (let e0 = 0; e0 < t.elements; e0 += CHUNK_ELEMENTS) {
          const len = Math.min(CHUNK_ELEMENTS, t.elements - e0);
          await Promise.all(
            active.map((a, i) => {
              const width = SAFETENSORS_DTYPES[infos[i]!.dtype].bytes;
              return a.ckpt.readInto(t.name, staging[i]!.subarray(0, len * width), e0 * width);
            }),
          );
          acc.fill(0, 0, len);
          for (const [i, a] of active.entries()) accumulate(acc, staging[i]!, infos[i]!, len, a.weight, decoded);
          encode(acc, len, t.dtype, encoded, decoded);
          await file.write(encoded.subarray(0, len * outBytes));
        }
        tensorsDone++;
        bytesDone += t.bytes;
        onProgress?.({ tensor: t.name, tensorsDone, tensorsTotal: plan.length, bytesDone, bytesTotal });
      }
      await file.commit();
    } catch (err) {
      await file.abort();
      throw err;
    }
    files.push(path);
  }

  if (!single) {
    const weightMap = shards.flatMap((shard, s) => shard.map((t): [string, string] => [t.name, names[s]!]));
    // Sorted and indented as transformers writes an index, so the two diff cleanly.
    weightMap.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    const text =
      `{\n  "metadata": {\n    "total_size": ${bytesTotal}\n  },\n  "weight_map": {\n` +
      weightMap.map(([n, f]) => `    ${JSON.stringify(n)}: ${JSON.stringify(f)}`).join(',\n') +
      '\n  }\n}\n';
    const index = join(out, 'model.safetensors.index.json');
    const file = await PendingFile.create(index, Buffer.byteLength(text));
    try {
      await file.write(new TextEncoder().encode(text));
      await file.commit();
    } catch (err) {
      await file.abort();
      throw err;
    }
  }

  // Files of an earlier checkpoint in `out` that this one does not use would make it ambiguous.
  const keep = new Set(names);
  if (!single) keep.add('model.safetensors.index.json');
  const stale = /^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$/;
  for (const f of await readdir(out).catch(() => [] as string[])) if (!keep.has(f) && stale.test(f)) await unlink(join(out, f)).catch(() => {});
  return files;
}

/** acc[0..len) += weight * (the chunk of `info` in `bytes`), decoded to numbers. */
function accumulate(acc: Float64Array, bytes: Uint8Array, info: SafetensorsTensorInfo, len: number, weight: number, scratch: Float32Array): void {
  if (info.dtype === 'F32') {
    const x = new Float32Array(bytes.buffer, bytes.byteOffset, len);
    for (let j = 0; j < len; j++) acc[j] += weight * x[j]!;
  } else if (info.dtype === 'BF16') {
    // bf16 is the upper half of a float32: shifting the bits up is an exact decode.
    const h = new Uint16Array(bytes.buffer, bytes.byteOffset, len);
    const bits = new Uint32Array(scratch.buffer, 0, len);
    for (let j = 0; j < len; j++) bits[j] = h[j]! << 16;
    for (let j = 0; j < len; j++) acc[j] += weight * scratch[j]!;
  } else {
    const h = new Uint16Array(bytes.buffer, bytes.byteOffset, len);
    const table = f16Table();
    for (let j = 0; j < len; j++) acc[j] += weight * table[h[j]!]!;
  }
}

/** Rounds acc[0..len) to `dtype` (nearest, ties to even) into `out` as little-endian bytes. */
function encode(acc: Float64Array, len: number, dtype: SafetensorsDType, out: Uint8Array, scratch: Float32Array): void {
  if (dtype === 'F32') {
    // Float64 -> float32 conversion by a typed-array store is round-to-nearest-even.
    new Float32Array(out.buffer, out.byteOffset, len).set(acc.subarray(0, len));
  } else if (dtype === 'BF16') {
    const o = new Uint16Array(out.buffer, out.byteOffset, len);
    const f = scratch.subarray(0, len);
    f.set(acc.subarray(0, len));
    const bits = new Uint32Array(scratch.buffer, 0, len);
    for (let j = 0; j < len; j++) o[j] = bf16FromRounded(acc[j]!, f[j]!, bits[j]!);
  } else {
    const o = new Uint16Array(out.buffer, out.byteOffset, len);
    for (let j = 0; j < len; j++) o[j] = f16FromNumber(acc[j]!);
  }
}

// ---- number formats ------------------------------------------------------------------------------

const oneF32 = new Float32Array(1);
const oneU32 = new Uint32Array(oneF32.buffer);

/** @internal The bfloat16 bits nearest to `x` (ties to even), rounded once from float64. */
export function bf16FromNumber(x: number): number {
  oneF32[0] = x;
  return bf16FromRounded(x, oneF32[0]!, oneU32[0]!);
}

/**
 * `f` is x rounded to float32 and `bits` its bits. Rounding f to bfloat16 equals rounding x
 * directly except when the first rounding lands exactly on a bfloat16 midpoint: then the tie is
 * broken by which side of the midpoint x really was.
 */
function bf16FromRounded(x: number, f: number, bits: number): number {
  if (x !== x) return (bits >>> 16) | 0x0040;  // a quiet NaN with the same sign
  const low = bits & 0xffff;
  let up: boolean;
  if (low === 0x8000 && f !== x) up = Math.abs(x) > Math.abs(f);
  else up = low > 0x8000 || (low === 0x8000 && (bits & 0x10000) !== 0);
  // A carry out of the mantissa correctly steps to the next exponent (or to infinity).
  return ((bits >>> 16) + (up ? 1 : 0)) & 0xffff;
}

/** @internal The float16 bits nearest to `x` (ties to even), subnormals and overflow to infinity included. */
export function f16FromNumber(x: number): number {
  if (x !== x) return 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  // 65520 is the midpoint between the largest float16 (65504) and 2^16; the tie goes to the even one, infinity.
  if (a >= 65520) return sign | 0x7c00;
  // Subnormals are multiples of 2^-24; a result of 1024 is the smallest normal, whose bits are the same.
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24);
  let e = Math.floor(Math.log2(a));
  // Math.log2 may be off by one next to a power of two.
  if (2 ** e > a) e--;
  else if (2 ** (e + 1) <= a) e++;
  // Scaling by powers of two and subtracting 1 from [1, 2) are exact, so only the final rounding rounds.
  const m = roundHalfEven((a / 2 ** e - 1) * 1024);
  // m = 1024 carries into the exponent, which is the correct next float16.
  return sign | (((e + 15) << 10) + m);
}

function roundHalfEven(q: number): number {
  const f = Math.floor(q);
  const d = q - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

let F16_TABLE: Float32Array | null = null;

/** @internal The value of every float16 bit pattern (Node 20 has no Float16Array). */
export function f16Table(): Float32Array {
  if (F16_TABLE !== null) return F16_TABLE;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const e = (h >>> 10) & 0x1f;
    const m = h & 0x3ff;
    const v = e === 0 ? m * 2 ** -24 : e === 31 ? (m === 0 ? Infinity : NaN) : (1 + m / 1024) * 2 ** (e - 15);
    t[h] = h & 0x8000 ? -v : v;
  }
  F16_TABLE = t;
  return t;
}

// ---- files ---------------------------------------------------------------------------------------

/**
 * A file written front to back under a temporary name, then synced and renamed over `path`, so
 * a crash leaves the old file or the new one, never part of one.
 */
class PendingFile {
  #fh: FileHandle | null;
  #position = 0;

  private constructor(readonly path: string, readonly tmp: string, fh: FileHandle, readonly size: number) {
    this.#fh = fh;
  }

  static async create(path: string, size: number): Promise<PendingFile> {
    const tmp = temporaryPath(path);
    try {
      return new PendingFile(path, tmp, await open(tmp, 'wx'), size);
    } catch (err) {
      throw new AverageError(`averageCheckpoints: cannot write ${path}: ${(err as Error).message}`);
    }
  }

  async write(bytes: Uint8Array): Promise<void> {
    let done = 0;
    try {
      while (done < bytes.length) {
        const { bytesWritten } = await this.#fh!.write(bytes, done, bytes.length - done, this.#position);
        done += bytesWritten;
        this.#position += bytesWritten;
      }
    } catch (err) {
      throw new AverageError(`averageCheckpoints: cannot write ${this.path}: ${(err as Error).message}`);
    }
  }

  async commit(): Promise<void> {
    // The header promised this size; anything else is a bug here, and must not reach the disk.
    if (this.#position !== this.size) throw new Error(`averageCheckpoints: internal error: wrote ${this.#position} of the ${this.size} bytes planned for ${this.path}`);
    try {
      await this.#fh!.sync();
      await this.#fh!.close();
      this.#fh = null;
      await rename(this.tmp, this.path);
    } catch (err) {
      throw new AverageError(`averageCheckpoints: cannot write ${this.path}: ${(err as Error).message}`);
    }
    await syncDirectory(dirname(this.path));
  }

  async abort(): Promise<void> {
    await this.#fh?.close().catch(() => {});
    this.#fh = null;
    await unlink(this.tmp).catch(() => {});
  }
}

async function isFile(path: string): Promise<boolean> {
  return (await stat(path).catch(() => null))?.isFile() ?? false;
}

async function copyTokenizer(from: string, out: string): Promise<void> {
  for (const f of TOKENIZER_FILES) {
    const src = join(from, f);
    if (!(await isFile(src))) continue;
    await writeFileAtomic(join(out, f), async (fh) => fh.writeFile(await readFile(src)));
  }
}

/**
 * config.json of the first checkpoint with every key kept; only the dtype entry changes, when the
 * output dtype differs from what it says (Hugging Face names it torch_dtype, newer versions dtype).
 */
async function writeConfig(out: string, text: string, plan: readonly PlannedTensor[], dtype: 'f32' | 'bf16' | undefined): Promise<void> {
  const raw = JSON.parse(text) as Record<string, unknown>;
  const dtypes = new Set(plan.map((t) => t.dtype));
  const only = dtype ?? (dtypes.size === 1 ? [...dtypes][0] : undefined);
  const name = only === 'F32' || only === 'f32' ? 'float32' : only === 'BF16' || only === 'bf16' ? 'bfloat16' : only === 'F16' ? 'float16' : undefined;
  if (name !== undefined) {
    if ('dtype' in raw) raw.dtype = name;
    if ('torch_dtype' in raw || !('dtype' in raw)) raw.torch_dtype = name;
  }
  await writeTextAtomic(join(out, 'config.json'), JSON.stringify(raw, null, 2) + '\n');
}
