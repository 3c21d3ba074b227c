import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { loadNative, nativeCandidates, packageRoot } from '../lib/native.js';
import { NativeLoadError } from '../lib/errors.js';

describe('native loader', () => {
  it('tries prebuilds, then the local build, and TUNEKIT_NATIVE overrides both', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tk-loader-'));
    const pre = join(dir, 'prebuilds', `${process.platform}-${process.arch}`);
    spawnSync('mkdir', ['-p', pre]);
    writeFileSync(join(pre, 'tunekit.napi.node'), '');
    const list = nativeCandidates(dir, {});
    expect(list[0]).toBe(join(pre, 'tunekit.napi.node'));
    expect(list.slice(1)).toEqual([join(dir, 'build', 'Release', 'tunekit.node'), join(dir, 'build', 'Debug', 'tunekit.node')]);
    expect(nativeCandidates(dir, { TUNEKIT_NATIVE: '/x/y.node' })).toEqual(['/x/y.node']);
  });

  it('explains what was tried and the command that fixes it', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tk-loader-'));
    let err: unknown;
    try {
      loadNative(dir, {});
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(NativeLoadError);
    const msg = (err as Error).message;
    expect(msg).toContain(`${join(dir, 'build', 'Release', 'tunekit.node')}: not found`);
    expect(msg).toContain('npm rebuild tunekit');
    expect(() => loadNative(dir, { TUNEKIT_NATIVE: join(dir, 'nope.node') })).toThrow(/nope.node: not found[\s\S]*unset TUNEKIT_NATIVE/);
    // A file that exists but is not an addon: the loader reports why it failed.
    const bogus = join(dir, 'bogus.node');
    writeFileSync(bogus, 'not an elf');
    expect(() => loadNative(dir, { TUNEKIT_NATIVE: bogus })).toThrow(/bogus.node: .*(invalid ELF|file too short|not a valid)/i);
  });

  it('loads the real addon through TUNEKIT_NATIVE', () => {
    const real = join(packageRoot, 'build', 'Release', 'tunekit.node');
    const b = loadNative(packageRoot, { TUNEKIT_NATIVE: real });
    expect(b.napiVersion).toBe(8);
  });
});

describe('TUNEKIT_ISA forces a CPU path', () => {
  // Each forced path must give the same GEMM as a float64 reference. Run in child processes,
  // since the variable is read when the addon loads; they use the compiled dist/ (npm install builds it).
  const script = `
    import * as tk from './dist/index.js';
    const M = 97, N = 257, K = 129;
    const a = new Float32Array(M * K).map((_, i) => Math.sin(i));
    const b = new Float32Array(K * N).map((_, i) => Math.cos(i));
    const c = tk.ops.matmul(tk.tensor(a, [M, K]), tk.tensor(b, [K, N])).toArraySync();
    let num = 0, den = 0;
    for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) {
      let r = 0; for (let k = 0; k < K; k++) r += a[i * K + k] * b[k * N + j];
      num += (c[i * N + j] - r) ** 2; den += r * r;
    }
    console.log(JSON.stringify({ isa: tk.info().cpu.isa, bf16: tk.info().cpu.bf16, nmse: num / den }));
  `;
  for (const isa of ['portable', 'avx2', 'avx512'] as const) {
    it(`TUNEKIT_ISA=${isa}`, () => {
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
        cwd: packageRoot,
        env: { ...process.env, TUNEKIT_ISA: isa },
        encoding: 'utf8',
      });
      expect(r.stderr).toBe('');
      const out = JSON.parse(r.stdout) as { isa: string; bf16: boolean; nmse: number };
      const detected = JSON.parse(spawnSync(process.execPath, ['dist/cli/main.js', 'info', '--json'], { cwd: packageRoot, encoding: 'utf8' }).stdout) as { cpu: { detected: string } };
      const order = ['portable', 'avx2', 'avx512', 'avx512bf16'];
      const expected = order.indexOf(isa) <= order.indexOf(detected.cpu.detected) ? isa : detected.cpu.detected.replace('bf16', '');
      expect(out.isa).toBe(expected);
      expect(out.bf16).toBe(false);
      expect(out.nmse).toBeLessThan(1e-10);
    });
  }
});
