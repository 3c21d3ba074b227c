// The execution model's promise: JavaScript enqueues work and returns, so the event loop keeps
// running while the CPU queue computes.
import { expect, it } from 'vitest';

import * as tk from '../lib/index.js';

it('keeps a 10 ms timer on time while >= 2 s of GEMM work runs', async () => {
  const n = 512;
  using a = tk.randn([n, n], { seed: 1 });
  using b = tk.randn([n, n], { seed: 2 });
  // Calibrate as the test runs (GEMMs queued back to back, each output freed before the next is
  // made) on the fastest of a few batches, so the queued work lasts >= 2 s even if the machine
  // speeds up after calibration (it is shared, and clocks move).
  tk.tidy(() => tk.ops.matmul(a, b)).dispose();
  tk.synchronize();
  let one = Infinity;
  for (let batch = 0; batch < 3; batch++) {
    const t0 = performance.now();
    for (let i = 0; i < 20; i++) tk.tidy(() => tk.ops.matmul(a, b)).dispose();
    tk.synchronize();
    one = Math.min(one, (performance.now() - t0) / 20);
  }
  const count = Math.ceil(3000 / Math.max(one, 0.05)) + 1;

  const delays: number[] = [];
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    delays.push(now - last - 10);
    last = now;
  }, 10);

  const start = performance.now();
  const enqueueStart = performance.now();
  let out = tk.ops.matmul(a, b);
  for (let i = 1; i < count; i++) {
    out.dispose();
    out = tk.ops.matmul(a, b);
  }
  const enqueueMs = performance.now() - enqueueStart;
  await out.toArray();
  const busyMs = performance.now() - start;
  clearInterval(timer);
  out.dispose();

  delays.sort((x, y) => x - y);
  const p99 = delays[Math.min(delays.length - 1, Math.floor(delays.length * 0.99))]!;
  console.log(`event loop: ${count} GEMMs ${n}^3 in ${busyMs.toFixed(0)} ms (enqueued in ${enqueueMs.toFixed(0)} ms), ${delays.length} ticks, p99 timer delay ${p99.toFixed(1)} ms`);
  expect(busyMs).toBeGreaterThan(2000);
  expect(delays.length).toBeGreaterThan(50);
  expect(p99).toBeLessThan(50);
});
