import { record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, nextSeed, Tensor } from '../tensor.js';
import { sumTo } from './reduce.js';

function binary(op: 'add' | 'sub' | 'mul', a: Tensor, b: Tensor): Tensor {
  return Tensor.fromNative(native().binary(op, checkTensor(a, op, 'a'), checkTensor(b, op, 'b')));
}

/** a + b with numpy broadcasting; same dtype and device. */
export function add(a: Tensor, b: Tensor): Tensor {
  const out = binary('add', a, b);
  const [sa, sb] = [[...a.shape], [...b.shape]];
  return record(out, 'add', [a, b], [], (g, _, needs) => [needs[0] ? sumTo(g, sa) : null, needs[1] ? sumTo(g, sb) : null]);
}

/** a - b with numpy broadcasting; same dtype and device. */
export function sub(a: Tensor, b: Tensor): Tensor {
  const out = binary('sub', a, b);
  const [sa, sb] = [[...a.shape], [...b.shape]];
  return record(out, 'sub', [a, b], [], (g, _, needs) => [needs[0] ? sumTo(g, sa) : null, needs[1] ? sumTo(scale(g, -1), sb) : null]);
}

/** a * b (elementwise) with numpy broadcasting; same dtype and device. */
export function mul(a: Tensor, b: Tensor): Tensor {
  const out = binary('mul', a, b);
  return record(out, 'mul', [a, b], [a, b], (g, [sa, sb], needs) => [
    needs[0] ? sumTo(binary('mul', g, sb!), sa!.shape) : null,
    needs[1] ? sumTo(binary('mul', g, sa!), sb!.shape) : null,
  ]);
}

/** alpha * x for a floating tensor. */
export function scale(x: Tensor, alpha: number): Tensor {
  const h = checkTensor(x, 'scale', 'x');
  if (typeof alpha !== 'number' || Number.isNaN(alpha)) throw new TypeError(`scale: alpha must be a number, got ${String(alpha)}`);
  const out = Tensor.fromNative(native().scale(h, alpha));
  return record(out, 'scale', [x], [], (g) => [scale(g, alpha)]);
}

export interface DropoutOptions {
  /** Probability of zeroing an element, in [0, 1). */
  p: number;
  /** The mask's seed; default: the next seed of tk.manualSeed's sequence. */
  seed?: number;
}

/**
 * Inverted dropout: each element is zeroed with probability p, the others scaled by 1 / (1 - p).
 * The mask depends only on (seed, element index), so the backward pass regenerates it.
 */
export function dropout(x: Tensor, options: DropoutOptions): Tensor {
  const h = checkTensor(x, 'dropout', 'x');
  const p = options?.p;
  if (typeof p !== 'number' || !(p >= 0 && p < 1)) throw new RangeError(`dropout: p must be a number in [0, 1), got ${String(p)}`);
  const seed = options.seed ?? nextSeed();
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`dropout: seed must be a non-negative integer, got ${String(seed)}`);
  if (p === 0) return x.reshape([...x.shape]);
  const out = Tensor.fromNative(native().dropout(h, p, seed));
  return record(out, 'dropout', [x], [], (g) => [Tensor.fromNative(native().dropout(g.handle(), p, seed))]);
}
