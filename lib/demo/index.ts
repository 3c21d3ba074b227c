// `tunekit demo`: the recipe book on a toy world, on the CPU, in a few minutes. One recipe, run by
// the public recipe runner, so the demo exercises what users run:
//   pretrain   a tiny Llama from scratch (byte-level tokenizer) on prose, solved sums and
//              key-value lines, at 128 tokens;
//   sft        QLoRA (NF4 base, LoRA on every linear layer) on chat-formatted instructions;
//   dpo        LoRA DPO on key-value recall pairs (the right value against another key's);
//   average    the per-phase average of the SFT and DPO models;
//   extend     ABF context extension: RoPE base 10k -> 100k and training at 256 tokens on
//              needle documents, with replay of the pretraining corpus;
//   distill    a mini student taught by the pretrained model (forward KL, mixed with cross
//              entropy), against a mini student trained from scratch on the same tokens.
// Each phase reports the number that shows its effect, measured on held-out data: exact-match
// accuracy, preference accuracy, needle recall and likelihood beyond the original length, held-out
// cross entropy. The HTML report holds the loss curves, the tables and the NIAH heatmaps.
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';

import { noGrad } from '../autograd.js';
import { arithmetic, evaluate, heldOutSet, instructionSet, keyValue, needleCorpus, preferenceSet, pretrainCorpus, writeJsonl, type Task } from '../data/synthetic/index.js';
import { evaluateNiah, niahHeatmapSvg, type NiahReport } from '../eval/niah.js';
import { generate } from '../generate/index.js';
import { loadModel } from '../models/io.js';
import type { CausalLM } from '../models/llama.js';
import { crossEntropy } from '../ops/loss.js';
import { barChartSvg, lineChartSvg, writeReport, type ReportSection } from '../report/index.js';
import { tidy } from '../scope.js';
import { tensor } from '../tensor.js';
import { ByteTokenizer } from '../tokenizer/byte.js';
import type { Tokenizer } from '../tokenizer/types.js';
import { preferenceAccuracy, readPreferences, type TokenizedPair } from '../train/dpo.js';
import { parseRecipe, type StageConfig } from '../train/recipe.js';
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
  /** Exact-match accuracy per task: after pretraining (before SFT), after SFT, after DPO, of the average. */
  accuracy: { task: string; beforeSft: number; afterSft: number; afterDpo: number; average: number }[];
  preference: { beforeDpo: number; afterDpo: number; average: number };
  niah: { before: NiahReport; after: NiahReport };
  distill: { distilled: number; scratch: number };
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
  const data = join(out, 'data');
  await mkdir(data, { recursive: true });

  const corpusOptions = { mix: { arithmetic: 4, keyValue: 3, prose: 2 }, arithmetic: { max: 49, ops: ['+' as const] }, keyValue: { pairs: 3 } };
  await writeJsonl(join(data, 'pretrain.jsonl'), pretrainCorpus(q ? 200 : 20000, 1, corpusOptions));
  await writeJsonl(join(data, 'sft.jsonl'), TASKS.flatMap(({ task }, i) => instructionSet(task, q ? 100 : 5000, 10 + i, { form: 'messages' })));
  await writeJsonl(join(data, 'prefs.jsonl'), preferenceSet(TASKS[1]!.task, q ? 64 : 2000, 20, { form: 'messages' }));
  await writeJsonl(join(data, 'long.jsonl'), needleCorpus(q ? 50 : 3000, 30, { length: [120, 160, 200, 240] }));
  const evalN = q ? 16 : 200;
  const S = (full: number, quick: number) => (q ? quick : full);

  const recipe = parseRecipe(
    {
      model: { preset: 'tiny', seed: 1 },
      output: join(out, 'run'),
      seed: 1,
      stages: [
        { name: 'pretrain', type: 'pretrain', data: join(data, 'pretrain.jsonl'), seqLen: 128, batchSize: 16, steps: S(1000, 6), lr: 3e-3, warmupSteps: S(50, 1) },
        { name: 'sft', type: 'sft', data: join(data, 'sft.jsonl'), seqLen: 128, batchSize: 16, steps: S(600, 4), lr: 2e-3, warmupSteps: S(20, 1), lora: { r: 16, alpha: 32, targetModules: 'all-linear', quantize: 'nf4' } },
        { name: 'dpo', type: 'dpo', data: join(data, 'prefs.jsonl'), seqLen: 64, batchSize: 16, steps: S(80, 3), lr: 1e-3, beta: 0.3, lora: { r: 16, alpha: 32, targetModules: 'all-linear' } },
        { name: 'average', type: 'average', stages: ['sft', 'dpo'] },
        { name: 'extend', type: 'pretrain', data: join(data, 'long.jsonl'), replay: { data: join(data, 'pretrain.jsonl'), ratio: 0.25 }, seqLen: 256, batchSize: 8, steps: S(200, 3), lr: 1e-3, warmupSteps: S(10, 1), rope: { theta: 100000 } },
        // The teacher is the pretrained tiny model: it knows the corpus the students learn.
        { name: 'distill', type: 'distill', teacher: join(out, 'run', 'pretrain', 'model'), student: { preset: 'mini', seed: 5 }, data: join(data, 'pretrain.jsonl'), seqLen: 128, batchSize: 16, steps: S(150, 3), lr: 3e-3, alpha: 0.8, kind: 'forward_kl', temperature: 1 },
        // The baseline: the same student, the same tokens, only cross entropy (alpha = 1).
        { name: 'scratch', type: 'distill', teacher: join(out, 'run', 'pretrain', 'model'), student: { preset: 'mini', seed: 5 }, data: join(data, 'pretrain.jsonl'), seqLen: 128, batchSize: 16, steps: S(150, 3), lr: 3e-3, alpha: 1 },
      ],
    },
    'demo recipe',
  );

  const accuracy: Record<string, number[]> = {};
  const measureTasks = async (model: CausalLM, tokenizer: Tokenizer, label: string) => {
    for (const { name, task } of TASKS) {
      const examples = heldOutSet(task, evalN, 99);
      const gen = (prompts: string[]) => generate(model, tokenizer, prompts, { chat: true, maxNewTokens: 8 });
      const r = await evaluate(gen, examples, { batchSize: 50, score: (o, a) => task.score(o, a) });
      (accuracy[name] ??= []).push(r.accuracy);
      log(`  ${label}: ${name}: ${(100 * r.accuracy).toFixed(1)}% exact match`);
    }
  };
  const tokenizer = new ByteTokenizer();
  const heldOutPairs: TokenizedPair[] = await readPreferences(preferenceSet(TASKS[1]!.task, evalN, 21, { form: 'messages', split: 'eval' }), tokenizer);
  const preference: Partial<DemoResult['preference']> = {};
  const niahOptions = { lengths: q ? [100] : [100, 160, 220, 250], depths: q ? [0.5] : [0.1, 0.5, 0.9], perCell: q ? 1 : 4, seed: 7, maxNewTokens: 6 };
  const niah: Partial<DemoResult['niah']> = {};
  const heldOutText = pretrainCorpus(q ? 8 : 64, 4242, corpusOptions).map((r) => r.text);
  const crossEntropyOn = (model: CausalLM) => heldOutCrossEntropy(model, tokenizer, heldOutText);

  const losses: Record<string, { step: number; loss: number }[]> = {};
  let bar: ReturnType<NonNullable<DemoOptions['progress']>> | null = null;
  const stopBar = () => {
    bar?.stop();
    bar = null;
  };
  log(`tunekit demo -> ${out}`);
  await runRecipe(recipe, {
    onStageStart: (stage, i) => {
      stopBar();
      log(`stage '${stage.name}' (${describeStage(stage)})${stage.type === 'average' ? '' : `: ${i.steps} steps, ${(i.trainable / 1e6).toFixed(2)}M trainable parameters`}`);
      if (stage.type !== 'average') bar = options.progress?.(stage.name) ?? null;
    },
    onProgress: (stage, e) => {
      (losses[stage.name] ??= []).push({ step: e.step, loss: e.loss });
      bar?.update(e);
    },
    beforeStage: async (stage, model) => {
      if (stage.name === 'dpo') preference.beforeDpo = await preferenceAccuracy(model, heldOutPairs, { seqLen: 64 });
      if (stage.name === 'extend') niah.before = await evaluateNiah(model, tokenizer, niahOptions);
    },
    afterStage: async (stage, model) => {
      stopBar();
      if (stage.name === 'pretrain') await measureTasks(model, tokenizer, 'after pretraining (before SFT)');
      if (stage.name === 'sft') await measureTasks(model, tokenizer, 'after SFT');
      if (stage.name === 'dpo') {
        await measureTasks(model, tokenizer, 'after DPO');
        preference.afterDpo = await preferenceAccuracy(model, heldOutPairs, { seqLen: 64 });
        log(`  preference accuracy on held-out pairs: ${(100 * preference.beforeDpo!).toFixed(1)}% before DPO, ${(100 * preference.afterDpo).toFixed(1)}% after`);
      }
      if (stage.name === 'extend') niah.after = await evaluateNiah(model, tokenizer, niahOptions);
    },
  });
  // The average is not trained: measure it from its directory.
  const averaged = await loadModel(join(out, 'run', 'average', 'model'));
  try {
    await measureTasks(averaged, tokenizer, 'per-phase average (SFT, DPO)');
    preference.average = await preferenceAccuracy(averaged, heldOutPairs, { seqLen: 64 });
  } finally {
    averaged.dispose();
  }
  const students: Record<string, number> = {};
  for (const name of ['distill', 'scratch']) {
    const m = await loadModel(join(out, 'run', name, 'model'));
    students[name] = crossEntropyOn(m);
    m.dispose();
  }
  const seconds = (performance.now() - started) / 1e3;

  const result: DemoResult = {
    accuracy: TASKS.map(({ name }) => ({ task: name, beforeSft: accuracy[name]![0]!, afterSft: accuracy[name]![1]!, afterDpo: accuracy[name]![2]!, average: accuracy[name]![3]! })),
    preference: preference as DemoResult['preference'],
    niah: niah as DemoResult['niah'],
    distill: { distilled: students.distill!, scratch: students.scratch! },
    losses,
    seconds,
    report: join(out, 'report.html'),
  };
  await writeDemoReport(result, evalN);
  printSummary(result, log);
  return result;
}

function describeStage(stage: StageConfig): string {
  switch (stage.type) {
    case 'pretrain':
      return stage.rope ? 'pretrain: ABF RoPE 10k -> 100k at 256 tokens, with replay' : 'pretrain from scratch at 128 tokens';
    case 'sft':
      return 'SFT with QLoRA: NF4 base + LoRA r=16';
    case 'dpo':
      return 'DPO with LoRA';
    case 'average':
      return `per-phase average of ${stage.stages.join(' and ')}`;
    case 'distill':
      return stage.alpha === 1 ? 'mini student from scratch, cross entropy only' : 'mini student distilled from the pretrained model';
  }
}

/** Mean cross entropy per token (nats) of a model on held-out texts. */
function heldOutCrossEntropy(model: CausalLM, tokenizer: Tokenizer, texts: readonly string[]): number {
  let sum = 0;
  let count = 0;
  for (const text of texts) {
    const ids = tokenizer.encode(text).slice(0, 128);
    if (ids.length < 2) continue;
    const targets = ids.map((_, i) => (i + 1 < ids.length ? ids[i + 1]! : -100));
    sum += tidy(() => noGrad(() => crossEntropy(model.forward(tensor(Int32Array.from(ids), [1, ids.length], { device: model.device })), tensor(Int32Array.from(targets), [1, ids.length], { device: model.device }), { reduction: 'sum' }).toArraySync()[0]!));
    count += ids.length - 1;
  }
  return sum / count;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

function printSummary(r: DemoResult, log: (line: string) => void): void {
  log('');
  log('exact match on held-out prompts   before SFT  after SFT  after DPO  average');
  for (const a of r.accuracy) log(`${a.task.padEnd(32)}${pct(a.beforeSft).padStart(11)}${pct(a.afterSft).padStart(11)}${pct(a.afterDpo).padStart(11)}${pct(a.average).padStart(9)}`);
  log(`preference accuracy (held-out pairs): ${pct(r.preference.beforeDpo)} before DPO, ${pct(r.preference.afterDpo)} after, ${pct(r.preference.average)} for the average`);
  const beyond = (rep: NiahReport) => rep.cells.filter((c) => c.length > 128);
  const recall = (rep: NiahReport) => beyond(rep).reduce((a, c) => a + c.correct, 0) / Math.max(1, beyond(rep).reduce((a, c) => a + c.total, 0));
  const loglik = (rep: NiahReport) => beyond(rep).reduce((a, c) => a + c.logLikelihood, 0) / Math.max(1, beyond(rep).length);
  log(`needle recall beyond 128 tokens: ${pct(recall(r.niah.before))} before ABF extension, ${pct(recall(r.niah.after))} after (needle log-likelihood ${loglik(r.niah.before).toFixed(2)} -> ${loglik(r.niah.after).toFixed(2)})`);
  log(`held-out cross entropy of a mini student: distilled ${r.distill.distilled.toFixed(3)} vs from scratch ${r.distill.scratch.toFixed(3)} nats/token (same tokens)`);
  log(`\nwall time ${r.seconds.toFixed(0)} s; report: ${r.report}`);
}

async function writeDemoReport(r: DemoResult, evalN: number): Promise<void> {
  const sections: ReportSection[] = [
    {
      heading: 'Exact-match accuracy on held-out prompts',
      text: `${evalN} prompts per task that no training record contains, answered greedily through the chat template.`,
      table: { columns: ['task', 'before SFT', 'after SFT', 'after DPO', 'average (SFT, DPO)'], rows: r.accuracy.map((a) => [a.task, pct(a.beforeSft), pct(a.afterSft), pct(a.afterDpo), pct(a.average)]) },
      svg: barChartSvg({
        title: 'Accuracy by phase',
        groups: r.accuracy.map((a) => a.task),
        series: [
          { name: 'before SFT', values: r.accuracy.map((a) => 100 * a.beforeSft) },
          { name: 'after SFT', values: r.accuracy.map((a) => 100 * a.afterSft) },
          { name: 'after DPO', values: r.accuracy.map((a) => 100 * a.afterDpo) },
          { name: 'average', values: r.accuracy.map((a) => 100 * a.average) },
        ],
        yLabel: '% exact match',
      }),
    },
    {
      heading: 'DPO: preference accuracy on held-out pairs',
      text: 'The fraction of held-out key-value pairs (the right value against another key\'s) whose right answer the model finds more likely.',
      table: { columns: ['before DPO', 'after DPO', 'per-phase average'], rows: [[pct(r.preference.beforeDpo), pct(r.preference.afterDpo), pct(r.preference.average)]] },
    },
    { heading: 'Needle recall before ABF context extension', text: 'The model was pretrained at 128 tokens; haystacks up to 250 characters (tokens).', svg: niahHeatmapSvg(r.niah.before, { metric: 'exact', title: 'before: exact match' }) },
    { heading: 'Needle recall after ABF context extension (RoPE base 100k, 256 tokens)', svg: niahHeatmapSvg(r.niah.after, { metric: 'exact', title: 'after: exact match' }) },
    { heading: 'Needle log-likelihood after extension', svg: niahHeatmapSvg(r.niah.after, { metric: 'logLikelihood', title: 'after: log p(needle value)' }) },
    {
      heading: 'Distillation: a mini student on the same token budget',
      table: { columns: ['student', 'held-out cross entropy (nats/token)'], rows: [['distilled from the pretrained tiny model', r.distill.distilled.toFixed(3)], ['trained from scratch', r.distill.scratch.toFixed(3)]] },
    },
    ...Object.entries(r.losses).map(([name, points]) => ({
      heading: `Training loss: ${name}`,
      svg: lineChartSvg({ title: `${name} loss`, xLabel: 'step', yLabel: 'loss', series: [{ name, points: points.map((p) => [p.step, p.loss] as const) }] }),
    })),
  ];
  await writeReport(r.report, { title: 'tunekit demo', subtitle: `The recipe book on a toy world, on the CPU, in ${r.seconds.toFixed(0)} s`, sections });
}
