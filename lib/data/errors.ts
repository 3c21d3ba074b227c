// Data errors name where the bad input is (a file and line, or an item of an in-memory list), so that
// a problem in line 48,213 of a corpus can be fixed without bisecting the file.

/** Where a record came from: a JSONL file and its 1-based line, or a label and the record's 1-based number. */
export interface RecordOrigin {
  file: string;
  line: number;
}

/** `file:line`, the form editors and terminals turn into a link. */
export function formatOrigin(origin: RecordOrigin | undefined): string | undefined {
  return origin === undefined ? undefined : `${origin.file}:${origin.line}`;
}

/** Thrown for unreadable or malformed data, records of the wrong shape and examples that do not fit. */
export class DataError extends Error {
  /** The file (or in-memory label) and line of the record at fault, when the error is about one record. */
  readonly origin: RecordOrigin | undefined;

  constructor(message: string, origin?: RecordOrigin, options?: { cause?: unknown }) {
    super(origin === undefined ? message : `${formatOrigin(origin)}: ${message}`, options);
    this.name = 'DataError';
    this.origin = origin;
  }
}

/** A short description of a JSON value for messages: its type and, for scalars, the value itself. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (typeof value === 'string') return `the string ${excerpt(JSON.stringify(value), 40)}`;
  if (typeof value === 'object') return 'an object';
  return `${typeof value} ${String(value)}`;
}

/** The start of a long text, marked as cut, so that a message about a 2 MB line stays readable. */
export function excerpt(text: string, max = 80): string {
  return text.length <= max ? text : `${text.slice(0, max)}…`;
}
