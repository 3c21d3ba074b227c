// Writes records as JSON Lines. The file appears under its name only when complete (written to a
// temporary name in the same directory, synced, then renamed: lib/io/atomic.ts), so a trainer started beside an
// interrupted demo never reads half a data set.
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';

import { writeFileAtomic } from '../../io/atomic.js';

// Strings are gathered into chunks of about this many characters, so a long-context corpus costs a
// bounded amount of memory beyond the records themselves and few write calls.
const CHUNK_CHARS = 1 << 20;

/**
 * Writes one JSON object per line to `path` (parent directories are created) and returns the number
 * of records written. Records must be plain objects: every JSONL shape a trainer reads is one.
 */
export async function writeJsonl(path: string, records: Iterable<unknown>): Promise<number> {
  await mkdir(dirname(path), { recursive: true });
  let count = 0;
  await writeFileAtomic(path, async (file) => {
    let chunk = '';
    for (const record of records) {
      if (record === null || typeof record !== 'object' || Array.isArray(record)) {
        throw new TypeError(`writeJsonl: record ${count} is not an object (${record === null ? 'null' : Array.isArray(record) ? 'array' : typeof record})`);
      }
      let line: string;
      try {
        line = JSON.stringify(record);
      } catch (err) {
        throw new TypeError(`writeJsonl: record ${count} cannot be written as JSON: ${(err as Error).message}`, { cause: err });
      }
      chunk += line + '\n';
      count++;
      if (chunk.length >= CHUNK_CHARS) {
        await file.write(chunk);
        chunk = '';
      }
    }
    if (chunk.length > 0) await file.write(chunk);
  });
  return count;
}
