import { record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';
import { sumTo } from './reduce.js';

export interface MatmulOptions {
  /** Use a's last two axes transposed: a is [..., K, M]. */
  transA?: boolean;
  /** Use b's last two axes transposed: b is [..., N, K] (a linear layer's weight). */
  transB?: boolean;
}

/**
 * a [..., M, K] x b [..., K, N] -> [..., M, N]. Batch axes must be equal, or one operand 2-D
 * (shared across the batch). f32, or bf16 with fp32 accumulation (output bf16).
 */
export function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  const ha = checkTensor(a, 'matmul', 'a');
  const hb = checkTensor(b, 'matmul', 'b');
  const { transA = false, transB = false } = options;
  if (typeof transA !== 'boolean' || typeof transB !== 'boolean') throw new TypeError('matmul: transA and transB must be booleans');
  const out = Tensor.fromNative(native().matmul(ha, hb, transA, transB));
  return record(out, 'matmul', [a, b], [a, b], (g, [sa, sb], needs) => [
    needs[0] ? matmulGradA(g, sa!, sb!, transA, transB) : null,
    needs[1] ? matmulGradB(g, sa!, sb!, transA, transB) : null,
  ]);
}

const mm = (x: Tensor, y: Tensor, transA: boolean, transB: boolean) => Tensor.fromNative(native().matmul(x.handle(), y.handle(), transA, transB));

// With C = op(A) op(B): d op(A) = G op(B)^T and d op(B) = op(A)^T G; a transposed operand gets the
// transpose of that, which is again one GEMM with the right flags.
// An operand shared across the other's batch gets the sum over the batch.
function matmulGradA(g: Tensor, a: Tensor, b: Tensor, transA: boolean, transB: boolean): Tensor {
  const full = transA ? (transB ? mm(b, g, true, true) : mm(b, g, false, true)) : transB ? mm(g, b, false, false) : mm(g, b, false, true);
  return sumTo(full, a.shape);
}

function matmulGradB(g: Tensor, a: Tensor, b: Tensor, transA: boolean, transB: boolean): Tensor {
  if (b.shape.length === 2 && a.shape.length > 2 && !transA) {
    // The common linear layer: x [..., K] against a 2-D weight. Flatten the batch into rows.
    const rows = a.size / a.shape[a.shape.length - 1]!;
    const a2 = a.reshape([rows, a.shape[a.shape.length - 1]!]);
    const g2 = g.reshape([rows, g.shape[g.shape.length - 1]!]);
    return transB ? mm(g2, a2, true, false) : mm(a2, g2, true, false);
  }
  const full = transB ? (transA ? mm(g, a, true, true) : mm(g, a, true, false)) : transA ? mm(a, g, false, false) : mm(a, g, true, false);
  return sumTo(full, b.shape);
}
