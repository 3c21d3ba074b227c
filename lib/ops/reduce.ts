import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

export interface SumOptions {
  /** Axis or axes to sum over (negative counts from the end). Default: all. */
  axis?: number | readonly number[];
  /** Keep reduced axes with size 1. */
  keepdim?: boolean;
}

/** Sum over axes; floats accumulate in fp32. Summing every axis gives a scalar of shape []. */
export function sum(x: Tensor, options: SumOptions = {}): Tensor {
  const h = checkTensor(x, 'sum', 'x');
  const axes = options.axis === undefined ? [] : typeof options.axis === 'number' ? [options.axis] : [...options.axis];
  for (const a of axes) {
    if (!Number.isInteger(a)) throw new TypeError(`sum: axis must be an integer, got ${String(a)}`);
  }
  if (options.axis !== undefined && axes.length === 0) throw new RangeError('sum: axis is an empty list; omit it to sum over all axes');
  return Tensor.fromNative(native().sum(h, axes, options.keepdim ?? false));
}
