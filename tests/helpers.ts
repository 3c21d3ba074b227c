// Independent references for the vitest suite: plain JavaScript in float64, no tunekit code.

/** Deterministic uniform values in [-1, 1) (a small LCG; independent of tunekit's generator). */
export function lcg(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

/** C = op(A) op(B) for row-major A [M,K] (or [K,M] with transA) and B [K,N] (or [N,K] with transB). */
export function refMatmul(a: ArrayLike<number>, b: ArrayLike<number>, M: number, N: number, K: number, transA = false, transB = false): Float64Array {
  const c = new Float64Array(M * N);
  for (let i = 0; i < M; i++)
    for (let j = 0; j < N; j++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += a[transA ? k * M + i : i * K + k]! * b[transB ? j * K + k : k * N + j]!;
      c[i * N + j] = acc;
    }
  return c;
}

/** Normalized MSE: sum((got - ref)^2) / sum(ref^2). */
export function nmse(got: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (got.length !== ref.length) throw new Error(`nmse: lengths differ (${got.length} vs ${ref.length})`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < ref.length; i++) {
    num += (got[i]! - ref[i]!) ** 2;
    den += ref[i]! ** 2;
  }
  return den === 0 ? num : num / den;
}

/** Rounds float32 values to bfloat16 (nearest even), returned widened to float32. */
export function roundBf16(x: Float32Array): Float32Array {
  const u = new Uint32Array(x.buffer.slice(x.byteOffset, x.byteOffset + x.byteLength));
  for (let i = 0; i < u.length; i++) {
    const v = u[i]!;
    const rounded = (v + 0x7fff + ((v >>> 16) & 1)) >>> 0;
    u[i] = (rounded & 0xffff0000) >>> 0;
  }
  return new Float32Array(u.buffer);
}
