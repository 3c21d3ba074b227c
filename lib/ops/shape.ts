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

/** The tensors joined along `axis` (same dtype and device, equal sizes on the other axes). */
export function concat(tensors: readonly Tensor[], axis = 0): Tensor {
  if (!Array.isArray(tensors) || tensors.length === 0) throw new TypeError('concat: expected a non-empty array of tensors');
  const handles = tensors.map((t, i) => checkTensor(t, 'concat', `tensors[${i}]`));
  if (!Number.isInteger(axis)) throw new TypeError(`concat: axis must be an integer, got ${String(axis)}`);
  const out = Tensor.fromNative(native().concat(handles, axis));
  const a = axis < 0 ? axis + tensors[0]!.shape.length : axis;
  const sizes = tensors.map((t) => t.shape[a]!);
  return record(out, 'concat', [...tensors], [], (g, _, needs) => {
    let start = 0;
    return sizes.map((n, i) => {
      const piece = needs[i] ? narrow(g, a, start, n) : null;
      start += n;
      return piece;
    });
  });
}

/** A copy of x's slice [start, start + length) along `axis`. */
export function narrow(x: Tensor, axis: number, start: number, length: number): Tensor {
  const h = checkTensor(x, 'narrow', 'x');
  for (const [name, v] of [['axis', axis], ['start', start], ['length', length]] as const)
    if (!Number.isInteger(v)) throw new TypeError(`narrow: ${name} must be an integer, got ${String(v)}`);
  const out = Tensor.fromNative(native().narrow(h, axis, start, length));
  const a = axis < 0 ? axis + x.shape.length : axis;
  const size = x.shape[a]!;
  return record(out, 'narrow', [x], [], (g) => {
    // Zero-padding g back to x's extent along the axis.
    const parts: Tensor[] = [];
    const zerosOf = (n: number) => {
      const shape = [...g.shape];
      shape[a] = n;
      return Tensor.fromNative(native().full(shape, g.dtype, g.device, 0));
    };
    if (start > 0) parts.push(zerosOf(start));
    parts.push(g);
    if (start + length < size) parts.push(zerosOf(size - start - length));
    return [parts.length === 1 ? g : concat(parts, a)];
  });
}
