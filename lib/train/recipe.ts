// Recipes: a YAML or JSON file that chains training stages, validated with zod before anything
// runs. Unknown keys are errors (a typo must not silently fall back to a default), and every
// error names the file and the key path, e.g. `recipe.yaml: stages[1].lora.r: ...`.
import { readFile } from 'node:fs/promises';

import { parse as parseYaml } from 'yaml';
import { z } from 'zod';

import { DEVICE_PATTERN } from '../tensor.js';

const positiveInt = z.number().int().positive();
const nonNegativeInt = z.number().int().nonnegative();

const dataSource = z.union([z.string().min(1), z.array(z.unknown())]);

const loraSchema = z.strictObject({
  r: positiveInt,
  alpha: z.number().positive().optional(),
  dropout: z.number().min(0).lt(1).optional(),
  targetModules: z.union([z.array(z.string().min(1)).min(1), z.string().min(1)]).optional(),
  rslora: z.boolean().optional(),
  /** QLoRA: the base weights are quantized to NF4 when the stage loads them. */
  quantize: z.literal('nf4').optional(),
});

/**
 * Context extension: a new RoPE base (ABF: raise theta) or a Hugging Face rope_scaling, written into
 * the model's config.json before the stage trains (typically with a longer seqLen).
 */
const ropeSchema = z.union([
  z.strictObject({ theta: z.number().gt(1, 'theta must be > 1 (RoPE base frequency)') }),
  z.strictObject({
    scaling: z.strictObject({
      rope_type: z.enum(['linear', 'dynamic', 'yarn', 'llama3']),
      factor: z.number().positive(),
      original_max_position_embeddings: positiveInt.optional(),
      low_freq_factor: z.number().optional(),
      high_freq_factor: z.number().optional(),
      beta_fast: z.number().optional(),
      beta_slow: z.number().optional(),
      attention_factor: z.number().optional(),
    }),
    maxPositionEmbeddings: positiveInt.optional(),
  }),
]);

const stageBase = {
  name: z.string().regex(/^[A-Za-z0-9._-]+$/, 'use letters, digits, ".", "_" or "-" (it names a directory)'),
  data: dataSource,
  seqLen: positiveInt.default(512),
  batchSize: positiveInt.default(8),
  gradAccum: positiveInt.default(1),
  /** Optimizer steps; default: what `epochs` passes over the data give. */
  steps: positiveInt.optional(),
  /** Passes over the data; default 1, or as many as `steps` needs when steps is given. */
  epochs: positiveInt.optional(),
  lr: z.number().positive().default(1e-4),
  schedule: z.enum(['cosine', 'linear', 'constant']).default('cosine'),
  warmupSteps: nonNegativeInt.default(0),
  minLrRatio: z.number().min(0).max(1).optional(),
  weightDecay: z.number().min(0).default(0.01),
  maxGradNorm: z.number().min(0).default(1),
  lora: loraSchema.optional(),
  checkpointEvery: positiveInt.optional(),
  checkpointLayers: z.boolean().default(false),
  seed: nonNegativeInt.optional(),
  rope: ropeSchema.optional(),
};

const pretrainStage = z.strictObject({
  ...stageBase,
  type: z.literal('pretrain'),
  /** General data mixed in against forgetting: a source and the fraction of examples it supplies. */
  replay: z.strictObject({ data: dataSource, ratio: z.number().min(0).lt(1) }).optional(),
  /** 'pack' (default) fills rows with whole documents; 'split' also cuts long documents into rows. */
  packing: z.enum(['pack', 'split', 'pad']).default('split'),
});

const sftStage = z.strictObject({
  ...stageBase,
  type: z.literal('sft'),
  packing: z.enum(['pack', 'pad']).default('pack'),
});

const judgeSchema = z.union([
  /** A synthetic task of the toy world, scored by exact match with the prompt's answer. */
  z.strictObject({ task: z.enum(['arithmetic', 'keyValue', 'copy', 'reverse']) }),
  /** A module whose default export is (prompt, response) => number (higher is better). */
  z.strictObject({ module: z.string().min(1) }),
]);

const dpoStage = z.strictObject({
  ...stageBase,
  type: z.literal('dpo'),
  /** Preference records { prompt, chosen, rejected } (strings or message lists). */
  beta: z.number().positive().default(0.1),
  loss: z.enum(['sigmoid', 'ipo', 'hinge']).default('sigmoid'),
  labelSmoothing: z.number().min(0).max(0.5).default(0),
  /** Rounds of generate, judge, pair, train; `data` then holds prompts ({ prompt }). */
  iterative: z
    .strictObject({
      rounds: positiveInt,
      samples: z.number().int().min(2).default(4),
      judge: judgeSchema,
      temperature: z.number().positive().default(1),
      maxNewTokens: positiveInt.default(16),
    })
    .optional(),
});

const distillStage = z.strictObject({
  ...stageBase,
  type: z.literal('distill'),
  /** The teacher: a model directory (a model this recipe wrote, or any Hugging Face directory). */
  teacher: z.string().min(1),
  /** A fresh student instead of the previous stage's model. */
  student: z.strictObject({ preset: z.enum(['micro', 'mini', 'tiny', 'small']), seed: nonNegativeInt.optional() }).optional(),
  alpha: z.number().min(0).max(1).default(0.5),
  kind: z.enum(['forward_kl', 'reverse_kl', 'jsd']).default('forward_kl'),
  temperature: z.number().positive().default(1),
  beta: z.number().min(0).max(1).default(0.5),
  packing: z.enum(['pack', 'split', 'pad']).default('split'),
});

/** Per-phase averaging: the weighted average of earlier stages' models (no training). */
const averageStage = z.strictObject({
  name: stageBase.name,
  type: z.literal('average'),
  stages: z.array(z.string().min(1)).min(2),
  weights: z.array(z.number().nonnegative()).optional(),
});

export const stageSchema = z.discriminatedUnion('type', [pretrainStage, sftStage, dpoStage, distillStage, averageStage]);

export const recipeSchema = z.strictObject({
  /** A Hugging Face model directory, or a preset to build from scratch (with a byte-level tokenizer). */
  model: z.union([z.string().min(1), z.strictObject({ preset: z.enum(['micro', 'mini', 'tiny', 'small']), seed: nonNegativeInt.optional() })]),
  /** Where each stage writes <output>/<stage name>/. */
  output: z.string().min(1),
  seed: nonNegativeInt.default(0),
  threads: positiveInt.optional(),
  /** Where every stage trains: 'cpu', 'cuda' or 'cuda:N'. */
  device: z.string().regex(DEVICE_PATTERN, "use 'cpu', 'cuda' or 'cuda:N'").default('cpu'),
  /**
   * The dtype of frozen weights: a LoRA or QLoRA base (its weights that are not NF4) and a
   * distillation teacher; activations follow it. Trainable weights are always f32 (the optimizer's
   * master copy). bf16 is the usual choice on a GPU.
   */
  dtype: z.enum(['f32', 'bf16']).default('f32'),
  stages: z.array(stageSchema).min(1),
});

export type Recipe = z.infer<typeof recipeSchema>;
export type StageConfig = z.infer<typeof stageSchema>;
export type RecipeInput = z.input<typeof recipeSchema>;

export class RecipeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RecipeError';
  }
}

function keyPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out ? `.${String(p)}` : String(p);
  return out || '(top level)';
}

/** Validates a recipe object; `where` names it in errors. */
export function parseRecipe(input: unknown, where = 'recipe'): Recipe {
  const r = recipeSchema.safeParse(input);
  if (!r.success) {
    const lines = r.error.issues.map((i) => {
      const keys = i.code === 'unrecognized_keys' ? ` (unknown key${i.keys.length > 1 ? 's' : ''} ${i.keys.map((k) => `'${k}'`).join(', ')})` : '';
      return `  ${keyPath(i.path)}: ${i.message}${keys}`;
    });
    throw new RecipeError(`${where}: invalid recipe:\n${lines.join('\n')}`);
  }
  const names = new Set<string>();
  r.data.stages.forEach((s, i) => {
    if (names.has(s.name)) throw new RecipeError(`${where}: stages[${i}].name: '${s.name}' is used by an earlier stage; stage names name output directories and must differ`);
    if (s.type === 'average') {
      s.stages.forEach((n, j) => {
        if (!names.has(n)) throw new RecipeError(`${where}: stages[${i}].stages[${j}]: '${n}' is not an earlier stage (${[...names].join(', ') || 'none'})`);
      });
      if (s.weights && s.weights.length !== s.stages.length) throw new RecipeError(`${where}: stages[${i}].weights: ${s.weights.length} weights for ${s.stages.length} stages`);
    }
    names.add(s.name);
  });
  return r.data;
}

/** Reads and validates a recipe file (.yaml, .yml or .json). */
export async function readRecipe(path: string): Promise<Recipe> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new RecipeError(`${path}: cannot read the recipe (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  let value: unknown;
  try {
    value = path.endsWith('.json') ? JSON.parse(text) : parseYaml(text);
  } catch (err) {
    throw new RecipeError(`${path}: not valid ${path.endsWith('.json') ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}`);
  }
  return parseRecipe(value, path);
}
