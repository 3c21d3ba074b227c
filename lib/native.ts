// Loads the N-API addon from an ordered list of candidates:
//   1. TUNEKIT_NATIVE=path (overrides everything; an error if it does not load),
//   2. a prebuilt binary matching this platform, architecture and libc (prebuilds/, from `npm run prebuild`),
//   3. a local build (build/Release, then build/Debug: cmake-js or node-gyp).
// When none loads, the error says what was tried, why each failed, and the one command that fixes it.
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { NativeLoadError } from './errors.js';

export type DType = 'f32' | 'bf16' | 'f16' | 'i32' | 'u8';

/** The addon's own tensor handle. Shapes are arrays of numbers, devices 'cpu' or 'cuda:N'. */
export interface NativeTensor {
  readonly shape: number[];
  readonly dtype: DType;
  readonly device: string;
  readonly disposed: boolean;
  read(): Promise<ArrayBuffer>;
  readSync(): ArrayBuffer;
  dispose(): void;
}

export interface NativeMemory {
  tensors: number;
  bytes: number;
  allocatedBytes: number;
  cachedBytes: number;
  peakAllocatedBytes: number;
}

export interface NativeInfo {
  cpu: { isa: 'avx512' | 'avx2' | 'portable'; bf16: boolean; detected: string; threads: number };
  cuda: {
    compiled: boolean;
    available: boolean;
    cublas: boolean;
    status?: string;
    devices: { index: number; name: string; computeCapability: string; multiprocessors: number; totalBytes: number }[];
  };
}

export interface NativeProbe {
  fp32Gflops: number;
  /** AVX512-BF16 dot-product peak; 0 where the CPU lacks it (bf16 GEMM then runs at the fp32 rate). */
  bf16Gflops: number;
  isa: string;
  threads: number;
  readGBs: number;
  copyGBs: number;
}

export interface NativeRopeScaling {
  type: 'none' | 'linear' | 'dynamic' | 'yarn' | 'llama3';
  factor?: number;
  originalMaxPositionEmbeddings?: number;
  maxPositionEmbeddings?: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  betaFast?: number;
  betaSlow?: number;
  mscale?: number;
  mscaleAllDim?: number;
  attentionFactor?: number;
  truncate?: boolean;
}

export interface NativeNf4Ref {
  packed: NativeTensor;
  absmax: NativeTensor;
  scale2?: NativeTensor;
  offset?: NativeTensor;
  out: number;
  in: number;
  blockSize: number;
  doubleQuant: boolean;
}

export interface NativeBinding {
  NativeTensor: abstract new (...args: never[]) => NativeTensor;
  fromHost(data: ArrayBufferView | ArrayBuffer, shape: number[], dtype: DType, device: string): NativeTensor;
  full(shape: number[], dtype: DType, device: string, value: number): NativeTensor;
  randn(shape: number[], dtype: DType, device: string, seed: number, mean: number, std: number): NativeTensor;
  toDevice(t: NativeTensor, device: string): NativeTensor;
  cast(t: NativeTensor, dtype: DType): NativeTensor;
  reshape(t: NativeTensor, shape: number[]): NativeTensor;
  permute(t: NativeTensor, perm: number[]): NativeTensor;
  concat(tensors: NativeTensor[], axis: number): NativeTensor;
  narrow(x: NativeTensor, axis: number, start: number, length: number): NativeTensor;
  matmul(a: NativeTensor, b: NativeTensor, transA: boolean, transB: boolean): NativeTensor;
  binary(op: 'add' | 'sub' | 'mul', a: NativeTensor, b: NativeTensor): NativeTensor;
  scale(x: NativeTensor, alpha: number): NativeTensor;
  dropout(x: NativeTensor, p: number, seed: number): NativeTensor;
  scaleByInplace(x: NativeTensor, scale: NativeTensor): NativeTensor;
  sum(x: NativeTensor, axes: number[], keepdim: boolean): NativeTensor;
  rmsNorm(x: NativeTensor, weight: NativeTensor, eps: number): NativeTensor;
  swiglu(gate: NativeTensor, up: NativeTensor): NativeTensor;
  embedding(ids: NativeTensor, table: NativeTensor): NativeTensor;
  rope(x: NativeTensor, positions: NativeTensor | null, theta: number, scaling: NativeRopeScaling): NativeTensor;
  attention(q: NativeTensor, k: NativeTensor, v: NativeTensor, causal: boolean, scale: number, segmentIds: NativeTensor | null, keySegmentIds: NativeTensor | null): NativeTensor;
  crossEntropy(logits: NativeTensor, targets: NativeTensor, ignoreIndex: number, reduction: 'mean' | 'sum' | 'none'): NativeTensor;
  sequenceLogprobs(logits: NativeTensor, targets: NativeTensor, ignoreIndex: number): NativeTensor;
  dpoLoss(pc: NativeTensor, pr: NativeTensor, rc: NativeTensor, rr: NativeTensor, beta: number, kind: string, labelSmoothing: number): { loss: NativeTensor; chosenRewards: NativeTensor; rejectedRewards: NativeTensor };
  distillLoss(student: NativeTensor, teacher: NativeTensor, targets: NativeTensor | null, kind: string, beta: number, temperature: number, ignoreIndex: number): NativeTensor;
  broadcastTo(x: NativeTensor, shape: number[]): NativeTensor;
  rmsNormTrain(x: NativeTensor, weight: NativeTensor, eps: number): { y: NativeTensor; rstd: NativeTensor };
  rmsNormBackward(dy: NativeTensor, x: NativeTensor, weight: NativeTensor, rstd: NativeTensor): { dx: NativeTensor; dweight: NativeTensor };
  swigluBackward(dout: NativeTensor, gate: NativeTensor, up: NativeTensor): { dgate: NativeTensor; dup: NativeTensor };
  embeddingBackward(dout: NativeTensor, ids: NativeTensor, vocab: number, dtype: DType): NativeTensor;
  ropeBackward(dy: NativeTensor, positions: NativeTensor | null, theta: number, scaling: NativeRopeScaling): NativeTensor;
  attentionTrain(q: NativeTensor, k: NativeTensor, v: NativeTensor, causal: boolean, scale: number, segmentIds: NativeTensor | null, keySegmentIds: NativeTensor | null): { out: NativeTensor; lse: NativeTensor };
  attentionBackward(dout: NativeTensor, q: NativeTensor, k: NativeTensor, v: NativeTensor, out: NativeTensor, lse: NativeTensor, causal: boolean, scale: number, segmentIds: NativeTensor | null, keySegmentIds: NativeTensor | null): { dq: NativeTensor; dk: NativeTensor; dv: NativeTensor };
  crossEntropyTrain(logits: NativeTensor, targets: NativeTensor, ignoreIndex: number, reduction: 'mean' | 'sum' | 'none'): { loss: NativeTensor; lse: NativeTensor };
  crossEntropyBackward(dloss: NativeTensor, logits: NativeTensor, targets: NativeTensor, lse: NativeTensor, ignoreIndex: number, reduction: 'mean' | 'sum' | 'none'): NativeTensor;
  sequenceLogprobsTrain(logits: NativeTensor, targets: NativeTensor, ignoreIndex: number): { out: NativeTensor; lse: NativeTensor };
  sequenceLogprobsBackward(dout: NativeTensor, logits: NativeTensor, targets: NativeTensor, lse: NativeTensor, ignoreIndex: number): NativeTensor;
  dpoLossBackward(dloss: NativeTensor, pc: NativeTensor, pr: NativeTensor, rc: NativeTensor, rr: NativeTensor, beta: number, kind: string, labelSmoothing: number): { dChosen: NativeTensor; dRejected: NativeTensor };
  distillLossBackward(dloss: NativeTensor, student: NativeTensor, teacher: NativeTensor, targets: NativeTensor | null, kind: string, beta: number, temperature: number, ignoreIndex: number): NativeTensor;
  linearCrossEntropy(hidden: NativeTensor, weight: NativeTensor, targets: NativeTensor, ignoreIndex: number, reduction: 'mean' | 'sum', wantDhidden: boolean, wantDweight: boolean): { loss: NativeTensor; dhidden?: NativeTensor; dweight?: NativeTensor };
  linearDistillLoss(sh: NativeTensor, sw: NativeTensor, th: NativeTensor, tw: NativeTensor, targets: NativeTensor | null, kind: string, beta: number, temperature: number, ignoreIndex: number, alpha: number, wantDhidden: boolean, wantDweight: boolean): { loss: NativeTensor; dhidden?: NativeTensor; dweight?: NativeTensor };
  qloraLinear(x: NativeTensor, w: NativeNf4Ref, a: NativeTensor, b: NativeTensor, scale: number, dropout: number, seed: number): { y: NativeTensor; xa: NativeTensor };
  qloraLinearBackward(dy: NativeTensor, x: NativeTensor, w: NativeNf4Ref, a: NativeTensor, b: NativeTensor, xa: NativeTensor, scale: number, dropout: number, seed: number, wantDx: boolean): { dx?: NativeTensor; dA: NativeTensor; dB: NativeTensor };
  adamwStep(params: NativeTensor[], grads: NativeTensor[], m: NativeTensor[], v: NativeTensor[], hp: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number; gradScale: number }): void;
  clipGradNorm(grads: NativeTensor[], maxNorm: number): NativeTensor;
  nf4Quantize(w: NativeTensor, blockSize: number, doubleQuant: boolean): { packed: NativeTensor; absmax: NativeTensor; scale2?: NativeTensor; offset?: NativeTensor };
  nf4Dequantize(packed: NativeTensor, absmax: NativeTensor, scale2: NativeTensor | null, offset: NativeTensor | null, shape: number[], blockSize: number, doubleQuant: boolean, dtype: DType): NativeTensor;
  synchronize(device: string): void;
  info(): NativeInfo;
  memory(): Record<string, NativeMemory>;
  setThreads(n: number): void;
  resetPeakMemory(device: string): void;
  setIsa(isa: string): string;
  probe(seconds: number, bytes: number): NativeProbe;
  napiVersion: number;
}

export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

function libc(): string {
  if (process.platform !== 'linux') return '';
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
  return report?.header?.glibcVersionRuntime ? 'glibc' : 'musl';
}

/** Paths to try, in order, each with why it is a candidate. */
export function nativeCandidates(root = packageRoot, env = process.env): string[] {
  if (env.TUNEKIT_NATIVE) return [env.TUNEKIT_NATIVE];
  const out: string[] = [];
  const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  if (existsSync(dir)) {
    const want = libc();
    const files = readdirSync(dir).filter((f) => f.endsWith('.node'));
    // prebuildify names files like tunekit.napi.glibc.node: take N-API builds for our libc first.
    const score = (f: string) => (f.includes('napi') ? 2 : 0) + (want && f.includes(want) ? 1 : 0);
    const usable = files.filter((f) => !(want === 'glibc' && f.includes('musl')) && !(want === 'musl' && f.includes('glibc')));
    usable.sort((a, b) => score(b) - score(a));
    for (const f of usable) out.push(join(dir, f));
  }
  out.push(join(root, 'build', 'Release', 'tunekit.node'));
  out.push(join(root, 'build', 'Debug', 'tunekit.node'));
  return out;
}

export function loadNative(root = packageRoot, env = process.env): NativeBinding {
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const path of nativeCandidates(root, env)) {
    if (!existsSync(path)) {
      tried.push(`  ${path}: not found`);
      continue;
    }
    try {
      return require(path) as NativeBinding;
    } catch (err) {
      tried.push(`  ${path}: ${(err as Error).message.split('\n')[0]}`);
    }
  }
  const fromClone = existsSync(join(root, '.git'));
  const fix = env.TUNEKIT_NATIVE
    ? `unset TUNEKIT_NATIVE, or point it at a built tunekit.node`
    : fromClone
      ? `npm run build:native   (in ${root}; needs CMake >= 3.18 and a C++17 compiler)`
      : `npm rebuild tunekit   (needs CMake >= 3.18 and a C++17 compiler)`;
  throw new NativeLoadError(`tunekit: could not load the native addon. Tried:\n${tried.join('\n')}\nTo fix it, run:\n  ${fix}`);
}

let binding: NativeBinding | undefined;

/** The addon, loaded on first use. */
export function native(): NativeBinding {
  binding ??= loadNative();
  return binding;
}
