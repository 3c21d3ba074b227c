import { record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';
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
