// Recipes: a YAML or JSON file that chains training stages, validated with zod before anything
// runs. Unknown keys are errors (a typo must not silently fall back to a default), and every
// error names the file and the key path, e.g. `recipe.yaml: stages[1].lora.r: ...`.
import { readFile } from 'node:fs/promises';

import { parse as parseYaml } from 'yaml';
import { z } from 'zod';

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

export const stageSchema = z.discriminatedUnion('type', [pretrainStage, sftStage]);

export const recipeSchema = z.strictObject({
  /** A Hugging Face model directory, or a preset to build from scratch (with a byte-level tokenizer). */
  model: z.union([z.string().min(1), z.strictObject({ preset: z.enum(['micro', 'tiny', 'small']), seed: nonNegativeInt.optional() })]),
  /** Where each stage writes <output>/<stage name>/. */
  output: z.string().min(1),
  seed: nonNegativeInt.default(0),
  threads: positiveInt.optional(),
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
