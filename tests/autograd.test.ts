// Autograd: every differentiable op's backward rule against central finite differences of its
// forward pass (float64 sums on the JavaScript side), plus the tape's own behaviour: accumulation,
// noGrad, checkpoint, graph freeing, and the optimizer against a float64 AdamW.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { Tensor } from '../lib/index.js';
import { lcg } from './helpers.js';

interface Input {
  data: Float32Array;
  shape: number[];
  /** Checked against finite differences (default true). */
  grad?: boolean;
}

const input = (shape: number[], seed: number, grad = true, scale = 1): Input => {
  const n = shape.reduce((a, b) => a * b, 1);
  return { data: lcg(n, seed).map((x) => x * scale), shape, grad };
};

/**
 * Checks d sum(f(x) * R) / dx from backward() against central differences at `samples` random
 * elements of each differentiable input. Tolerance: |ad - fd| <= tol * (max |ad| of the tensor).
 */
function gradCheck(f: (xs: Tensor[]) => Tensor, inputs: Input[], { h = 1e-2, tol = 2e-2, samples = 6 } = {}): void {
  tk.tidy(() => {
    const xs = inputs.map((x) => tk.tensor(x.data, x.shape, { requiresGrad: x.grad !== false }));
    const out = f(xs);
    const r = lcg(out.size, 999);
    const rt = tk.tensor(r, [...out.shape]);
    out.backward(rt);
    const objective = (values: Float32Array[]): number =>
      tk.tidy(() =>
        tk.noGrad(() => {
          const y = f(values.map((v, i) => tk.tensor(v, inputs[i]!.shape))).toArraySync();
          let s = 0;
          for (let i = 0; i < y.length; i++) s += y[i]! * r[i]!;
          return s;
        }),
      );
    inputs.forEach((x, k) => {
      if (x.grad === false) {
        expect(xs[k]!.grad).toBeNull();
        return;
      }
      const ad = xs[k]!.grad!.toArraySync();
      expect(ad.length).toBe(x.data.length);
      let maxAd = 0;
      for (const v of ad) maxAd = Math.max(maxAd, Math.abs(v));
      const picks = lcg(samples, 17 + k).map((u) => Math.floor(((u + 1) / 2) * x.data.length));
      for (const i of picks) {
        const plus = inputs.map((y) => y.data.slice());
        const minus = inputs.map((y) => y.data.slice());
        plus[k]![i]! += h;
        minus[k]![i]! -= h;
        const fd = (objective(plus) - objective(minus)) / (2 * h);
        expect(Math.abs(ad[i]! - fd), `input ${k} element ${i}: autograd ${ad[i]} vs finite difference ${fd}`).toBeLessThanOrEqual(tol * Math.max(maxAd, 1e-3));
      }
    });
  });
}

describe('backward rules against finite differences', () => {
  it('matmul: every transpose combination, batched and broadcast operands', () => {
    for (const [transA, transB] of [[false, false], [true, false], [false, true], [true, true]] as const) {
      gradCheck(([a, b]) => tk.ops.matmul(a!, b!, { transA, transB }), [input(transA ? [5, 3] : [3, 5], 1), input(transB ? [4, 5] : [5, 4], 2)]);
      gradCheck(([a, b]) => tk.ops.matmul(a!, b!, { transA, transB }), [input(transA ? [2, 5, 3] : [2, 3, 5], 3), input(transB ? [2, 4, 5] : [2, 5, 4], 4)]);
    }
    // A linear layer: x [B, T, K] against a shared weight [N, K].
    gradCheck(([x, w]) => tk.ops.matmul(x!, w!, { transB: true }), [input([2, 3, 6], 5), input([4, 6], 6)]);
    gradCheck(([x, w]) => tk.ops.matmul(x!, w!, { transA: true }), [input([2, 6, 3], 7), input([6, 4], 8)]);
    // A shared left operand.
    gradCheck(([a, b]) => tk.ops.matmul(a!, b!), [input([3, 5], 9), input([2, 5, 4], 10)]);
  });

  it('add, sub, mul with broadcasting; scale; sum; broadcastTo', () => {
    gradCheck(([a, b]) => tk.ops.add(a!, b!), [input([2, 3, 4], 11), input([3, 1], 12)]);
    gradCheck(([a, b]) => tk.ops.sub(a!, b!), [input([4], 13), input([2, 3, 4], 14)]);
    gradCheck(([a, b]) => tk.ops.mul(a!, b!), [input([2, 1, 4], 15), input([3, 1], 16)]);
    gradCheck(([a]) => tk.ops.mul(a!, a!), [input([5], 17)]);
    gradCheck(([a]) => tk.ops.scale(a!, -2.5), [input([3, 2], 18)]);
    gradCheck(([a]) => tk.ops.sum(a!, { axis: [0, 2] }), [input([2, 3, 4], 19)]);
    gradCheck(([a]) => tk.ops.sum(a!, { axis: -1, keepdim: true }), [input([2, 3, 4], 20)]);
    gradCheck(([a]) => tk.ops.sum(a!), [input([2, 3], 21)]);
    gradCheck(([a]) => tk.ops.broadcastTo(a!, [2, 3, 4]), [input([3, 1], 22)]);
  });

  it('reshape, permute, transpose, cast', () => {
    gradCheck(([a]) => tk.ops.mul(a!.reshape([6, 4]), a!.reshape([6, 4])), [input([2, 3, 4], 23)]);
    gradCheck(([a]) => tk.ops.permute(a!, [2, 0, 1]), [input([2, 3, 4], 24)]);
    gradCheck(([a]) => tk.ops.transpose(a!, 0, 1), [input([2, 3, 4], 25)]);
    // Through bf16 and back: the gradient of a cast is the cast back (finite differences see bf16
    // rounding, so the step is large and the tolerance loose).
    gradCheck(([a]) => tk.ops.scale(a!.to('bf16'), 2).to('f32'), [input([8], 26)], { h: 0.25, tol: 0.05 });
  });

  it('rmsNorm, swiglu, embedding (repeated ids)', () => {
    gradCheck(([x, w]) => tk.ops.rmsNorm(x!, w!, { eps: 1e-5 }), [input([3, 7], 27), input([7], 28)]);
    gradCheck(([g, u]) => tk.ops.swiglu(g!, u!), [input([4, 5], 29, true, 3), input([4, 5], 30)]);
    const ids = tk.tensor(new Int32Array([2, 0, 2, 4, 2]), [5]);
    gradCheck(([t]) => tk.ops.embedding(ids, t!), [input([6, 3], 31)]);
    ids.dispose();
  });

  it('rope with per-row positions and a scaling type', () => {
    const pos = tk.tensor(new Int32Array([0, 1, 2, 7, 3, 4, 0, 1]), [2, 4]);
    gradCheck(([x]) => tk.ops.rope(x!, { theta: 500000, positions: pos }), [input([2, 4, 3, 6], 32)]);
    gradCheck(([x]) => tk.ops.rope(x!, { scaling: { ropeType: 'yarn', factor: 4, originalMaxPositionEmbeddings: 2 } }), [input([1, 5, 2, 8], 33)]);
    pos.dispose();
  });

  it('attention: causal GQA, segment ids, S > T', () => {
    gradCheck(([q, k, v]) => tk.ops.attention(q!, k!, v!), [input([2, 5, 4, 8], 34), input([2, 5, 2, 8], 35), input([2, 5, 2, 8], 36)]);
    const seg = tk.tensor(new Int32Array([0, 0, 1, 1, 1, 0, 0, 0, 0, 2]), [2, 5]);
    gradCheck(([q, k, v]) => tk.ops.attention(q!, k!, v!, { segmentIds: seg, scale: 0.5 }), [input([2, 5, 2, 4], 37), input([2, 5, 1, 4], 38), input([2, 5, 1, 4], 39)]);
    seg.dispose();
    gradCheck(([q, k, v]) => tk.ops.attention(q!, k!, v!, { causal: true }), [input([1, 3, 2, 4], 40), input([1, 6, 2, 4], 41), input([1, 6, 2, 4], 42)]);
  });

  it('crossEntropy (mean with ignored targets, none), sequenceLogprobs', () => {
    const targets = tk.tensor(new Int32Array([1, -100, 4, 0, 6, 2]), [2, 3]);
    gradCheck(([l]) => tk.ops.crossEntropy(l!, targets), [input([2, 3, 7], 43, true, 3)]);
    gradCheck(([l]) => tk.ops.crossEntropy(l!, targets, { reduction: 'none' }), [input([2, 3, 7], 44, true, 3)]);
    gradCheck(([l]) => tk.ops.crossEntropy(l!, targets, { reduction: 'sum' }), [input([2, 3, 7], 45, true, 3)]);
    gradCheck(([l]) => tk.ops.sequenceLogprobs(l!, targets), [input([2, 3, 7], 46, true, 3)]);
    targets.dispose();
  });

  it('dpoLoss in the policy log-probs; distillLoss in the student logits', () => {
    const rc = tk.tensor(lcg(4, 47), [4]);
    const rr = tk.tensor(lcg(4, 48), [4]);
    for (const kind of ['sigmoid', 'ipo', 'hinge'] as const) {
      gradCheck(([pc, pr]) => tk.ops.dpoLoss(pc!, pr!, rc, rr, { kind, beta: 0.5, labelSmoothing: kind === 'sigmoid' ? 0.1 : 0 }).loss, [input([4], 49, true, 2), input([4], 50, true, 2)], { h: 1e-3 });
    }
    rc.dispose();
    rr.dispose();
    const targets = tk.tensor(new Int32Array([1, -100, 3]), [3]);
    for (const kind of ['forward_kl', 'reverse_kl', 'jsd'] as const) {
      gradCheck(([s, t]) => tk.ops.distillLoss(s!, t!, { kind, temperature: 2, beta: 0.3, targets }), [input([3, 9], 51, true, 3), input([3, 9], 52, false, 3)]);
    }
    targets.dispose();
  });

  it('a small network: shared weights used twice, the gradients sum', () => {
    gradCheck(
      ([x, w1, w2, g]) => {
        const h = tk.ops.swiglu(tk.ops.matmul(x!, w1!, { transB: true }), tk.ops.matmul(x!, w1!, { transB: true }));
        const y = tk.ops.rmsNorm(tk.ops.matmul(h, w2!, { transB: true }), g!);
        return tk.ops.mul(y, tk.ops.add(y, x!));
      },
      [input([2, 3, 6], 53), input([5, 6], 54), input([6, 5], 55), input([6], 56)],
    );
  });
});

describe('the tape', () => {
  it('accumulates gradients over backward calls until they are cleared', () => {
    tk.tidy(() => {
      const w = tk.tensor([1, 2, 3], [3], { requiresGrad: true });
      const x = tk.tensor([4, 5, 6], [3]);
      tk.ops.sum(tk.ops.mul(w, x)).backward();
      expect([...w.grad!.toArraySync()]).toEqual([4, 5, 6]);
      tk.ops.sum(tk.ops.mul(w, x)).backward();
      expect([...w.grad!.toArraySync()]).toEqual([8, 10, 12]);
      w.grad = null;
      tk.ops.sum(tk.ops.scale(w, 3)).backward();
      expect([...w.grad!.toArraySync()]).toEqual([3, 3, 3]);
      expect(x.grad).toBeNull();
    });
  });

  it('records nothing under noGrad, and says so on backward', () => {
    tk.tidy(() => {
      const w = tk.tensor([1, 2], [2], { requiresGrad: true });
      const y = tk.noGrad(() => tk.ops.sum(tk.ops.mul(w, w)));
      expect(y.requiresGrad).toBe(false);
      expect(tk.isGradEnabled()).toBe(true);
      expect(() => y.backward()).toThrow(/does not require a gradient/);
    });
  });

  it('noGrad holds across await in async code', async () => {
    await tk.scope(async () => {
      const w = tk.tensor([1, 2], [2], { requiresGrad: true });
      const y = await tk.noGrad(async () => {
        await new Promise((r) => setTimeout(r, 1));
        expect(tk.isGradEnabled()).toBe(false);
        return tk.ops.scale(w, 2);
      });
      expect(y.requiresGrad).toBe(false);
    });
  });

  it('a second backward through a consumed graph is an error that says why', () => {
    tk.tidy(() => {
      const w = tk.tensor([1, 2], [2], { requiresGrad: true });
      const loss = tk.ops.sum(tk.ops.mul(w, w));
      loss.backward();
      expect(() => loss.backward()).toThrow(/freed by an earlier backward/);
    });
  });

  it('needs an explicit gradient for a non-scalar, and a matching one', () => {
    tk.tidy(() => {
      const w = tk.tensor([1, 2], [2], { requiresGrad: true });
      const y = tk.ops.scale(w, 2);
      expect(() => y.backward()).toThrow(/pass its gradient explicitly/);
      expect(() => y.backward(tk.tensor([1, 2, 3], [3]))).toThrow(/must match/);
      expect(() => {
        y.requiresGrad = false;
      }).toThrow(/leaf tensors/);
      expect(() => tk.tensor(new Int32Array([1]), [1], { requiresGrad: true })).toThrow(/floating/);
    });
  });

  it('frees a graph that is dropped without backward, even after its intermediates were disposed', () => {
    const before = tk.memory().cpu!;
    const w = tk.tensor(lcg(64, 1), [8, 8], { requiresGrad: true });
    const loss = tk.tidy(() => {
      const h = tk.ops.matmul(w, w);
      return tk.ops.sum(tk.ops.mul(h, h));
    });
    // The intermediates' scope is closed, but the graph still holds what backward needs.
    expect(tk.memory().cpu!.tensors).toBeGreaterThan(before.tensors + 2);
    loss.dispose();
    expect(tk.memory().cpu!.tensors).toBe(before.tensors + 1);
    w.dispose();
  });

  it('backward works after the scope that made the intermediates closed', () => {
    tk.tidy(() => {
      const w = tk.tensor([1, 2, 3], [3], { requiresGrad: true });
      const loss = tk.tidy(() => tk.ops.sum(tk.ops.mul(tk.ops.scale(w, 2), w)));
      loss.backward();
      expect([...w.grad!.toArraySync()]).toEqual([4, 8, 12]);
    });
  });

  it('checkpoint gives the same gradients as the plain graph and keeps fewer tensors', () => {
    tk.tidy(() => {
      const w1 = tk.tensor(lcg(48, 2), [8, 6], { requiresGrad: true });
      const w2 = tk.tensor(lcg(48, 3), [6, 8], { requiresGrad: true });
      const x = tk.tensor(lcg(24, 4), [4, 6], { requiresGrad: true });
      const block = (h: Tensor) => tk.ops.matmul(tk.ops.swiglu(tk.ops.matmul(h, w1, { transB: true }), tk.ops.matmul(h, w1, { transB: true })), w2, { transB: true });
      const plain = tk.ops.sum(tk.ops.mul(block(block(x)), block(x)));
      plain.backward();
      const want = [x, w1, w2].map((t) => t.grad!.toArraySync());
      for (const t of [x, w1, w2]) t.grad = null;

      const live = tk.memory().cpu!.tensors;
      const y1 = tk.checkpoint(block, x);
      const y2 = tk.checkpoint(block, y1);
      const y3 = tk.checkpoint(block, x);
      const loss = tk.ops.sum(tk.ops.mul(y2, y3));
      // Three outputs, their three saved inputs, the product with its two saved operands and the
      // sum: no activation of any block.
      expect(tk.memory().cpu!.tensors - live).toBe(10);
      loss.backward();
      [x, w1, w2].forEach((t, i) => {
        const got = t.grad!.toArraySync();
        for (let j = 0; j < got.length; j++) expect(got[j]).toBeCloseTo(want[i]![j]!, 4);
      });
    });
  });

  it('checkpoint replays the same random seeds', () => {
    tk.tidy(() => {
      const w = tk.tensor(lcg(6, 5), [6], { requiresGrad: true });
      const noisy = (h: Tensor) => tk.ops.mul(h, tk.randn([6]));
      tk.manualSeed(42);
      tk.ops.sum(tk.ops.mul(noisy(w), w)).backward();
      const want = w.grad!.toArraySync();
      w.grad = null;
      tk.manualSeed(42);
      const y = tk.checkpoint(noisy, w);
      tk.randn([6]);  // draws between forward and backward must not shift the replay
      tk.ops.sum(tk.ops.mul(y, w)).backward();
      expect([...w.grad!.toArraySync()]).toEqual([...want]);
    });
  });
});

describe('optim', () => {
  it('AdamW matches a float64 reference over several steps, with gradScale', () => {
    tk.tidy(() => {
      const p0 = lcg(10, 61);
      const p = tk.tensor(p0, [10], { requiresGrad: true });
      const opt = new tk.optim.AdamW([p], { lr: 0.01, betas: [0.8, 0.95], eps: 1e-6, weightDecay: 0.1 });
      const ref = Float64Array.from(p0);
      const m = new Float64Array(10);
      const v = new Float64Array(10);
      for (let step = 1; step <= 4; step++) {
        const gradSrc = lcg(10, 70 + step);
        opt.zeroGrad();
        tk.ops.sum(tk.ops.mul(p, tk.tensor(gradSrc, [10]))).backward();  // grad = gradSrc
        opt.step({ gradScale: 0.5 });
        for (let i = 0; i < 10; i++) {
          const g = gradSrc[i]! * 0.5;
          m[i] = 0.8 * m[i]! + 0.2 * g;
          v[i] = 0.95 * v[i]! + 0.05 * g * g;
          const mh = m[i]! / (1 - 0.8 ** step);
          const vh = v[i]! / (1 - 0.95 ** step);
          ref[i] = ref[i]! * (1 - 0.01 * 0.1) - (0.01 * mh) / (Math.sqrt(vh) + 1e-6);
        }
      }
      const got = p.toArraySync();
      for (let i = 0; i < 10; i++) expect(got[i]).toBeCloseTo(ref[i]!, 5);
      expect(opt.stepCount).toBe(4);
      opt.dispose();
    });
  });

  it('clipGradNorm measures and scales like torch.nn.utils.clip_grad_norm_', () => {
    tk.tidy(() => {
      const a = tk.tensor([3, 0], [2], { requiresGrad: true });
      const b = tk.tensor([0, 0, 4], [3], { requiresGrad: true });
      tk.ops.add(tk.ops.sum(tk.ops.mul(a, a)), tk.ops.sum(tk.ops.mul(b, b))).backward();  // grads 2a, 2b: norm 10
      const norm = tk.optim.clipGradNorm([a, b], 5);
      expect(norm.toArraySync()[0]).toBeCloseTo(10, 5);
      const s = 5 / (10 + 1e-6);
      expect(a.grad!.toArraySync()[0]).toBeCloseTo(6 * s, 5);
      expect(b.grad!.toArraySync()[2]).toBeCloseTo(8 * s, 5);
      const again = tk.optim.clipGradNorm([a, b], 0);
      expect(again.toArraySync()[0]).toBeCloseTo(5, 4);
    });
  });

  it('rejects bad hyperparameters and parameters without gradients, by name', () => {
    tk.tidy(() => {
      const p = tk.tensor([1], [1], { requiresGrad: true });
      expect(() => new tk.optim.AdamW([p], { lr: -1 })).toThrow(/lr must be/);
      expect(() => new tk.optim.AdamW([p], { betas: [1, 0.9] })).toThrow(/betas\[0\]/);
      expect(() => new tk.optim.AdamW([tk.tensor([1], [1])])).toThrow(/does not require gradients/);
      expect(() => tk.optim.clipGradNorm([p], -1)).toThrow(/maxNorm/);
    });
  });
});
