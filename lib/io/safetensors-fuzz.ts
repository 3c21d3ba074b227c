// A deterministic fuzzer for the safetensors reader, shared by the test suite (a short run) and
// scripts/fuzz-safetensors.mjs (a long one, against dist/). Each case takes a valid file built
// here independently of the writer, applies one mutation, and checks the reader's answer:
// either it accepts the file and every tensor it reports reads back consistently (checked
// against a separate, naive decoding with JSON.parse and BigInt), or it rejects it with a
// SafetensorsError. Any other exception, an acceptance of a file known to be invalid, or a
// rejection of a file known to be valid is a failure. Cases are reproducible from (seed, index).
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { KNOWN_DTYPES, MAX_HEADER_BYTES, SAFETENSORS_DTYPES, SafetensorsError, type SafetensorsDType, type SafetensorsErrorReason } from './safetensors-format.js';
import { SafetensorsFile } from './safetensors.js';

export const MUTATION_KINDS = [
  'none',
  'bit-flip',
  'random-bytes',
  'length-field',
  'truncate',
  'extend',
  'json-text',
  'shape',
  'offsets',
  'dtype',
  'structure',
  'metadata',
  'random-file',
] as const;
export type MutationKind = (typeof MUTATION_KINDS)[number];

/** What the mutation guarantees: a valid file, an invalid one (rejected for one of `reasons`), or either. */
export type Expectation = { kind: 'accept' } | { kind: 'reject'; reasons: readonly SafetensorsErrorReason[] } | { kind: 'either' };

export interface FuzzCase {
  readonly index: number;
  readonly kind: MutationKind;
  /** A short description of the mutation, for reproducing a failure. */
  readonly detail: string;
  readonly bytes: Uint8Array;
  readonly expect: Expectation;
}

// ---- random numbers ------------------------------------------------------------------------------

export interface Rng {
  /** Uniform in [0, 1). */
  next(): number;
  /** Uniform integer in [0, n). */
  int(n: number): number;
  pick<T>(items: readonly T[]): T;
  chance(p: number): boolean;
}

/** xorshift32 seeded through a 32-bit mix of (seed, stream), so each case has its own stream. */
export function rng(seed: number, stream = 0): Rng {
  let s = mix32(mix32(seed >>> 0) ^ Math.imul(stream >>> 0, 0x9e3779b1)) || 0x6d2b79f5;
  const next = () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, pick: (items) => items[int(items.length)]!, chance: (p) => next() < p };
}

function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

// ---- valid files, built without the writer ----------------------------------------------------------

/** One top-level header entry, as raw JSON text so that mutations can produce any text at all. */
interface RawEntry {
  key: string; // a JSON string literal
  fields: Array<[string, string]> | null; // raw key literal and raw value, or null when `raw` is used
  raw?: string;
}

interface Model {
  entries: RawEntry[];
  data: Uint8Array;
  // Readers meet headers from many writers: compact, spaced and indented JSON, padded with
  // spaces, with newlines, or not at all.
  style: 'compact' | 'spaced' | 'pretty';
  pad: 'spaces' | 'none' | 'newlines';
}

const NAMES = ['w', 'model.embed_tokens.weight', 'layers.0.mlp.up_proj.weight', '0', '10', '2', '__proto__', 'constructor', 'ñame.é', 'a"b\\c', 'tab\there', '日本', '', 'lm_head.weight', 'x'.repeat(40)];

function buildModel(r: Rng): Model {
  const count = r.int(6);
  const names = new Set<string>();
  while (names.size < count) names.add(r.chance(0.7) ? r.pick(NAMES) : `t${r.int(1000)}`);
  const tensors = [...names].map((name) => {
    const dtype = r.pick(KNOWN_DTYPES);
    const rank = r.int(4);
    const shape = Array.from({ length: rank }, () => (r.chance(0.1) ? 0 : 1 + r.int(4)));
    const bytes = shape.reduce((a, b) => a * b, 1) * SAFETENSORS_DTYPES[dtype].bytes;
    return { name, dtype, shape, bytes, begin: 0 };
  });
  // The data buffer need not follow header order; readers must sort by offset.
  const order = tensors.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = r.int(i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  let offset = 0;
  for (const i of order) {
    tensors[i]!.begin = offset;
    offset += tensors[i]!.bytes;
  }
  const data = new Uint8Array(offset);
  for (let i = 0; i < data.length; i++) data[i] = r.int(256);

  const entries: RawEntry[] = tensors.map((t) => {
    const fields: Array<[string, string]> = [
      ['"dtype"', JSON.stringify(t.dtype)],
      ['"shape"', `[${t.shape.join(',')}]`],
      ['"data_offsets"', `[${t.begin},${t.begin + t.bytes}]`],
    ];
    if (r.chance(0.3)) fields.reverse();
    return { key: JSON.stringify(t.name), fields };
  });
  if (r.chance(0.5)) {
    const meta: Array<[string, string]> = [];
    const n = r.int(3);
    for (let i = 0; i < n; i++) meta.push([JSON.stringify(r.pick(['format', 'note', 'ünï', '__proto__']) + (i === 0 ? '' : String(i))), JSON.stringify(r.pick(['pt', '', 'x y', '{"nested": "json"}']))]);
    entries.splice(r.int(entries.length + 1), 0, { key: '"__metadata__"', fields: meta });
  }
  return { entries, data, style: r.pick(['compact', 'spaced', 'pretty'] as const), pad: r.pick(['spaces', 'none', 'newlines'] as const) };
}

function renderHeader(m: Model): string {
  const [sep, colon, open, close] =
    m.style === 'compact' ? [',', ':', '', ''] : m.style === 'spaced' ? [', ', ': ', ' ', ' '] : [',\n  ', ': ', '\n  ', '\n'];
  const body = m.entries
    .map((e) => `${e.key}${colon}${e.fields === null ? e.raw : `{${e.fields.map(([k, v]) => `${k}${colon}${v}`).join(sep)}}`}`)
    .join(sep);
  let text = `{${open}${body}${close}}`;
  const len = new TextEncoder().encode(text).length;
  if (m.pad !== 'none') text += (m.pad === 'spaces' ? ' ' : '\n').repeat((8 - (len % 8)) % 8);
  return text;
}

function assemble(header: Uint8Array, data: Uint8Array, lengthField: bigint = BigInt(header.length)): Uint8Array {
  const out = new Uint8Array(8 + header.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthField, true);
  out.set(header, 8);
  out.set(data, 8 + header.length);
  return out;
}

function render(m: Model): Uint8Array {
  return assemble(new TextEncoder().encode(renderHeader(m)), m.data);
}

// ---- mutations -----------------------------------------------------------------------------------

const accept: Expectation = { kind: 'accept' };
const either: Expectation = { kind: 'either' };
const reject = (...reasons: SafetensorsErrorReason[]): Expectation => ({ kind: 'reject', reasons });

function tensorEntries(m: Model): RawEntry[] {
  return m.entries.filter((e) => e.key !== '"__metadata__"' && e.fields !== null);
}

function field(e: RawEntry, key: string): [string, string] {
  return e.fields!.find(([k]) => k === `"${key}"`)!;
}

function parseIntArray(raw: string): number[] {
  return JSON.parse(raw) as number[];
}

/** Builds case `index` of the run seeded by `seed`. */
export function makeCase(seed: number, index: number): FuzzCase {
  const r = rng(seed, index);
  const kind = MUTATION_KINDS[index % MUTATION_KINDS.length]!;
  const m = buildModel(r);
  const base = render(m);
  const headerLength = base.length - 8 - m.data.length;
  const done = (detail: string, bytes: Uint8Array, expect: Expectation): FuzzCase => ({ index, kind, detail, bytes, expect });
  const rerender = (detail: string, expect: Expectation) => done(detail, render(m), expect);

  switch (kind) {
    case 'none':
      return done(`valid file, ${tensorEntries(m).length} tensors, ${m.style}/${m.pad}`, base, accept);

    case 'bit-flip': {
      const bytes = base.slice();
      const flips = 1 + r.int(3);
      const at: number[] = [];
      for (let i = 0; i < flips; i++) {
        const p = r.int(8 + headerLength);
        bytes[p]! ^= 1 << r.int(8);
        at.push(p);
      }
      return done(`flipped bits at ${at.join(', ')}`, bytes, either);
    }

    case 'random-bytes': {
      const bytes = base.slice();
      const at: number[] = [];
      const interesting = [0x00, 0x7b, 0x7d, 0x5b, 0x5d, 0x22, 0x2c, 0x3a, 0x5c, 0x2d, 0x30, 0x39, 0x80, 0xc3, 0xe6, 0xf0, 0xff, 0x20];
      for (let i = 0, n = 1 + r.int(4); i < n; i++) {
        const p = r.int(8 + headerLength);
        bytes[p] = r.chance(0.5) ? r.pick(interesting) : r.int(256);
        at.push(p);
      }
      return done(`overwrote bytes at ${at.join(', ')}`, bytes, either);
    }

    case 'length-field': {
      const n = BigInt(headerLength);
      const size = BigInt(base.length);
      const choices: Array<[string, bigint, Expectation]> = [
        ['0', 0n, reject('header-json', 'header-length')],
        ['n - 1', n - 1n, either],
        ['n + 1', n + 1n, either],
        ['n + 8', n + 8n, either],
        ['n - 8', n - 8n, either],
        ['file size - 8', size - 8n, either],
        ['file size - 7', size - 7n, reject('header-length')],
        ['2^32', 1n << 32n, reject('header-length')],
        ['2^53 + 1', (1n << 53n) + 1n, reject('header-length')],
        ['2^63', 1n << 63n, reject('header-length')],
        ['2^64 - 1', (1n << 64n) - 1n, reject('header-length')],
        ['100 MiB + 1', BigInt(MAX_HEADER_BYTES) + 1n, reject('header-length')],
        ['random', BigInt(r.int(2 ** 32)) * BigInt(r.int(2 ** 32)), either],
      ];
      const [label, value, expect] = r.pick(choices);
      const bytes = base.slice();
      new DataView(bytes.buffer).setBigUint64(0, BigInt.asUintN(64, value), true);
      // Shortening or lengthening the header by spaces can leave valid JSON and a valid layout,
      // except that the buffer then starts elsewhere; only an exact value is guaranteed valid.
      return done(`length field set to ${label}`, bytes, value === n ? accept : expect);
    }

    case 'truncate': {
      const cut = r.int(base.length);
      const dataStart = 8 + headerLength;
      // Cutting into the data buffer always breaks the layout unless nothing follows the cut.
      const expect = cut < 8 ? reject('header-length') : cut < dataStart ? reject('header-length') : m.data.length > 0 ? reject('layout') : either;
      return done(`truncated to ${cut} of ${base.length} bytes`, base.slice(0, cut), expect);
    }

    case 'extend': {
      const extra = 1 + r.int(16);
      const bytes = new Uint8Array(base.length + extra);
      bytes.set(base);
      if (r.chance(0.5)) for (let i = base.length; i < bytes.length; i++) bytes[i] = r.int(256);
      return done(`appended ${extra} bytes`, bytes, reject('layout'));
    }

    case 'json-text': {
      const text = renderHeader(m);
      const p = r.int(text.length);
      const edits: Array<[string, () => string]> = [
        ['deleted a character', () => text.slice(0, p) + text.slice(p + 1)],
        ['inserted a character', () => text.slice(0, p) + r.pick([...'{}[]",:-.0123456789eE \\\n\tatfnulé\u0000']) + text.slice(p)],
        ['duplicated a span', () => { const q = p + r.int(Math.min(24, text.length - p) + 1); return text.slice(0, q) + text.slice(p, q) + text.slice(q); }],
        ['swapped two characters', () => { const q = r.int(text.length); const a = [...text]; [a[p], a[q]] = [a[q]!, a[p]!]; return a.join(''); }],
        ['truncated the JSON', () => text.slice(0, p)],
        ['nested arrays 200 deep', () => text.slice(0, p) + '['.repeat(200) + text.slice(p)],
      ];
      const [label, edit] = r.pick(edits);
      return done(`${label} at character ${p}`, assemble(new TextEncoder().encode(edit()), m.data), either);
    }

    case 'shape': {
      const entries = tensorEntries(m);
      if (entries.length === 0) return rerender('no tensor to mutate', accept);
      const e = r.pick(entries);
      const f = field(e, 'shape');
      const dims = parseIntArray(f[1]);
      const choices: Array<[string, Expectation]> = [
        ['[-1]', reject('shape')],
        ['[1.5]', reject('shape')],
        ['[1.0]', reject('shape')],
        ['[1e0]', reject('shape')],
        ['["3"]', reject('shape')],
        ['[-0]', reject('shape')],
        ['[null]', reject('shape')],
        ['[[2]]', reject('shape')],
        ['null', reject('shape')],
        ['{}', reject('shape')],
        ['3', reject('shape')],
        ['"[]"', reject('shape')],
        ['[9007199254740992]', reject('shape')],
        ['[99999999999999999999999]', reject('shape')],
        ['[1099511627776,1099511627776]', reject('byte-size')],
        ['[9007199254740991,9007199254740991,9007199254740991]', reject('byte-size')],
        [`[${Array(300).fill(4294967295).join(',')}]`, reject('byte-size')],
        [`[${[...dims, 1].join(',')}]`, accept],
        [`[${[1, ...dims].join(',')}]`, accept],
        [`[${[...dims, 0].join(',')}]`, dims.includes(0) ? accept : reject('byte-size')],
        [`[${[...dims, 2].join(',')}]`, dims.includes(0) ? accept : reject('byte-size')],
        [`[${[...dims, 9007199254740991, 0].join(',')}]`, dims.includes(0) ? accept : reject('byte-size')],
      ];
      const [raw, expect] = r.pick(choices);
      const before = f[1];
      f[1] = raw;
      return rerender(`shape ${before} -> ${raw.length > 60 ? `${raw.slice(0, 60)}...` : raw} of ${e.key}`, expect);
    }

    case 'offsets': {
      const entries = tensorEntries(m);
      if (entries.length === 0) return rerender('no tensor to mutate', accept);
      const e = r.pick(entries);
      const f = field(e, 'data_offsets');
      const [b, en] = parseIntArray(f[1]) as [number, number];
      const size = en - b;
      const choices: Array<[string, Expectation]> = [
        [`[${en},${b}]`, size === 0 ? accept : reject('data-offsets')],
        [`[${b + 1},${en}]`, reject(size === 0 ? 'data-offsets' : 'byte-size')],
        [`[${b},${en + 1}]`, reject('byte-size')],
        [`[${b + 1},${en + 1}]`, either],
        [`[${b + 8},${en + 8}]`, either],
        [`[${b}]`, reject('data-offsets')],
        [`[${b},${en},${en}]`, reject('data-offsets')],
        [`["${b}",${en}]`, reject('data-offsets')],
        [`[${b}.0,${en}]`, reject('data-offsets')],
        [`[-1,${en}]`, reject('data-offsets')],
        [`[${b},9007199254740992]`, reject('data-offsets')],
        [`[${b},18446744073709551616]`, reject('data-offsets')],
        [`[9007199254740990,9007199254740991]`, either],
        ['null', reject('data-offsets')],
        ['{}', reject('data-offsets')],
        ['[]', reject('data-offsets')],
      ];
      if (entries.length > 1) {
        // Swapping with another tensor is valid exactly when the two have the same size.
        const other = r.pick(entries.filter((x) => x !== e));
        const g = field(other, 'data_offsets');
        const [b2, e2] = parseIntArray(g[1]) as [number, number];
        if (r.chance(0.3)) {
          [f[1], g[1]] = [g[1], f[1]];
          return rerender(`swapped data_offsets of ${e.key} and ${other.key}`, e2 - b2 === size ? accept : reject('byte-size'));
        }
      }
      const [raw, expect] = r.pick(choices);
      const before = f[1];
      f[1] = raw;
      return rerender(`data_offsets ${before} -> ${raw} of ${e.key}`, expect);
    }

    case 'dtype': {
      const entries = tensorEntries(m);
      if (entries.length === 0) return rerender('no tensor to mutate', accept);
      const e = r.pick(entries);
      const f = field(e, 'dtype');
      const current = JSON.parse(f[1]) as SafetensorsDType;
      const shape = parseIntArray(field(e, 'shape')[1]);
      const empty = shape.includes(0);
      const unknown = ['F4', 'f32', 'float32', '', 'BF16 ', 'F8_E4M3FN', 'F6_E2M3', 'C64', '__proto__', 'toString', 'constructor', 'hasOwnProperty'];
      const nonString = ['4', 'null', '["F32"]', '{"F32":1}', 'true'];
      const roll = r.int(3);
      if (roll === 0) {
        const name = r.pick(unknown);
        f[1] = JSON.stringify(name);
        return rerender(`dtype ${current} -> ${JSON.stringify(name)} of ${e.key}`, reject('dtype'));
      }
      if (roll === 1) {
        f[1] = r.pick(nonString);
        return rerender(`dtype ${current} -> ${f[1]} of ${e.key}`, reject('dtype'));
      }
      const next = r.pick(KNOWN_DTYPES);
      f[1] = JSON.stringify(next);
      const same = empty || SAFETENSORS_DTYPES[next].bytes === SAFETENSORS_DTYPES[current].bytes;
      return rerender(`dtype ${current} -> ${next} of ${e.key}`, same ? accept : reject('byte-size'));
    }

    case 'structure': {
      const entries = tensorEntries(m);
      const roll = r.int(10);
      if (entries.length === 0 || roll === 0) {
        // A zero-byte tensor fits anywhere in the tiling, so adding one keeps the file valid.
        const at = entries.length === 0 ? 0 : parseIntArray(field(r.pick(entries), 'data_offsets')[1])[r.int(2)]!;
        m.entries.push({ key: JSON.stringify(`zero${index}`), fields: [['"dtype"', '"F32"'], ['"shape"', '[2,0]'], ['"data_offsets"', `[${at},${at}]`]] });
        return rerender(`added an empty tensor at offset ${at}`, accept);
      }
      const e = r.pick(entries);
      switch (roll) {
        case 1: {
          const k = r.int(3);
          const removed = e.fields!.splice(k, 1)[0]![0];
          return rerender(`removed ${removed} from ${e.key}`, reject('entry'));
        }
        case 2:
          e.fields!.push([r.pick(['"extra"', '"offsets"', '"Dtype"', '"__proto__"']), r.pick(['1', 'null', '"x"', '[]'])]);
          return rerender(`added a key to ${e.key}`, reject('entry'));
        case 3: {
          const dup = r.pick(e.fields!);
          e.fields!.push([dup[0], dup[1]]);
          return rerender(`duplicated ${dup[0]} in ${e.key}`, reject('duplicate'));
        }
        case 4:
          m.entries.push({ key: e.key, fields: e.fields!.map(([k, v]) => [k, v]) });
          return rerender(`listed ${e.key} twice`, reject('duplicate'));
        case 5: {
          // The same name spelled with a \u escape must still count as a duplicate.
          const name = JSON.parse(e.key) as string;
          if (name.length === 0) return rerender('empty name: nothing to escape', accept);
          const escaped = `"\\u${name.charCodeAt(0).toString(16).padStart(4, '0')}${JSON.stringify(name).slice(2)}`;
          m.entries.push({ key: escaped, fields: e.fields!.map(([k, v]) => [k, v]) });
          return rerender(`listed ${e.key} twice, once escaped`, reject('duplicate'));
        }
        case 6:
          e.fields = null;
          e.raw = r.pick(['[]', 'null', '"F32"', '1', '[{"dtype":"F32"}]', 'true']);
          return rerender(`replaced ${e.key} by ${e.raw}`, reject('entry'));
        case 7: {
          const header = `[${renderHeader(m)}]`;
          return done('wrapped the header in an array', assemble(new TextEncoder().encode(header), m.data), reject('header-json'));
        }
        case 8: {
          const header = r.pick(['null', '"text"', '123', '[]', 'true']);
          return done(`header replaced by ${header}`, assemble(new TextEncoder().encode(header), m.data), reject('header-json'));
        }
        default: {
          const header = new TextEncoder().encode(renderHeader(m));
          const bytes = new Uint8Array(3 + header.length);
          bytes.set([0xef, 0xbb, 0xbf]);
          bytes.set(header, 3);
          return done('prefixed the header with a UTF-8 byte order mark', assemble(bytes, m.data), reject('header-json'));
        }
      }
    }

    case 'metadata': {
      let meta = m.entries.find((e) => e.key === '"__metadata__"');
      if (meta === undefined) {
        meta = { key: '"__metadata__"', fields: [['"format"', '"pt"']] };
        m.entries.unshift(meta);
      }
      const roll = r.int(7);
      if (roll === 0) {
        meta.fields = null;
        meta.raw = r.pick(['[]', 'null', '"pt"', '1', '[["format","pt"]]']);
        return rerender(`__metadata__ replaced by ${meta.raw}`, reject('metadata'));
      }
      if (roll === 1) {
        meta.fields!.push(['"n"', r.pick(['1', 'null', 'true', '["a"]', '{"a":"b"}'])]);
        return rerender('a non-string metadata value', reject('metadata'));
      }
      if (roll === 2) {
        meta.fields!.push(['"dup"', '"1"'], ['"dup"', '"2"']);
        return rerender('a metadata key twice', reject('duplicate'));
      }
      if (roll === 3) {
        m.entries.push({ key: '"__metadata__"', fields: [] });
        return rerender('__metadata__ twice', reject('duplicate'));
      }
      const key = JSON.stringify(r.pick(['__proto__', 'constructor', 'ключ', 'k', 'format']));
      const clash = meta.fields!.some(([k]) => k === key);
      meta.fields!.push([key, JSON.stringify(r.pick(['v', '', '\u0000', 'ü'.repeat(50)]))]);
      return rerender(`added metadata key ${key}`, clash ? reject('duplicate') : accept);
    }

    case 'random-file': {
      const n = r.int(64);
      const bytes = new Uint8Array(n);
      for (let i = 0; i < n; i++) bytes[i] = r.int(256);
      if (n >= 8 && r.chance(0.5)) new DataView(bytes.buffer).setBigUint64(0, BigInt(r.int(n - 7)), true);
      if (n >= 10 && r.chance(0.3)) bytes[8] = 0x7b;
      return done(`${n} random bytes`, bytes, either);
    }
  }
}

// ---- checking one case -------------------------------------------------------------------------

export type CaseOutcome =
  | { kind: 'accepted'; tensors: number }
  | { kind: 'rejected'; reason: SafetensorsErrorReason }
  | { kind: 'failure'; message: string };

/**
 * Opens the case (from memory, or through `path` after writing it there), then compares what the
 * reader reports with an independent decoding. Never throws.
 */
export async function checkCase(c: FuzzCase, path?: string): Promise<CaseOutcome> {
  let file: SafetensorsFile;
  try {
    if (path !== undefined) {
      await writeFile(path, c.bytes);
      file = await SafetensorsFile.open(path);
    } else {
      file = await SafetensorsFile.fromBytes(c.bytes, `case-${c.index}`);
    }
  } catch (e) {
    if (!(e instanceof SafetensorsError)) return { kind: 'failure', message: `threw ${describeError(e)} instead of a SafetensorsError` };
    if (c.expect.kind === 'accept') return { kind: 'failure', message: `rejected a valid file: ${e.message}` };
    if (c.expect.kind === 'reject' && !c.expect.reasons.includes(e.reason))
      return { kind: 'failure', message: `rejected for '${e.reason}', expected one of ${c.expect.reasons.join(', ')}: ${e.message}` };
    return { kind: 'rejected', reason: e.reason };
  }
  try {
    if (c.expect.kind === 'reject') return { kind: 'failure', message: `accepted a file that must be rejected (${c.expect.reasons.join(' or ')})` };
    const problem = await verifyAccepted(c.bytes, file);
    if (problem !== null) return { kind: 'failure', message: `accepted, but ${problem}` };
    return { kind: 'accepted', tensors: file.tensors.size };
  } catch (e) {
    return { kind: 'failure', message: `reading an accepted file threw ${describeError(e)}` };
  } finally {
    await file.close().catch(() => {});
  }
}

/** Re-derives the file's contents naively and compares; returns the first disagreement, or null. */
async function verifyAccepted(bytes: Uint8Array, file: SafetensorsFile): Promise<string | null> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = view.getBigUint64(0, true);
  if (n > BigInt(bytes.length - 8)) return `the header length ${n} runs past the file`;
  const start = 8 + Number(n);
  if (file.dataOffset !== start) return `dataOffset ${file.dataOffset} != ${start}`;
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, start))) as Record<string, unknown>;
  } catch (e) {
    return `the header does not decode with JSON.parse (${(e as Error).message})`;
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) return 'the header is not an object';
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  if (names.length !== file.tensors.size) return `${file.tensors.size} tensors reported, the header has ${names.length}`;
  const meta = Object.prototype.hasOwnProperty.call(header, '__metadata__') ? (header['__metadata__'] as Record<string, unknown>) : {};
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) return '__metadata__ is not an object';
  const metaKeys = Object.keys(meta);
  if (metaKeys.length !== Object.keys(file.metadata).length) return 'metadata has a different number of keys';
  for (const k of metaKeys) if (typeof meta[k] !== 'string' || file.metadata[k] !== meta[k]) return `metadata ${JSON.stringify(k)} differs`;

  const spans: Array<[number, number]> = [];
  for (const name of names) {
    const entry = header[name] as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    const info = file.tensors.get(name);
    if (info === undefined) return `tensor ${JSON.stringify(name)} is missing`;
    if (Object.keys(entry).sort().join() !== 'data_offsets,dtype,shape') return `tensor ${JSON.stringify(name)} has keys ${Object.keys(entry).join()}`;
    if (entry.dtype !== info.dtype || !(entry.dtype as string in SAFETENSORS_DTYPES)) return `tensor ${JSON.stringify(name)} dtype differs`;
    const shape = entry.shape as unknown[];
    if (!Array.isArray(shape) || shape.length !== info.shape.length || shape.some((d, i) => d !== info.shape[i] || !Number.isSafeInteger(d) || (d as number) < 0))
      return `tensor ${JSON.stringify(name)} shape differs`;
    const [b, e] = entry.data_offsets as number[];
    if (!Number.isSafeInteger(b) || !Number.isSafeInteger(e) || b !== info.dataOffsets[0] || e !== info.dataOffsets[1]) return `tensor ${JSON.stringify(name)} offsets differ`;
    const elements = (shape as number[]).reduce((a, d) => a * BigInt(d), 1n);
    if (elements * BigInt(SAFETENSORS_DTYPES[info.dtype].bytes) !== BigInt(e! - b!) || info.byteLength !== e! - b!) return `tensor ${JSON.stringify(name)} byte size is wrong`;
    if (info.byteOffset !== start + b!) return `tensor ${JSON.stringify(name)} byteOffset is wrong`;
    spans.push([b!, e!]);
    const got = await file.read(name);
    const want = bytes.subarray(start + b!, start + e!);
    if (got.length !== want.length || got.some((x, i) => x !== want[i])) return `tensor ${JSON.stringify(name)} reads different bytes`;
    if (got.length > 1) {
      const part = new Uint8Array(got.length - 1);
      await file.readInto(name, part, 1);
      if (part.some((x, i) => x !== want[i + 1])) return `tensor ${JSON.stringify(name)} readInto differs`;
    }
  }
  spans.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  let cursor = 0;
  for (const [b, e] of spans) {
    if (b !== cursor) return `the tensors do not tile the buffer (gap or overlap at ${cursor})`;
    cursor = e;
  }
  if (cursor !== bytes.length - start) return `the tensors end at ${cursor}, the buffer at ${bytes.length - start}`;
  return null;
}

function describeError(e: unknown): string {
  if (e instanceof Error) return `${e.name}: ${e.message}\n${e.stack ?? ''}`;
  return String(e);
}

// ---- a run -----------------------------------------------------------------------------------------

export interface FuzzOptions {
  seed?: number;
  count?: number;
  /** Every k-th case goes through a real file and SafetensorsFile.open instead of fromBytes (0: none). */
  fileEvery?: number;
  /** Stop collecting failures after this many (the run continues, counting them). */
  maxFailures?: number;
}

export interface KindStats {
  cases: number;
  accepted: number;
  rejected: number;
  failures: number;
  reasons: Partial<Record<SafetensorsErrorReason, number>>;
}

export interface FuzzReport {
  seed: number;
  count: number;
  fileCases: number;
  byKind: Record<MutationKind, KindStats>;
  failures: Array<{ index: number; kind: MutationKind; detail: string; message: string }>;
  failureCount: number;
  /** The slowest case, to spot anything that scales badly with its input. */
  slowest: { index: number; kind: MutationKind; ms: number };
  ms: number;
}

export async function runFuzz(options: FuzzOptions = {}): Promise<FuzzReport> {
  const seed = options.seed ?? 1;
  const count = options.count ?? 2000;
  const fileEvery = options.fileEvery ?? 0;
  const maxFailures = options.maxFailures ?? 20;
  const byKind = Object.fromEntries(MUTATION_KINDS.map((k) => [k, { cases: 0, accepted: 0, rejected: 0, failures: 0, reasons: {} }])) as Record<MutationKind, KindStats>;
  const report: FuzzReport = { seed, count, fileCases: 0, byKind, failures: [], failureCount: 0, slowest: { index: -1, kind: 'none', ms: 0 }, ms: 0 };
  const dir = fileEvery > 0 ? await mkdtemp(join(tmpdir(), 'tunekit-st-fuzz-')) : null;
  const t0 = performance.now();
  try {
    for (let i = 0; i < count; i++) {
      const c0 = performance.now();
      let c: FuzzCase;
      let outcome: CaseOutcome | undefined;
      try {
        c = makeCase(seed, i);
      } catch (e) {
        // A broken generator must not pass silently as "no failures".
        const kind = MUTATION_KINDS[i % MUTATION_KINDS.length]!;
        c = { index: i, kind, detail: 'generator', bytes: new Uint8Array(), expect: either };
        outcome = { kind: 'failure', message: `the case generator threw ${describeError(e)}` };
      }
      const viaFile = dir !== null && i % fileEvery === 0;
      outcome ??= await checkCase(c, viaFile ? join(dir!, `case-${i}.safetensors`) : undefined);
      if (viaFile) report.fileCases++;
      const ms = performance.now() - c0;
      if (ms > report.slowest.ms) report.slowest = { index: i, kind: c.kind, ms };
      const s = byKind[c.kind];
      s.cases++;
      if (outcome.kind === 'accepted') s.accepted++;
      else if (outcome.kind === 'rejected') {
        s.rejected++;
        s.reasons[outcome.reason] = (s.reasons[outcome.reason] ?? 0) + 1;
      } else {
        s.failures++;
        report.failureCount++;
        if (report.failures.length < maxFailures) report.failures.push({ index: i, kind: c.kind, detail: c.detail, message: outcome.message });
      }
    }
  } finally {
    if (dir !== null) await rm(dir, { recursive: true, force: true });
  }
  report.ms = performance.now() - t0;
  return report;
}

/** The report as a table, for the script and for test failure messages. */
export function formatFuzzReport(r: FuzzReport): string {
  const lines = [`safetensors fuzz: seed ${r.seed}, ${r.count} cases (${r.fileCases} through files), ${(r.ms / 1000).toFixed(2)} s, slowest case ${r.slowest.index} (${r.slowest.kind}) ${r.slowest.ms.toFixed(1)} ms`];
  lines.push(`${'mutation'.padEnd(14)}${'cases'.padStart(8)}${'accepted'.padStart(10)}${'rejected'.padStart(10)}${'failures'.padStart(10)}  rejection reasons`);
  for (const k of MUTATION_KINDS) {
    const s = r.byKind[k];
    const reasons = Object.entries(s.reasons).sort((a, b) => b[1] - a[1]).map(([why, n]) => `${why} ${n}`).join(', ');
    lines.push(`${k.padEnd(14)}${String(s.cases).padStart(8)}${String(s.accepted).padStart(10)}${String(s.rejected).padStart(10)}${String(s.failures).padStart(10)}  ${reasons}`);
  }
  lines.push(`failures: ${r.failureCount}`);
  for (const f of r.failures) lines.push(`  case ${f.index} (${f.kind}: ${f.detail}): ${f.message}`);
  return lines.join('\n');
}
