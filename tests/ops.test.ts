import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import { lcg, nmse, refMatmul, roundBf16 } from './helpers.js';

describe('matmul', () => {
  const shapes: [number, number, number][] = [
    [1, 1, 1],
    [7, 97, 13],
    [97, 257, 33],
    [257, 97, 129],
    [33, 1025, 65],
  ];

  for (const [M, N, K] of shapes) {
    for (const [transA, transB] of [[false, false], [true, false], [false, true], [true, true]] as const) {
      it(`f32 ${M}x${N}x${K} transA=${transA} transB=${transB} matches a float64 reference`, () => {
        const a = lcg(M * K, M * 31 + K);
        const b = lcg(K * N, N * 17 + K);
        using ta = tk.tensor(a, transA ? [K, M] : [M, K]);
        using tb = tk.tensor(b, transB ? [N, K] : [K, N]);
        using c = tk.ops.matmul(ta, tb, { transA, transB });
        expect(c.shape).toEqual([M, N]);
        expect(nmse(c.toArraySync(), refMatmul(a, b, M, N, K, transA, transB))).toBeLessThan(1e-10);
      });
    }
  }

  it('bf16 inputs accumulate in fp32 and round the output once', () => {
    const [M, N, K] = [65, 97, 257];
    const a = roundBf16(lcg(M * K, 1));
    const b = roundBf16(lcg(K * N, 2));
    using ta = tk.tensor(a, [M, K], { dtype: 'bf16' });
    using tb = tk.tensor(b, [K, N], { dtype: 'bf16' });
    using c = tk.ops.matmul(ta, tb);
    expect(c.dtype).toBe('bf16');
    const ref = refMatmul(a, b, M, N, K);
    // Output rounding to bf16 (8 bits of mantissa) dominates: relative error ~ 2^-9 per element.
    const err = nmse(c.toArraySync(), ref);
    expect(err).toBeLessThan(2e-5);
    expect(err).toBeGreaterThan(0);
    // Accumulation is fp32: the same product read as f32 is exact to fp32 precision.
    using a32 = ta.to('f32');
    using b32 = tb.to('f32');
    using c32 = tk.ops.matmul(a32, b32);
    expect(nmse(c32.toArraySync(), ref)).toBeLessThan(1e-10);
  });

  it('batched with equal batch dims and with a shared 2-D operand', () => {
    const [B, M, N, K] = [3, 17, 19, 23];
    const a = lcg(B * M * K, 5);
    const b = lcg(B * K * N, 6);
    const w = lcg(K * N, 7);
    const v = lcg(K * 5, 8);
    using ta = tk.tensor(a, [B, M, K]);
    using tb = tk.tensor(b, [B, K, N]);
    using tw = tk.tensor(w, [K, N]);
    using tv = tk.tensor(v, [K, 5]);
    using c = tk.ops.matmul(ta, tb);
    using cw = tk.ops.matmul(ta, tw);
    using ct = tk.ops.matmul(tb, tv, { transA: true });
    expect(c.shape).toEqual([B, M, N]);
    expect(cw.shape).toEqual([B, M, N]);
    expect(ct.shape).toEqual([B, N, 5]);
    const got = c.toArraySync();
    const gotW = cw.toArraySync();
    const gotT = ct.toArraySync();
    for (let i = 0; i < B; i++) {
      const ai = a.subarray(i * M * K, (i + 1) * M * K);
      const bi = b.subarray(i * K * N, (i + 1) * K * N);
      expect(nmse(got.subarray(i * M * N, (i + 1) * M * N), refMatmul(ai, bi, M, N, K))).toBeLessThan(1e-10);
      expect(nmse(gotW.subarray(i * M * N, (i + 1) * M * N), refMatmul(ai, w, M, N, K))).toBeLessThan(1e-10);
      expect(nmse(gotT.subarray(i * N * 5, (i + 1) * N * 5), refMatmul(bi, v, N, 5, K, true))).toBeLessThan(1e-10);
    }
  });

  it('empty and degenerate sizes', () => {
    using a = tk.zeros([0, 4]);
    using b = tk.ones([4, 3]);
    using c = tk.ops.matmul(a, b);
    expect(c.shape).toEqual([0, 3]);
    using k0a = tk.ones([2, 0]);
    using k0b = tk.ones([0, 3]);
    using z = tk.ops.matmul(k0a, k0b);
    expect(Array.from(z.toArraySync())).toEqual([0, 0, 0, 0, 0, 0]);
  });
});

describe('elementwise and reductions', () => {
  it('add, sub and mul broadcast like numpy', () => {
    const a = lcg(3 * 97 * 5, 1);
    const b = lcg(97 * 1, 2);
    using ta = tk.tensor(a, [3, 97, 5]);
    using tb = tk.tensor(b, [97, 1]);
    using s = tk.ops.add(ta, tb);
    using d = tk.ops.sub(ta, tb);
    using m = tk.ops.mul(tb, ta);
    expect(s.shape).toEqual([3, 97, 5]);
    const [vs, vd, vm] = [s.toArraySync(), d.toArraySync(), m.toArraySync()];
    for (let i = 0; i < 3; i++)
      for (let j = 0; j < 97; j++)
        for (let k = 0; k < 5; k++) {
          const idx = (i * 97 + j) * 5 + k;
          expect(vs[idx]).toBe(Math.fround(a[idx]! + b[j]!));
          expect(vd[idx]).toBe(Math.fround(a[idx]! - b[j]!));
          expect(vm[idx]).toBe(Math.fround(a[idx]! * b[j]!));
        }
  });

  it('integer add and mul stay integers', () => {
    using a = tk.tensor(new Int32Array([1, 2, 3]), [3]);
    using b = tk.tensor(new Int32Array([10]), [1]);
    using s = tk.ops.add(a, b);
    using m = tk.ops.mul(a, b);
    expect(s.dtype).toBe('i32');
    expect(Array.from(s.toArraySync())).toEqual([11, 12, 13]);
    expect(Array.from(m.toArraySync())).toEqual([10, 20, 30]);
  });

  it('scale multiplies by a constant', () => {
    using a = tk.tensor([1, -2, 3.5]);
    using s = tk.ops.scale(a, -0.5);
    expect(Array.from(s.toArraySync())).toEqual([-0.5, 1, -1.75]);
  });

  it('sum over every axis subset of a rank-3 tensor matches a float64 reference', () => {
    const [A, B, C] = [5, 97, 7];
    const x = lcg(A * B * C, 9);
    using t = tk.tensor(x, [A, B, C]);
    const subsets: number[][] = [[0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2], [-1], [-3, -1]];
    for (const axes of subsets) {
      const norm = axes.map((a) => (a < 0 ? a + 3 : a));
      using s = tk.ops.sum(t, { axis: axes });
      using k = tk.ops.sum(t, { axis: axes, keepdim: true });
      const dims = [A, B, C];
      const outDims = dims.map((d, i) => (norm.includes(i) ? 1 : d));
      expect(k.shape).toEqual(outDims);
      expect(s.shape).toEqual(dims.filter((_, i) => !norm.includes(i)));
      const ref = new Float64Array(outDims.reduce((p, q) => p * q, 1));
      for (let i = 0; i < A; i++)
        for (let j = 0; j < B; j++)
          for (let l = 0; l < C; l++) {
            const o = [i, j, l].map((v, ax) => (norm.includes(ax) ? 0 : v));
            ref[(o[0]! * outDims[1]! + o[1]!) * outDims[2]! + o[2]!] += x[(i * B + j) * C + l]!;
          }
      // fp32 accumulation with cancellation (values in [-1, 1) summing near 0) bounds this, not rounding.
      expect(nmse(s.toArraySync(), ref)).toBeLessThan(1e-10);
      expect(nmse(k.toArraySync(), ref)).toBeLessThan(1e-10);
    }
    using all = tk.ops.sum(t);
    expect(all.shape).toEqual([]);
  });

  it('permute and transpose make contiguous copies', () => {
    const x = lcg(2 * 3 * 4, 4);
    using t = tk.tensor(x, [2, 3, 4]);
    using p = tk.ops.permute(t, [2, 0, 1]);
    using tr = tk.ops.transpose(t);
    expect(p.shape).toEqual([4, 2, 3]);
    expect(tr.shape).toEqual([2, 4, 3]);
    const vp = p.toArraySync();
    const vt = tr.toArraySync();
    for (let i = 0; i < 2; i++)
      for (let j = 0; j < 3; j++)
        for (let k = 0; k < 4; k++) {
          expect(vp[(k * 2 + i) * 3 + j]).toBe(x[(i * 3 + j) * 4 + k]);
          expect(vt[(i * 4 + k) * 3 + j]).toBe(x[(i * 3 + j) * 4 + k]);
        }
  });
});

describe('work is queued in order', () => {
  it('a chain of dependent ops yields the value of running them in sequence', async () => {
    using x = tk.ones([64, 64]);
    let y = tk.ops.scale(x, 0.5);
    for (let i = 0; i < 20; i++) {
      const prev = y;
      y = tk.tidy(() => tk.ops.scale(tk.ops.add(tk.ops.matmul(prev, x), prev), 1 / 65));
      prev.dispose();
    }
    // Each step maps a constant c to (64c + c)/65 = c: the value stays 0.5 exactly up to rounding.
    const v = await y.toArray();
    expect(Math.max(...Array.from(v, (e) => Math.abs(e - 0.5)))).toBeLessThan(1e-5);
    y.dispose();
  });
});
