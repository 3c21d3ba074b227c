import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';

// The 16 NormalFloat4 values of the QLoRA paper (Dettmers et al. 2023, appendix E).
const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];

describe('nf4', () => {
  it('reproduces the code values exactly and packs 4 bits per weight', () => {
    const scale = 2.5;
    const values = Float32Array.from({ length: 128 }, (_, i) => NF4[(i * 7) % 16]! * scale);
    using w = tk.tensor(values, [2, 64]);
    using q = tk.nf4.quantize(w, { doubleQuant: false });
    expect(q.packed.dtype).toBe('u8');
    expect(q.packed.shape).toEqual([64]);
    expect(q.absmax.shape).toEqual([2]);
    expect(Array.from(q.absmax.toArraySync())).toEqual([scale, scale]);
    // Element 2j sits in the high nibble.
    const packed = q.packed.toArraySync();
    expect(packed[0]! >> 4).toBe(0);
    expect(packed[0]! & 15).toBe(7);
    using back = tk.nf4.dequantize(q);
    expect(back.shape).toEqual([2, 64]);
    expect(Array.from(back.toArraySync())).toEqual(Array.from(values, (v) => Math.fround(v)));
  });

  it('round-trips N(0, 1) weights with QLoRA-level error, and double quantization costs little', () => {
    using w = tk.randn([256, 256], { seed: 11 });
    const ref = w.toArraySync();
    for (const doubleQuant of [false, true]) {
      using q = tk.nf4.quantize(w, { doubleQuant });
      using back = tk.nf4.dequantize(q);
      const got = back.toArraySync();
      let mae = 0;
      for (let i = 0; i < ref.length; i++) mae += Math.abs(got[i]! - ref[i]!);
      mae /= ref.length;
      // Measured ~0.0727 for NF4 with blocks of 64; a wrong table or scale lands far outside.
      expect(mae).toBeGreaterThan(0.065);
      expect(mae).toBeLessThan(0.08);
      const n = 256 * 256;
      const nblocks = n / 64;
      expect(q.bytes).toBe(doubleQuant ? n / 2 + nblocks + 4 * Math.ceil(nblocks / 256) + 4 : n / 2 + 4 * nblocks);
    }
  });

  it('dequantizes to bf16 and handles a ragged last block', () => {
    const values = Float32Array.from({ length: 97 }, (_, i) => Math.sin(i) * 3);
    using w = tk.tensor(values, [97]);
    using q = tk.nf4.quantize(w);
    using b = tk.nf4.dequantize(q, { dtype: 'bf16' });
    expect(b.dtype).toBe('bf16');
    const got = b.toArraySync();
    for (let i = 0; i < 97; i++) expect(Math.abs(got[i]! - values[i]!)).toBeLessThan(0.6);
  });

  it('rejects bad input by name', () => {
    using w = tk.zeros([4, 4]);
    using i = tk.zeros([4], { dtype: 'i32' });
    expect(() => tk.nf4.quantize(w, { blockSize: 63 })).toThrow(/nf4.quantize: blockSize must be an even integer from 2 to 2\^24, got 63/);
    expect(() => tk.nf4.quantize(i)).toThrow(/nf4.quantize: w \[4\] i32 on cpu must be f32 or bf16/);
    const q = tk.nf4.quantize(w);
    q.dispose();
    expect(() => tk.nf4.dequantize(q)).toThrow(tk.DisposedError);
    expect(() => tk.nf4.dequantize({} as tk.nf4.Nf4Weight)).toThrow(/nf4.dequantize: expected an Nf4Weight/);
  });
});
