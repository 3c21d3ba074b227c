// Writes records as JSON Lines. The file appears under its name only when complete (written to a
// temporary name in the same directory, flushed, then renamed), so a trainer started beside an
// interrupted demo never reads half a data set.
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

let tempCounter = 0;

// Strings are gathered into chunks of about this many characters, so a long-context corpus costs a
// bounded amount of memory beyond the records themselves and few write calls.
const CHUNK_CHARS = 1 << 20;

/**
 * Writes one JSON object per line to `path` (parent directories are created) and returns the number
 * of records written. Records must be plain objects: every JSONL shape a trainer reads is one.
 */
export async function writeJsonl(path: string, records: Iterable<unknown>): Promise<number> {
  const dir = dirname(path);
  await mkdir(dir, { recursive: true });
  const temp = join(dir, `.${basename(path)}.${process.pid}.${tempCounter++}.tmp`);
  const file = await open(temp, 'wx');
  let count = 0;
  try {
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
    await file.sync();
    await file.close();
  } catch (err) {
    await file.close().catch(() => undefined);
    await rm(temp, { force: true });
    throw err;
  }
  try {
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
  return count;
}
