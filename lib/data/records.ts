// The three record shapes training stages read, validated strictly: `text` for pretraining,
// `alpaca` (instruction / input / output) and `messages` (chat) for SFT. A record of the wrong shape is
// an error naming its file:line and the key at fault, never a silently skipped example.
import { z } from 'zod';

import { DataError, describeValue, type RecordOrigin } from './errors.js';
import { checkSource, parseItem, readRawItems, sourceName, type DataSource, type RawItem } from './jsonl.js';

export const DATA_FORMATS = ['text', 'alpaca', 'messages'] as const;
export type DataFormat = (typeof DATA_FORMATS)[number];

export const CHAT_ROLES = ['system', 'user', 'assistant'] as const;
export type ChatRole = (typeof CHAT_ROLES)[number];

export const textRecordSchema = z.object({ text: z.string().min(1) });

export const alpacaRecordSchema = z.object({
  instruction: z.string().min(1),
  // Alpaca data writes a missing input as "" or null as often as it leaves the key out.
  input: z.string().nullable().optional(),
  output: z.string().min(1),
});

export const chatTurnSchema = z.object({
  role: z.enum(CHAT_ROLES),
  content: z.string(),
  /** false leaves an assistant turn out of the loss (e.g. a worse earlier answer kept as context). */
  train: z.boolean().optional(),
});

export const messagesRecordSchema = z
  .object({ messages: z.array(chatTurnSchema).min(1) })
  .superRefine((record, ctx) => {
    record.messages.forEach((m, i) => {
      if (m.train === true && m.role !== 'assistant') {
        ctx.addIssue({ code: 'custom', path: ['messages', i, 'train'], message: `is true on a ${m.role} message; only assistant messages are trained on` });
      }
    });
    if (!record.messages.some((m) => m.role === 'assistant' && m.train !== false)) {
      ctx.addIssue({ code: 'custom', path: ['messages'], message: 'has no assistant message to train on (none, or all have train: false)' });
    }
  });

export type TextRecord = z.infer<typeof textRecordSchema>;
export type AlpacaRecord = z.infer<typeof alpacaRecordSchema>;
export type ChatTurn = z.infer<typeof chatTurnSchema>;
export type MessagesRecord = z.infer<typeof messagesRecordSchema>;

/** A validated record tagged with its format, so that `switch (r.format)` narrows `r.record`. */
export type FormattedRecord =
  | { format: 'text'; record: TextRecord }
  | { format: 'alpaca'; record: AlpacaRecord }
  | { format: 'messages'; record: MessagesRecord };

/** A validated record with the file (or list label) and line it came from. */
export type SourceRecord = FormattedRecord & RecordOrigin;

const SCHEMAS = { text: textRecordSchema, alpaca: alpacaRecordSchema, messages: messagesRecordSchema } as const;

/** The shape of each format as the error messages spell it out. */
export const FORMAT_SHAPES: Readonly<Record<DataFormat, string>> = {
  text: '{"text": string}',
  alpaca: '{"instruction": string, "input"?: string, "output": string}',
  messages: '{"messages": [{"role": "system"|"user"|"assistant", "content": string, "train"?: boolean}, ...]}',
};

/** "a text record", "an alpaca record". */
function aRecord(format: DataFormat): string {
  return `${format === 'alpaca' ? 'an' : 'a'} ${format} record`;
}

function pathToKey(path: readonly PropertyKey[]): string {
  let key = '';
  for (const p of path) key += typeof p === 'number' ? `[${p}]` : `${key === '' ? '' : '.'}${String(p)}`;
  return key;
}

function valueAt(value: unknown, path: readonly PropertyKey[]): unknown {
  let v = value;
  for (const p of path) {
    if (typeof v !== 'object' || v === null) return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

function describeIssue(issue: z.core.$ZodIssue, value: unknown): string {
  const key = `"${pathToKey(issue.path)}"`;
  const actual = valueAt(value, issue.path);
  switch (issue.code) {
    case 'invalid_type':
      return actual === undefined ? `${key} is missing` : `${key} must be ${issue.expected === 'array' ? 'a list' : `a ${issue.expected}`}, got ${describeValue(actual)}`;
    case 'too_small':
      return Array.isArray(actual) ? `${key} is an empty list` : `${key} is empty`;
    case 'invalid_value':
      return `${key} must be one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}, got ${describeValue(actual)}`;
    case 'custom':
      return `${key} ${issue.message}`;
    default:
      return `${key}: ${issue.message}`;
  }
}

/** Checks one parsed object against a format; the error names the origin, the key and the expected shape. */
export function validateRecord(value: unknown, format: DataFormat, origin?: RecordOrigin): FormattedRecord {
  const parsed = SCHEMAS[format].safeParse(value);
  if (!parsed.success) {
    const problems = parsed.error.issues.slice(0, 3).map((i) => describeIssue(i, value));
    throw new DataError(`not ${aRecord(format)}: ${problems.join('; ')} (${aRecord(format)} is ${FORMAT_SHAPES[format]})`, origin);
  }
  return { format, record: parsed.data } as FormattedRecord;
}

/** The format a record's keys announce, or null when they announce none. */
export function detectFormat(value: Readonly<Record<string, unknown>>): DataFormat | null {
  if (Object.hasOwn(value, 'messages')) return 'messages';
  if (Object.hasOwn(value, 'instruction') || Object.hasOwn(value, 'output')) return 'alpaca';
  if (Object.hasOwn(value, 'text')) return 'text';
  return null;
}

export interface FormatOptions {
  /** The records' format; by default it is detected from the first record. */
  format?: DataFormat;
  /** The formats the consuming stage accepts (e.g. ['alpaca', 'messages'] for SFT). Default: all. */
  formats?: readonly DataFormat[];
}

function checkFormatOptions(options: FormatOptions): void {
  if (options.format !== undefined && !DATA_FORMATS.includes(options.format)) {
    throw new DataError(`format must be one of ${DATA_FORMATS.map((f) => `'${f}'`).join(', ')}, got ${describeValue(options.format)}`);
  }
  if (options.formats !== undefined) {
    if (!Array.isArray(options.formats) || options.formats.length === 0 || options.formats.some((f) => !DATA_FORMATS.includes(f))) {
      throw new DataError(`formats must be a non-empty list of ${DATA_FORMATS.map((f) => `'${f}'`).join(', ')}, got ${describeValue(options.formats)}`);
    }
  }
}

function allowedList(formats: readonly DataFormat[]): string {
  return formats.length === 1 ? formats[0]! : `${formats.slice(0, -1).join(', ')} or ${formats.at(-1)}`;
}

/** Decides the format from the first item; `formats` limits what a stage accepts. */
function formatOfFirst(first: RawItem, options: FormatOptions): DataFormat {
  const value = parseItem(first);
  const allowed = options.formats ?? DATA_FORMATS;
  const format = options.format ?? detectFormat(value);
  if (format === null) {
    const keys = Object.keys(value);
    throw new DataError(
      `cannot tell the format of the records: the first record has ${keys.length === 0 ? 'no keys' : `the keys ${keys.map((k) => JSON.stringify(k)).join(', ')}`}; ` +
        `expected ${allowed.map((f) => FORMAT_SHAPES[f]).join(' or ')}`,
      first.origin,
    );
  }
  if (!allowed.includes(format)) {
    const how = options.format === undefined ? `the first record is ${aRecord(format)}` : `format is '${format}'`;
    throw new DataError(`${how}, but this stage takes ${allowedList(allowed)} records (${allowed.map((f) => FORMAT_SHAPES[f]).join(' or ')})`, first.origin);
  }
  return format;
}

function emptySourceError(source: DataSource): DataError {
  return typeof source === 'string'
    ? new DataError(`${source} has no records: the file is empty or holds only blank lines`)
    : new DataError(`${sourceName(source)} has no records: the list is empty`);
}

/**
 * The format of a source: `options.format` when given (checked against `options.formats`), else the
 * format the first record's keys announce. Reads only up to the first record.
 */
export async function resolveFormat(source: DataSource, options: FormatOptions = {}): Promise<DataFormat> {
  checkSource(source);
  checkFormatOptions(options);
  for await (const first of readRawItems(source)) return formatOfFirst(first, options);
  throw emptySourceError(source);
}

/**
 * Streams the validated records of a JSONL file or list with their origin. The format is
 * `options.format`, or detected from the first record; every record must have it. An empty source, a
 * malformed line and a record of the wrong shape are errors naming the source (and file:line).
 */
export async function* readRecords(source: DataSource, options: FormatOptions = {}): AsyncGenerator<SourceRecord> {
  checkSource(source);
  checkFormatOptions(options);
  let format: DataFormat | undefined;
  for await (const item of readRawItems(source)) {
    format ??= formatOfFirst(item, options);
    yield { ...validateRecord(parseItem(item), format, item.origin), ...item.origin };
  }
  if (format === undefined) throw emptySourceError(source);
}
