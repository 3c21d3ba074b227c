// Files that appear under their name only when complete: written to a temporary name in the same
// directory, synced, renamed over the target, and the directory synced so the rename itself is
// durable. A crash or an error at any point leaves either the old file or the new one, never half
// of one; the temporary file is removed on failure. (DESIGN.md: nothing a user wrote is left
// half-written.)
import { randomBytes } from 'node:crypto';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/** A temporary name beside `path`, unique to this process and call. */
export function temporaryPath(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
}

/** Writes `path` atomically; `write` fills the opened temporary file. */
export async function writeFileAtomic(path: string, write: (fh: FileHandle) => Promise<void>): Promise<void> {
  const tmp = temporaryPath(path);
  let fh: FileHandle | undefined;
  try {
    fh = await open(tmp, 'wx');
    await write(fh);
    await fh.sync();
    await fh.close();
    fh = undefined;
    await rename(tmp, path);
  } catch (err) {
    await fh?.close().catch(() => {});
    await rm(tmp, { force: true });
    throw err;
  }
  await syncDirectory(dirname(path));
}

/** Writes a string atomically (UTF-8). */
export function writeTextAtomic(path: string, text: string): Promise<void> {
  return writeFileAtomic(path, (fh) => fh.writeFile(text, 'utf8'));
}

/** Makes a rename durable; platforms that cannot sync a directory (Windows) skip it. */
export async function syncDirectory(dir: string): Promise<void> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch {
    // Opening or syncing a directory is unsupported on some platforms; the data itself is synced.
  } finally {
    await fh?.close().catch(() => {});
  }
}
