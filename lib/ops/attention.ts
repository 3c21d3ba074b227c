import { needsGrad, record } from '../autograd.js';
import { native } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

export interface AttentionOptions {
  /** Causal mask; when S > T the last query aligns with the last key. Default true. */
  causal?: boolean;
  /** Score scale. Default 1/sqrt(D). */
  scale?: number;
  /** i32 [B, T] document ids of packed sequences (needs S == T): no attention across documents. */
  segmentIds?: Tensor;
  /**
   * i32 [B, S] ids of the keys, when they differ from the queries' (a KV cache, where S > T and
   * left padding has its own id). Needs segmentIds.
   */
  keySegmentIds?: Tensor;
}

/**
 * Fused (flash-style) attention: q [B, T, H, D], k and v [B, S, Hkv, D] with H % Hkv == 0
 * (grouped-query) -> [B, T, H, D]. Never materializes the [T, S] scores; the backward pass
 * recomputes them tile by tile from the saved log-sum-exp.
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions = {}): Tensor {
  const hq = checkTensor(q, 'attention', 'q');
  const hk = checkTensor(k, 'attention', 'k');
  const hv = checkTensor(v, 'attention', 'v');
  const causal = options.causal ?? true;
  if (typeof causal !== 'boolean') throw new TypeError('attention: causal must be a boolean');
  const scale = options.scale ?? 0;
  if (typeof scale !== 'number' || !Number.isFinite(scale) || scale < 0 || (options.scale !== undefined && scale === 0))
    throw new RangeError(`attention: scale must be a finite number > 0, got ${String(options.scale)}`);
  const seg = options.segmentIds === undefined ? null : checkTensor(options.segmentIds, 'attention', 'segmentIds');
  const kseg = options.keySegmentIds === undefined ? null : checkTensor(options.keySegmentIds, 'attention', 'keySegmentIds');
  if (!needsGrad(q, k, v)) return Tensor.fromNative(native().attention(hq, hk, hv, causal, scale, seg, kseg));
  const r = native().attentionTrain(hq, hk, hv, causal, scale, seg, kseg);
  const out = Tensor.fromNative(r.out);
  const lse = Tensor.fromNative(r.lse);
  try {
    const save = [q, k, v, out, lse, ...(options.segmentIds ? [options.segmentIds] : []), ...(options.keySegmentIds ? [options.keySegmentIds] : [])];
    return record(out, 'attention', [q, k, v], save, (g, [sq, sk, sv, so, sl, ss, sks]) => {
      const d = native().attentionBackward(g.handle(), sq!.handle(), sk!.handle(), sv!.handle(), so!.handle(), sl!.handle(), causal, scale, ss ? ss.handle() : null, sks ? sks.handle() : null);
      return [Tensor.fromNative(d.dq), Tensor.fromNative(d.dk), Tensor.fromNative(d.dv)];
    });
  } finally {
    lse.dispose();
  }
}
