// Every test must leave device memory as it found it: live tensors and bytes return to their
// baseline (a test that leaks fails here, naming the counts).
import { afterEach, beforeEach, expect } from 'vitest';

import * as tk from '../lib/index.js';

let baseline: ReturnType<typeof tk.memory>;

beforeEach(() => {
  baseline = tk.memory();
});

afterEach(() => {
  // Queued kernels hold their operands until they run: wait for them (a deferred kernel error a
  // test provoked on purpose is not this check's business).
  try {
    tk.synchronize();
  } catch {
    // reported to the test that caused it, if it read a result
  }
  const now = tk.memory();
  for (const device of Object.keys(baseline)) {
    expect({ device, tensors: now[device]!.tensors, bytes: now[device]!.bytes }).toEqual({
      device,
      tensors: baseline[device]!.tensors,
      bytes: baseline[device]!.bytes,
    });
  }
});
