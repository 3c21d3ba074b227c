// `tunekit demo`: the recipe book on a toy world, on the CPU, in a few minutes.
//   1. pretrain a tiny Llama from scratch (byte-level tokenizer) on a synthetic corpus of prose,
//      solved sums and key-value lines;
//   2. QLoRA-SFT it (NF4 base, LoRA on every linear layer) on chat-formatted instructions;
//   3. measure exact-match accuracy on held-out prompts (never seen in training) before and after
//      SFT, and write an HTML report with the loss curves and the accuracy table.
// Everything runs through the public recipe runner, so the demo exercises what users run.
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';

import { arithmetic, evaluate, heldOutSet, instructionSet, keyValue, pretrainCorpus, writeJsonl, type Task } from '../data/synthetic/index.js';
import { generate } from '../generate/index.js';
import type { CausalLM } from '../models/llama.js';
import { barChartSvg, lineChartSvg, writeReport } from '../report/index.js';
import type { Tokenizer } from '../tokenizer/types.js';
import { parseRecipe } from '../train/recipe.js';
import { runRecipe } from '../train/stages.js';
import type { ProgressEvent } from '../train/trainer.js';

export interface DemoOptions {
  outputDir: string;
  /** A much shorter run (smoke test): the numbers are not meaningful. */
  quick?: boolean;
  log?: (line: string) => void;
  progress?: (label: string) => { update(e: ProgressEvent): void; stop(): void };
}

export interface DemoResult {
  table: { task: string; before: number; after: number; n: number }[];
  losses: Record<string, { step: number; loss: number }[]>;
  seconds: number;
  report: string;
}

const TASKS: { name: string; task: Task }[] = [
  { name: 'arithmetic (a+b, 0..49)', task: arithmetic({ max: 49, ops: ['+'] }) },
  { name: 'key-value recall', task: keyValue({ pairs: 3 }) },
];

export async function runDemo(options: DemoOptions): Promise<DemoResult> {
  const log = options.log ?? (() => {});
  const started = performance.now();
  const out = options.outputDir;
  const q = options.quick ?? false;
  await mkdir(join(out, 'data'), { recursive: true });

  const pretrainPath = join(out, 'data', 'pretrain.jsonl');
  const sftPath = join(out, 'data', 'sft.jsonl');
  await writeJsonl(pretrainPath, pretrainCorpus(q ? 200 : 20000, 1, { mix: { arithmetic: 4, keyValue: 3, prose: 2 }, arithmetic: { max: 49, ops: ['+'] }, keyValue: { pairs: 3 } }));
  const sft = TASKS.flatMap(({ task }, i) => instructionSet(task, q ? 100 : 5000, 10 + i, { form: 'messages' }));
  await writeJsonl(sftPath, sft);
  const evalN = q ? 16 : 200;

  const recipe = parseRecipe(
    {
      model: { preset: 'tiny', seed: 1 },
      output: join(out, 'run'),
      seed: 1,
      stages: [
        { name: 'pretrain', type: 'pretrain', data: pretrainPath, seqLen: 128, batchSize: 16, steps: q ? 6 : 1000, lr: 3e-3, warmupSteps: q ? 1 : 50, minLrRatio: 0.1 },
        { name: 'sft', type: 'sft', data: sftPath, seqLen: 128, batchSize: 16, steps: q ? 4 : 500, lr: 2e-3, warmupSteps: q ? 1 : 20, lora: { r: 16, alpha: 32, targetModules: 'all-linear', quantize: 'nf4' } },
      ],
    },
    'demo recipe',
  );

  const accuracy: Record<string, number[]> = {};
  const measure = async (model: CausalLM, tokenizer: Tokenizer, label: string) => {
    for (const { name, task } of TASKS) {
      const examples = heldOutSet(task, evalN, 99);
      const gen = (prompts: string[]) => generate(model, tokenizer, prompts, { chat: true, maxNewTokens: 8 });
      const r = await evaluate(gen, examples, { batchSize: 50, score: (o, a) => task.score(o, a) });
      (accuracy[name] ??= []).push(r.accuracy);
      log(`  ${label}: ${name}: ${(100 * r.accuracy).toFixed(1)}% exact match (${r.correct}/${r.total})`);
    }
  };

  const losses: Record<string, { step: number; loss: number }[]> = {};
  let bar: ReturnType<NonNullable<DemoOptions['progress']>> | null = null;
  log(`tunekit demo -> ${out}`);
  await runRecipe(recipe, {
    onStageStart: (stage, i) => {
      bar?.stop();
      log(`stage '${stage.name}' (${stage.type}${'lora' in stage && stage.lora ? ', QLoRA: NF4 base + LoRA r=16' : ', from scratch'}): ${i.steps} steps, ${(i.trainable / 1e6).toFixed(2)}M trainable parameters`);
      bar = options.progress?.(stage.name) ?? null;
    },
    onProgress: (stage, e) => {
      (losses[stage.name] ??= []).push({ step: e.step, loss: e.loss });
      bar?.update(e);
    },
    afterStage: async (stage, model, tokenizer) => {
      bar?.stop();
      bar = null;
      await measure(model, tokenizer, stage.name === 'pretrain' ? 'before SFT' : 'after SFT');
    },
  });
  const seconds = (performance.now() - started) / 1e3;
  const table = TASKS.map(({ name }) => ({ task: name, before: accuracy[name]![0]!, after: accuracy[name]![1]!, n: evalN }));

  const report = join(out, 'report.html');
  await writeReport(report, {
    title: 'tunekit demo',
    subtitle: `A ${'tiny'} Llama pretrained from scratch, then QLoRA-SFT, on the CPU in ${seconds.toFixed(0)} s`,
    sections: [
      {
        heading: 'Exact-match accuracy on held-out prompts',
        text: `${evalN} prompts per task that no training record contains, answered greedily through the chat template.`,
        table: { columns: ['task', 'before SFT', 'after SFT'], rows: table.map((r) => [r.task, `${(100 * r.before).toFixed(1)}%`, `${(100 * r.after).toFixed(1)}%`]) },
        svg: barChartSvg({
          title: 'Accuracy before and after QLoRA SFT',
          groups: table.map((r) => r.task),
          series: [
            { name: 'before SFT', values: table.map((r) => 100 * r.before) },
            { name: 'after SFT', values: table.map((r) => 100 * r.after) },
          ],
          yLabel: '% exact match',
        }),
      },
      ...Object.entries(losses).map(([name, points]) => ({
        heading: `Training loss: ${name}`,
        svg: lineChartSvg({ title: `${name} loss`, xLabel: 'step', yLabel: 'cross entropy (nats/token)', series: [{ name, points: points.map((p) => [p.step, p.loss] as const) }] }),
      })),
    ],
  });
  log('');
  log('task                        before SFT   after SFT');
  for (const r of table) log(`${r.task.padEnd(28)}${`${(100 * r.before).toFixed(1)}%`.padStart(10)}${`${(100 * r.after).toFixed(1)}%`.padStart(12)}`);
  log(`\nwall time ${seconds.toFixed(0)} s; report: ${report}`);
  return { table, losses, seconds, report };
}
