// Forward ops built on the CPU kernels, against plain float64 JavaScript references.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import { lcg, nmse, roundBf16 } from './helpers.js';

describe('rmsNorm, swiglu, embedding', () => {
  it('rmsNorm normalizes the last axis in fp32 and scales by weight', () => {
    const [N, D] = [7, 97];
    const x = lcg(N * D, 1);
    const w = lcg(D, 2);
    using tx = tk.tensor(x, [N, D]);
    using tw = tk.tensor(w, [D]);
    using y = tk.ops.rmsNorm(tx, tw, { eps: 1e-5 });
    const ref = new Float64Array(N * D);
    for (let n = 0; n < N; n++) {
      let ms = 0;
      for (let d = 0; d < D; d++) ms += x[n * D + d]! ** 2;
      const r = 1 / Math.sqrt(ms / D + 1e-5);
      for (let d = 0; d < D; d++) ref[n * D + d] = x[n * D + d]! * r * w[d]!;
    }
    expect(y.shape).toEqual([N, D]);
    expect(nmse(y.toArraySync(), ref)).toBeLessThan(1e-12);
    using xb = tk.tensor(roundBf16(x), [N, D], { dtype: 'bf16' });
    using wb = tk.tensor(roundBf16(w), [D], { dtype: 'bf16' });
    using yb = tk.ops.rmsNorm(xb, wb, { eps: 1e-5 });
    expect(yb.dtype).toBe('bf16');
    expect(nmse(yb.toArraySync(), ref)).toBeLessThan(1e-4);
  });

  it('swiglu is silu(gate) * up', () => {
    const g = lcg(257, 3).map((v) => v * 8);
    const u = lcg(257, 4);
    using tg = tk.tensor(g, [257]);
    using tu = tk.tensor(u, [257]);
    using o = tk.ops.swiglu(tg, tu);
    const ref = Array.from(g, (gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]!);
    expect(nmse(o.toArraySync(), ref)).toBeLessThan(1e-12);
  });

  it('embedding gathers rows and reports an out-of-range id at the next read', async () => {
    const table = lcg(5 * 3, 5);
    using tt = tk.tensor(table, [5, 3]);
    using ids = tk.tensor(new Int32Array([4, 0, 4, 2]), [2, 2]);
    using out = tk.ops.embedding(ids, tt);
    expect(out.shape).toEqual([2, 2, 3]);
    const got = out.toArraySync();
    [4, 0, 4, 2].forEach((id, i) => expect(Array.from(got.subarray(i * 3, i * 3 + 3))).toEqual(Array.from(table.subarray(id * 3, id * 3 + 3))));
    using bad = tk.tensor(new Int32Array([1, 5]), [2]);
    using garbage = tk.ops.embedding(bad, tt);
    await expect(garbage.toArray()).rejects.toThrow(/ids\[1\] = 5 is out of range for a table of V = 5 rows/);
    // The error is reported once; the queue keeps working.
    expect(Array.from(out.toArraySync())).toEqual(Array.from(got));
  });

  it('rejects bad shapes and dtypes by name', () => {
    using x = tk.zeros([2, 4]);
    using w = tk.zeros([3]);
    using i = tk.zeros([2], { dtype: 'i32' });
    expect(() => tk.ops.rmsNorm(x, w)).toThrow('rmsNorm: weight [3] f32 on cpu must be [4] to match the last axis of x [2, 4] f32 on cpu');
    expect(() => tk.ops.rmsNorm(x, w, { eps: -1 })).toThrow(/rmsNorm: eps must be a finite number >= 0/);
    expect(() => tk.ops.swiglu(x, w)).toThrow(/swiglu: gate \[2, 4\] f32 on cpu and up \[3\] f32 on cpu must have the same shape/);
    expect(() => tk.ops.embedding(x, x)).toThrow(/embedding: ids \[2, 4\] f32 on cpu must be i32/);
    expect(() => tk.ops.embedding(i, w)).toThrow(/embedding: table \[3\] f32 on cpu must be \[V, D\]/);
  });
});

// Hugging Face's RoPE, written out: inv_freq[i] = 1 / theta^(2i/D); rotate_half layout.
function refRope(x: Float32Array, [B, T, H, D]: number[], invFreq: number[], pos: (b: number, t: number) => number, af = 1): Float64Array {
  const out = new Float64Array(x.length);
  const half = D / 2;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++)
      for (let h = 0; h < H; h++) {
        const base = ((b * T + t) * H + h) * D;
        for (let i = 0; i < half; i++) {
          const a = pos(b, t) * invFreq[i]!;
          const c = Math.cos(a) * af;
          const s = Math.sin(a) * af;
          out[base + i] = x[base + i]! * c - x[base + i + half]! * s;
          out[base + i + half] = x[base + i + half]! * c + x[base + i]! * s;
        }
      }
  return out;
}

const defaultInvFreq = (D: number, theta: number) => Array.from({ length: D / 2 }, (_, i) => 1 / theta ** ((2 * i) / D));

describe('rope', () => {
  const shape = [2, 7, 3, 16];
  const x = lcg(shape.reduce((a, b) => a * b, 1), 9);

  it('default and ABF theta with shared and per-batch positions', () => {
    using tx = tk.tensor(x, shape);
    for (const theta of [10000, 1e6]) {
      using y = tk.ops.rope(tx, { theta });
      expect(nmse(y.toArraySync(), refRope(x, shape, defaultInvFreq(16, theta), (_, t) => t))).toBeLessThan(1e-12);
    }
    const pos = new Int32Array([0, 1, 2, 0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]);
    using tp = tk.tensor(pos, [2, 7]);
    using y2 = tk.ops.rope(tx, { positions: tp });
    expect(nmse(y2.toArraySync(), refRope(x, shape, defaultInvFreq(16, 10000), (b, t) => pos[b * 7 + t]!))).toBeLessThan(1e-12);
  });

  it('linear, dynamic and llama3 scaling follow Hugging Face', () => {
    using tx = tk.tensor(x, shape);
    const inv = defaultInvFreq(16, 10000);
    using lin = tk.ops.rope(tx, { scaling: { ropeType: 'linear', factor: 4 } });
    expect(nmse(lin.toArraySync(), refRope(x, shape, inv.map((f) => f / 4), (_, t) => t))).toBeLessThan(1e-12);

    // Dynamic NTK: past max_position_embeddings the base grows to theta * (f*L/max - (f-1))^(D/(D-2)).
    using dyn = tk.ops.rope(tx, { scaling: { type: 'dynamic', factor: 2 }, maxPositionEmbeddings: 4 });
    const base = 10000 * ((2 * 7) / 4 - 1) ** (16 / 14);
    expect(nmse(dyn.toArraySync(), refRope(x, shape, defaultInvFreq(16, base), (_, t) => t))).toBeLessThan(1e-12);
    using dynShort = tk.ops.rope(tx, { scaling: { type: 'dynamic', factor: 2 }, maxPositionEmbeddings: 64 });
    expect(nmse(dynShort.toArraySync(), refRope(x, shape, inv, (_, t) => t))).toBeLessThan(1e-12);

    // llama3: wavelengths above orig/low are divided by factor, below orig/high kept, smooth in between.
    const [factor, low, high, orig] = [8, 1, 4, 16];
    const l3 = inv.map((f) => {
      const wavelen = (2 * Math.PI) / f;
      if (wavelen < orig / high) return f;
      if (wavelen > orig / low) return f / factor;
      const smooth = (orig / wavelen - low) / (high - low);
      return (1 - smooth) * (f / factor) + smooth * f;
    });
    using y3 = tk.ops.rope(tx, { scaling: { ropeType: 'llama3', factor, lowFreqFactor: low, highFreqFactor: high, originalMaxPositionEmbeddings: orig } });
    expect(nmse(y3.toArraySync(), refRope(x, shape, l3, (_, t) => t))).toBeLessThan(1e-11);
  });

  it('rejects bad input by name', () => {
    using x3 = tk.zeros([2, 3, 4]);
    using odd = tk.zeros([1, 2, 1, 5]);
    using ok = tk.zeros([1, 2, 1, 4]);
    using badPos = tk.zeros([3], { dtype: 'i32' });
    expect(() => tk.ops.rope(x3)).toThrow('rope: x [2, 3, 4] f32 on cpu must be [B, T, H, D]');
    expect(() => tk.ops.rope(odd)).toThrow(/rope: the head dim of x \[1, 2, 1, 5\] f32 on cpu must be even/);
    expect(() => tk.ops.rope(ok, { theta: 0 })).toThrow(/rope: theta must be a finite number > 1, got 0/);
    expect(() => tk.ops.rope(ok, { positions: badPos })).toThrow(/rope: positions \[3\] i32 on cpu must be \[2\] or \[1, 2\]/);
    expect(() => tk.ops.rope(ok, { scaling: { ropeType: 'cubic' as 'linear', factor: 2 } })).toThrow(/rope: scaling.ropeType must be one of default, linear, dynamic, yarn, llama3, got cubic/);
    expect(() => tk.ops.rope(ok, { scaling: { ropeType: 'yarn' } })).toThrow(/rope: scaling.factor is required for ropeType 'yarn'/);
  });
});
