// A strict JSON parser for safetensors headers and index files. JSON.parse is not enough here:
// it keeps the last of two equal keys (so a tensor listed twice would silently lose an entry),
// rounds integers past 2^53 (so an offset could silently change), and puts keys named like
// integers before the others. This parser keeps every object entry in file order, duplicates
// included, and keeps each number's source text so callers can check integers exactly.

/** A number with its source text, so that integers are checked exactly rather than as doubles. */
export class JsonNumber {
  constructor(readonly raw: string) {}
  get value(): number {
    return Number(this.raw);
  }
}

/** An object's entries in file order; duplicate keys are kept for the caller to report. */
export class JsonObject {
  constructor(readonly entries: ReadonlyArray<readonly [string, JsonValue]>) {}
}

export type JsonValue = null | boolean | string | JsonNumber | JsonValue[] | JsonObject;

/** Thrown for text that is not JSON; callers wrap it in their own error with the file name. */
export class JsonSyntaxError extends Error {
  constructor(message: string, readonly position: number) {
    super(message);
    this.name = 'JsonSyntaxError';
  }
}

// Safetensors headers nest three levels deep; a generous bound keeps a hostile "[[[[..." from
// exhausting the stack while leaving room for any metadata a real writer produces.
export const MAX_JSON_DEPTH = 64;

const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

export function parseJson(text: string): JsonValue {
  let pos = 0;

  const fail = (what: string, at = pos): never => {
    const found = at < text.length ? `'${printable(text[at]!)}'` : 'the end of the text';
    throw new JsonSyntaxError(`${what} at character ${at}, found ${found}`, at);
  };

  const skipSpace = () => {
    for (;;) {
      const c = text.charCodeAt(pos);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) pos++;
      else return;
    }
  };

  const parseString = (): string => {
    const start = pos;
    pos++; // opening quote
    let escaped = false;
    for (;;) {
      if (pos >= text.length) fail('unterminated string', start);
      const c = text.charCodeAt(pos);
      if (c === 0x22) break;
      if (c < 0x20) fail('control character inside a string');
      if (c === 0x5c) {
        escaped = true;
        pos += 2;
      } else {
        pos++;
      }
    }
    pos++; // closing quote
    if (!escaped) return text.slice(start + 1, pos - 1);
    // JSON.parse decodes and validates the escapes of this one literal; the scan above has
    // already bounded it, so it cannot run past the string.
    try {
      return JSON.parse(text.slice(start, pos)) as string;
    } catch {
      return fail('invalid escape in string', start);
    }
  };

  const parseValue = (depth: number): JsonValue => {
    skipSpace();
    if (pos >= text.length) fail('expected a value');
    const c = text[pos]!;
    if (c === '{' || c === '[') {
      if (depth >= MAX_JSON_DEPTH) fail(`nesting deeper than ${MAX_JSON_DEPTH} levels`);
      return c === '{' ? parseObject(depth + 1) : parseArray(depth + 1);
    }
    if (c === '"') return parseString();
    if (c === '-' || (c >= '0' && c <= '9')) {
      NUMBER.lastIndex = pos;
      const m = NUMBER.exec(text);
      if (!m) return fail('invalid number');
      pos += m[0].length;
      return new JsonNumber(m[0]);
    }
    for (const [word, value] of [['true', true], ['false', false], ['null', null]] as const) {
      if (text.startsWith(word, pos)) {
        pos += word.length;
        return value;
      }
    }
    return fail('expected a value');
  };

  const parseObject = (depth: number): JsonObject => {
    pos++; // {
    const entries: Array<readonly [string, JsonValue]> = [];
    skipSpace();
    if (text[pos] === '}') {
      pos++;
      return new JsonObject(entries);
    }
    for (;;) {
      skipSpace();
      if (text[pos] !== '"') fail('expected a string key');
      const key = parseString();
      skipSpace();
      if (text[pos] !== ':') fail("expected ':' after a key");
      pos++;
      entries.push([key, parseValue(depth)]);
      skipSpace();
      if (text[pos] === ',') {
        pos++;
        continue;
      }
      if (text[pos] === '}') {
        pos++;
        return new JsonObject(entries);
      }
      fail("expected ',' or '}'");
    }
  };

  const parseArray = (depth: number): JsonValue[] => {
    pos++; // [
    const items: JsonValue[] = [];
    skipSpace();
    if (text[pos] === ']') {
      pos++;
      return items;
    }
    for (;;) {
      items.push(parseValue(depth));
      skipSpace();
      if (text[pos] === ',') {
        pos++;
        continue;
      }
      if (text[pos] === ']') {
        pos++;
        return items;
      }
      fail("expected ',' or ']'");
    }
  };

  const value = parseValue(0);
  skipSpace();
  if (pos !== text.length) fail('unexpected text after the JSON value');
  return value;
}

/** A short description of a JSON value for error messages (bounded, whatever the input). */
export function describeJson(v: JsonValue): string {
  if (v === null) return 'null';
  if (typeof v === 'boolean') return String(v);
  if (typeof v === 'string') return quote(v);
  if (v instanceof JsonNumber) return clip(v.raw, 40);
  if (Array.isArray(v)) {
    const shown = v.slice(0, 8).map((x) => (x instanceof JsonNumber ? clip(x.raw, 24) : Array.isArray(x) ? '[...]' : x instanceof JsonObject ? '{...}' : describeJson(x)));
    return `[${shown.join(', ')}${v.length > 8 ? `, ... (${v.length} items)` : ''}]`;
  }
  return `an object with ${v.entries.length} key${v.entries.length === 1 ? '' : 's'}`;
}

/** A name quoted as a JSON string (so control characters show), clipped for messages. */
export function quote(s: string, max = 120): string {
  const q = JSON.stringify(s);
  return q.length <= max ? q : `${q.slice(0, max - 4)}..."`;
}

function clip(s: string, max: number): string {
  return s.length <= max ? s : `${s.slice(0, max - 3)}...`;
}

function printable(c: string): string {
  const code = c.charCodeAt(0);
  return code < 0x20 || code === 0x7f ? `\\u${code.toString(16).padStart(4, '0')}` : c;
}
