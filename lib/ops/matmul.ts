import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

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
  return Tensor.fromNative(native().matmul(ha, hb, transA, transB));
}
