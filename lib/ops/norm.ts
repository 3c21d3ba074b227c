import { needsGrad, record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

export interface RmsNormOptions {
  /** Added to the mean square before the square root. Default 1e-6 (Llama). */
  eps?: number;
}

/**
 * RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (f32 or bf16
 * storage). x [..., D], weight [D]. Differentiable in x and weight.
 */
export function rmsNorm(x: Tensor, weight: Tensor, options: RmsNormOptions = {}): Tensor {
  const hx = checkTensor(x, 'rmsNorm', 'x');
  const hw = checkTensor(weight, 'rmsNorm', 'weight');
  const eps = options.eps ?? 1e-6;
  if (typeof eps !== 'number' || !Number.isFinite(eps) || eps < 0) throw new RangeError(`rmsNorm: eps must be a finite number >= 0, got ${String(eps)}`);
  if (!needsGrad(x, weight)) return Tensor.fromNative(native().rmsNorm(hx, hw, eps));
  const r = native().rmsNormTrain(hx, hw, eps);
  const rstd = Tensor.fromNative(r.rstd);
  try {
    return record(Tensor.fromNative(r.y), 'rmsNorm', [x, weight], [x, weight, rstd], (g, [sx, sw, sr], needs) => {
      const d = native().rmsNormBackward(g.handle(), sx!.handle(), sw!.handle(), sr!.handle());
      const dx = Tensor.fromNative(d.dx);
      const dw = Tensor.fromNative(d.dweight);
      return [needs[0] ? dx : null, needs[1] ? dw : null];
    });
  } finally {
    rstd.dispose();
  }
}

/** SwiGLU's gating: silu(gate) * up, elementwise; same shape and dtype (f32 or bf16). */
export function swiglu(gate: Tensor, up: Tensor): Tensor {
  const out = Tensor.fromNative(native().swiglu(checkTensor(gate, 'swiglu', 'gate'), checkTensor(up, 'swiglu', 'up')));
  return record(out, 'swiglu', [gate, up], [gate, up], (g, [sg, su]) => {
    const d = native().swigluBackward(g.handle(), sg!.handle(), su!.handle());
    return [Tensor.fromNative(d.dgate), Tensor.fromNative(d.dup)];
  });
}

/**
 * Rows of `table` [V, D] picked by i32 `ids` [...] -> [..., D]. An id outside [0, V) fails the
 * queued kernel; the error (naming the id) surfaces at the next read. Differentiable in table
 * (rows of repeated ids sum their gradients).
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  const out = Tensor.fromNative(native().embedding(checkTensor(ids, 'embedding', 'ids'), checkTensor(table, 'embedding', 'table')));
  const [vocab, dtype] = [table.shape[0]!, table.dtype];
  return record(out, 'embedding', [null, table], [ids], (g, [sids]) => [null, Tensor.fromNative(native().embeddingBackward(g.handle(), sids!.handle(), vocab, dtype))]);
}
