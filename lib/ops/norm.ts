import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

export interface RmsNormOptions {
  /** Added to the mean square before the square root. Default 1e-6 (Llama). */
  eps?: number;
}

/**
 * RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (f32 or bf16
 * storage). x [..., D], weight [D]. Forward only until the autograd tape lands.
 */
export function rmsNorm(x: Tensor, weight: Tensor, options: RmsNormOptions = {}): Tensor {
  const hx = checkTensor(x, 'rmsNorm', 'x');
  const hw = checkTensor(weight, 'rmsNorm', 'weight');
  const eps = options.eps ?? 1e-6;
  if (typeof eps !== 'number' || !Number.isFinite(eps) || eps < 0) throw new RangeError(`rmsNorm: eps must be a finite number >= 0, got ${String(eps)}`);
  return Tensor.fromNative(native().rmsNorm(hx, hw, eps));
}

/** SwiGLU's gating: silu(gate) * up, elementwise; same shape and dtype (f32 or bf16). Forward only. */
export function swiglu(gate: Tensor, up: Tensor): Tensor {
  return Tensor.fromNative(native().swiglu(checkTensor(gate, 'swiglu', 'gate'), checkTensor(up, 'swiglu', 'up')));
}

/**
 * Rows of `table` [V, D] picked by i32 `ids` [...] -> [..., D]. An id outside [0, V) fails the
 * queued kernel; the error (naming the id) surfaces at the next read. Forward only.
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  return Tensor.fromNative(native().embedding(checkTensor(ids, 'embedding', 'ids'), checkTensor(table, 'embedding', 'table')));
}
