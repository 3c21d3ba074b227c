// Reading and writing safetensors files and Hugging Face checkpoints (single file or sharded
// with model.safetensors.index.json), strictly: a file is validated completely from its header
// before any tensor memory is allocated, and a tensor is read with positioned reads of exactly
// its bytes, so opening a 100 GB checkpoint costs its headers and reading one tensor costs that
// tensor. Writes go to a temporary file that is synced and renamed, so a crash leaves either the
// old file or the new one, never half of one.
import { constants as bufferConstants } from 'node:buffer';
import { open, readdir, unlink, type FileHandle } from 'node:fs/promises';
import { basename, join } from 'node:path';

import {
  SafetensorsError,
  checkHeaderLength,
  checkMetadataInput,
  checkTensorInput,
  encodeSafetensors,
  parseHeader,
  quote,
  tensorList,
  type SafetensorsTensorInfo,
  type SafetensorsTensorInput,
  type SafetensorsTensors,
} from './safetensors-format.js';
import { writeFileAtomic } from './atomic.js';
import { JsonNumber, JsonObject, JsonSyntaxError, describeJson, parseJson, type JsonValue } from './safetensors-json.js';

export {
  KNOWN_DTYPES,
  MAX_HEADER_BYTES,
  SAFETENSORS_DTYPES,
  SafetensorsError,
  encodeSafetensors,
  isSafetensorsDType,
  safetensorsDTypeOf,
  tunekitDTypeOf,
  type SafetensorsDType,
  type SafetensorsDTypeInfo,
  type SafetensorsErrorReason,
  type SafetensorsTensorInfo,
  type SafetensorsTensorInput,
  type SafetensorsTensors,
} from './safetensors-format.js';

// Node refuses single reads and writes above 2 GiB; 1 GiB chunks stay clear of that limit.
const IO_CHUNK = 1 << 30;

// ---- byte sources --------------------------------------------------------------------------------

/** Random-access bytes: a file handle, or a buffer already in memory. */
interface ByteSource {
  readonly size: number;
  /** Fills `target` from `position`; returns how many bytes were available (fewer at the end). */
  read(target: Uint8Array, position: number): Promise<number>;
  close(): Promise<void>;
}

class FileSource implements ByteSource {
  constructor(private readonly fh: FileHandle, readonly size: number) {}

  async read(target: Uint8Array, position: number): Promise<number> {
    let done = 0;
    while (done < target.length) {
      const length = Math.min(target.length - done, IO_CHUNK);
      const { bytesRead } = await this.fh.read(target, done, length, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

class BufferSource implements ByteSource {
  constructor(private readonly bytes: Uint8Array) {}

  get size(): number {
    return this.bytes.length;
  }

  async read(target: Uint8Array, position: number): Promise<number> {
    const part = this.bytes.subarray(Math.min(position, this.bytes.length), Math.min(position + target.length, this.bytes.length));
    target.set(part);
    return part.length;
  }

  async close(): Promise<void> {}
}

// ---- one file ------------------------------------------------------------------------------------

/** What SafetensorsFile and SafetensorsCheckpoint share: a set of named tensors to read. */
export interface SafetensorsReader {
  readonly tensors: ReadonlyMap<string, SafetensorsTensorInfo>;
  /** Exactly the tensor's bytes, little-endian as stored. */
  read(name: string): Promise<Uint8Array>;
  /** Fills `target` with the tensor's bytes from `byteOffset` (relative to the tensor): for streaming large tensors. */
  readInto(name: string, target: Uint8Array, byteOffset?: number): Promise<void>;
  close(): Promise<void>;
}

const constructToken = Symbol('SafetensorsFile');

export class SafetensorsFile implements SafetensorsReader {
  readonly path: string;
  /** The header's "__metadata__" map ({} when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Tensors in header order. */
  readonly tensors: ReadonlyMap<string, SafetensorsTensorInfo>;
  /** Where the data buffer begins (8 + header length). */
  readonly dataOffset: number;
  readonly fileSize: number;
  #source: ByteSource | null;

  /** @internal Use SafetensorsFile.open or SafetensorsFile.fromBytes. */
  constructor(token: symbol, path: string, source: ByteSource, header: ReturnType<typeof parseHeader>) {
    if (token !== constructToken) throw new TypeError('SafetensorsFile: use SafetensorsFile.open(path) or SafetensorsFile.fromBytes(bytes)');
    this.path = path;
    this.#source = source;
    this.metadata = header.metadata;
    this.tensors = header.tensors;
    this.dataOffset = header.dataOffset;
    this.fileSize = source.size;
  }

  /** Opens and validates a file; reads only its header. */
  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw new SafetensorsError(`cannot open: ${(e as Error).message}`, { path, reason: 'io', cause: e });
    }
    try {
      const { size } = await fh.stat();
      return await SafetensorsFile.#load(path, new FileSource(fh, size));
    } catch (e) {
      await fh.close().catch(() => {});
      if (e instanceof SafetensorsError) throw e;
      throw new SafetensorsError(`cannot read: ${(e as Error).message}`, { path, reason: 'io', cause: e });
    }
  }

  /** Validates a file already in memory (the bytes are kept, not copied). `label` names it in errors. */
  static async fromBytes(bytes: Uint8Array, label = '<memory>'): Promise<SafetensorsFile> {
    return SafetensorsFile.#load(label, new BufferSource(bytes));
  }

  static async #load(path: string, source: ByteSource): Promise<SafetensorsFile> {
    // 24 bytes: enough to recognize a Git LFS pointer as well as to hold the length prefix.
    const prefix = new Uint8Array(Math.min(24, source.size));
    await readFully(source, prefix, 0, path);
    const n = checkHeaderLength(prefix, source.size, path);
    const header = new Uint8Array(n);
    await readFully(source, header, 8, path);
    return new SafetensorsFile(constructToken, path, source, parseHeader(header, source.size, path));
  }

  get closed(): boolean {
    return this.#source === null;
  }

  async read(name: string): Promise<Uint8Array> {
    const info = this.#info(name);
    if (info.byteLength > bufferConstants.MAX_LENGTH)
      throw new SafetensorsError(`is ${info.byteLength} bytes, more than one JavaScript buffer holds (${bufferConstants.MAX_LENGTH}); read it in parts with readInto(name, target, byteOffset)`, { path: this.path, tensor: name, reason: 'too-large' });
    const out = new Uint8Array(info.byteLength);
    await this.#readAt(info, out, 0);
    return out;
  }

  async readInto(name: string, target: Uint8Array, byteOffset = 0): Promise<void> {
    const info = this.#info(name);
    if (!(target instanceof Uint8Array)) throw new TypeError(`readInto: target must be a Uint8Array`);
    if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || byteOffset + target.length > info.byteLength)
      throw new RangeError(`readInto: bytes [${byteOffset}, ${byteOffset + target.length}) are outside tensor ${quote(name)} of ${info.byteLength} bytes`);
    await this.#readAt(info, target, byteOffset);
  }

  async close(): Promise<void> {
    const source = this.#source;
    this.#source = null;
    await source?.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #info(name: string): SafetensorsTensorInfo {
    if (this.#source === null) throw new SafetensorsError('the file has been closed; open it again to read', { path: this.path, tensor: name, reason: 'closed' });
    const info = this.tensors.get(name);
    if (info === undefined) throw new SafetensorsError(`not in this file; it holds ${listNames(this.tensors)}`, { path: this.path, tensor: name, reason: 'not-found' });
    return info;
  }

  async #readAt(info: SafetensorsTensorInfo, target: Uint8Array, byteOffset: number): Promise<void> {
    const source = this.#source!;
    let got: number;
    try {
      got = await source.read(target, info.byteOffset + byteOffset);
    } catch (e) {
      throw new SafetensorsError(`cannot read: ${(e as Error).message}`, { path: this.path, tensor: info.name, reason: 'io', cause: e });
    }
    if (got !== target.length)
      throw new SafetensorsError(`the file ended after ${got} of ${target.length} bytes; it was truncated after it was opened`, { path: this.path, tensor: info.name, reason: 'io' });
  }
}

async function readFully(source: ByteSource, target: Uint8Array, position: number, path: string): Promise<void> {
  const got = await source.read(target, position);
  if (got !== target.length)
    throw new SafetensorsError(`the file ended after ${position + got} bytes while reading the header; it changed while being opened`, { path, reason: 'io' });
}

function listNames(tensors: ReadonlyMap<string, unknown>): string {
  if (tensors.size === 0) return 'no tensors';
  const names = [...tensors.keys()].slice(0, 8).map((n) => quote(n, 60));
  return `${tensors.size} tensor${tensors.size === 1 ? '' : 's'}: ${names.join(', ')}${tensors.size > 8 ? ', ...' : ''}`;
}

// ---- checkpoints ---------------------------------------------------------------------------------

export interface CheckpointOptions {
  /** The file name stem: 'model' reads model.safetensors or model.safetensors.index.json; 'adapter_model' reads a PEFT adapter. */
  prefix?: string;
}

/** The tensors of a Hugging Face checkpoint directory, one file or many shards, as one set. */
export class SafetensorsCheckpoint implements SafetensorsReader {
  /** The index's "metadata" object (e.g. { total_size }), or null for a single file. */
  readonly indexMetadata: Readonly<Record<string, unknown>> | null;
  readonly tensors: ReadonlyMap<string, SafetensorsTensorInfo>;
  readonly #byFile: ReadonlyMap<string, SafetensorsFile>;

  /** @internal Use openCheckpoint(dir). */
  constructor(token: symbol, readonly dir: string, readonly files: readonly SafetensorsFile[], indexMetadata: Record<string, unknown> | null) {
    if (token !== constructToken) throw new TypeError('SafetensorsCheckpoint: use openCheckpoint(dir)');
    this.indexMetadata = indexMetadata === null ? null : Object.freeze(indexMetadata);
    this.#byFile = new Map(files.map((f) => [f.path, f]));
    const tensors = new Map<string, SafetensorsTensorInfo>();
    for (const f of files) for (const [name, info] of f.tensors) tensors.set(name, info);
    this.tensors = tensors;
  }

  async read(name: string): Promise<Uint8Array> {
    return this.#file(name).read(name);
  }

  async readInto(name: string, target: Uint8Array, byteOffset = 0): Promise<void> {
    return this.#file(name).readInto(name, target, byteOffset);
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #file(name: string): SafetensorsFile {
    const info = this.tensors.get(name);
    if (info === undefined) throw new SafetensorsError(`not in this checkpoint; it holds ${listNames(this.tensors)}`, { path: this.dir, tensor: name, reason: 'not-found' });
    return this.#byFile.get(info.file)!;
  }
}

// An index is a few MB even for the largest models; the bound keeps a wrong file from being slurped.
const MAX_INDEX_BYTES = 64 * 1024 * 1024;

/**
 * Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`,
 * after checking that the index and the shards agree: every shard exists, every listed tensor is
 * in its shard, no tensor is in two shards, and no shard holds a tensor the index does not list.
 */
export async function openCheckpoint(dir: string, options: CheckpointOptions = {}): Promise<SafetensorsCheckpoint> {
  const prefix = options.prefix ?? 'model';
  const single = join(dir, `${prefix}.safetensors`);
  const indexPath = join(dir, `${prefix}.safetensors.index.json`);
  const [hasSingle, hasIndex] = await Promise.all([isFile(single), isFile(indexPath)]);
  if (hasSingle && hasIndex)
    throw new SafetensorsError(`holds both ${prefix}.safetensors and ${prefix}.safetensors.index.json, so which one is the checkpoint is ambiguous; remove the stale one`, { path: dir, reason: 'index' });
  if (hasSingle) {
    const file = await SafetensorsFile.open(single);
    return new SafetensorsCheckpoint(constructToken, dir, [file], null);
  }
  if (!hasIndex)
    throw new SafetensorsError(`holds neither ${prefix}.safetensors nor ${prefix}.safetensors.index.json; is this a Hugging Face checkpoint directory (or one in another format, such as .bin)?`, { path: dir, reason: 'io' });

  const { weightMap, metadata } = await readIndex(indexPath);
  // In file-name order, so that model-00001-of-... is opened (and reported) first.
  const shardNames = [...new Set(weightMap.values())].sort();
  const files: SafetensorsFile[] = [];
  try {
    for (const shard of shardNames) {
      const listed = [...weightMap].filter(([, s]) => s === shard).map(([n]) => n);
      if (!(await isFile(join(dir, shard))))
        throw new SafetensorsError(`weight_map sends ${listed.length} tensor${listed.length === 1 ? '' : 's'} (first ${quote(listed[0]!)}) to ${quote(shard)}, which does not exist in ${dir}; the download is incomplete`, { path: indexPath, tensor: listed[0], reason: 'index' });
      files.push(await SafetensorsFile.open(join(dir, shard)));
    }
    const owner = new Map<string, SafetensorsFile>();
    for (const f of files) {
      for (const name of f.tensors.keys()) {
        const other = owner.get(name);
        if (other !== undefined)
          throw new SafetensorsError(`is in two shards, ${quote(basename(other.path))} and ${quote(basename(f.path))}; a tensor must be in exactly one`, { path: indexPath, tensor: name, reason: 'index' });
        owner.set(name, f);
        if (!weightMap.has(name))
          throw new SafetensorsError(`is in shard ${quote(basename(f.path))} but not in weight_map; the index and the shards disagree (add it to weight_map or remove it from the shard)`, { path: indexPath, tensor: name, reason: 'index' });
      }
    }
    for (const [name, shard] of weightMap) {
      const f = owner.get(name);
      if (f === undefined || basename(f.path) !== shard)
        throw new SafetensorsError(`weight_map puts it in ${quote(shard)}, but ${f === undefined ? 'no shard holds it' : `it is in ${quote(basename(f.path))}`}; the index and the shards disagree`, { path: indexPath, tensor: name, reason: 'index' });
    }
    return new SafetensorsCheckpoint(constructToken, dir, files, metadata);
  } catch (e) {
    await Promise.all(files.map((f) => f.close().catch(() => {})));
    throw e;
  }
}

async function readIndex(indexPath: string): Promise<{ weightMap: Map<string, string>; metadata: Record<string, unknown> | null }> {
  const fail = (detail: string, tensor?: string): never => {
    throw new SafetensorsError(detail, { path: indexPath, tensor, reason: 'index' });
  };
  let text: string;
  try {
    const fh = await open(indexPath, 'r');
    try {
      const { size } = await fh.stat();
      if (size > MAX_INDEX_BYTES) fail(`is ${size} bytes, over the ${MAX_INDEX_BYTES}-byte limit for an index; it is not a safetensors index`);
      const bytes = new Uint8Array(size);
      const got = await new FileSource(fh, size).read(bytes, 0);
      text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes.subarray(0, got));
    } finally {
      await fh.close();
    }
  } catch (e) {
    if (e instanceof SafetensorsError) throw e;
    throw new SafetensorsError(`cannot read the index: ${(e as Error).message}`, { path: indexPath, reason: 'io', cause: e });
  }
  let root: JsonValue;
  try {
    root = parseJson(text);
  } catch (e) {
    if (!(e instanceof JsonSyntaxError)) throw e;
    return fail(`is not valid JSON: ${e.message}`);
  }
  if (!(root instanceof JsonObject)) return fail(`must be a JSON object with "weight_map", got ${describeJson(root)}`);
  let weightMapValue: JsonValue | undefined;
  let metadata: Record<string, unknown> | null = null;
  const keys = new Set<string>();
  for (const [k, v] of root.entries) {
    if (keys.has(k)) fail(`key ${quote(k)} appears twice`);
    keys.add(k);
    if (k === 'weight_map') weightMapValue = v;
    else if (k === 'metadata') {
      if (!(v instanceof JsonObject)) fail(`"metadata" must be an object, got ${describeJson(v)}`);
      metadata = Object.fromEntries((v as JsonObject).entries.map(([mk, mv]) => [mk, toPlain(mv)]));
    }
    // Other top-level keys are tolerated: writers add their own bookkeeping there.
  }
  if (weightMapValue === undefined) return fail('has no "weight_map"; it is not a safetensors index');
  if (!(weightMapValue instanceof JsonObject)) return fail(`"weight_map" must be an object from tensor name to shard file, got ${describeJson(weightMapValue)}`);
  if (weightMapValue.entries.length === 0) return fail('"weight_map" is empty; a checkpoint without tensors has nothing to load');
  const weightMap = new Map<string, string>();
  for (const [name, shard] of weightMapValue.entries) {
    if (weightMap.has(name)) fail('appears twice in weight_map', name);
    if (typeof shard !== 'string') fail(`weight_map value must be a shard file name, got ${describeJson(shard)}`, name);
    const file = shard as string;
    // Shards live next to the index: a path would let an index point anywhere on the disk.
    if (file === '' || file === '.' || file === '..' || /[\\/\0]/.test(file))
      fail(`weight_map value ${quote(file)} must be a file name in the checkpoint directory, not a path`, name);
    weightMap.set(name, file);
  }
  return { weightMap, metadata };
}

function toPlain(v: JsonValue): unknown {
  if (v instanceof JsonNumber) return v.value;
  if (v instanceof JsonObject) return Object.fromEntries(v.entries.map(([k, x]) => [k, toPlain(x)]));
  if (Array.isArray(v)) return v.map(toPlain);
  return v;
}

async function isFile(path: string): Promise<boolean> {
  try {
    const fh = await open(path, 'r');
    try {
      return (await fh.stat()).isFile();
    } finally {
      await fh.close();
    }
  } catch {
    return false;
  }
}

// ---- writing -------------------------------------------------------------------------------------

export interface WrittenFile {
  readonly path: string;
  /** Size of the file: length prefix, padded header and data. */
  readonly bytes: number;
}

/**
 * Writes a safetensors file atomically: tensors in the given order, the header padded with
 * spaces to a multiple of 8 bytes. Every tensor's data is checked against shape x dtype size
 * before anything touches the disk; an existing file at `path` is replaced only once the new one
 * is complete and synced.
 */
export async function writeSafetensors(path: string, tensors: SafetensorsTensors, metadata?: Record<string, string>): Promise<WrittenFile> {
  const layout = encodeSafetensors(tensors, metadata, path);
  await writeAtomically(path, [layout.head, ...layout.chunks]);
  return { path, bytes: layout.head.length + layout.dataBytes };
}

export interface ShardOptions {
  /** The most tensor bytes per shard (headers excluded, as Hugging Face counts). Default 5 GB (5e9). A larger tensor gets a shard of its own. */
  maxShardBytes?: number;
  /** "__metadata__" for every shard; transformers expects { format: 'pt' } when metadata is present. */
  metadata?: Record<string, string>;
  /** File name stem, as in CheckpointOptions. Default 'model'. */
  prefix?: string;
}

export interface WrittenCheckpoint {
  /** The safetensors files, in order. */
  readonly files: readonly string[];
  /** The index file, or null when everything fit in one file. */
  readonly index: string | null;
  /** Sum of tensor bytes, as the index's metadata.total_size. */
  readonly totalSize: number;
}

/**
 * Writes a checkpoint directory the way Hugging Face does: `model.safetensors` when the tensors
 * fit in one shard, otherwise `model-00001-of-0000N.safetensors` files, filled greedily in the
 * given order, plus `model.safetensors.index.json` ({ metadata: { total_size }, weight_map }).
 * Files of a previous save with the same prefix that the new one does not use (a stale index,
 * single file, or shard) are removed afterwards, so the directory never holds two checkpoints.
 */
export async function writeShardedSafetensors(dir: string, tensors: SafetensorsTensors, options: ShardOptions = {}): Promise<WrittenCheckpoint> {
  const prefix = options.prefix ?? 'model';
  const maxShardBytes = options.maxShardBytes ?? 5_000_000_000;
  if (!Number.isSafeInteger(maxShardBytes) || maxShardBytes <= 0)
    throw new SafetensorsError(`maxShardBytes must be a positive integer, got ${maxShardBytes}`, { path: dir, reason: 'input' });
  if (prefix === '' || /[\\/\0]/.test(prefix)) throw new SafetensorsError(`prefix ${quote(prefix)} must be a plain file name stem`, { path: dir, reason: 'input' });
  const list = tensorList(tensors, dir);
  checkMetadataInput(options.metadata, dir);

  // Validate everything before the first byte is written, so bad input leaves the directory as it was.
  const shards: SafetensorsTensorInput[][] = [];
  let current: SafetensorsTensorInput[] = [];
  let currentBytes = 0;
  let totalSize = 0;
  const names = new Set<string>();
  for (const t of list) {
    const bytes = checkTensorInput(t, dir);
    if (names.has(t.name)) throw new SafetensorsError('given twice; tensor names must be unique', { path: dir, tensor: t.name, reason: 'input' });
    names.add(t.name);
    if (current.length > 0 && currentBytes + bytes > maxShardBytes) {
      shards.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(t);
    currentBytes += bytes;
    totalSize += bytes;
  }
  if (current.length > 0 || shards.length === 0) shards.push(current);

  const single = `${prefix}.safetensors`;
  const indexName = `${prefix}.safetensors.index.json`;
  const layouts = shards.map((s, i) => {
    const name = shards.length === 1 ? single : `${prefix}-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`;
    return { name, layout: encodeSafetensors(s, options.metadata, join(dir, name)), tensors: s };
  });

  // Crash safety across files: an old index is removed before any shard it lists is
  // overwritten, so a crash mid-save can never pair an old index with a mix of old and new
  // shards holding the same names. At every point the directory either reads consistently (the
  // old single file, or the new checkpoint) or is rejected as incomplete or ambiguous.
  if (layouts.length > 1) await unlink(join(dir, indexName)).catch(() => {});
  for (const { name, layout } of layouts) await writeAtomically(join(dir, name), [layout.head, ...layout.chunks]);
  let index: string | null = null;
  if (layouts.length > 1) {
    const weightMap: Array<[string, string]> = layouts.flatMap(({ name, tensors: ts }) => ts.map((t): [string, string] => [t.name, name]));
    // Sorted and indented like transformers' json.dumps(index, indent=2, sort_keys=True), so
    // diffs against a Python-written index are minimal.
    weightMap.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    const text =
      `{\n  "metadata": {\n    "total_size": ${totalSize}\n  },\n  "weight_map": {\n` +
      weightMap.map(([n, f]) => `    ${JSON.stringify(n)}: ${JSON.stringify(f)}`).join(',\n') +
      '\n  }\n}\n';
    index = join(dir, indexName);
    await writeAtomically(index, [new TextEncoder().encode(text)]);
  }

  const keep = new Set(layouts.map((l) => l.name));
  if (index !== null) keep.add(indexName);
  const shardPattern = new RegExp(`^${escapeRegExp(prefix)}-\\d{5}-of-\\d{5}\\.safetensors$`);
  let existing: string[] = [];
  try {
    existing = await readdir(dir);
  } catch {
    // The files were just written there, so the directory exists; an unreadable listing only
    // means stale files cannot be found, which must not fail a save that succeeded.
  }
  for (const f of existing) {
    if (keep.has(f)) continue;
    if (f === single || f === indexName || shardPattern.test(f)) await unlink(join(dir, f)).catch(() => {});
  }
  return { files: layouts.map((l) => join(dir, l.name)), index, totalSize };
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Writes `chunks` to a temporary file next to `path`, syncs it, and renames it over `path`. */
async function writeAtomically(path: string, chunks: readonly Uint8Array[]): Promise<void> {
  try {
    await writeFileAtomic(path, async (fh) => {
      let position = 0;
      for (const chunk of chunks) {
        let done = 0;
        while (done < chunk.length) {
          const { bytesWritten } = await fh.write(chunk, done, Math.min(chunk.length - done, IO_CHUNK), position);
          done += bytesWritten;
          position += bytesWritten;
        }
      }
    });
  } catch (e) {
    throw new SafetensorsError(`cannot write: ${(e as Error).message}`, { path, reason: 'io', cause: e });
  }
}
