import { record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, Tensor, type DType } from '../tensor.js';

/** Same values in a new shape (-1 infers one size); shares memory with x. */
export function reshape(x: Tensor, shape: readonly number[]): Tensor {
  checkTensor(x, 'reshape', 'x');
  return x.reshape(shape);
}

/** A contiguous copy with axes reordered: out.shape[i] = x.shape[perm[i]]. */
export function permute(x: Tensor, perm: readonly number[]): Tensor {
  const h = checkTensor(x, 'permute', 'x');
  if (!Array.isArray(perm) || perm.some((p) => !Number.isInteger(p))) throw new TypeError('permute: perm must be an array of integers');
  const out = Tensor.fromNative(native().permute(h, [...perm]));
  const n = x.shape.length;
  const inverse: number[] = new Array(n);
  perm.forEach((p, i) => (inverse[p < 0 ? p + n : p] = i));
  return record(out, 'permute', [x], [], (g) => [permute(g, inverse)]);
}

/** A contiguous copy with two axes swapped (by default the last two). */
export function transpose(x: Tensor, dim0 = -2, dim1 = -1): Tensor {
  const h = checkTensor(x, 'transpose', 'x');
  const n = h.shape.length;
  for (const d of [dim0, dim1]) {
    if (!Number.isInteger(d) || d < -n || d >= n) throw new RangeError(`transpose: axis ${d} is out of range for shape [${h.shape.join(', ')}]`);
  }
  const perm = [...Array(n).keys()];
  const a = dim0 < 0 ? dim0 + n : dim0;
  const b = dim1 < 0 ? dim1 + n : dim1;
  [perm[a], perm[b]] = [perm[b]!, perm[a]!];
  return permute(x, perm);
}

/** A copy converted to another dtype (rounding to nearest even; floats to ints truncate and saturate). */
export function cast(x: Tensor, dtype: DType): Tensor {
  checkTensor(x, 'cast', 'x');
  return x.to(dtype);
}
