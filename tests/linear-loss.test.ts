// The fused linear losses against the same losses on materialized logits (matmul + crossEntropy /
// distillLoss, themselves checked against PyTorch and float64 references): values and gradients.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { Tensor } from '../lib/index.js';
import { lcg, nmse } from './helpers.js';

function gradsOf(loss: () => Tensor, params: Tensor[]): { value: number; grads: Float32Array[] } {
  for (const p of params) p.grad = null;
  const value = tk.tidy(() => {
    const l = loss();
    l.backward();
    return l.toArraySync()[0]!;
  });
  return { value, grads: params.map((p) => p.grad!.toArraySync() as Float32Array) };
}

describe('linearCrossEntropy', () => {
  it('equals crossEntropy on materialized logits, value and gradients (mean, sum, ignored rows)', () => {
    tk.tidy(() => {
      const [B, T, D, V] = [2, 9, 17, 301];
      const h = tk.tensor(lcg(B * T * D, 1), [B, T, D], { requiresGrad: true });
      const w = tk.tensor(lcg(V * D, 2), [V, D], { requiresGrad: true });
      const y = Int32Array.from(lcg(B * T, 3), (u, i) => (i % 5 === 0 ? -100 : Math.floor(((u + 1) / 2) * V)));
      const targets = tk.tensor(y, [B, T]);
      for (const reduction of ['mean', 'sum'] as const) {
        const fused = gradsOf(() => tk.ops.scale(tk.ops.linearCrossEntropy(h, w, targets, { reduction }), 1.5), [h, w]);
        const plain = gradsOf(() => tk.ops.scale(tk.ops.crossEntropy(tk.ops.matmul(h, w, { transB: true }), targets, { reduction }), 1.5), [h, w]);
        expect(fused.value).toBeCloseTo(plain.value, 4);
        expect(nmse(fused.grads[0]!, plain.grads[0]!)).toBeLessThan(1e-10);
        expect(nmse(fused.grads[1]!, plain.grads[1]!)).toBeLessThan(1e-10);
      }
      // Without gradients it is a forward pass only.
      const l = tk.noGrad(() => tk.ops.linearCrossEntropy(h, w, targets));
      expect(l.requiresGrad).toBe(false);
    });
  });

  it('bf16 storage stays within bf16 rounding of the f32 result', () => {
    tk.tidy(() => {
      const [N, D, V] = [33, 16, 129];
      const h = tk.tensor(lcg(N * D, 4), [N, D]);
      const w = tk.tensor(lcg(V * D, 5), [V, D]);
      const targets = tk.tensor(Int32Array.from({ length: N }, (_, i) => (i * 37) % V), [N]);
      const f32 = tk.ops.linearCrossEntropy(h, w, targets).toArraySync()[0]!;
      const bf16 = tk.ops.linearCrossEntropy(h.to('bf16'), w.to('bf16'), targets).toArraySync()[0]!;
      expect(Math.abs(bf16 - f32) / f32).toBeLessThan(1e-2);
    });
  });

  it('rejects bad input by name', () => {
    tk.tidy(() => {
      const h = tk.zeros([4, 8]);
      const w = tk.zeros([10, 8]);
      expect(() => tk.ops.linearCrossEntropy(h, tk.zeros([10, 7]), tk.tensor(new Int32Array(4), [4]))).toThrow(/weight \[10, 7\] .* must be \[V, 8\]/);
      expect(() => tk.ops.linearCrossEntropy(h, w, tk.tensor(new Int32Array(3), [3]))).toThrow(/targets \[3\] .* must be i32 \[4\]/);
      expect(() => tk.ops.linearCrossEntropy(h, w, tk.tensor(new Int32Array(4), [4]), { reduction: 'none' as 'mean' })).toThrow(/reduction must be 'mean' or 'sum'/);
      const bad = tk.ops.linearCrossEntropy(h, w, tk.tensor(Int32Array.from([1, 2, 10, 3]), [4]));
      expect(() => bad.toArraySync()).toThrow(/target/);
    });
  });
});

describe('linearDistillLoss', () => {
  it('equals alpha CE + (1 - alpha) distillLoss on materialized logits', () => {
    tk.tidy(() => {
      const [N, Ds, Dt, V] = [13, 12, 20, 97];
      const sh = tk.tensor(lcg(N * Ds, 6), [N, Ds], { requiresGrad: true });
      const sw = tk.tensor(lcg(V * Ds, 7), [V, Ds], { requiresGrad: true });
      const th = tk.tensor(lcg(N * Dt, 8), [N, Dt]);
      const tw = tk.tensor(lcg(V * Dt, 9), [V, Dt]);
      const targets = tk.tensor(Int32Array.from({ length: N }, (_, i) => (i % 4 === 3 ? -100 : (i * 11) % V)), [N]);
      for (const [kind, alpha] of [['forward_kl', 0], ['reverse_kl', 0.3], ['jsd', 0.5]] as const) {
        const opts = { kind, beta: 0.4, temperature: 2, targets };
        const fused = gradsOf(() => tk.ops.linearDistillLoss(sh, sw, th, tw, { ...opts, alpha }), [sh, sw]);
        const plain = gradsOf(() => {
          const s = tk.ops.matmul(sh, sw, { transB: true });
          const t = tk.ops.matmul(th, tw, { transB: true });
          const kd = tk.ops.scale(tk.ops.distillLoss(s, t, opts), 1 - alpha);
          return alpha > 0 ? tk.ops.add(kd, tk.ops.scale(tk.ops.crossEntropy(s, targets), alpha)) : kd;
        }, [sh, sw]);
        expect(fused.value, kind).toBeCloseTo(plain.value, 5);
        expect(nmse(fused.grads[0]!, plain.grads[0]!), kind).toBeLessThan(1e-9);
        expect(nmse(fused.grads[1]!, plain.grads[1]!), kind).toBeLessThan(1e-9);
      }
    });
  });

  it('rejects a teacher with another vocabulary, and alpha without targets', () => {
    tk.tidy(() => {
      const sh = tk.zeros([3, 4]);
      const sw = tk.zeros([10, 4]);
      expect(() => tk.ops.linearDistillLoss(sh, sw, sh, tk.zeros([11, 4]))).toThrow(/student's vocabulary \(10\) differs from the teacher's \(11\)/);
      expect(() => tk.ops.linearDistillLoss(sh, sw, sh, sw, { alpha: 0.5 })).toThrow(/needs targets/);
    });
  });
});
