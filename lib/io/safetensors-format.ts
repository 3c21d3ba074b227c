// The safetensors layout, without any I/O: the dtype table, the error class, header validation
// (everything a reader must check before it allocates tensor memory) and header encoding.
//
// A file is: an 8-byte little-endian u64 n, n bytes of UTF-8 JSON, then the data buffer.
// The JSON maps tensor names to { dtype, shape, data_offsets: [begin, end] } (offsets relative
// to the buffer), plus an optional "__metadata__" string-to-string map.
import type { DType } from '../tensor.js';
import { JsonNumber, JsonObject, JsonSyntaxError, describeJson, parseJson, quote, type JsonValue } from './safetensors-json.js';

export { quote } from './safetensors-json.js';

// ---- dtypes --------------------------------------------------------------------------------------

export type SafetensorsDType =
  | 'F64' | 'F32' | 'F16' | 'BF16'
  | 'I64' | 'I32' | 'I16' | 'I8'
  | 'U64' | 'U32' | 'U16' | 'U8'
  | 'BOOL' | 'F8_E4M3' | 'F8_E5M2';

export interface SafetensorsDTypeInfo {
  /** Bytes per element. */
  readonly bytes: number;
  /** The tunekit dtype that holds these bits unchanged, or null when tunekit has none. */
  readonly tunekit: DType | null;
}

/**
 * Every dtype the reader accepts. The 8-bit floats (FP8 checkpoints) and the wide integers are
 * known so that such files open and their other tensors can be read; tunekit has no dtype for
 * them (tunekit: null), so converting them to tunekit tensors is the caller's decision. BOOL is
 * one byte per element but is not mapped to u8, so a mask never silently becomes numbers.
 * Sub-byte dtypes (F4, F6_*) are rejected as unknown: their byte size is not element-based.
 */
export const SAFETENSORS_DTYPES: Readonly<Record<SafetensorsDType, SafetensorsDTypeInfo>> = Object.freeze({
  F64: { bytes: 8, tunekit: null },
  F32: { bytes: 4, tunekit: 'f32' },
  F16: { bytes: 2, tunekit: 'f16' },
  BF16: { bytes: 2, tunekit: 'bf16' },
  I64: { bytes: 8, tunekit: null },
  I32: { bytes: 4, tunekit: 'i32' },
  I16: { bytes: 2, tunekit: null },
  I8: { bytes: 1, tunekit: null },
  U64: { bytes: 8, tunekit: null },
  U32: { bytes: 4, tunekit: null },
  U16: { bytes: 2, tunekit: null },
  U8: { bytes: 1, tunekit: 'u8' },
  BOOL: { bytes: 1, tunekit: null },
  F8_E4M3: { bytes: 1, tunekit: null },
  F8_E5M2: { bytes: 1, tunekit: null },
} satisfies Record<SafetensorsDType, SafetensorsDTypeInfo>);

export const KNOWN_DTYPES = Object.freeze(Object.keys(SAFETENSORS_DTYPES) as SafetensorsDType[]);

const TUNEKIT_TO_SAFETENSORS: Readonly<Record<DType, SafetensorsDType>> = { f32: 'F32', bf16: 'BF16', f16: 'F16', i32: 'I32', u8: 'U8' };

export function isSafetensorsDType(s: unknown): s is SafetensorsDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(SAFETENSORS_DTYPES, s);
}

/** The safetensors name of a tunekit dtype ('bf16' -> 'BF16'). */
export function safetensorsDTypeOf(dtype: DType): SafetensorsDType {
  const name = TUNEKIT_TO_SAFETENSORS[dtype];
  if (name === undefined) throw new TypeError(`safetensorsDTypeOf: unknown tunekit dtype ${JSON.stringify(dtype)}; use one of ${Object.keys(TUNEKIT_TO_SAFETENSORS).join(', ')}`);
  return name;
}

/** The tunekit dtype that holds a safetensors dtype's bits unchanged, or null. */
export function tunekitDTypeOf(dtype: SafetensorsDType): DType | null {
  return SAFETENSORS_DTYPES[dtype].tunekit;
}

// ---- errors --------------------------------------------------------------------------------------

/** What was wrong, for callers that branch on it (and for the fuzzer's statistics). */
export type SafetensorsErrorReason =
  | 'io' // the file could not be opened, read or written
  | 'header-length' // the u64 length prefix is impossible for this file
  | 'header-encoding' // the header is not UTF-8
  | 'header-json' // the header is not JSON, or not an object
  | 'metadata' // __metadata__ is not a string-to-string map
  | 'duplicate' // a name or key appears twice
  | 'entry' // a tensor entry lacks a key, has an extra one, or is not an object
  | 'dtype' // unknown or mistyped dtype
  | 'shape' // shape is not an array of non-negative safe integers
  | 'data-offsets' // data_offsets is not [begin, end] with begin <= end
  | 'byte-size' // the offsets do not span element count x dtype size bytes
  | 'layout' // tensors do not tile the data buffer exactly up to the end of the file
  | 'not-found' // read() of a name the file does not hold
  | 'closed' // read() after close()
  | 'too-large' // a tensor exceeds what one JavaScript buffer can hold
  | 'index' // a sharded checkpoint's index disagrees with itself or its shards
  | 'input'; // the writer was given inconsistent tensors or metadata

export interface SafetensorsErrorOptions {
  path: string;
  reason: SafetensorsErrorReason;
  tensor?: string | undefined;
  cause?: unknown;
}

/** Every rejection of a safetensors file, index or write request. The message names the file and tensor. */
export class SafetensorsError extends Error {
  readonly path: string;
  readonly tensor: string | undefined;
  readonly reason: SafetensorsErrorReason;

  constructor(detail: string, options: SafetensorsErrorOptions) {
    super(`${options.path}: ${options.tensor === undefined ? '' : `tensor ${quote(options.tensor)}: `}${detail}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'SafetensorsError';
    this.path = options.path;
    this.tensor = options.tensor;
    this.reason = options.reason;
  }
}

// ---- limits --------------------------------------------------------------------------------------

/** The largest header accepted: far above real headers (a few MB for 100k tensors), far below memory limits. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
// Element counts are multiplied exactly as BigInt but only up to this bound: past it the answer
// is "too large" whatever the remaining dimensions are, and a header with a million dimensions
// must not turn into a quadratic big-number product.
const COUNT_CAP = 1n << 128n;

// ---- reading -------------------------------------------------------------------------------------

export interface SafetensorsTensorInfo {
  readonly name: string;
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** [begin, end) relative to the start of the data buffer, as written in the header. */
  readonly dataOffsets: readonly [number, number];
  /** Absolute position of the first byte in the file. */
  readonly byteOffset: number;
  readonly byteLength: number;
  /** The file that holds the bytes. */
  readonly file: string;
}

export interface ParsedHeader {
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: ReadonlyMap<string, SafetensorsTensorInfo>;
  /** Where the data buffer begins: 8 + header length. */
  readonly dataOffset: number;
}

const LFS_POINTER = 'version https://git-lfs';

/**
 * Validates the 8-byte length prefix against the file size; returns the header length.
 * `prefix` is the file's first bytes (at least 8 when the file has them).
 */
export function checkHeaderLength(prefix: Uint8Array, fileSize: number, path: string): number {
  const fail = (detail: string): never => {
    throw new SafetensorsError(detail, { path, reason: 'header-length' });
  };
  if (new TextDecoder('latin1').decode(prefix.subarray(0, LFS_POINTER.length)) === LFS_POINTER)
    fail('this is a Git LFS pointer file, not the tensor data; fetch the real file (git lfs pull)');
  if (fileSize < 8) fail(`the file is ${fileSize} bytes, too short for the 8-byte header length; it is truncated or not a safetensors file`);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES))
    fail(`header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte (100 MiB) limit; the file is corrupt or not a safetensors file`);
  if (n > BigInt(fileSize - 8))
    fail(`header length ${n} runs past the end of the ${fileSize}-byte file; the file is truncated (download or write it again)`);
  return Number(n);
}

/**
 * Validates a header completely (structure, dtypes, shapes, checked byte sizes, and that the
 * tensors tile the data buffer up to the end of the file) and returns its contents.
 */
export function parseHeader(header: Uint8Array, fileSize: number, path: string): ParsedHeader {
  const dataOffset = 8 + header.length;
  let text: string;
  try {
    // fatal: a header with invalid UTF-8 is rejected instead of decoded with replacement
    // characters (which could merge two different names); ignoreBOM keeps a BOM so JSON rejects it.
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(header);
  } catch (e) {
    throw new SafetensorsError('the header is not valid UTF-8; the file is corrupt', { path, reason: 'header-encoding', cause: e });
  }
  if (text.trim() === '') throw new SafetensorsError(`the ${header.length}-byte header is empty; a file without tensors still has the header {}`, { path, reason: 'header-json' });
  let root: JsonValue;
  try {
    root = parseJson(text);
  } catch (e) {
    if (!(e instanceof JsonSyntaxError)) throw e;
    throw new SafetensorsError(`the header is not valid JSON: ${e.message}`, { path, reason: 'header-json', cause: e });
  }
  if (!(root instanceof JsonObject))
    throw new SafetensorsError(`the header must be a JSON object mapping tensor names to entries, got ${describeJson(root)}`, { path, reason: 'header-json' });

  let metadata: Record<string, string> = {};
  let sawMetadata = false;
  const entries: SafetensorsTensorInfo[] = [];
  const seen = new Set<string>();
  for (const [name, value] of root.entries) {
    if (name === '__metadata__') {
      if (sawMetadata) throw new SafetensorsError('"__metadata__" appears twice in the header', { path, reason: 'duplicate' });
      sawMetadata = true;
      metadata = parseMetadata(value, path);
      continue;
    }
    if (seen.has(name)) throw new SafetensorsError('listed twice in the header; a name must be unique', { path, tensor: name, reason: 'duplicate' });
    seen.add(name);
    entries.push(parseEntry(name, value, dataOffset, path));
  }
  checkLayout(entries, fileSize - dataOffset, path);
  return { metadata, tensors: new Map(entries.map((e) => [e.name, e])), dataOffset };
}

function parseMetadata(value: JsonValue, path: string): Record<string, string> {
  if (!(value instanceof JsonObject))
    throw new SafetensorsError(`"__metadata__" must be an object of string values, got ${describeJson(value)}`, { path, reason: 'metadata' });
  const out: Array<[string, string]> = [];
  const keys = new Set<string>();
  for (const [k, v] of value.entries) {
    if (keys.has(k)) throw new SafetensorsError(`"__metadata__" key ${quote(k)} appears twice`, { path, reason: 'duplicate' });
    keys.add(k);
    if (typeof v !== 'string')
      throw new SafetensorsError(`"__metadata__" value of ${quote(k)} must be a string, got ${describeJson(v)}`, { path, reason: 'metadata' });
    out.push([k, v]);
  }
  // fromEntries defines own properties, so a key named "__proto__" is kept as data.
  return Object.freeze(Object.fromEntries(out));
}

const ENTRY_KEYS = ['dtype', 'shape', 'data_offsets'] as const;

function parseEntry(name: string, value: JsonValue, dataOffset: number, path: string): SafetensorsTensorInfo {
  const fail = (reason: SafetensorsErrorReason, detail: string): never => {
    throw new SafetensorsError(detail, { path, tensor: name, reason });
  };
  if (!(value instanceof JsonObject)) return fail('entry', `the entry must be an object with dtype, shape and data_offsets, got ${describeJson(value)}`);
  const fields = new Map<string, JsonValue>();
  for (const [k, v] of value.entries) {
    if (fields.has(k)) fail('duplicate', `key ${quote(k)} appears twice in the entry`);
    if (!(ENTRY_KEYS as readonly string[]).includes(k)) fail('entry', `unexpected key ${quote(k)}; an entry has exactly dtype, shape and data_offsets`);
    fields.set(k, v);
  }
  for (const k of ENTRY_KEYS) if (!fields.has(k)) fail('entry', `the entry has no "${k}"; an entry has exactly dtype, shape and data_offsets`);

  const dtype = fields.get('dtype')!;
  if (typeof dtype !== 'string') return fail('dtype', `dtype must be a string, got ${describeJson(dtype)}`);
  if (!isSafetensorsDType(dtype)) return fail('dtype', `unknown dtype ${quote(dtype)}; known dtypes are ${KNOWN_DTYPES.join(', ')}`);

  const shapeValue = fields.get('shape')!;
  if (!Array.isArray(shapeValue)) return fail('shape', `shape must be an array of non-negative integers, got ${describeJson(shapeValue)}`);
  const shape: number[] = [];
  for (let i = 0; i < shapeValue.length; i++) {
    const d = exactInteger(shapeValue[i]!);
    if (d === null) return fail('shape', `shape ${describeJson(shapeValue)}: dimension ${i} is ${describeJson(shapeValue[i]!)}; dimensions must be integers from 0 to 2^53 - 1`);
    shape.push(d);
  }

  const offsets = fields.get('data_offsets')!;
  const begin = Array.isArray(offsets) && offsets.length === 2 ? exactInteger(offsets[0]!) : null;
  const end = Array.isArray(offsets) && offsets.length === 2 ? exactInteger(offsets[1]!) : null;
  if (begin === null || end === null) return fail('data-offsets', `data_offsets must be [begin, end], two integers from 0 to 2^53 - 1, got ${describeJson(offsets)}`);
  if (begin > end) return fail('data-offsets', `data_offsets [${begin}, ${end}] end before they begin`);

  const span = end - begin;
  // Doubles multiply safe integers exactly while the product stays below 2^53 (and a product
  // past 2^53 cannot round back under it), so the common case needs no BigInt.
  let fast = SAFETENSORS_DTYPES[dtype].bytes;
  for (const d of shape) fast *= d;
  if (fast <= Number.MAX_SAFE_INTEGER && fast === span) return info(name, dtype, shape, begin, end, dataOffset, path);

  const size = BigInt(SAFETENSORS_DTYPES[dtype].bytes);
  let count = 1n;
  for (const d of shape) {
    if (d === 0) {
      count = 0n;
      break;
    }
    if (count <= COUNT_CAP) count *= BigInt(d);
  }
  if (count > COUNT_CAP)
    return fail('byte-size', `shape ${formatShape(shape)} holds more than 2^128 elements, but data_offsets [${begin}, ${end}] span ${span} bytes`);
  const bytes = count * size;
  if (bytes !== BigInt(span))
    return fail('byte-size', `shape ${formatShape(shape)} of ${dtype} is ${count} elements x ${size} bytes = ${bytes} bytes, but data_offsets [${begin}, ${end}] span ${span} bytes`);

  return info(name, dtype, shape, begin, end, dataOffset, path);
}

function info(name: string, dtype: SafetensorsDType, shape: number[], begin: number, end: number, dataOffset: number, path: string): SafetensorsTensorInfo {
  return Object.freeze({
    name,
    dtype,
    shape: Object.freeze(shape),
    dataOffsets: Object.freeze([begin, end] as [number, number]),
    byteOffset: dataOffset + begin,
    byteLength: end - begin,
    file: path,
  });
}

/** An integer literal from 0 to 2^53 - 1, compared exactly; null for anything else (-0, 1.0, 1e3 included). */
function exactInteger(v: JsonValue): number | null {
  if (!(v instanceof JsonNumber) || !/^(0|[1-9]\d*)$/.test(v.raw)) return null;
  // 15 digits are always below 2^53; 17 or more never are (and skipping BigInt for them keeps
  // a 100 MB digit string cheap); only 16 digits need an exact comparison.
  if (v.raw.length <= 15) return Number(v.raw);
  if (v.raw.length > 16 || BigInt(v.raw) > MAX_SAFE) return null;
  return Number(v.raw);
}

/** Sorted by begin, the tensors must cover [0, bufferLength) exactly once. */
function checkLayout(entries: readonly SafetensorsTensorInfo[], bufferLength: number, path: string): void {
  const sorted = [...entries].sort((a, b) => a.dataOffsets[0] - b.dataOffsets[0] || a.dataOffsets[1] - b.dataOffsets[1]);
  let cursor = 0;
  let previous: SafetensorsTensorInfo | undefined;
  for (const t of sorted) {
    const [begin, end] = t.dataOffsets;
    if (begin < cursor)
      throw new SafetensorsError(`data_offsets [${begin}, ${end}] overlap tensor ${quote(previous!.name)} at [${previous!.dataOffsets[0]}, ${previous!.dataOffsets[1]}]; each byte belongs to one tensor`, { path, tensor: t.name, reason: 'layout' });
    if (begin > cursor)
      throw new SafetensorsError(`data_offsets [${begin}, ${end}] leave bytes ${cursor} to ${begin} of the data buffer to no tensor (${previous ? `after tensor ${quote(previous.name)}` : 'at its start'}); the offsets must be contiguous`, { path, tensor: t.name, reason: 'layout' });
    cursor = end;
    previous = t;
  }
  if (cursor > bufferLength)
    throw new SafetensorsError(`data_offsets end at byte ${cursor} of the data buffer, but the file holds only ${bufferLength} bytes after the header; the file is truncated (download or write it again)`, { path, tensor: previous?.name, reason: 'layout' });
  if (cursor < bufferLength)
    throw new SafetensorsError(`${bufferLength - cursor} bytes after the last tensor${previous ? ` (${quote(previous.name)}, ending at byte ${cursor})` : ''} belong to no tensor; the data buffer must end exactly at the end of the file`, { path, reason: 'layout' });
}

export function formatShape(shape: readonly number[]): string {
  return shape.length <= 16 ? `[${shape.join(', ')}]` : `[${shape.slice(0, 16).join(', ')}, ... (${shape.length} dimensions)]`;
}

// ---- writing -------------------------------------------------------------------------------------

export interface SafetensorsTensorInput {
  readonly name: string;
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  /** The little-endian bytes; any typed array or DataView is taken as its bytes. */
  readonly data: ArrayBufferView;
}

export type SafetensorsTensors = readonly SafetensorsTensorInput[] | ReadonlyMap<string, Omit<SafetensorsTensorInput, 'name'>>;

export interface EncodedLayout {
  /** The length prefix and the padded header: everything before the data buffer. */
  readonly head: Uint8Array;
  /** Each tensor's bytes, in file order. */
  readonly chunks: readonly Uint8Array[];
  readonly dataBytes: number;
}

/** Normalizes the writer's two input forms to a list, in the caller's order. */
export function tensorList(tensors: SafetensorsTensors, path: string): SafetensorsTensorInput[] {
  if (tensors instanceof Map) return [...tensors].map(([name, t]) => ({ ...t, name }));
  if (Array.isArray(tensors)) return [...tensors];
  throw new SafetensorsError('tensors must be an array of { name, dtype, shape, data } or a Map from name to { dtype, shape, data }', { path, reason: 'input' });
}

/** Checks one tensor the writer was given; returns its byte size. */
export function checkTensorInput(t: SafetensorsTensorInput, path: string): number {
  const name = t?.name;
  if (typeof name !== 'string') throw new SafetensorsError(`every tensor needs a string name, got ${typeof name}`, { path, reason: 'input' });
  const fail = (detail: string): never => {
    throw new SafetensorsError(detail, { path, tensor: name, reason: 'input' });
  };
  if (name === '__metadata__') fail('"__metadata__" is reserved for the metadata map; rename the tensor');
  if (!isSafetensorsDType(t.dtype)) fail(`unknown dtype ${typeof t.dtype === 'string' ? quote(t.dtype) : String(t.dtype)}; known dtypes are ${KNOWN_DTYPES.join(', ')}`);
  if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
    fail(`shape must be an array of non-negative safe integers, got ${Array.isArray(t.shape) ? formatShape(t.shape) : String(t.shape)}`);
  if (!ArrayBuffer.isView(t.data)) fail('data must be a typed array or DataView holding the tensor bytes');
  let count = 1n;
  for (const d of t.shape) count *= BigInt(d);
  const expected = count * BigInt(SAFETENSORS_DTYPES[t.dtype].bytes);
  if (expected !== BigInt(t.data.byteLength))
    fail(`shape ${formatShape(t.shape)} of ${t.dtype} needs ${expected} bytes, but data holds ${t.data.byteLength}`);
  return t.data.byteLength;
}

export function checkMetadataInput(metadata: unknown, path: string): Record<string, string> | undefined {
  if (metadata === undefined) return undefined;
  if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata))
    throw new SafetensorsError('metadata must be an object of string values', { path, reason: 'input' });
  for (const [k, v] of Object.entries(metadata)) {
    if (typeof v !== 'string') throw new SafetensorsError(`metadata value of ${quote(k)} must be a string, got ${typeof v}`, { path, reason: 'input' });
  }
  return metadata as Record<string, string>;
}

/**
 * Lays out a file: validates the tensors, assigns contiguous offsets in the given order, and
 * encodes the header padded with spaces so the data buffer starts 8-byte aligned (as the
 * reference Rust and Python writers do, so that readers can map tensors without copying).
 * `path` only names the destination in error messages.
 */
export function encodeSafetensors(tensors: SafetensorsTensors, metadata?: Record<string, string>, path = '<memory>'): EncodedLayout {
  const list = tensorList(tensors, path);
  const meta = checkMetadataInput(metadata, path);
  const names = new Set<string>();
  // Built by hand rather than with JSON.stringify on an object: objects move integer-like keys
  // ("0", "12") to the front, and the file must list tensors in the caller's order.
  const parts: string[] = [];
  if (meta !== undefined) {
    const m = Object.entries(meta).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`);
    parts.push(`"__metadata__":{${m.join(',')}}`);
  }
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const t of list) {
    const bytes = checkTensorInput(t, path);
    if (names.has(t.name)) throw new SafetensorsError('given twice; tensor names must be unique', { path, tensor: t.name, reason: 'input' });
    names.add(t.name);
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${offset},${offset + bytes}]}`);
    chunks.push(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    offset += bytes;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const n = Math.ceil(json.length / 8) * 8;
  if (n > MAX_HEADER_BYTES)
    throw new SafetensorsError(`the header would be ${n} bytes, over the ${MAX_HEADER_BYTES}-byte limit readers enforce; split the tensors over several files`, { path, reason: 'input' });
  const head = new Uint8Array(8 + n).fill(0x20);
  new DataView(head.buffer).setBigUint64(0, BigInt(n), true);
  head.set(json, 8);
  return { head, chunks, dataBytes: offset };
}
