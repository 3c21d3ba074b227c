// Model configuration: Hugging Face's config.json for the Llama family (llama, mistral, qwen2,
// qwen3), validated with zod before anything is allocated, and the camelCase view the model uses.
// Both RoPE shapes are read: the classic `rope_theta` + `rope_scaling` (`type` or `rope_type`) and
// the newer `rope_parameters` ({ rope_type, rope_theta, ...scaling keys }).
import { z } from 'zod';

import type { RopeScaling } from '../ops/rope.js';

export const MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'qwen3'] as const;
export type ModelType = (typeof MODEL_TYPES)[number];

const positiveInt = z.number().int().positive();
const tokenIds = z.union([z.number().int(), z.array(z.number().int())]).nullable().optional();

const ropeScalingSchema = z.looseObject({
  type: z.string().optional(),
  rope_type: z.string().optional(),
  factor: z.number().optional(),
  original_max_position_embeddings: z.number().int().optional(),
  low_freq_factor: z.number().optional(),
  high_freq_factor: z.number().optional(),
  beta_fast: z.number().optional(),
  beta_slow: z.number().optional(),
  mscale: z.number().optional(),
  mscale_all_dim: z.number().optional(),
  attention_factor: z.number().optional(),
  truncate: z.boolean().optional(),
  rope_theta: z.number().optional(),
});

export const hfConfigSchema = z.looseObject({
  model_type: z.string(),
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  intermediate_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  num_key_value_heads: positiveInt.nullable().optional(),
  head_dim: positiveInt.nullable().optional(),
  rms_norm_eps: z.number().positive().optional(),
  rope_theta: z.number().optional(),
  rope_scaling: ropeScalingSchema.nullable().optional(),
  rope_parameters: ropeScalingSchema.nullable().optional(),
  max_position_embeddings: positiveInt.optional(),
  tie_word_embeddings: z.boolean().optional(),
  attention_bias: z.boolean().optional(),
  mlp_bias: z.boolean().optional(),
  hidden_act: z.string().optional(),
  bos_token_id: tokenIds,
  eos_token_id: tokenIds,
  pad_token_id: tokenIds,
  torch_dtype: z.string().nullable().optional(),
  sliding_window: z.number().int().nullable().optional(),
  use_sliding_window: z.boolean().optional(),
});

export type HfConfig = z.infer<typeof hfConfigSchema>;

/** What the model reads; `raw` is the config.json it came from (saved back with updates). */
export interface ModelConfig {
  modelType: ModelType;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling | null;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** Biases on q_proj, k_proj and v_proj. */
  qkvBias: boolean;
  /** A bias on o_proj. */
  oBias: boolean;
  /** Per-head RMSNorm of q and k before RoPE (qwen3). */
  qkNorm: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
  raw: HfConfig;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** Validates a parsed config.json; `where` names the file in errors. */
export function parseConfig(json: unknown, where = 'config.json'): ModelConfig {
  const parsed = hfConfigSchema.safeParse(json);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `  ${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`);
    throw new ConfigError(`${where}: invalid model config:\n${lines.join('\n')}`);
  }
  const c = parsed.data;
  if (!(MODEL_TYPES as readonly string[]).includes(c.model_type))
    throw new ConfigError(`${where}: model_type '${c.model_type}' is not supported; supported: ${MODEL_TYPES.join(', ')}`);
  const modelType = c.model_type as ModelType;
  if (c.hidden_act !== undefined && c.hidden_act !== 'silu')
    throw new ConfigError(`${where}: hidden_act '${c.hidden_act}' is not supported; the Llama family uses 'silu'`);
  if (c.mlp_bias) throw new ConfigError(`${where}: mlp_bias = true is not supported`);
  const numKvHeads = c.num_key_value_heads ?? c.num_attention_heads;
  if (c.num_attention_heads % numKvHeads !== 0)
    throw new ConfigError(`${where}: num_attention_heads (${c.num_attention_heads}) must be a multiple of num_key_value_heads (${numKvHeads})`);
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (!Number.isInteger(headDim)) throw new ConfigError(`${where}: hidden_size ${c.hidden_size} is not a multiple of num_attention_heads ${c.num_attention_heads}; set head_dim`);
  if (headDim % 2 !== 0) throw new ConfigError(`${where}: head_dim ${headDim} must be even for RoPE`);

  const rp = c.rope_parameters ?? null;
  const ropeTheta = rp?.rope_theta ?? c.rope_theta ?? 10000;
  if (!(ropeTheta > 1)) throw new ConfigError(`${where}: rope_theta must be > 1, got ${ropeTheta}`);
  const scalingSource = rp ?? c.rope_scaling ?? null;
  const ropeScaling = scalingSource ? toRopeScaling(scalingSource, where, rp ? 'rope_parameters' : 'rope_scaling') : null;

  const eos = c.eos_token_id;
  return {
    modelType,
    vocabSize: c.vocab_size,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    rmsNormEps: c.rms_norm_eps ?? 1e-6,
    ropeTheta,
    ropeScaling,
    maxPositionEmbeddings: c.max_position_embeddings ?? 2048,
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    // Qwen2 always has q/k/v biases and none on o_proj; the others follow attention_bias on all four.
    qkvBias: modelType === 'qwen2' ? true : (c.attention_bias ?? false),
    oBias: modelType === 'qwen2' ? false : (c.attention_bias ?? false),
    qkNorm: modelType === 'qwen3',
    bosTokenId: typeof c.bos_token_id === 'number' ? c.bos_token_id : null,
    eosTokenIds: eos === null || eos === undefined ? [] : Array.isArray(eos) ? eos : [eos],
    raw: c,
  };
}

const SCALING_TYPES = ['default', 'linear', 'dynamic', 'yarn', 'llama3'] as const;

function toRopeScaling(s: z.infer<typeof ropeScalingSchema>, where: string, key: string): RopeScaling | null {
  const type = s.rope_type ?? s.type ?? 'default';
  if (!(SCALING_TYPES as readonly string[]).includes(type))
    throw new ConfigError(`${where}: ${key}.rope_type '${type}' is not supported; supported: ${SCALING_TYPES.join(', ')}`);
  if (type === 'default') return null;
  if (s.factor === undefined) throw new ConfigError(`${where}: ${key}.factor is required for rope_type '${type}'`);
  const out: RopeScaling = { ropeType: type as RopeScaling['ropeType'], factor: s.factor };
  if (s.original_max_position_embeddings !== undefined) out.originalMaxPositionEmbeddings = s.original_max_position_embeddings;
  if (s.low_freq_factor !== undefined) out.lowFreqFactor = s.low_freq_factor;
  if (s.high_freq_factor !== undefined) out.highFreqFactor = s.high_freq_factor;
  if (s.beta_fast !== undefined) out.betaFast = s.beta_fast;
  if (s.beta_slow !== undefined) out.betaSlow = s.beta_slow;
  if (s.mscale !== undefined) out.mscale = s.mscale;
  if (s.mscale_all_dim !== undefined) out.mscaleAllDim = s.mscale_all_dim;
  if (s.attention_factor !== undefined) out.attentionFactor = s.attention_factor;
  if (s.truncate !== undefined) out.truncate = s.truncate;
  return out;
}

/** Small Llama configs for models built from scratch (the toy world). */
export const PRESETS = {
  /** ~0.1M parameters: unit tests. */
  micro: { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256 },
  /** ~0.15M parameters: small students (the demo's distillation). */
  mini: { hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512 },
  /** ~1M parameters: the CPU demo. */
  tiny: { hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 1024 },
  /** ~3.5M parameters: the training benchmark's shape (d = 256, 4 layers, 8 heads / 4 KV heads). */
  small: { hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 2048 },
} as const;

export type PresetName = keyof typeof PRESETS;

/** A Hugging Face llama config.json object for a preset and a vocabulary size. */
export function presetConfig(name: PresetName, vocabSize: number, overrides: Record<string, unknown> = {}): HfConfig {
  const p = PRESETS[name];
  if (!p) throw new ConfigError(`preset '${String(name)}' does not exist; presets: ${Object.keys(PRESETS).join(', ')}`);
  return hfConfigSchema.parse({
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: vocabSize,
    ...p,
    hidden_act: 'silu',
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    rope_scaling: null,
    tie_word_embeddings: true,
    attention_bias: false,
    torch_dtype: 'float32',
    ...overrides,
  });
}
