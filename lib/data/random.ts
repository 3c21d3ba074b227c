// Counter-based randomness: every draw is a pure function of (seed, stream, counters), so an epoch's
// order or a replay decision can be recomputed from a saved position instead of replaying a generator.

const TWO_32 = 2 ** 32;

/** A 32-bit finalizer (murmur3-style): avalanches every input bit into every output bit. */
function fmix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

/** Hashes safe integers (negative and above 2^32 included) to a uniform 32-bit value. */
export function hashInts(...parts: readonly number[]): number {
  let h = 0x9e3779b9;
  for (const p of parts) {
    const lo = p >>> 0;
    const hi = Math.floor(p / TWO_32) >>> 0;
    h = fmix32(h ^ fmix32(lo + 0x632be5ab));
    h = fmix32(h ^ fmix32(hi + 0x2545f491));
  }
  return h;
}

/** A uniform number in [0, 1) for the given counters. */
export function uniform(...parts: readonly number[]): number {
  return hashInts(...parts) / TWO_32;
}

/** A small sequential generator (mulberry32) for shuffling, seeded from hashInts. */
export class SeededRandom {
  private state: number;

  constructor(...seedParts: readonly number[]) {
    this.state = hashInts(...seedParts);
  }

  /** A uniform 32-bit integer. */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** A uniform integer in [0, n), n < 2^32. Multiply-shift instead of modulo keeps the bias below 2^-32 * n. */
  below(n: number): number {
    return Math.floor((this.next() / TWO_32) * n);
  }
}
