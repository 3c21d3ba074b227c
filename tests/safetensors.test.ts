import { mkdir, mkdtemp, open, readFile, readdir, rm, truncate, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import * as tk from '../lib/index.js';
import {
  KNOWN_DTYPES,
  SAFETENSORS_DTYPES,
  SafetensorsError,
  SafetensorsFile,
  openCheckpoint,
  safetensorsDTypeOf,
  tunekitDTypeOf,
  writeSafetensors,
  writeShardedSafetensors,
  type SafetensorsDType,
  type SafetensorsErrorReason,
  type SafetensorsTensorInput,
} from '../lib/io/safetensors.js';

let dir: string;
let counter = 0;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-st-'));
});

afterEach(async () => {
  vi.restoreAllMocks();
  await rm(dir, { recursive: true, force: true });
});

const ascii = (s: string) => new TextEncoder().encode(s);

function u64(n: number | bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(n), true);
  return out;
}

function concat(...parts: Array<Uint8Array | number[]>): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A file from a header (text, or an object to stringify) and data, with the length field computed unless given. */
function stFile(header: string | object, data: Uint8Array | number[] = [], lengthField?: bigint): Uint8Array {
  const h = ascii(typeof header === 'string' ? header : JSON.stringify(header));
  return concat(u64(lengthField ?? BigInt(h.length)), h, data);
}

async function put(bytes: Uint8Array, name = `f${counter++}.safetensors`): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  return path;
}

async function rejection(bytes: Uint8Array): Promise<SafetensorsError> {
  const path = await put(bytes);
  const err = await SafetensorsFile.open(path).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SafetensorsError);
  const e = err as SafetensorsError;
  expect(e.message.startsWith(`${path}: `)).toBe(true);
  expect(e.path).toBe(path);
  return e;
}

function randomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = s & 0xff;
  }
  return out;
}

// toEqual compares element by element; megabytes need a memcmp.
function sameBytes(a: Uint8Array, b: ArrayBufferView): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function tensorOf(name: string, dtype: SafetensorsDType, shape: number[], seed = 1): SafetensorsTensorInput {
  const n = shape.reduce((a, b) => a * b, 1) * SAFETENSORS_DTYPES[dtype].bytes;
  return { name, dtype, shape, data: randomBytes(n, seed) };
}

// The FileHandle class is not exported; its prototype is reachable through any open handle.
async function fileHandlePrototype(): Promise<{ read: (...args: unknown[]) => unknown; write: (...args: unknown[]) => unknown }> {
  const fh = await open(join(dir, '.probe'), 'w');
  const proto = Object.getPrototypeOf(fh);
  await fh.close();
  return proto;
}

describe('safetensors dtypes', () => {
  it('lists byte sizes and the tunekit dtype that holds each', () => {
    expect(KNOWN_DTYPES).toEqual(['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U64', 'U32', 'U16', 'U8', 'BOOL', 'F8_E4M3', 'F8_E5M2']);
    const bytes = Object.fromEntries(KNOWN_DTYPES.map((d) => [d, SAFETENSORS_DTYPES[d].bytes]));
    expect(bytes).toEqual({ F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1 });
    const held = KNOWN_DTYPES.filter((d) => tunekitDTypeOf(d) !== null).map((d) => [d, tunekitDTypeOf(d)]);
    expect(held).toEqual([['F32', 'f32'], ['F16', 'f16'], ['BF16', 'bf16'], ['I32', 'i32'], ['U8', 'u8']]);
    for (const [st, t] of held) expect(safetensorsDTypeOf(t!)).toBe(st);
  });
});

describe('SafetensorsFile: reading independent files', () => {
  it('reads a hand-written file: header order differs from data order, unpadded header, scalar and empty tensors', async () => {
    // Written byte by byte, not by the writer. The header is 195 (0xc3) bytes and not padded.
    const header = '{"b":{"dtype":"BF16","shape":[],"data_offsets":[8,10]},"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"I8","shape":[0,3],"data_offsets":[10,10]}}';
    expect(header.length).toBe(0xc3);
    const bytes = concat(
      [0xc3, 0, 0, 0, 0, 0, 0, 0],
      ascii(header),
      [0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x20, 0xc0], // a: f32 1.0, -2.5
      [0xc0, 0x3f], // b: bf16 1.5
    );
    const path = await put(bytes);
    const f = await SafetensorsFile.open(path);
    try {
      expect(f.metadata).toEqual({ format: 'pt' });
      expect([...f.tensors.keys()]).toEqual(['b', 'a', 'e']);
      expect(f.dataOffset).toBe(8 + 0xc3);
      expect(f.tensors.get('a')).toEqual({ name: 'a', dtype: 'F32', shape: [2], dataOffsets: [0, 8], byteOffset: 203, byteLength: 8, file: path });
      expect(f.tensors.get('b')).toMatchObject({ dtype: 'BF16', shape: [], byteOffset: 211, byteLength: 2 });
      expect(f.tensors.get('e')).toMatchObject({ dtype: 'I8', shape: [0, 3], byteLength: 0 });
      const a = await f.read('a');
      expect(Array.from(new Float32Array(a.slice().buffer))).toEqual([1, -2.5]);
      const b = await f.read('b');
      expect(Array.from(b)).toEqual([0xc0, 0x3f]);
      expect(await f.read('e')).toEqual(new Uint8Array(0));
      // The raw bits become a tunekit tensor unchanged.
      using t = tk.tensor(new Uint16Array(b.slice().buffer), [], { dtype: 'bf16' });
      expect(t.shape).toEqual([]);
      expect(Array.from(t.toArraySync())).toEqual([1.5]);
    } finally {
      await f.close();
    }
  });

  it("reads the reference writers' layout: metadata first, header padded with spaces to 8 bytes", async () => {
    // Compact JSON of 86 bytes plus 2 spaces, as the Rust safetensors serializer lays it out.
    const bytes = concat(
      [0x58, 0, 0, 0, 0, 0, 0, 0],
      ascii('{"__metadata__":{"format":"pt"},"x":{"dtype":"I32","shape":[3],"data_offsets":[0,12]}}  '),
      [1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // 1, -2, 2^31 - 1
    );
    const f = await SafetensorsFile.fromBytes(bytes, 'ref.safetensors');
    expect(f.dataOffset).toBe(96);
    expect(Array.from(new Int32Array((await f.read('x')).slice().buffer))).toEqual([1, -2, 2147483647]);
    await f.close();
  });

  it('accepts a file with no tensors, and keeps odd names and metadata keys as data', async () => {
    const empty = await SafetensorsFile.fromBytes(stFile('{}'));
    expect(empty.tensors.size).toBe(0);
    expect(empty.metadata).toEqual({});
    const odd = await SafetensorsFile.fromBytes(
      stFile('{"__metadata__":{"__proto__":"p","k":""},"__proto__":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"0":{"dtype":"U8","shape":[],"data_offsets":[1,2]},"F8":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[2,3]}}', [7, 8, 9]),
    );
    expect([...odd.tensors.keys()]).toEqual(['__proto__', '0', 'F8']);
    expect(Object.keys(odd.metadata)).toEqual(['__proto__', 'k']);
    expect(odd.metadata['__proto__']).toBe('p');
    expect(Array.from(await odd.read('__proto__'))).toEqual([7]);
    expect(Array.from(await odd.read('F8'))).toEqual([9]);
  });
});

describe('writeSafetensors', () => {
  it('round-trips every dtype bit-exactly, with scalars, empty tensors and metadata', async () => {
    const tensors: SafetensorsTensorInput[] = [];
    let seed = 1;
    for (const dtype of KNOWN_DTYPES) {
      tensors.push(tensorOf(`${dtype}.matrix`, dtype, [3, 5], seed++));
      tensors.push(tensorOf(`${dtype}.scalar`, dtype, [], seed++));
      tensors.push(tensorOf(`${dtype}.empty`, dtype, [4, 0], seed++));
    }
    // NaN payloads and signed zeros must survive as bits, not as numbers.
    tensors.push({ name: 'f32.bits', dtype: 'F32', shape: [3], data: new Uint32Array([0x7fc00001, 0x80000000, 0xff800000]) });
    const path = join(dir, 'all.safetensors');
    const written = await writeSafetensors(path, tensors, { format: 'pt', note: 'ünïcode' });
    const raw = await readFile(path);
    expect(written.bytes).toBe(raw.length);
    const f = await SafetensorsFile.open(path);
    try {
      expect(f.metadata).toEqual({ format: 'pt', note: 'ünïcode' });
      expect([...f.tensors.keys()]).toEqual(tensors.map((t) => t.name));
      for (const t of tensors) {
        const info = f.tensors.get(t.name)!;
        expect(info.dtype).toBe(t.dtype);
        expect(info.shape).toEqual(t.shape);
        const want = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
        expect(await f.read(t.name)).toEqual(want);
      }
      // Tensors are laid out in the given order.
      const begins = tensors.map((t) => f.tensors.get(t.name)!.dataOffsets[0]);
      expect(begins).toEqual([...begins].sort((a, b) => a - b));
    } finally {
      await f.close();
    }
  });

  it('pads the header with spaces to a multiple of 8 bytes', async () => {
    for (let len = 1; len <= 9; len++) {
      const path = join(dir, `pad${len}.safetensors`);
      await writeSafetensors(path, [tensorOf('n'.repeat(len), 'U8', [1])]);
      const raw = new Uint8Array(await readFile(path));
      const n = Number(new DataView(raw.buffer).getBigUint64(0, true));
      expect(n % 8).toBe(0);
      const header = new TextDecoder().decode(raw.subarray(8, 8 + n));
      expect(header).toMatch(/^\{.*\} *$/);
      expect(header.trimEnd().length).toBeGreaterThan(n - 8);
      expect(JSON.parse(header)).toEqual({ ['n'.repeat(len)]: { dtype: 'U8', shape: [1], data_offsets: [0, 1] } });
    }
  });

  it('keeps the given order even for integer-like names, and accepts a Map', async () => {
    const names = ['10', '2', 'b', 'a', '0'];
    const path = join(dir, 'order.safetensors');
    await writeSafetensors(path, new Map(names.map((n, i) => [n, { dtype: 'F16' as const, shape: [2], data: randomBytes(4, i + 1) }])));
    const header = (await readFile(path, 'latin1')).slice(8);
    const positions = names.map((n) => header.indexOf(`"${n}":`));
    expect(positions).toEqual([...positions].sort((a, b) => a - b));
    const f = await SafetensorsFile.open(path);
    expect([...f.tensors.keys()]).toEqual(names);
    expect(f.tensors.get('0')!.dataOffsets).toEqual([16, 20]);
    await f.close();
  });

  it('rejects inconsistent tensors by name before touching the disk', async () => {
    const path = join(dir, 'bad.safetensors');
    const cases: Array<[unknown, RegExp]> = [
      [[{ name: 'w', dtype: 'F32', shape: [2, 3], data: new Uint8Array(20) }], /tensor "w": shape \[2, 3\] of F32 needs 24 bytes, but data holds 20/],
      [[tensorOf('w', 'F32', [1]), tensorOf('w', 'F32', [1])], /tensor "w": given twice/],
      [[{ name: 'w', dtype: 'F4', shape: [1], data: new Uint8Array(1) }], /tensor "w": unknown dtype "F4"; known dtypes are F64, F32, F16, BF16/],
      [[{ name: 'w', dtype: 'F32', shape: [-1], data: new Uint8Array(0) }], /tensor "w": shape must be an array of non-negative safe integers, got \[-1\]/],
      [[{ name: 'w', dtype: 'F32', shape: [1], data: [0, 0, 0, 0] }], /tensor "w": data must be a typed array/],
      [[tensorOf('__metadata__', 'U8', [1])], /"__metadata__" is reserved/],
      [[{ dtype: 'U8', shape: [1], data: new Uint8Array(1) }], /every tensor needs a string name/],
    ];
    for (const [tensors, re] of cases) {
      const err = await writeSafetensors(path, tensors as SafetensorsTensorInput[]).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SafetensorsError);
      expect((err as Error).message).toMatch(re);
      expect((err as SafetensorsError).reason).toBe('input');
    }
    await expect(writeSafetensors(path, [], { n: 1 } as unknown as Record<string, string>)).rejects.toThrow(/metadata value of "n" must be a string, got number/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('replaces a file atomically: a failed write leaves the old file and no temporary file', async () => {
    const path = join(dir, 'model.safetensors');
    await writeSafetensors(path, [tensorOf('old', 'U8', [4])]);
    const before = await readFile(path);

    const proto = await fileHandlePrototype();
    await unlink(join(dir, '.probe'));
    const realWrite = proto.write;
    let calls = 0;
    vi.spyOn(proto, 'write').mockImplementation(function (this: unknown, ...args: unknown[]) {
      if (++calls === 2) return Promise.reject(Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }));
      return realWrite.apply(this, args);
    });
    const err = await writeSafetensors(path, [tensorOf('new', 'U8', [1 << 16])]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SafetensorsError);
    expect((err as Error).message).toMatch(/model\.safetensors: cannot write: ENOSPC/);
    vi.restoreAllMocks();

    expect(await readFile(path)).toEqual(before);
    expect(await readdir(dir)).toEqual(['model.safetensors']);
    // And a successful write replaces it whole.
    await writeSafetensors(path, [tensorOf('new', 'U8', [3])]);
    const f = await SafetensorsFile.open(path);
    expect([...f.tensors.keys()]).toEqual(['new']);
    await f.close();
    expect(await readdir(dir)).toEqual(['model.safetensors']);
  });

  it('reports a missing directory as a SafetensorsError', async () => {
    await expect(writeSafetensors(join(dir, 'nope', 'x.safetensors'), [])).rejects.toThrow(/nope\/x\.safetensors: cannot write: ENOENT/);
  });
});

describe('SafetensorsFile: strict validation', () => {
  const one = (extra: object = {}) => ({ t: { dtype: 'F32', shape: [2], data_offsets: [0, 8], ...extra } });
  const eight = new Uint8Array(8);

  const cases: Array<[string, Uint8Array, RegExp, SafetensorsErrorReason]> = [
    ['a file shorter than 8 bytes', new Uint8Array([1, 2, 3]), /: the file is 3 bytes, too short for the 8-byte header length/, 'header-length'],
    ['a header length past the end of the file', stFile('{}', [], 9n), /: header length 9 runs past the end of the 10-byte file; the file is truncated/, 'header-length'],
    ['a header length over 100 MiB', stFile('{}', [], 100n * 1024n * 1024n + 1n), /: header length 104857601 exceeds the 104857600-byte \(100 MiB\) limit/, 'header-length'],
    ['a header length of 2^64 - 1', stFile('{}', [], 2n ** 64n - 1n), /: header length 18446744073709551615 exceeds/, 'header-length'],
    ['a Git LFS pointer', ascii('version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n'), /: this is a Git LFS pointer file, not the tensor data; fetch the real file \(git lfs pull\)/, 'header-length'],
    ['an empty header', stFile(''), /: the 0-byte header is empty/, 'header-json'],
    ['invalid UTF-8', concat(u64(4), [0x7b, 0xff, 0xfe, 0x7d]), /: the header is not valid UTF-8/, 'header-encoding'],
    ['a byte order mark', concat(u64(5), [0xef, 0xbb, 0xbf, 0x7b, 0x7d]), /: the header is not valid JSON: expected a value at character 0/, 'header-json'],
    ['invalid JSON', stFile('{"t":{"dtype":"F32",}}'), /: the header is not valid JSON: expected a string key at character 20, found '}'/, 'header-json'],
    ['deep nesting', stFile(`{"t":${'['.repeat(100)}`), /: the header is not valid JSON: nesting deeper than 64 levels/, 'header-json'],
    ['a JSON array', stFile('[1,2]'), /: the header must be a JSON object mapping tensor names to entries, got \[1, 2\]/, 'header-json'],
    ['a non-object entry', stFile('{"t":[0,8]}', eight), /: tensor "t": the entry must be an object with dtype, shape and data_offsets, got \[0, 8\]/, 'entry'],
    ['a missing dtype', stFile({ t: { shape: [2], data_offsets: [0, 8] } }, eight), /: tensor "t": the entry has no "dtype"/, 'entry'],
    ['an extra key', stFile(one({ offsets: 1 }), eight), /: tensor "t": unexpected key "offsets"; an entry has exactly dtype, shape and data_offsets/, 'entry'],
    ['an unknown dtype', stFile(one({ dtype: 'F4' }), eight), /: tensor "t": unknown dtype "F4"; known dtypes are F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2/, 'dtype'],
    ['a lower-case dtype', stFile(one({ dtype: 'f32' }), eight), /: tensor "t": unknown dtype "f32"/, 'dtype'],
    ['a dtype that is not a string', stFile(one({ dtype: 4 }), eight), /: tensor "t": dtype must be a string, got 4/, 'dtype'],
    ['a shape that is not an array', stFile(one({ shape: 2 }), eight), /: tensor "t": shape must be an array of non-negative integers, got 2/, 'shape'],
    ['a negative dimension', stFile(one({ shape: [2, -1] }), eight), /: tensor "t": shape \[2, -1\]: dimension 1 is -1; dimensions must be integers from 0 to 2\^53 - 1/, 'shape'],
    ['a fractional dimension', stFile('{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', eight), /: tensor "t": shape \[2\.0\]: dimension 0 is 2\.0/, 'shape'],
    ['an exponent dimension', stFile('{"t":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}', eight), /dimension 0 is 2e0/, 'shape'],
    ['a string dimension', stFile(one({ shape: ['2'] }), eight), /: tensor "t": shape \["2"\]: dimension 0 is "2"/, 'shape'],
    ['a dimension past 2^53', stFile('{"t":{"dtype":"F32","shape":[9007199254740993],"data_offsets":[0,8]}}', eight), /dimension 0 is 9007199254740993; dimensions must be integers from 0 to 2\^53 - 1/, 'shape'],
    ['one offset', stFile(one({ data_offsets: [0] }), eight), /: tensor "t": data_offsets must be \[begin, end\], two integers from 0 to 2\^53 - 1, got \[0\]/, 'data-offsets'],
    ['a negative offset', stFile(one({ data_offsets: [-8, 0] }), eight), /: tensor "t": data_offsets must be \[begin, end\].*got \[-8, 0\]/, 'data-offsets'],
    ['an offset past 2^53', stFile('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551624]}}', eight), /got \[0, 18446744073709551624\]/, 'data-offsets'],
    ['offsets that end before they begin', stFile(one({ data_offsets: [8, 0] }), eight), /: tensor "t": data_offsets \[8, 0\] end before they begin/, 'data-offsets'],
    ['a byte size that does not match the shape', stFile(one({ shape: [3] }), eight), /: tensor "t": shape \[3\] of F32 is 3 elements x 4 bytes = 12 bytes, but data_offsets \[0, 8\] span 8 bytes/, 'byte-size'],
    // 2^40 x 2^40 elements; a 64-bit product of [2^32, 2^32] x 4 would wrap to exactly 0 bytes.
    ['a [2^40, 2^40] shape', stFile(one({ shape: [2 ** 40, 2 ** 40], data_offsets: [0, 0] })), /: tensor "t": shape \[1099511627776, 1099511627776\] of F32 is 1208925819614629174706176 elements x 4 bytes = 4835703278458516698824704 bytes, but data_offsets \[0, 0\] span 0 bytes/, 'byte-size'],
    ['a [2^32, 2^32] shape that wraps 64-bit arithmetic to 0', stFile(one({ shape: [2 ** 32, 2 ** 32], data_offsets: [0, 0] })), /= 73786976294838206464 bytes, but data_offsets \[0, 0\] span 0 bytes/, 'byte-size'],
    ['a shape with hundreds of huge dimensions', stFile(one({ shape: Array(400).fill(2 ** 32 - 1), data_offsets: [0, 0] })), /: tensor "t": shape \[4294967295, .*\(400 dimensions\)\] holds more than 2\^128 elements/, 'byte-size'],
    ['the first tensor not at 0', stFile({ t: { dtype: 'U8', shape: [4], data_offsets: [4, 8] } }, eight), /: tensor "t": data_offsets \[4, 8\] leave bytes 0 to 4 of the data buffer to no tensor \(at its start\)/, 'layout'],
    ['a gap', stFile({ a: { dtype: 'U8', shape: [2], data_offsets: [0, 2] }, b: { dtype: 'U8', shape: [4], data_offsets: [4, 8] } }, eight), /: tensor "b": data_offsets \[4, 8\] leave bytes 2 to 4 of the data buffer to no tensor \(after tensor "a"\)/, 'layout'],
    ['an overlap', stFile({ a: { dtype: 'U8', shape: [6], data_offsets: [0, 6] }, b: { dtype: 'U8', shape: [4], data_offsets: [4, 8] } }, eight), /: tensor "b": data_offsets \[4, 8\] overlap tensor "a" at \[0, 6\]/, 'layout'],
    ['two tensors on the same bytes', stFile({ a: { dtype: 'U8', shape: [8], data_offsets: [0, 8] }, b: { dtype: 'I8', shape: [8], data_offsets: [0, 8] } }, eight), /: tensor "b": data_offsets \[0, 8\] overlap tensor "a"/, 'layout'],
    ['a truncated data buffer', stFile(one(), new Uint8Array(5)), /: tensor "t": data_offsets end at byte 8 of the data buffer, but the file holds only 5 bytes after the header; the file is truncated/, 'layout'],
    ['trailing bytes', stFile(one(), new Uint8Array(12)), /: 4 bytes after the last tensor \("t", ending at byte 8\) belong to no tensor; the data buffer must end exactly at the end of the file/, 'layout'],
    ['trailing bytes without tensors', stFile('{}', [0]), /: 1 bytes after the last tensor belong to no tensor/, 'layout'],
    ['a duplicate tensor name', stFile('{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"t":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}', eight), /: tensor "t": listed twice in the header; a name must be unique/, 'duplicate'],
    ['a duplicate name spelled with an escape', stFile('{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"\\u0074":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}', eight), /: tensor "t": listed twice/, 'duplicate'],
    ['a duplicate key in an entry', stFile('{"t":{"dtype":"U8","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', eight), /: tensor "t": key "dtype" appears twice in the entry/, 'duplicate'],
    ['__metadata__ twice', stFile('{"__metadata__":{},"__metadata__":{}}'), /: "__metadata__" appears twice in the header/, 'duplicate'],
    ['a duplicate metadata key', stFile('{"__metadata__":{"a":"1","a":"2"}}'), /: "__metadata__" key "a" appears twice/, 'duplicate'],
    ['__metadata__ that is not an object', stFile('{"__metadata__":["format","pt"]}'), /: "__metadata__" must be an object of string values, got \["format", "pt"\]/, 'metadata'],
    ['a metadata value that is not a string', stFile('{"__metadata__":{"total_size":5}}'), /: "__metadata__" value of "total_size" must be a string, got 5/, 'metadata'],
  ];

  it.each(cases)('rejects %s', async (_label, bytes, re, reason) => {
    const e = await rejection(bytes);
    expect(e.message).toMatch(re);
    expect(e.reason).toBe(reason);
  });

  it('names tensors with control characters and long names readably', async () => {
    const name = `bad\nname${'x'.repeat(300)}`;
    const e = await rejection(stFile({ [name]: { dtype: 'F4', shape: [], data_offsets: [0, 0] } }));
    expect(e.tensor).toBe(name);
    expect(e.message).toMatch(/tensor "bad\\nnamex+\.\.\.": unknown dtype "F4"/);
    expect(e.message.length).toBeLessThan(400);
  });

  it('reports missing files, unknown names and use after close', async () => {
    await expect(SafetensorsFile.open(join(dir, 'missing.safetensors'))).rejects.toThrow(/missing\.safetensors: cannot open: ENOENT/);
    const path = await put(stFile({ a: { dtype: 'U8', shape: [1], data_offsets: [0, 1] }, b: { dtype: 'U8', shape: [1], data_offsets: [1, 2] } }, [1, 2]));
    const f = await SafetensorsFile.open(path);
    await expect(f.read('c')).rejects.toThrow(new RegExp(`${path}: tensor "c": not in this file; it holds 2 tensors: "a", "b"`));
    await expect(f.readInto('a', new Uint8Array(2))).rejects.toThrow(/readInto: bytes \[0, 2\) are outside tensor "a" of 1 bytes/);
    await f.close();
    await f.close();
    expect(f.closed).toBe(true);
    await expect(f.read('a')).rejects.toThrow(/tensor "a": the file has been closed; open it again to read/);
  });

  it('closes with await using', async () => {
    const path = await put(stFile('{}'));
    let seen: SafetensorsFile;
    {
      await using f = await SafetensorsFile.open(path);
      seen = f;
      expect(f.closed).toBe(false);
    }
    expect(seen.closed).toBe(true);
  });

  it('notices a file truncated after it was opened', async () => {
    const path = await put(stFile({ a: { dtype: 'U8', shape: [100], data_offsets: [0, 100] } }, new Uint8Array(100)));
    const f = await SafetensorsFile.open(path);
    await truncate(path, 50);
    const e = await f.read('a').catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect((e as Error).message).toMatch(/tensor "a": the file ended after .* bytes; it was truncated after it was opened/);
    await f.close();
  });
});

describe('SafetensorsFile: streaming', () => {
  it('reads the header and then exactly the requested tensor, never the whole file', async () => {
    const big = tensorOf('big', 'F32', [1024, 1024], 3); // 4 MiB
    const small = tensorOf('small', 'BF16', [3], 4);
    const path = join(dir, 'big.safetensors');
    await writeSafetensors(path, [big, small]);

    const proto = await fileHandlePrototype();
    const reads = vi.spyOn(proto, 'read');
    const f = await SafetensorsFile.open(path);
    const requested = () => reads.mock.calls.reduce((a, c) => a + (c[2] as number), 0);
    const headerBytes = requested();
    expect(headerBytes).toBe(Math.min(24, f.fileSize) + f.dataOffset - 8);

    expect(await f.read('small')).toEqual(small.data);
    expect(requested() - headerBytes).toBe(6);
    const last = reads.mock.calls.at(-1)!;
    expect(last[3]).toBe(f.tensors.get('small')!.byteOffset);

    // Streaming the big tensor in 1 MiB parts.
    const part = new Uint8Array(1 << 20);
    await f.readInto('big', part, 3 << 20);
    expect(sameBytes(part, big.data.subarray(3 << 20, 4 << 20))).toBe(true);
    expect(requested() - headerBytes).toBe(6 + (1 << 20));

    expect(sameBytes(await f.read('big'), big.data)).toBe(true);
    expect(requested() - headerBytes).toBe(6 + (1 << 20) + (4 << 20));
    await f.close();
  });
});

describe('checkpoints', () => {
  const tensors = () => [
    tensorOf('model.embed_tokens.weight', 'BF16', [16, 8], 1), // 256 bytes
    tensorOf('model.layers.0.self_attn.q_proj.weight', 'BF16', [8, 8], 2), // 128
    tensorOf('model.layers.0.mlp.up_proj.weight', 'F32', [8, 4], 3), // 128
    tensorOf('model.norm.weight', 'F32', [8], 4), // 32
    tensorOf('lm_head.weight', 'BF16', [16, 8], 5), // 256
    tensorOf('scalar', 'I64', [], 6), // 8
  ];

  async function expectAll(dirPath: string, list: SafetensorsTensorInput[]) {
    const ckpt = await openCheckpoint(dirPath);
    try {
      expect([...ckpt.tensors.keys()].sort()).toEqual(list.map((t) => t.name).sort());
      for (const t of list) {
        expect(ckpt.tensors.get(t.name)).toMatchObject({ dtype: t.dtype, shape: t.shape });
        expect(await ckpt.read(t.name)).toEqual(t.data);
      }
      return { files: ckpt.files.map((f) => f.path), indexMetadata: ckpt.indexMetadata };
    } finally {
      await ckpt.close();
    }
  }

  it('writes and reads a sharded checkpoint named the Hugging Face way', async () => {
    const list = tensors();
    const out = await writeShardedSafetensors(dir, list, { maxShardBytes: 300, metadata: { format: 'pt' } });
    // Greedy in order: [256], [128, 128, 32], [256, 8].
    const shardNames = ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors'];
    expect(out.files).toEqual(shardNames.map((n) => join(dir, n)));
    expect(out.index).toBe(join(dir, 'model.safetensors.index.json'));
    expect(out.totalSize).toBe(808);
    expect((await readdir(dir)).sort()).toEqual([...shardNames, 'model.safetensors.index.json'].sort());
    const indexText = await readFile(out.index!, 'utf8');
    const index = JSON.parse(indexText);
    expect(index.metadata).toEqual({ total_size: 808 });
    expect(Object.keys(index.weight_map)).toEqual(list.map((t) => t.name).sort());
    expect(index.weight_map['model.norm.weight']).toBe('model-00002-of-00003.safetensors');
    expect(indexText.endsWith('}\n')).toBe(true);
    const shard = await SafetensorsFile.open(out.files[1]!);
    expect(shard.metadata).toEqual({ format: 'pt' });
    await shard.close();

    const got = await expectAll(dir, list);
    expect(got.files).toEqual(out.files);
    expect(got.indexMetadata).toEqual({ total_size: 808 });
  });

  it('writes a single model.safetensors when everything fits, and cleans up a previous save', async () => {
    const list = tensors();
    await writeShardedSafetensors(dir, list, { maxShardBytes: 300 });
    await writeFile(join(dir, 'config.json'), '{}');
    const out = await writeShardedSafetensors(dir, list);
    expect(out).toEqual({ files: [join(dir, 'model.safetensors')], index: null, totalSize: 808 });
    expect((await readdir(dir)).sort()).toEqual(['config.json', 'model.safetensors']);
    expect((await expectAll(dir, list)).indexMetadata).toBeNull();
    // And back to shards: the single file goes.
    await writeShardedSafetensors(dir, list, { maxShardBytes: 400 });
    expect((await readdir(dir)).sort()).toEqual(['config.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors', 'model.safetensors.index.json']);
    await expectAll(dir, list);
  });

  it('gives a tensor larger than maxShardBytes a shard of its own, and supports other prefixes', async () => {
    const list = [tensorOf('a', 'U8', [10]), tensorOf('huge', 'U8', [1000]), tensorOf('b', 'U8', [10])];
    const out = await writeShardedSafetensors(dir, list, { maxShardBytes: 100, prefix: 'adapter_model' });
    expect(out.files.map((f) => f.slice(dir.length + 1))).toEqual(['adapter_model-00001-of-00003.safetensors', 'adapter_model-00002-of-00003.safetensors', 'adapter_model-00003-of-00003.safetensors']);
    const ckpt = await openCheckpoint(dir, { prefix: 'adapter_model' });
    expect(await ckpt.read('huge')).toEqual(list[1]!.data);
    await ckpt.close();
  });

  it('rejects bad shard options and bad input without writing anything', async () => {
    await expect(writeShardedSafetensors(dir, tensors(), { maxShardBytes: 0 })).rejects.toThrow(/maxShardBytes must be a positive integer, got 0/);
    await expect(writeShardedSafetensors(dir, [...tensors(), { name: 'bad', dtype: 'F32', shape: [2], data: new Uint8Array(7) }], { maxShardBytes: 300 })).rejects.toThrow(
      /tensor "bad": shape \[2\] of F32 needs 8 bytes, but data holds 7/,
    );
    expect(await readdir(dir)).toEqual([]);
  });

  describe('validation of the index against the shards', () => {
    const indexPath = () => join(dir, 'model.safetensors.index.json');
    const readIndex = async () => JSON.parse(await readFile(indexPath(), 'utf8'));
    const writeIndex = (index: unknown) => writeFile(indexPath(), typeof index === 'string' ? index : JSON.stringify(index));

    async function openError(): Promise<SafetensorsError> {
      const e = await openCheckpoint(dir).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(SafetensorsError);
      return e as SafetensorsError;
    }

    beforeEach(async () => {
      await writeShardedSafetensors(dir, tensors(), { maxShardBytes: 300 });
    });

    it('a missing shard', async () => {
      await unlink(join(dir, 'model-00002-of-00003.safetensors'));
      const e = await openError();
      expect(e.message).toMatch(/model\.safetensors\.index\.json: tensor "model\.layers\.0\.mlp\.up_proj\.weight": weight_map sends 3 tensors \(first "model\.layers\.0\.mlp\.up_proj\.weight"\) to "model-00002-of-00003\.safetensors", which does not exist/);
      expect(e.reason).toBe('index');
    });

    it('a listed tensor that is not in its shard', async () => {
      const index = await readIndex();
      index.weight_map['ghost'] = 'model-00001-of-00003.safetensors';
      await writeIndex(index);
      expect((await openError()).message).toMatch(/tensor "ghost": weight_map puts it in "model-00001-of-00003\.safetensors", but no shard holds it/);
    });

    it('a tensor in another shard than the index says', async () => {
      const index = await readIndex();
      index.weight_map['model.norm.weight'] = 'model-00001-of-00003.safetensors';
      await writeIndex(index);
      expect((await openError()).message).toMatch(/tensor "model\.norm\.weight": weight_map puts it in "model-00001-of-00003\.safetensors", but it is in "model-00002-of-00003\.safetensors"/);
    });

    it('a tensor in two shards', async () => {
      await writeSafetensors(join(dir, 'model-00003-of-00003.safetensors'), [tensorOf('lm_head.weight', 'BF16', [16, 8], 5), tensorOf('model.norm.weight', 'F32', [8], 4), tensorOf('scalar', 'I64', [], 6)]);
      expect((await openError()).message).toMatch(/tensor "model\.norm\.weight": is in two shards, "model-00002-of-00003\.safetensors" and "model-00003-of-00003\.safetensors"/);
    });

    it('a tensor that the index does not list', async () => {
      const index = await readIndex();
      delete index.weight_map['scalar'];
      await writeIndex(index);
      expect((await openError()).message).toMatch(/tensor "scalar": is in shard "model-00003-of-00003\.safetensors" but not in weight_map/);
    });

    it('a shard path outside the directory', async () => {
      const index = await readIndex();
      index.weight_map['scalar'] = '../model-00003-of-00003.safetensors';
      await writeIndex(index);
      expect((await openError()).message).toMatch(/tensor "scalar": weight_map value "\.\.\/model-00003-of-00003\.safetensors" must be a file name in the checkpoint directory, not a path/);
    });

    it('a tensor listed twice in weight_map', async () => {
      const text = await readFile(indexPath(), 'utf8');
      await writeIndex(text.replace('"scalar": "model-00003-of-00003.safetensors"', '"scalar": "model-00003-of-00003.safetensors", "scalar": "model-00001-of-00003.safetensors"'));
      expect((await openError()).message).toMatch(/tensor "scalar": appears twice in weight_map/);
    });

    it('malformed indexes', async () => {
      const bad: Array<[unknown, RegExp]> = [
        ['{"weight_map": {', /model\.safetensors\.index\.json: is not valid JSON: expected a string key at character 16, found the end of the text/],
        ['[]', /must be a JSON object with "weight_map", got \[\]/],
        [{ metadata: {} }, /has no "weight_map"; it is not a safetensors index/],
        [{ weight_map: [] }, /"weight_map" must be an object from tensor name to shard file, got \[\]/],
        [{ weight_map: {} }, /"weight_map" is empty/],
        [{ weight_map: { a: 3 } }, /tensor "a": weight_map value must be a shard file name, got 3/],
        [{ metadata: 'x', weight_map: { a: 'b' } }, /"metadata" must be an object, got "x"/],
        ['{"weight_map": {"a": "b"}, "weight_map": {"a": "b"}}', /key "weight_map" appears twice/],
      ];
      for (const [index, re] of bad) {
        await writeIndex(index);
        const e = await openError();
        expect(e.message).toMatch(re);
        expect(e.reason).toBe('index');
      }
    });

    it('both a single file and an index', async () => {
      await writeSafetensors(join(dir, 'model.safetensors'), []);
      expect((await openError()).message).toMatch(/holds both model\.safetensors and model\.safetensors\.index\.json, so which one is the checkpoint is ambiguous; remove the stale one/);
    });

    it('an empty directory', async () => {
      const empty = join(dir, 'empty');
      await mkdir(empty);
      const e = await openCheckpoint(empty).catch((x: unknown) => x);
      expect((e as Error).message).toMatch(/holds neither model\.safetensors nor model\.safetensors\.index\.json/);
    });

    it('a shard that is itself invalid names the shard', async () => {
      const shard = join(dir, 'model-00002-of-00003.safetensors');
      const bytes = new Uint8Array(await readFile(shard));
      await writeFile(shard, bytes.subarray(0, bytes.length - 1));
      expect((await openError()).message).toMatch(/model-00002-of-00003\.safetensors: tensor ".*": data_offsets end at byte .* the file is truncated/);
    });

    it('unknown names are reported against the directory', async () => {
      const ckpt = await openCheckpoint(dir);
      await expect(ckpt.read('nope')).rejects.toThrow(/tensor "nope": not in this checkpoint; it holds 6 tensors/);
      await ckpt.close();
    });
  });
});
