import { describe, expect, it } from 'vitest';

import { MUTATION_KINDS, formatFuzzReport, makeCase, runFuzz } from '../lib/io/safetensors-fuzz.js';

describe('safetensors reader fuzz', () => {
  it('accepts and reads consistently, or rejects with SafetensorsError, 2,000 mutated files', async () => {
    const report = await runFuzz({ seed: 20240611, count: 2000, fileEvery: 20 });
    const table = formatFuzzReport(report);
    expect(report.failureCount, table).toBe(0);
    expect(report.fileCases).toBe(100);
    for (const kind of MUTATION_KINDS) expect(report.byKind[kind].cases, kind).toBeGreaterThan(100);
    // Valid seeds are always accepted; the mutations reach both outcomes and many rejection reasons.
    expect(report.byKind.none.rejected).toBe(0);
    for (const kind of ['shape', 'offsets', 'dtype', 'structure', 'metadata', 'json-text'] as const) {
      expect(report.byKind[kind].accepted, kind).toBeGreaterThan(0);
      expect(report.byKind[kind].rejected, kind).toBeGreaterThan(0);
    }
    const reasons = new Set(MUTATION_KINDS.flatMap((k) => Object.keys(report.byKind[k].reasons)));
    expect([...reasons].sort()).toEqual(['byte-size', 'data-offsets', 'dtype', 'duplicate', 'entry', 'header-encoding', 'header-json', 'header-length', 'layout', 'metadata', 'shape']);
    expect(report.ms).toBeLessThan(10_000);
  });

  it('is deterministic: a case is reproducible from (seed, index)', () => {
    for (const i of [0, 7, 123, 1999]) {
      const a = makeCase(5, i);
      const b = makeCase(5, i);
      expect(b.detail).toBe(a.detail);
      expect(b.bytes).toEqual(a.bytes);
    }
    expect(makeCase(5, 1).bytes).not.toEqual(makeCase(6, 1).bytes);
  });
});
