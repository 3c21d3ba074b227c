import { record } from '../autograd.js';
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
  const out = Tensor.fromNative(native().sum(h, axes, options.keepdim ?? false));
  const shape = [...x.shape];
  const nd = shape.length;
  const reduced = axes.length === 0 ? shape.map((_, i) => i) : axes.map((a) => (a < 0 ? a + nd : a));
  const kept = shape.map((d, i) => (reduced.includes(i) ? 1 : d));
  return record(out, 'sum', [x], [], (g) => [broadcastTo(g.reshape(kept), shape)]);
}

/** x copied to `shape` under numpy broadcasting rules. */
export function broadcastTo(x: Tensor, shape: readonly number[]): Tensor {
  const h = checkTensor(x, 'broadcastTo', 'x');
  if (x.shape.join() === shape.join()) return x.reshape(shape);
  const from = [...x.shape];
  const out = Tensor.fromNative(native().broadcastTo(h, [...shape]));
  return record(out, 'broadcastTo', [x], [], (g) => [sumTo(g, from)]);
}

/**
 * The gradient of broadcasting: g summed over the axes that broadcasting added or stretched, so
 * that it has `shape` again. Returns g itself when nothing was broadcast.
 */
export function sumTo(g: Tensor, shape: readonly number[]): Tensor {
  if (g.shape.join() === shape.join()) return g;
  const lead = g.shape.length - shape.length;
  const axes: number[] = [];
  g.shape.forEach((d, i) => {
    if (i < lead || (shape[i - lead] === 1 && d !== 1)) axes.push(i);
  });
  const summed = axes.length ? sum(g, { axis: axes, keepdim: true }) : g;
  return summed.reshape(shape);
}
