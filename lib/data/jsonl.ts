// Streaming JSON Lines. Files are read in chunks and split on newline bytes before decoding, so memory
// stays bounded by the longest line, a line number is exact even for invalid UTF-8, and a multi-byte
// character can never straddle two lines (0x0A never occurs inside a UTF-8 sequence).
import { createReadStream } from 'node:fs';

import { DataError, describeValue, excerpt, type RecordOrigin } from './errors.js';

/**
 * Where records come from: a JSONL path, an in-memory list of records, or a list with a label that
 * error messages use in place of a file name (the toy world and tests pass lists).
 */
export type DataSource = string | readonly unknown[] | { readonly records: readonly unknown[]; readonly name?: string };

/** One JSON object of a source with its origin; for lists, `line` is the record's 1-based number. */
export interface JsonlRecord extends RecordOrigin {
  value: Record<string, unknown>;
}

/** One non-blank line of a file, or one entry of a list, before parsing. */
export type RawItem = { kind: 'line'; text: string; origin: RecordOrigin } | { kind: 'value'; value: unknown; origin: RecordOrigin };

const DEFAULT_LIST_NAME = '<records>';

/** The name error messages give the source: its path, or the list's label. */
export function sourceName(source: DataSource): string {
  if (typeof source === 'string') return source;
  if (Array.isArray(source)) return DEFAULT_LIST_NAME;
  return (source as { name?: string }).name ?? DEFAULT_LIST_NAME;
}

/** Rejects what is not a DataSource before any reading starts, naming what was given. */
export function checkSource(source: unknown, what = 'source'): asserts source is DataSource {
  if (typeof source === 'string') {
    if (source.length === 0) throw new DataError(`${what} must be a JSONL path, a list of records or { records, name }, got an empty string`);
    return;
  }
  if (Array.isArray(source)) return;
  const s = source as { records?: unknown; name?: unknown } | null;
  if (typeof s === 'object' && s !== null && Array.isArray(s.records) && (s.name === undefined || typeof s.name === 'string')) return;
  throw new DataError(`${what} must be a JSONL path, a list of records or { records, name }, got ${describeValue(source)}`);
}

function errnoCode(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | null)?.code;
}

/** The non-blank lines of a file with their 1-based line numbers (CRLF and a leading BOM accepted). */
export async function* readLines(path: string): AsyncGenerator<{ text: string; line: number }> {
  const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  const stream = createReadStream(path, { highWaterMark: 1 << 16 });
  let parts: Buffer[] = [];
  let line = 0;
  const decode = (bytes: Buffer): string => {
    line++;
    let text: string;
    try {
      text = utf8.decode(bytes);
    } catch (e) {
      throw new DataError('is not valid UTF-8; JSONL files must be UTF-8 encoded', { file: path, line }, { cause: e });
    }
    if (line === 1 && text.startsWith('\uFEFF')) text = text.slice(1);
    return text.endsWith('\r') ? text.slice(0, -1) : text;
  };
  try {
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      let from = 0;
      for (;;) {
        const nl = chunk.indexOf(0x0a, from);
        if (nl < 0) {
          if (from < chunk.length) parts.push(chunk.subarray(from));
          break;
        }
        parts.push(chunk.subarray(from, nl));
        from = nl + 1;
        const text = decode(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
        parts = [];
        if (text.trim() !== '') yield { text, line };
      }
    }
    if (parts.length > 0) {
      const text = decode(Buffer.concat(parts));
      if (text.trim() !== '') yield { text, line };
    }
  } catch (e) {
    if (e instanceof DataError) throw e;
    const code = errnoCode(e);
    if (code === 'ENOENT') throw new DataError(`${path} does not exist; expected a JSONL file (one JSON object per line)`, undefined, { cause: e });
    if (code === 'EISDIR') throw new DataError(`${path} is a directory; expected a JSONL file (one JSON object per line)`, undefined, { cause: e });
    throw new DataError(`cannot read ${path}: ${(e as Error).message}`, undefined, { cause: e });
  } finally {
    stream.destroy();
  }
}

/** The items of a source in their stored order: lines of a file, or entries of a list. */
export async function* readRawItems(source: DataSource): AsyncGenerator<RawItem> {
  checkSource(source);
  if (typeof source === 'string') {
    for await (const { text, line } of readLines(source)) yield { kind: 'line', text, origin: { file: source, line } };
    return;
  }
  const file = sourceName(source);
  const records = Array.isArray(source) ? source : (source as { records: readonly unknown[] }).records;
  for (let i = 0; i < records.length; i++) yield { kind: 'value', value: records[i], origin: { file, line: i + 1 } };
}

/** The JSON object an item holds; anything else (bad JSON, an array, a number) is an error naming its line. */
export function parseItem(item: RawItem): Record<string, unknown> {
  let value: unknown;
  if (item.kind === 'line') {
    try {
      value = JSON.parse(item.text);
    } catch (e) {
      throw new DataError(`not valid JSON (${(e as Error).message}); the line starts: ${excerpt(item.text)}`, item.origin, { cause: e });
    }
  } else {
    value = item.value;
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    const where = item.kind === 'line' ? `; the line starts: ${excerpt(item.text)}` : '';
    throw new DataError(`expected a JSON object (one record per line), got ${describeValue(value)}${where}`, item.origin);
  }
  return value as Record<string, unknown>;
}

/**
 * Streams the JSON objects of a JSONL file (or a list) with their origin, without reading the whole
 * file; blank lines are skipped and a malformed line is an error naming file:line.
 */
export async function* readJsonl(source: DataSource): AsyncGenerator<JsonlRecord> {
  for await (const item of readRawItems(source)) yield { value: parseItem(item), ...item.origin };
}
