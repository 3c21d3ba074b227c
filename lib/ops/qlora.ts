import { needsGrad, record } from '../autograd.js';
import { native, type NativeNf4Ref } from '../native.js';
import { Nf4Weight } from '../nf4.js';
import { checkTensor, nextSeed, Tensor } from '../tensor.js';

export interface QloraLinearOptions {
  /** The LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA). Default 1. */
  scale?: number;
  /** Dropout on the LoRA input, in [0, 1). Default 0. */
  dropout?: number;
  /** The dropout mask's seed; default: the next seed of tk.manualSeed's sequence. */
  seed?: number;
}

/**
 * QLoRA's linear layer: y = x deq(q)^T + scale (drop(x) A^T) B^T with the frozen NF4 weight q
 * [out, in] dequantized tile by tile inside the GEMM (never materialized), x [..., in] f32 or
 * bf16, A [r, in], B [out, r]. Differentiable in x, A and B; the backward pass dequantizes again
 * and regenerates the dropout mask from its seed.
 */
export function qloraLinear(x: Tensor, q: Nf4Weight, loraA: Tensor, loraB: Tensor, options: QloraLinearOptions = {}): Tensor {
  const op = 'qloraLinear';
  const hx = checkTensor(x, op, 'x');
  if (!(q instanceof Nf4Weight)) throw new TypeError(`${op}: q must be an Nf4Weight from tk.nf4.quantize`);
  if (q.shape.length !== 2) throw new RangeError(`${op}: the NF4 weight must be 2-D [out, in], got [${q.shape.join(', ')}]`);
  const ha = checkTensor(loraA, op, 'loraA');
  const hb = checkTensor(loraB, op, 'loraB');
  const scale = options.scale ?? 1;
  const dropout = options.dropout ?? 0;
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw new RangeError(`${op}: scale must be a finite number, got ${String(scale)}`);
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) throw new RangeError(`${op}: dropout must be in [0, 1), got ${String(dropout)}`);
  const seed = options.seed ?? (dropout > 0 ? nextSeed() : 0);
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`${op}: seed must be a non-negative integer, got ${String(seed)}`);
  const ref = (): NativeNf4Ref => ({
    packed: q.packed.handle(`${op}: q`),
    absmax: q.absmax.handle(`${op}: q`),
    ...(q.doubleQuant ? { scale2: q.scale2!.handle(`${op}: q`), offset: q.offset!.handle(`${op}: q`) } : {}),
    out: q.shape[0]!,
    in: q.shape[1]!,
    blockSize: q.blockSize,
    doubleQuant: q.doubleQuant,
  });
  const r = native().qloraLinear(hx, ref(), ha, hb, scale, dropout, seed);
  const y = Tensor.fromNative(r.y);
  const xa = Tensor.fromNative(r.xa);
  try {
    if (!needsGrad(x, loraA, loraB)) return y;
    // The NF4 tensors are saved too (aliases), so disposing the weight cannot pull them from under backward.
    const parts = [q.packed, q.absmax, ...(q.doubleQuant ? [q.scale2!, q.offset!] : [])];
    return record(y, op, [x, loraA, loraB], [x, loraA, loraB, xa, ...parts], (g, [sx, sa, sb, sxa, ...sq], needs) => {
      const w: NativeNf4Ref = {
        packed: sq[0]!.handle(),
        absmax: sq[1]!.handle(),
        ...(q.doubleQuant ? { scale2: sq[2]!.handle(), offset: sq[3]!.handle() } : {}),
        out: q.shape[0]!,
        in: q.shape[1]!,
        blockSize: q.blockSize,
        doubleQuant: q.doubleQuant,
      };
      const d = native().qloraLinearBackward(g.handle(), sx!.handle(), w, sa!.handle(), sb!.handle(), sxa!.handle(), scale, dropout, seed, needs[0]!);
      return [d.dx ? Tensor.fromNative(d.dx) : null, Tensor.fromNative(d.dA), Tensor.fromNative(d.dB)];
    });
  } finally {
    xa.dispose();
  }
}
