// Fused attention and the losses, against plain float64 JavaScript references.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import { lcg, nmse } from './helpers.js';

interface AttnCase { B: number; T: number; S: number; H: number; Hkv: number; D: number; causal: boolean; scale?: number; seg?: Int32Array }

function refAttention(q: Float32Array, k: Float32Array, v: Float32Array, c: AttnCase): Float64Array {
  const { B, T, S, H, Hkv, D, causal } = c;
  const scale = c.scale ?? 1 / Math.sqrt(D);
  const out = new Float64Array(B * T * H * D);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const hk = Math.floor(h / (H / Hkv));
      for (let t = 0; t < T; t++) {
        const scores: number[] = [];
        for (let s = 0; s < S; s++) {
          const visible = (!causal || s <= t + (S - T)) && (!c.seg || c.seg[b * T + t] === c.seg[b * S + s]);
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[((b * T + t) * H + h) * D + d]! * k[((b * S + s) * Hkv + hk) * D + d]!;
          scores.push(visible ? dot * scale : -Infinity);
        }
        const m = Math.max(...scores);
        if (m === -Infinity) continue; // no visible key: zeros
        const w = scores.map((x) => Math.exp(x - m));
        const z = w.reduce((a, x) => a + x, 0);
        for (let s = 0; s < S; s++)
          for (let d = 0; d < D; d++) out[((b * T + t) * H + h) * D + d] += (w[s]! / z) * v[((b * S + s) * Hkv + hk) * D + d]!;
      }
    }
  return out;
}

describe('attention', () => {
  const cases: AttnCase[] = [
    { B: 1, T: 7, S: 7, H: 2, Hkv: 2, D: 8, causal: true },
    { B: 2, T: 5, S: 13, H: 4, Hkv: 2, D: 16, causal: true },
    { B: 1, T: 9, S: 9, H: 3, Hkv: 1, D: 72, causal: false, scale: 0.3 },
    { B: 1, T: 10, S: 10, H: 2, Hkv: 1, D: 8, causal: true, seg: new Int32Array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2]) },
  ];
  for (const c of cases) {
    it(`B=${c.B} T=${c.T} S=${c.S} H=${c.H}/${c.Hkv} D=${c.D} causal=${c.causal}${c.seg ? ' segments' : ''}`, () => {
      const q = lcg(c.B * c.T * c.H * c.D, 1);
      const k = lcg(c.B * c.S * c.Hkv * c.D, 2);
      const v = lcg(c.B * c.S * c.Hkv * c.D, 3);
      using tq = tk.tensor(q, [c.B, c.T, c.H, c.D]);
      using tkk = tk.tensor(k, [c.B, c.S, c.Hkv, c.D]);
      using tv = tk.tensor(v, [c.B, c.S, c.Hkv, c.D]);
      using seg = c.seg ? tk.tensor(c.seg, [c.B, c.T]) : undefined;
      using o = tk.ops.attention(tq, tkk, tv, { causal: c.causal, scale: c.scale, segmentIds: seg });
      expect(o.shape).toEqual([c.B, c.T, c.H, c.D]);
      expect(nmse(o.toArraySync(), refAttention(q, k, v, c))).toBeLessThan(1e-10);
    });
  }

  it('rejects bad shapes by name', () => {
    using q = tk.zeros([1, 4, 3, 8]);
    using k = tk.zeros([1, 4, 2, 8]);
    using k8 = tk.zeros([1, 4, 1, 4]);
    using seg = tk.zeros([1, 3], { dtype: 'i32' });
    expect(() => tk.ops.attention(q, k, k)).toThrow("attention: q's 3 heads must be a multiple of k's 2 heads (grouped-query attention)");
    expect(() => tk.ops.attention(q, k8, k8)).toThrow(/attention: q \[1, 4, 3, 8\] f32 on cpu and k \[1, 4, 1, 4\] f32 on cpu must agree on batch/);
    expect(() => tk.ops.attention(q, k8, k)).toThrow(/attention: k .* and v .* must have the same shape/);
    using k1 = tk.zeros([1, 4, 1, 8]);
    expect(() => tk.ops.attention(q, k1, k1, { segmentIds: seg })).toThrow(/attention: segmentIds \[1, 3\] i32 on cpu must be i32 \[1, 4\]/);
    expect(() => tk.ops.attention(q, k1, k1, { scale: -1 })).toThrow(/attention: scale must be a finite number > 0/);
  });
});

function logSumExp(row: ArrayLike<number>): number {
  let m = -Infinity;
  for (let i = 0; i < row.length; i++) m = Math.max(m, row[i]!);
  let z = 0;
  for (let i = 0; i < row.length; i++) z += Math.exp(row[i]! - m);
  return m + Math.log(z);
}

describe('losses', () => {
  it('crossEntropy with ignored targets and every reduction', () => {
    const [N, V] = [9, 1025];
    const logits = lcg(N * V, 4).map((x) => x * 6);
    const targets = new Int32Array([3, -100, 1024, 0, 7, -100, 500, 1, 2]);
    using tl = tk.tensor(logits, [3, 3, V]);
    using tt = tk.tensor(targets, [3, 3]);
    const per = Array.from(targets, (t, n) => (t === -100 ? 0 : logSumExp(logits.subarray(n * V, (n + 1) * V)) - logits[n * V + t]!));
    const kept = Array.from(targets).filter((t) => t !== -100).length;
    const total = per.reduce((a, b) => a + b, 0);
    using mean = tk.ops.crossEntropy(tl, tt);
    using sum = tk.ops.crossEntropy(tl, tt, { reduction: 'sum' });
    using none = tk.ops.crossEntropy(tl, tt, { reduction: 'none' });
    expect(mean.shape).toEqual([]);
    expect(none.shape).toEqual([3, 3]);
    expect(mean.toArraySync()[0]).toBeCloseTo(total / kept, 5);
    expect(sum.toArraySync()[0]).toBeCloseTo(total, 4);
    expect(nmse(none.toArraySync(), per)).toBeLessThan(1e-12);
    using allIgnored = tk.tensor(new Int32Array(9).fill(-100), [3, 3]);
    using zero = tk.ops.crossEntropy(tl, allIgnored);
    expect(zero.toArraySync()[0]).toBe(0);
  });

  it('sequenceLogprobs sums log p(target) per sequence', () => {
    const [B, T, V] = [2, 4, 33];
    const logits = lcg(B * T * V, 5).map((x) => x * 3);
    const targets = new Int32Array([1, 2, 3, -100, 32, 0, -100, -100]);
    using tl = tk.tensor(logits, [B, T, V]);
    using tt = tk.tensor(targets, [B, T]);
    using lp = tk.ops.sequenceLogprobs(tl, tt);
    const ref = [0, 0];
    for (let b = 0; b < B; b++)
      for (let t = 0; t < T; t++) {
        const n = b * T + t;
        if (targets[n] === -100) continue;
        ref[b] += logits[n * V + targets[n]!]! - logSumExp(logits.subarray(n * V, (n + 1) * V));
      }
    expect(nmse(lp.toArraySync(), ref)).toBeLessThan(1e-12);
  });

  it('dpoLoss: sigmoid with label smoothing, ipo and hinge, as in TRL', () => {
    const pc = [-5, -7.5, -3], pr = [-6, -7, -9], rc = [-5.5, -7, -4], rr = [-5.8, -7.2, -8];
    using a = tk.tensor(pc), b = tk.tensor(pr), c = tk.tensor(rc), d = tk.tensor(rr);
    const beta = 0.5;
    const logits = pc.map((_, i) => pc[i]! - pr[i]! - (rc[i]! - rr[i]!));
    const logSig = (x: number) => -Math.log1p(Math.exp(-x));
    const kinds = {
      sigmoid: logits.map((l) => -logSig(beta * l) * 0.9 - logSig(-beta * l) * 0.1),
      ipo: logits.map((l) => (l - 1 / (2 * beta)) ** 2),
      hinge: logits.map((l) => Math.max(0, 1 - beta * l)),
    };
    for (const [kind, losses] of Object.entries(kinds)) {
      const r = tk.ops.dpoLoss(a, b, c, d, { beta, kind: kind as 'sigmoid', labelSmoothing: kind === 'sigmoid' ? 0.1 : 0 });
      try {
        expect(r.loss.shape).toEqual([]);
        expect(r.loss.toArraySync()[0]).toBeCloseTo(losses.reduce((x, y) => x + y, 0) / 3, 5);
        expect(nmse(r.chosenRewards.toArraySync(), pc.map((x, i) => beta * (x - rc[i]!)))).toBeLessThan(1e-12);
        expect(nmse(r.rejectedRewards.toArraySync(), pr.map((x, i) => beta * (x - rr[i]!)))).toBeLessThan(1e-12);
      } finally {
        r.loss.dispose();
        r.chosenRewards.dispose();
        r.rejectedRewards.dispose();
      }
    }
  });

  it('rejects bad input by name', () => {
    using logits = tk.zeros([2, 5]);
    using t3 = tk.zeros([3], { dtype: 'i32' });
    using tf = tk.zeros([2]);
    using v = tk.zeros([2]);
    using v3 = tk.zeros([3]);
    expect(() => tk.ops.crossEntropy(logits, t3)).toThrow("crossEntropy: targets [3] i32 on cpu must have logits' shape without the vocabulary axis, [2]");
    expect(() => tk.ops.crossEntropy(logits, tf)).toThrow(/crossEntropy: targets \[2\] f32 on cpu must be i32/);
    expect(() => tk.ops.crossEntropy(logits, t3, { reduction: 'avg' as 'mean' })).toThrow(/crossEntropy: reduction must be/);
    expect(() => tk.ops.sequenceLogprobs(logits, t3)).toThrow(/sequenceLogprobs: logits \[2, 5\] f32 on cpu must be \[B, T, V\]/);
    expect(() => tk.ops.dpoLoss(v, v3, v, v)).toThrow(/dpoLoss: policyRejected \[3\] f32 on cpu must be f32 \[B\] like policyChosen/);
    expect(() => tk.ops.dpoLoss(v, v, v, v, { beta: 0 })).toThrow(/dpoLoss: beta must be a finite number > 0/);
    expect(() => tk.ops.dpoLoss(v, v, v, v, { labelSmoothing: 0.7 })).toThrow(/dpoLoss: labelSmoothing must be in \[0, 0.5\]/);
  });
});

describe('distillLoss', () => {
  const [N, V] = [5, 33];
  const s = lcg(N * V, 21).map((x) => x * 4);
  const t = lcg(N * V, 22).map((x) => x * 4);
  const logSoftmax = (z: Float32Array, n: number, T: number) => {
    const row = Array.from(z.subarray(n * V, (n + 1) * V), (x) => x / T);
    const lse = logSumExp(row);
    return row.map((x) => x - lse);
  };
  const targets = new Int32Array([1, -100, 3, 4, -100]);

  function reference(kind: string, T: number, beta: number, useTargets: boolean): number {
    let total = 0;
    let rows = 0;
    for (let n = 0; n < N; n++) {
      if (useTargets && targets[n] === -100) continue;
      const ls = logSoftmax(s, n, T), lt = logSoftmax(t, n, T);
      let d = 0;
      for (let i = 0; i < V; i++) {
        const ps = Math.exp(ls[i]!), pt = Math.exp(lt[i]!);
        const m = beta * pt + (1 - beta) * ps;
        if (kind === 'forward_kl') d += pt * (lt[i]! - ls[i]!);
        else if (kind === 'reverse_kl') d += ps * (ls[i]! - lt[i]!);
        else d += beta * pt * (lt[i]! - Math.log(m)) + (1 - beta) * ps * (ls[i]! - Math.log(m));
      }
      total += T * T * d;
      rows++;
    }
    return rows ? total / rows : 0;
  }

  for (const [kind, T, beta, useTargets] of [['forward_kl', 1, 0.5, false], ['reverse_kl', 2, 0.5, true], ['jsd', 2, 0.3, true]] as const) {
    it(`${kind} at temperature ${T}${useTargets ? ' with ignored rows' : ''}`, () => {
      using ts = tk.tensor(s, [N, V]);
      using tt = tk.tensor(t, [N, V]);
      using tg = tk.tensor(targets, [N]);
      using loss = tk.ops.distillLoss(ts, tt, { kind, temperature: T, beta, targets: useTargets ? tg : undefined });
      expect(loss.shape).toEqual([]);
      const ref = reference(kind, T, beta, useTargets);
      expect(Math.abs(loss.toArraySync()[0]! - ref) / Math.abs(ref)).toBeLessThan(1e-5);
    });
  }

  it('names a teacher with another vocabulary and bad options', () => {
    using a = tk.zeros([2, 5]);
    using b = tk.zeros([2, 6]);
    expect(() => tk.ops.distillLoss(a, b)).toThrow(/distillLoss: student \[2, 5\] f32 on cpu and teacher \[2, 6\] f32 on cpu must have the same shape/);
    expect(() => tk.ops.distillLoss(a, a, { temperature: 0 })).toThrow(/distillLoss: temperature must be a finite number > 0/);
    expect(() => tk.ops.distillLoss(a, a, { kind: 'kl' as 'jsd' })).toThrow(/distillLoss: kind must be/);
  });
});
