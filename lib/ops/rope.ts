import { record } from '../autograd.js';
import { native, type NativeRopeScaling } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

/** Hugging Face `rope_scaling` with camelCase keys (`rope_type` or `type` -> `ropeType` or `type`). */
export interface RopeScaling {
  ropeType?: 'default' | 'linear' | 'dynamic' | 'yarn' | 'llama3';
  type?: 'default' | 'linear' | 'dynamic' | 'yarn' | 'llama3';
  factor?: number;
  originalMaxPositionEmbeddings?: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  betaFast?: number;
  betaSlow?: number;
  mscale?: number;
  mscaleAllDim?: number;
  attentionFactor?: number;
  truncate?: boolean;
}

export interface RopeOptions {
  /** The base of the inverse frequencies (raise it for ABF context extension). Default 10000. */
  theta?: number;
  /** i32 positions, [T] shared or [B, T] per batch row (packed documents). Default 0..T-1. */
  positions?: Tensor;
  scaling?: RopeScaling;
  /** The model's max_position_embeddings (dynamic NTK scales past it; others fall back to it). */
  maxPositionEmbeddings?: number;
}

const NUMBER_KEYS = ['factor', 'originalMaxPositionEmbeddings', 'lowFreqFactor', 'highFreqFactor', 'betaFast', 'betaSlow', 'mscale', 'mscaleAllDim', 'attentionFactor'] as const;
const TYPES = ['default', 'linear', 'dynamic', 'yarn', 'llama3'];

/**
 * Rotary position embedding of x [B, T, H, D] in Hugging Face's half-rotation layout, with the
 * rope_scaling types linear, dynamic (NTK), yarn and llama3. Differentiable in x.
 */
export function rope(x: Tensor, options: RopeOptions = {}): Tensor {
  const hx = checkTensor(x, 'rope', 'x');
  const theta = options.theta ?? 10000;
  if (typeof theta !== 'number' || !Number.isFinite(theta) || theta <= 1) throw new RangeError(`rope: theta must be a finite number > 1, got ${String(theta)}`);
  const positions = options.positions === undefined ? null : checkTensor(options.positions, 'rope', 'positions');
  const s = options.scaling ?? {};
  if (typeof s !== 'object' || s === null) throw new TypeError('rope: scaling must be an object (Hugging Face rope_scaling in camelCase)');
  const type = s.ropeType ?? s.type ?? (options.scaling ? undefined : 'default');
  if (type === undefined || !TYPES.includes(type)) throw new TypeError(`rope: scaling.ropeType must be one of ${TYPES.join(', ')}, got ${String(type)}`);
  const scaling: NativeRopeScaling = { type: type === 'default' ? 'none' : type };
  for (const key of NUMBER_KEYS) {
    const v = s[key];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`rope: scaling.${key} must be a finite number, got ${String(v)}`);
    scaling[key] = v;
  }
  if (type !== 'default' && scaling.factor === undefined) throw new TypeError(`rope: scaling.factor is required for ropeType '${type}'`);
  if (scaling.factor !== undefined && scaling.factor < 1 && type !== 'linear') throw new RangeError(`rope: scaling.factor must be >= 1, got ${scaling.factor}`);
  if (s.truncate !== undefined) scaling.truncate = !!s.truncate;
  if (options.maxPositionEmbeddings !== undefined) {
    if (!Number.isInteger(options.maxPositionEmbeddings) || options.maxPositionEmbeddings < 1) throw new RangeError(`rope: maxPositionEmbeddings must be a positive integer, got ${options.maxPositionEmbeddings}`);
    scaling.maxPositionEmbeddings = options.maxPositionEmbeddings;
  }
  const out = Tensor.fromNative(native().rope(hx, positions, theta, scaling));
  const saved = options.positions ? [options.positions] : [];
  return record(out, 'rope', [x], saved, (g, [sp]) => [Tensor.fromNative(native().ropeBackward(g.handle(), sp ? sp.handle() : null, theta, scaling))]);
}
