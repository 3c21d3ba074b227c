import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';

describe('tensor creation and reads', () => {
  it('round-trips nested arrays with an inferred shape', async () => {
    using t = tk.tensor([[1, 2, 3], [4, 5, 6]]);
    expect(t.shape).toEqual([2, 3]);
    expect(t.dtype).toBe('f32');
    expect(t.device).toBe('cpu');
    expect(t.size).toBe(6);
    expect(Array.from(await t.toArray())).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(t.toArraySync())).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('takes typed arrays with an explicit shape and keeps their dtype', () => {
    using a = tk.tensor(new Int32Array([1, -2, 3, 4]), [2, 2]);
    using b = tk.tensor(new Uint8Array([0, 255]), [2]);
    using s = tk.tensor(7);
    expect(a.dtype).toBe('i32');
    expect(Array.from(a.toArraySync())).toEqual([1, -2, 3, 4]);
    expect(b.dtype).toBe('u8');
    expect(Array.from(b.toArraySync())).toEqual([0, 255]);
    expect(s.shape).toEqual([]);
    expect(Array.from(s.toArraySync())).toEqual([7]);
  });

  it('copies host data at creation, so the caller may reuse its buffer', () => {
    const data = new Float32Array([1, 2, 3]);
    using t = tk.tensor(data, [3]);
    data.fill(9);
    expect(Array.from(t.toArraySync())).toEqual([1, 2, 3]);
  });

  it('rounds to bf16 and f16 to nearest even and reads them back widened', () => {
    // 1 + 2^-8 is a tie between two bf16 values: nearest even is 1. 1 + 3*2^-8 rounds up to 1 + 2^-6.
    using b = tk.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5], [3], { dtype: 'bf16' });
    expect(Array.from(b.toArraySync())).toEqual([1, 1 + 2 ** -6, -2.5]);
    // f16: 1 + 2^-11 ties to 1; 65504 is the largest finite half; 1e-7 underflows to a subnormal.
    using h = tk.tensor([1 + 2 ** -11, 65504, 2 ** -24], [3], { dtype: 'f16' });
    expect(Array.from(h.toArraySync())).toEqual([1, 65504, 2 ** -24]);
    using raw = tk.tensor(new Uint16Array([0x3f80, 0xc000]), [2], { dtype: 'bf16' });
    expect(Array.from(raw.toArraySync())).toEqual([1, -2]);
  });

  it('fills zeros, ones and full in every dtype', () => {
    for (const dtype of ['f32', 'bf16', 'f16', 'i32', 'u8'] as const) {
      using z = tk.zeros([2, 3], { dtype });
      using o = tk.ones([4], { dtype });
      using f = tk.full([2], 3, { dtype });
      expect(z.dtype).toBe(dtype);
      expect(Array.from(z.toArraySync())).toEqual([0, 0, 0, 0, 0, 0]);
      expect(Array.from(o.toArraySync())).toEqual([1, 1, 1, 1]);
      expect(Array.from(f.toArraySync())).toEqual([3, 3]);
    }
  });

  it('handles empty tensors', async () => {
    using e = tk.zeros([0, 5]);
    expect(e.size).toBe(0);
    expect((await e.toArray()).length).toBe(0);
  });

  it('randn is reproducible per seed, differs across seeds, and has N(mean, std^2) statistics', () => {
    using a = tk.randn([1000, 100], { seed: 42 });
    using b = tk.randn([1000, 100], { seed: 42 });
    using c = tk.randn([1000, 100], { seed: 43 });
    const va = a.toArraySync();
    expect(Array.from(b.toArraySync())).toEqual(Array.from(va));
    expect(Array.from(c.toArraySync().slice(0, 10))).not.toEqual(Array.from(va.slice(0, 10)));
    let mean = 0;
    for (const x of va) mean += x;
    mean /= va.length;
    let variance = 0;
    for (const x of va) variance += (x - mean) ** 2;
    variance /= va.length;
    // 1e5 samples: the standard error of the mean is 0.003, of the variance about 0.0045.
    expect(Math.abs(mean)).toBeLessThan(0.02);
    expect(Math.abs(variance - 1)).toBeLessThan(0.03);
    using s = tk.randn([100000], { seed: 1, mean: 3, std: 0.5 });
    const vs = s.toArraySync();
    let m2 = 0;
    for (const x of vs) m2 += x;
    expect(Math.abs(m2 / vs.length - 3)).toBeLessThan(0.02);
  });

  it('randn draws a new seed each call unless seeded, and manualSeed makes that sequence reproducible', () => {
    tk.manualSeed(7);
    using a = tk.randn([8]);
    using b = tk.randn([8]);
    tk.manualSeed(7);
    using c = tk.randn([8]);
    expect(Array.from(a.toArraySync())).not.toEqual(Array.from(b.toArraySync()));
    expect(Array.from(c.toArraySync())).toEqual(Array.from(a.toArraySync()));
  });

  it('randn values do not depend on the thread count', () => {
    using a = tk.randn([4097], { seed: 5 });
    const va = Array.from(a.toArraySync());
    const threads = tk.info().cpu.threads;
    tk.setThreads(1);
    try {
      using b = tk.randn([4097], { seed: 5 });
      expect(Array.from(b.toArraySync())).toEqual(va);
    } finally {
      tk.setThreads(threads);
    }
  });

  it('to() casts between dtypes and keeps same-device copies cheap', () => {
    using a = tk.tensor([1.5, -2.7, 300, 2 ** 31], [4]);
    using i = a.to('i32');
    expect(i.dtype).toBe('i32');
    expect(Array.from(i.toArraySync())).toEqual([1, -2, 300, 2 ** 31 - 1]);
    using u = a.to('u8');
    expect(Array.from(u.toArraySync())).toEqual([1, 0, 255, 255]);
    using same = a.to('cpu');
    expect(Array.from(same.toArraySync())).toEqual(Array.from(a.toArraySync()));
  });

  it('reshape shares memory and infers -1', () => {
    using a = tk.tensor([1, 2, 3, 4, 5, 6], [6]);
    using b = a.reshape([2, -1]);
    expect(b.shape).toEqual([2, 3]);
    a.dispose();
    // b still owns a reference to the memory.
    expect(Array.from(b.toArraySync())).toEqual([1, 2, 3, 4, 5, 6]);
  });
});

describe('lifetime', () => {
  it('dispose is idempotent and any later use throws DisposedError', async () => {
    const t = tk.tensor([1, 2]);
    t.dispose();
    t.dispose();
    expect(t.disposed).toBe(true);
    expect(() => t.toArraySync()).toThrow(tk.DisposedError);
    await expect(t.toArray()).rejects.toThrow(tk.DisposedError);
    expect(() => t.to('bf16')).toThrow(tk.DisposedError);
    expect(() => t.reshape([2])).toThrow(tk.DisposedError);
    expect(() => tk.ops.add(t, t)).toThrow(/add: a: the tensor has been disposed/);
  });

  it('a read queued before dispose still completes', async () => {
    const t = tk.randn([256, 256], { seed: 3 });
    const pending = t.toArray();
    t.dispose();
    expect((await pending).length).toBe(256 * 256);
  });

  it('using disposes at the end of the block', () => {
    let outer: tk.Tensor;
    {
      using t = tk.zeros([3]);
      outer = t;
    }
    expect(outer.disposed).toBe(true);
  });

  it('tidy disposes intermediates and keeps what it returns', () => {
    const before = tk.memory().cpu.tensors;
    const [kept, other] = tk.tidy(() => {
      const a = tk.ones([4]);
      const b = tk.ops.add(a, a);
      tk.ops.mul(b, b);
      return [b, tk.zeros([1])];
    });
    expect(tk.memory().cpu.tensors).toBe(before + 2);
    expect(Array.from(kept!.toArraySync())).toEqual([2, 2, 2, 2]);
    kept!.dispose();
    other!.dispose();
    expect(() => tk.tidy(() => Promise.resolve(1))).toThrow(/tidy: fn returned a Promise/);
  });

  it('tidy disposes what it made when fn throws', () => {
    const before = tk.memory().cpu.tensors;
    expect(() =>
      tk.tidy(() => {
        tk.ones([4]);
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(tk.memory().cpu.tensors).toBe(before);
  });

  it('a scope collects tensors across await', async () => {
    const before = tk.memory().cpu.tensors;
    let seen: tk.Tensor[] = [];
    await (async () => {
      using scope = tk.scope();
      const a = tk.ones([8]);
      await a.toArray();
      await new Promise((r) => setTimeout(r, 5));
      const b = tk.ops.scale(a, 2);
      expect(Array.from(await b.toArray())).toEqual(new Array(8).fill(2));
      seen = [a, b];
      expect(scope.open).toBe(true);
    })();
    expect(seen.every((t) => t.disposed)).toBe(true);
    expect(tk.memory().cpu.tensors).toBe(before);
  });

  it('the callback form of scope keeps returned tensors and isolates concurrent work', async () => {
    const outside = tk.zeros([2]);
    const [r1, r2] = await Promise.all([
      tk.scope(async () => {
        const x = tk.ones([3]);
        await new Promise((r) => setTimeout(r, 5));
        return tk.ops.add(x, x);
      }),
      tk.scope(async (s) => {
        const y = s.keep(tk.full([1], 5));
        await new Promise((r) => setTimeout(r, 1));
        return y;
      }),
    ]);
    expect(outside.disposed).toBe(false);
    expect(Array.from(r1.toArraySync())).toEqual([2, 2, 2]);
    expect(Array.from(r2.toArraySync())).toEqual([5]);
    for (const t of [outside, r1, r2]) t.dispose();
  });

  it('scope.keep moves a tensor to the enclosing scope', () => {
    let kept!: tk.Tensor;
    const outer = tk.tidy(() => {
      {
        using inner = tk.scope();
        kept = inner.keep(tk.ones([2]));
        tk.zeros([2]);
      }
      expect(kept.disposed).toBe(false);
      return 1;
    });
    expect(outer).toBe(1);
    // The enclosing tidy owned it after keep, and disposed it.
    expect(kept.disposed).toBe(true);
  });

  it('memory() counts live tensors and bytes per device', () => {
    const m0 = tk.memory().cpu;
    const t = tk.zeros([1000], { dtype: 'bf16' });
    const m1 = tk.memory().cpu;
    expect(m1.tensors - m0.tensors).toBe(1);
    expect(m1.bytes - m0.bytes).toBe(2000);
    t.dispose();
    const m2 = tk.memory().cpu;
    expect(m2.tensors).toBe(m0.tensors);
    expect(m2.bytes).toBe(m0.bytes);
  });
});

describe('runtime', () => {
  it('info reports version, ISA, threads, bf16 and CUDA', () => {
    const i = tk.info();
    expect(i.version).toMatch(/^\d+\.\d+\.\d+/);
    expect(['avx512', 'avx2', 'portable']).toContain(i.cpu.isa);
    expect(i.cpu.threads).toBeGreaterThanOrEqual(1);
    expect(typeof i.cpu.bf16).toBe('boolean');
    expect(Array.isArray(i.cuda.devices)).toBe(true);
    expect(i.cuda.available).toBe(i.cuda.devices.length > 0);
    expect(typeof i.cuda.cublas).toBe('boolean');
    expect(i.napi).toBe(8);
  });

  it('setThreads changes the pool and rejects nonsense', () => {
    const n = tk.info().cpu.threads;
    tk.setThreads(1);
    expect(tk.info().cpu.threads).toBe(1);
    tk.setThreads(n);
    expect(tk.info().cpu.threads).toBe(n);
    expect(() => tk.setThreads(0)).toThrow(/setThreads: threads must be an integer from 1 to 1024/);
    expect(() => tk.setThreads(1.5)).toThrow(/setThreads/);
  });
});
