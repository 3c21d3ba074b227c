// qloraLinear (NF4 dequantized inside the GEMM) against the same computation spelled out with
// nf4.dequantize, matmul and dropout: values, gradients, the shared dropout mask, bad input.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { Tensor } from '../lib/index.js';
import { lcg, nmse } from './helpers.js';

function grads(f: () => Tensor, params: Tensor[]): Float32Array[] {
  for (const p of params) p.grad = null;
  tk.tidy(() => {
    const y = f();
    y.backward(tk.tensor(lcg(y.size, 77), [...y.shape], { dtype: y.dtype }));
  });
  return params.map((p) => p.grad!.toArraySync() as Float32Array);
}

describe('qloraLinear', () => {
  for (const [dtype, doubleQuant, p] of [['f32', true, 0], ['f32', false, 0.3], ['bf16', true, 0.2]] as const) {
    it(`${dtype}, double quantization ${doubleQuant}, dropout ${p}: equals dequantize + matmul + LoRA`, () => {
      tk.tidy(() => {
        const [N, IN, OUT, R] = [7, 130, 33, 4];
        const w = tk.tensor(lcg(OUT * IN, 1), [OUT, IN]);
        const q = tk.nf4.quantize(w, { doubleQuant });
        const x = tk.tensor(lcg(2 * N * IN, 2), [2, N, IN], { dtype, requiresGrad: true });
        const a = tk.tensor(lcg(R * IN, 3), [R, IN], { dtype, requiresGrad: true });
        const b = tk.tensor(lcg(OUT * R, 4), [OUT, R], { dtype, requiresGrad: true });
        const scale = 1.75;
        const seed = 1234;
        const fused = () => tk.ops.qloraLinear(x, q, a, b, { scale, dropout: p, seed });
        const spelled = () => {
          const deq = tk.nf4.dequantize(q, { dtype });
          const base = tk.ops.matmul(x, deq, { transB: true });
          const h = tk.ops.matmul(p > 0 ? tk.ops.dropout(x, { p, seed }) : x, a, { transB: true });
          return tk.ops.add(base, tk.ops.scale(tk.ops.matmul(h, b, { transB: true }), scale));
        };
        const tol = dtype === 'f32' ? 1e-10 : 1e-4;
        expect(nmse(fused().toArraySync(), spelled().toArraySync())).toBeLessThan(tol);
        const gf = grads(fused, [x, a, b]);
        const gs = grads(spelled, [x, a, b]);
        gf.forEach((g, i) => expect(nmse(g, gs[i]!), ['dx', 'dA', 'dB'][i]).toBeLessThan(dtype === 'f32' ? 1e-10 : 1e-3));
        q.dispose();
      });
    });
  }

  it('leaves the frozen input without a gradient when it does not need one', () => {
    tk.tidy(() => {
      const q = tk.nf4.quantize(tk.tensor(lcg(64 * 16, 5), [16, 64]));
      const x = tk.tensor(lcg(3 * 64, 6), [3, 64]);
      const a = tk.tensor(lcg(2 * 64, 7), [2, 64], { requiresGrad: true });
      const b = tk.zeros([16, 2], { requiresGrad: true });
      tk.ops.sum(tk.ops.qloraLinear(x, q, a, b)).backward();
      expect(x.grad).toBeNull();
      expect(a.grad).not.toBeNull();
      // B = 0: A's gradient is zero, B's is not.
      expect(Math.max(...a.grad!.toArraySync().map(Math.abs))).toBe(0);
      expect(Math.max(...b.grad!.toArraySync().map(Math.abs))).toBeGreaterThan(0);
      q.dispose();
    });
  });

  it('rejects shapes that do not fit the weight, by name', () => {
    tk.tidy(() => {
      const q = tk.nf4.quantize(tk.zeros([16, 64]));
      const a = tk.zeros([2, 64]);
      const b = tk.zeros([16, 2]);
      expect(() => tk.ops.qloraLinear(tk.zeros([3, 60]), q, a, b)).toThrow(/x \[3, 60\] .* must end in W's input size 64/);
      expect(() => tk.ops.qloraLinear(tk.zeros([3, 64]), q, tk.zeros([2, 60]), b)).toThrow(/loraA \[2, 60\] .* must be \[r, 64\]/);
      expect(() => tk.ops.qloraLinear(tk.zeros([3, 64]), q, a, tk.zeros([15, 2]))).toThrow(/loraB \[15, 2\] .* must be \[16, 2\]/);
      expect(() => tk.ops.qloraLinear(tk.zeros([3, 64]), q, a, b, { dropout: 1 })).toThrow(/dropout must be in \[0, 1\)/);
      q.dispose();
    });
  });
});
