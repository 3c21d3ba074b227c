// The Llama-family causal LM (llama, mistral, qwen2, qwen3) with Hugging Face's module names and
// semantics:
//   h = embed(ids)
//   per layer: h = h + o_proj(attn(rope(q), rope(k), v)) on input_layernorm(h)
//              h = h + down_proj(silu(gate_proj(x)) * up_proj(x)), x = post_attention_layernorm(h)
//   logits = lm_head(norm(h))   (lm_head is embed_tokens' weight when tie_word_embeddings)
// q, k, v stay in [B, T, heads, head_dim], the layout the fused attention and RoPE kernels take,
// so no transposes are needed; qwen3 normalizes q and k per head (q_norm, k_norm) before RoPE.
import { checkpoint } from '../autograd.js';
import { Embedding, Linear, RMSNorm, type InitOptions } from '../nn/layers.js';
import { Module, ModuleList, owned } from '../nn/module.js';
import { attention } from '../ops/attention.js';
import { add } from '../ops/elementwise.js';
import { matmul } from '../ops/matmul.js';
import { swiglu } from '../ops/norm.js';
import { rope } from '../ops/rope.js';
import { concat } from '../ops/shape.js';
import { canonicalDevice, type Device, type Tensor } from '../tensor.js';
import type { ModelConfig } from './config.js';

export interface ForwardOptions {
  /** i32 positions [T] or [B, T] (restarting per packed document). Default 0..T-1. */
  positions?: Tensor;
  /** i32 document ids [B, T] of packed rows: no attention across documents. */
  segmentIds?: Tensor;
  /** Recompute each decoder layer during backward instead of keeping its activations. */
  checkpointLayers?: boolean;
  /**
   * Keys and values of earlier tokens (generation): this call's keys and values are appended to
   * it, and its queries attend to all of them. With segmentIds, keySegmentIds [B, S] must give the
   * ids of every cached key plus this call's.
   */
  cache?: KvCache;
  keySegmentIds?: Tensor;
}

/** Per-layer keys and values [B, S, Hkv, hd] of the tokens seen so far. Owns its tensors. */
export class KvCache {
  readonly layers: { k: Tensor | null; v: Tensor | null }[];

  constructor(numLayers: number) {
    this.layers = Array.from({ length: numLayers }, () => ({ k: null, v: null }));
  }

  /** Tokens cached so far. */
  get length(): number {
    return this.layers[0]?.k?.shape[1] ?? 0;
  }

  /** Appends along the sequence axis and returns the whole keys and values. */
  append(layer: number, k: Tensor, v: Tensor): { k: Tensor; v: Tensor } {
    const slot = this.layers[layer]!;
    const nk = owned(() => (slot.k ? concat([slot.k, k], 1) : k.reshape([...k.shape])));
    const nv = owned(() => (slot.v ? concat([slot.v, v], 1) : v.reshape([...v.shape])));
    slot.k?.dispose();
    slot.v?.dispose();
    slot.k = nk;
    slot.v = nv;
    return { k: nk, v: nv };
  }

  dispose(): void {
    for (const slot of this.layers) {
      slot.k?.dispose();
      slot.v?.dispose();
      slot.k = slot.v = null;
    }
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

export class Attention extends Module {
  readonly qProj: Linear;
  readonly kProj: Linear;
  readonly vProj: Linear;
  readonly oProj: Linear;
  readonly qNorm: RMSNorm | null;
  readonly kNorm: RMSNorm | null;

  constructor(readonly config: ModelConfig, init: InitOptions) {
    super();
    const { hiddenSize: d, numHeads: h, numKvHeads: kv, headDim: hd } = config;
    this.qProj = this.addModule('q_proj', new Linear(d, h * hd, { ...init, bias: config.qkvBias }));
    this.kProj = this.addModule('k_proj', new Linear(d, kv * hd, { ...init, bias: config.qkvBias }));
    this.vProj = this.addModule('v_proj', new Linear(d, kv * hd, { ...init, bias: config.qkvBias }));
    this.oProj = this.addModule('o_proj', new Linear(h * hd, d, { ...init, bias: config.oBias }));
    this.qNorm = config.qkNorm ? this.addModule('q_norm', new RMSNorm(hd, config.rmsNormEps, init)) : null;
    this.kNorm = config.qkNorm ? this.addModule('k_norm', new RMSNorm(hd, config.rmsNormEps, init)) : null;
  }

  /** x [B, T, D] -> [B, T, D]. */
  forward(x: Tensor, options: ForwardOptions = {}, layerIndex = 0): Tensor {
    const { numHeads: h, numKvHeads: kv, headDim: hd, ropeTheta, ropeScaling, maxPositionEmbeddings } = this.config;
    const [B, T] = x.shape as [number, number, number];
    let q = this.qProj.forward(x).reshape([B, T, h, hd]);
    let k = this.kProj.forward(x).reshape([B, T, kv, hd]);
    const v = this.vProj.forward(x).reshape([B, T, kv, hd]);
    if (this.qNorm && this.kNorm) {
      q = this.qNorm.forward(q);
      k = this.kNorm.forward(k);
    }
    const ropeOptions = { theta: ropeTheta, positions: options.positions, maxPositionEmbeddings, ...(ropeScaling ? { scaling: ropeScaling } : {}) };
    q = rope(q, ropeOptions);
    k = rope(k, ropeOptions);
    const keys = options.cache ? options.cache.append(layerIndex, k, v) : { k, v };
    const o = attention(q, keys.k, keys.v, { causal: true, segmentIds: options.segmentIds, keySegmentIds: options.keySegmentIds });
    return this.oProj.forward(o.reshape([B, T, h * hd]));
  }
}

export class Mlp extends Module {
  readonly gateProj: Linear;
  readonly upProj: Linear;
  readonly downProj: Linear;

  constructor(config: ModelConfig, init: InitOptions) {
    super();
    this.gateProj = this.addModule('gate_proj', new Linear(config.hiddenSize, config.intermediateSize, init));
    this.upProj = this.addModule('up_proj', new Linear(config.hiddenSize, config.intermediateSize, init));
    this.downProj = this.addModule('down_proj', new Linear(config.intermediateSize, config.hiddenSize, init));
  }

  forward(x: Tensor): Tensor {
    return this.downProj.forward(swiglu(this.gateProj.forward(x), this.upProj.forward(x)));
  }
}

export class DecoderLayer extends Module {
  readonly selfAttn: Attention;
  readonly mlp: Mlp;
  readonly inputLayernorm: RMSNorm;
  readonly postAttentionLayernorm: RMSNorm;

  constructor(config: ModelConfig, init: InitOptions) {
    super();
    this.selfAttn = this.addModule('self_attn', new Attention(config, init));
    this.mlp = this.addModule('mlp', new Mlp(config, init));
    this.inputLayernorm = this.addModule('input_layernorm', new RMSNorm(config.hiddenSize, config.rmsNormEps, init));
    this.postAttentionLayernorm = this.addModule('post_attention_layernorm', new RMSNorm(config.hiddenSize, config.rmsNormEps, init));
  }

  forward(h: Tensor, options: ForwardOptions = {}, layerIndex = 0): Tensor {
    const a = add(h, this.selfAttn.forward(this.inputLayernorm.forward(h), options, layerIndex));
    return add(a, this.mlp.forward(this.postAttentionLayernorm.forward(a)));
  }
}

/** The decoder stack: HF's `model.` prefix. */
export class DecoderStack extends Module {
  readonly embedTokens: Embedding;
  readonly layers: DecoderLayer[];
  readonly norm: RMSNorm;

  constructor(config: ModelConfig, init: InitOptions) {
    super();
    this.embedTokens = this.addModule('embed_tokens', new Embedding(config.vocabSize, config.hiddenSize, init));
    const layers = this.addModule('layers', new ModuleList<DecoderLayer>());
    for (let i = 0; i < config.numLayers; i++) layers.push(new DecoderLayer(config, init));
    this.layers = layers.items;
    this.norm = this.addModule('norm', new RMSNorm(config.hiddenSize, config.rmsNormEps, init));
  }
}

export class CausalLM extends Module {
  readonly model: DecoderStack;
  readonly lmHead: Linear | null;
  /** Where the weights live ('cpu', 'cuda:0', ...); inputs built for the model go there too. */
  readonly device: Device;

  constructor(readonly config: ModelConfig, init: InitOptions = {}) {
    super();
    this.device = canonicalDevice(init.device ?? 'cpu', 'CausalLM');
    init = { ...init, device: this.device };
    this.model = this.addModule('model', new DecoderStack(config, init));
    this.lmHead = config.tieWordEmbeddings ? null : this.addModule('lm_head', new Linear(config.hiddenSize, config.vocabSize, init));
  }

  /** The output projection [V, D]: lm_head's weight, or the embedding's when tied. */
  get lmHeadWeight(): Tensor {
    return this.lmHead ? this.lmHead.weight : this.model.embedTokens.weight;
  }

  /** Final hidden states [B, T, D] (after the last norm) for ids [B, T] i32. */
  hidden(ids: Tensor, options: ForwardOptions = {}): Tensor {
    if (ids.shape.length !== 2 || ids.dtype !== 'i32') throw new TypeError(`forward: ids must be i32 [B, T], got ${ids.toString()}`);
    let h = this.model.embedTokens.forward(ids);
    if (options.cache && options.checkpointLayers) throw new TypeError('forward: checkpointLayers is for training; it cannot be combined with a KV cache');
    this.model.layers.forEach((layer, i) => {
      h = options.checkpointLayers ? checkpoint((x) => layer.forward(x, options, i), h) : layer.forward(h, options, i);
    });
    return this.model.norm.forward(h);
  }

  /** Logits [B, T, V] for ids [B, T] i32. */
  forward(ids: Tensor, options: ForwardOptions = {}): Tensor {
    return this.logits(this.hidden(ids, options));
  }

  /** The LM head on hidden states [..., D] -> logits [..., V]. */
  logits(h: Tensor): Tensor {
    return this.lmHead ? this.lmHead.forward(h) : matmul(h, this.model.embedTokens.weight, { transB: true });
  }

  /** An empty KV cache for generation. */
  newCache(): KvCache {
    return new KvCache(this.config.numLayers);
  }

  /** Every Linear of the decoder layers by dotted name (LoRA and NF4 targets; lm_head excluded). */
  linearLayers(): [string, Linear][] {
    return this.namedModules().filter((e): e is [string, Linear] => e[1] instanceof Linear && e[0] !== 'lm_head');
  }
}
