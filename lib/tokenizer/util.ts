// Small helpers shared by the tokenizers.
import { TokenizerError } from './types.js';

/** A short description of a value of the wrong kind, for error messages. */
export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') return `the string ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + '...' : value)}`;
  return typeof value === 'object' ? 'an object' : `${typeof value} ${String(value)}`;
}

/** Validates ids for decode and copies them into a plain array (typed arrays from tensors are welcome). */
export function checkIds(ids: ArrayLike<number>, vocabSize: number, source: string, known: (id: number) => boolean = () => true): number[] {
  if (ids === null || typeof ids !== 'object' || typeof ids.length !== 'number') {
    throw new TokenizerError(`decode (${source}): ids must be an array of token ids, got ${describe(ids)}`);
  }
  const list = Array.from(ids);
  for (let i = 0; i < list.length; i++) {
    const id = list[i]!;
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize || !known(id)) {
      throw new TokenizerError(`decode (${source}): ids[${i}] = ${id} is not a token id (0 <= id < ${vocabSize})`);
    }
  }
  return list;
}
