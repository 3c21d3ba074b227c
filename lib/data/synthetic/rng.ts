// Seeded randomness for the toy world. Every generator takes an explicit seed so that a demo run, a
// test and a bug report all see the same data on every machine; Math.random is never used.
//
// The generator is a 32-bit Weyl sequence passed through Murmur3's finalizer (the SplitMix idea at
// 32 bits): one add and a few multiplies per draw, plenty for generating toy tasks, and the state is a
// single integer, so deriving independent streams from (seed, labels) is just hashing.

const WEYL = 0x9e3779b9;
const TWO_32 = 0x1_0000_0000;

/** Murmur3's 32-bit finalizer: a bijection on uint32 that spreads every input bit over the output. */
export function mix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

/** FNV-1a over the string's UTF-16 code units, starting from `seed`, finalized with mix32. */
export function hash32(text: string, seed = 0): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return mix32(h);
}

/** A uniform number in [0, 1) that depends only on `text`: how examples are assigned to splits. */
export function hashUnit(text: string): number {
  return hash32(text) / TWO_32;
}

function checkInt(name: string, value: number): void {
  if (!Number.isSafeInteger(value)) throw new RangeError(`${name} must be a safe integer, got ${String(value)}`);
}

export class Rng {
  #state: number;

  constructor(state: number) {
    this.#state = state >>> 0;
  }

  /** A uniform uint32. */
  uint32(): number {
    this.#state = (this.#state + WEYL) >>> 0;
    return mix32(this.#state);
  }

  /** A uniform number in [0, 1). */
  float(): number {
    return this.uint32() / TWO_32;
  }

  /** A uniform integer in [lo, hi], both included. */
  int(lo: number, hi: number): number {
    checkInt('lo', lo);
    checkInt('hi', hi);
    if (lo > hi) throw new RangeError(`int(lo, hi): lo ${lo} > hi ${hi}`);
    // Multiplying a 32-bit fraction has a bias of at most (hi - lo + 1) / 2^32: invisible at toy sizes,
    // and unlike rejection it uses exactly one draw, which keeps streams easy to reason about.
    return lo + Math.floor(this.float() * (hi - lo + 1));
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick: no items to pick from');
    return items[this.int(0, items.length - 1)]!;
  }

  /** `k` distinct items in random order (a partial Fisher-Yates shuffle of a copy). */
  sample<T>(items: readonly T[], k: number): T[] {
    checkInt('k', k);
    if (k < 0 || k > items.length) throw new RangeError(`sample: cannot take ${k} of ${items.length} items`);
    const pool = items.slice();
    for (let i = 0; i < k; i++) {
      const j = this.int(i, pool.length - 1);
      [pool[i], pool[j]] = [pool[j]!, pool[i]!];
    }
    return pool.slice(0, k);
  }

  /** An index drawn with probability proportional to `weights[i]`. */
  weighted(weights: readonly number[]): number {
    const total = weights.reduce((a, b) => a + b, 0);
    if (!(total > 0)) throw new RangeError('weighted: the weights must sum to more than 0');
    let r = this.float() * total;
    for (let i = 0; i < weights.length; i++) {
      r -= weights[i]!;
      if (r < 0) return i;
    }
    // Rounding can leave r at a hair above 0: the last index with weight is the right answer then.
    for (let i = weights.length - 1; i >= 0; i--) if (weights[i]! > 0) return i;
    return weights.length - 1;
  }
}

/**
 * A generator for (seed, ...labels). Labels name the stream ('arithmetic', 'train', ...), so that two
 * uses of one seed (a training set and its held-out set, say) never share draws.
 */
export function createRng(seed: number, ...labels: ReadonlyArray<string | number>): Rng {
  checkInt('seed', seed);
  // Both halves of a seed above 2^32 count, so seeds 1 and 2^32 + 1 give different streams.
  const high = Math.floor(seed / TWO_32) >>> 0;
  let state = mix32((seed >>> 0) ^ mix32(high + WEYL));
  for (const label of labels) state = hash32(`${typeof label}:${String(label)}`, state);
  return new Rng(state);
}
