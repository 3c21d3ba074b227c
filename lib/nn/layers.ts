// The layers of a Llama-family decoder. A Linear holds a dense weight or an NF4-quantized one
// (QLoRA's frozen base), an optional bias, and optionally a LoRA pair (PEFT's names: lora_A, lora_B).
import { dequantize, type Nf4Weight } from '../nf4.js';
import { add, dropout, scale } from '../ops/elementwise.js';
import { matmul } from '../ops/matmul.js';
import { embedding, rmsNorm } from '../ops/norm.js';
import { qloraLinear } from '../ops/qlora.js';
import { ones, randn, zeros, type Device, type DType, type Tensor } from '../tensor.js';
import { Module, owned } from './module.js';

export interface InitOptions {
  dtype?: DType;
  device?: Device;
  /** 'random' draws weights (N(0, std)); 'empty' declares them to be loaded from a checkpoint. */
  init?: 'random' | 'empty';
  /** Standard deviation of random weights. Default 0.02 (Hugging Face's initializer_range). */
  std?: number;
  seed?: number;
}

export class Linear extends Module {
  quantized: Nf4Weight | null = null;
  /** LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA), when LoRA is applied. */
  loraScale = 0;
  /** Dropout probability on the LoRA input. */
  loraDropout = 0;
  /** The dtype the layer was built in (its dense weight's; what mergeLora gives an NF4 base). */
  readonly dtype: DType;

  constructor(
    readonly inFeatures: number,
    readonly outFeatures: number,
    options: InitOptions & { bias?: boolean } = {},
  ) {
    super();
    const { dtype = 'f32', device = 'cpu', init = 'random', std = 0.02, seed } = options;
    this.dtype = dtype;
    this.setParam('weight', init === 'random' ? owned(() => randn([outFeatures, inFeatures], { dtype, device, std, seed })) : null);
    if (options.bias) this.setParam('bias', init === 'random' ? owned(() => zeros([outFeatures], { dtype, device })) : null);
  }

  get weight(): Tensor {
    return this.param('weight');
  }

  get bias(): Tensor | null {
    return this.hasParam('bias') ? this.param('bias') : null;
  }

  get hasBias(): boolean {
    return this.declaresParameter('bias');
  }

  get hasLora(): boolean {
    return this.getModule('lora_A') !== undefined;
  }

  get loraA(): Tensor {
    return (this.getModule('lora_A') as LoraWeight).weight;
  }

  get loraB(): Tensor {
    return (this.getModule('lora_B') as LoraWeight).weight;
  }

  /** Replaces the dense weight by its NF4 quantization (QLoRA's frozen base). */
  setQuantized(q: Nf4Weight): void {
    if (q.shape.join() !== [this.outFeatures, this.inFeatures].join())
      throw new RangeError(`Linear: an NF4 weight of shape [${q.shape.join(', ')}] does not fit [${this.outFeatures}, ${this.inFeatures}]`);
    this.quantized?.dispose();
    this.quantized = q;
    this.setParam('weight', null);
  }

  /**
   * Adds a LoRA pair: A [r, in] random, B [out, r] zero, so the layer starts unchanged. The pair
   * is f32 whatever the base's dtype (PEFT's autocast_adapter_dtype): it is what the optimizer
   * updates, and bf16 would round away small updates. forward() casts it to the activations' dtype.
   */
  addLora(r: number, scaleValue: number, dropoutP: number, options: { seed?: number } = {}): void {
    const w = this.quantized ? null : this.weight;
    const dtype = 'f32';
    const device = w?.device ?? this.quantized!.packed.device;
    // PEFT draws A from kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); a normal
    // with the same variance keeps its scale.
    const std = 1 / Math.sqrt(3 * this.inFeatures);
    this.addModule('lora_A', new LoraWeight(owned(() => randn([r, this.inFeatures], { dtype, device, std, seed: options.seed }))));
    this.addModule('lora_B', new LoraWeight(owned(() => zeros([this.outFeatures, r], { dtype, device }))));
    this.loraA.requiresGrad = true;
    this.loraB.requiresGrad = true;
    this.loraScale = scaleValue;
    this.loraDropout = dropoutP;
  }

  removeLora(): void {
    this.deleteModule('lora_A');
    this.deleteModule('lora_B');
    this.loraScale = 0;
    this.loraDropout = 0;
  }

  /** The base weight in full precision (dequantized when NF4); a new tensor when dequantized. */
  denseWeight(dtype: DType = 'f32'): { weight: Tensor; temporary: boolean } {
    if (this.quantized) return { weight: dequantize(this.quantized, { dtype }), temporary: true };
    return { weight: this.weight, temporary: false };
  }

  /** x [..., in] -> [..., out]. */
  forward(x: Tensor): Tensor {
    const p = this.training ? this.loraDropout : 0;
    // The f32 LoRA pair in the activations' dtype (a differentiable cast: its gradients are f32).
    const lora = (t: Tensor) => (t.dtype === x.dtype ? t : t.to(x.dtype));
    let y: Tensor;
    if (this.quantized && this.hasLora) {
      // QLoRA: the NF4 weight is dequantized inside the GEMM, forward and backward.
      y = qloraLinear(x, this.quantized, lora(this.loraA), lora(this.loraB), { scale: this.loraScale, dropout: p });
    } else {
      const w = this.quantized ? dequantize(this.quantized, { dtype: x.dtype }) : this.weight;
      y = matmul(x, w, { transB: true });
      if (this.quantized) w.dispose();  // queued after the product that reads it
      if (this.hasLora) {
        const h = matmul(p > 0 ? dropout(x, { p }) : x, lora(this.loraA), { transB: true });
        y = add(y, scale(matmul(h, lora(this.loraB), { transB: true }), this.loraScale));
      }
    }
    const b = this.bias;
    return b ? add(y, b) : y;
  }

  override dispose(): void {
    this.quantized?.dispose();
    this.quantized = null;
    super.dispose();
  }
}

/** One LoRA matrix as its own module, so its parameter is named `lora_A.weight` as in PEFT. */
export class LoraWeight extends Module {
  constructor(w: Tensor) {
    super();
    this.setParam('weight', w);
  }

  get weight(): Tensor {
    return this.param('weight');
  }
}

export class Embedding extends Module {
  constructor(
    readonly numEmbeddings: number,
    readonly dim: number,
    options: InitOptions = {},
  ) {
    super();
    const { dtype = 'f32', device = 'cpu', init = 'random', std = 0.02, seed } = options;
    this.setParam('weight', init === 'random' ? owned(() => randn([numEmbeddings, dim], { dtype, device, std, seed })) : null);
  }

  get weight(): Tensor {
    return this.param('weight');
  }

  /** ids [...] i32 -> [..., dim]. */
  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight);
  }
}

export class RMSNorm extends Module {
  constructor(
    readonly dim: number,
    readonly eps: number,
    options: InitOptions = {},
  ) {
    super();
    const { dtype = 'f32', device = 'cpu', init = 'random' } = options;
    this.setParam('weight', init === 'random' ? owned(() => ones([dim], { dtype, device })) : null);
  }

  get weight(): Tensor {
    return this.param('weight');
  }

  forward(x: Tensor): Tensor {
    return rmsNorm(x, this.weight, { eps: this.eps });
  }
}
