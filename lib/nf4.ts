// NF4 (QLoRA) weight storage: 4-bit NormalFloat codes in blocks of 64 with an absmax per block,
// and double quantization of the absmaxes (8-bit, blocks of 256, plus an fp32 offset), laid out as
// bitsandbytes lays them out.
import { native } from './native.js';
import { checkShape, checkTensor, Tensor, type DType } from './tensor.js';

/** A quantized weight. Owns its tensors: dispose() (or `using`) releases them. */
export class Nf4Weight {
  constructor(
    /** The original weight's shape. */
    readonly shape: readonly number[],
    readonly blockSize: number,
    readonly doubleQuant: boolean,
    /** u8 [ceil(n / 2)]: element 2j in the high nibble. */
    readonly packed: Tensor,
    /** f32 [nblocks], or u8 codes [nblocks] with double quantization. */
    readonly absmax: Tensor,
    /** f32 [ceil(nblocks / 256)], with double quantization. */
    readonly scale2?: Tensor,
    /** f32 [] mean of the absmaxes, with double quantization. */
    readonly offset?: Tensor,
  ) {}

  /** Bytes of quantized storage: 0.5 per element, plus the absmax state. */
  get bytes(): number {
    const parts = [this.packed, this.absmax, this.scale2, this.offset].filter((t): t is Tensor => t !== undefined);
    return parts.reduce((sum, t) => sum + t.size * (t.dtype === 'u8' ? 1 : 4), 0);
  }

  dispose(): void {
    for (const t of [this.packed, this.absmax, this.scale2, this.offset]) t?.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

export interface Nf4QuantizeOptions {
  /** Elements per absmax block. Default 64 (QLoRA). */
  blockSize?: number;
  /** Quantize the absmaxes to 8 bits too (QLoRA's double quantization). Default true. */
  doubleQuant?: boolean;
}

/** Quantizes an f32 or bf16 weight to NF4. */
export function quantize(w: Tensor, options: Nf4QuantizeOptions = {}): Nf4Weight {
  const h = checkTensor(w, 'nf4.quantize', 'w');
  const blockSize = options.blockSize ?? 64;
  const doubleQuant = options.doubleQuant ?? true;
  if (!Number.isInteger(blockSize) || blockSize < 2 || blockSize % 2 !== 0 || blockSize > 2 ** 24)
    throw new RangeError(`nf4.quantize: blockSize must be an even integer from 2 to 2^24, got ${String(blockSize)}`);
  if (typeof doubleQuant !== 'boolean') throw new TypeError('nf4.quantize: doubleQuant must be a boolean');
  const q = native().nf4Quantize(h, blockSize, doubleQuant);
  const wrap = (t: typeof q.packed | undefined) => (t ? Tensor.fromNative(t) : undefined);
  return new Nf4Weight([...w.shape], blockSize, doubleQuant, wrap(q.packed)!, wrap(q.absmax)!, wrap(q.scale2), wrap(q.offset));
}

/** The dense weight back, in f32 (default) or bf16. */
export function dequantize(q: Nf4Weight, options: { dtype?: DType } = {}): Tensor {
  if (!(q instanceof Nf4Weight)) throw new TypeError('nf4.dequantize: expected an Nf4Weight from tk.nf4.quantize');
  const dtype = options.dtype ?? 'f32';
  const op = 'nf4.dequantize';
  const shape = checkShape([...q.shape], op);
  return Tensor.fromNative(
    native().nf4Dequantize(
      checkTensor(q.packed, op, 'packed'),
      checkTensor(q.absmax, op, 'absmax'),
      q.doubleQuant ? checkTensor(q.scale2, op, 'scale2') : null,
      q.doubleQuant ? checkTensor(q.offset, op, 'offset') : null,
      shape,
      q.blockSize,
      q.doubleQuant,
      dtype,
    ),
  );
}
