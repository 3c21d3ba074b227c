import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

function binary(op: 'add' | 'sub' | 'mul', a: Tensor, b: Tensor): Tensor {
  return Tensor.fromNative(native().binary(op, checkTensor(a, op, 'a'), checkTensor(b, op, 'b')));
}

/** a + b with numpy broadcasting; same dtype and device. */
export function add(a: Tensor, b: Tensor): Tensor {
  return binary('add', a, b);
}

/** a - b with numpy broadcasting; same dtype and device. */
export function sub(a: Tensor, b: Tensor): Tensor {
  return binary('sub', a, b);
}

/** a * b (elementwise) with numpy broadcasting; same dtype and device. */
export function mul(a: Tensor, b: Tensor): Tensor {
  return binary('mul', a, b);
}

/** alpha * x for a floating tensor. */
export function scale(x: Tensor, alpha: number): Tensor {
  const h = checkTensor(x, 'scale', 'x');
  if (typeof alpha !== 'number' || Number.isNaN(alpha)) throw new TypeError(`scale: alpha must be a number, got ${String(alpha)}`);
  return Tensor.fromNative(native().scale(h, alpha));
}
