#!/usr/bin/env node
// The tunekit command line: thin wrappers over the library, argument errors with the usage line.
import { parseArgs } from 'node:util';
import { dirname } from 'node:path';

import cliProgress from 'cli-progress';

import { runNiahCommand } from '../eval/niah.js';
import { generate } from '../generate/index.js';
import { averageCheckpoints } from '../models/average.js';
import { loadModel, saveModel } from '../models/io.js';
import { loadAdapter, mergeLora } from '../models/lora.js';
import { info } from '../runtime.js';
import { DEVICE_PATTERN, type Device } from '../tensor.js';
import { loadTokenizer } from '../tokenizer/load.js';
import { readRecipe } from '../train/recipe.js';
import { runRecipe } from '../train/stages.js';
import type { ProgressEvent } from '../train/trainer.js';

const usage = `usage: tunekit <command> [options]

commands:
  info                       version, CPU ISA and threads, CUDA devices and cuBLAS (--json for JSON)
  train <recipe.yaml> [--device cuda]   run a recipe's stages (Ctrl-C writes a checkpoint; run again to resume);
                             --device overrides the recipe's device
  generate --model DIR --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--adapter DIR] [--device D]
  merge --model DIR --adapter DIR --out DIR     fold a LoRA adapter into its base (NF4 bases too) and save it
  average DIR... --out DIR [--weights 0.5,0.5] [--dtype f32|bf16]   weighted average of checkpoints, tensor by tensor
  eval niah --model DIR [--adapter DIR] --lengths 256,512 --depths 0,0.5,1 [--per-cell N] [--chat] [--out PATH] [--device D]
  demo [--out DIR] [--quick]  pretrain a tiny Llama from scratch, QLoRA-SFT it, and report what changed
`;

class UsageError extends Error {}

function checkDeviceOption(value: string): Device {
  if (!DEVICE_PATTERN.test(value)) throw new UsageError(`--device must be cpu, cuda or cuda:N, got '${value}'`);
  return value as Device;
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '?';
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${Math.round(s)}s`;
}

/** Host memory, and the device's peak when training on a GPU. */
function memoryLabel(e: ProgressEvent): string {
  const mib = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;
  return `mem ${mib(e.memoryBytes)}${e.deviceMemoryBytes === undefined ? '' : `, device peak ${mib(e.deviceMemoryBytes)}`}`;
}

/** A progress bar for one training stage on stderr (a line per step when stderr is not a TTY). */
export function progressReporter(label: string): { update(e: ProgressEvent): void; stop(): void } {
  if (!process.stderr.isTTY) {
    let last = 0;
    return {
      update(e) {
        const now = Date.now();
        if (now - last < 2000 && e.step !== e.totalSteps) return;
        last = now;
        process.stderr.write(`${label} step ${e.step}/${e.totalSteps} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)} ${Math.round(e.tokensPerSecond)} tok/s ETA ${formatSeconds(e.etaSeconds)} ${memoryLabel(e)}\n`);
      },
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar(
    { format: `${label} [{bar}] {value}/{total} | loss {loss} | lr {lr} | {tps} tok/s | ETA {eta_h} | {mem}`, hideCursor: true, stream: process.stderr },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(e) {
      const payload = { loss: e.loss.toFixed(4), lr: e.lr.toExponential(2), tps: Math.round(e.tokensPerSecond), eta_h: formatSeconds(e.etaSeconds), mem: memoryLabel(e) };
      if (!started) {
        bar.start(e.totalSteps, e.step, payload);
        started = true;
      } else {
        bar.update(e.step, payload);
      }
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

async function cmdTrain(args: string[]): Promise<number> {
  const { positionals, values } = parseArgs({ args, allowPositionals: true, options: { device: { type: 'string' } } });
  if (positionals.length !== 1) throw new UsageError('train needs exactly one recipe file');
  const path = positionals[0]!;
  const recipe = await readRecipe(path);
  if (values.device !== undefined) recipe.device = checkDeviceOption(values.device);
  let bar: ReturnType<typeof progressReporter> | null = null;
  const outcomes = await runRecipe(recipe, {
    baseDir: dirname(path),
    handleSigint: true,
    onStageStart: (stage, i) => {
      bar?.stop();
      if (stage.type === 'average') {
        process.stderr.write(`stage ${i.index + 1}/${recipe.stages.length} '${stage.name}': averaging ${stage.stages.join(', ')}\n`);
        bar = null;
        return;
      }
      process.stderr.write(`stage ${i.index + 1}/${recipe.stages.length} '${stage.name}' (${stage.type}${stage.lora ? `, LoRA r=${stage.lora.r}${stage.lora.quantize ? ' on NF4' : ''}` : ''}): ${i.steps} steps, ${(i.trainable / 1e6).toFixed(2)}M trainable parameters\n`);
      bar = progressReporter(stage.name);
    },
    onProgress: (_, e) => bar?.update(e),
  });
  (bar as ReturnType<typeof progressReporter> | null)?.stop();
  for (const o of outcomes) {
    if (o.skipped) process.stdout.write(`${o.name}: already complete (${o.modelDir})\n`);
    else if (o.result?.stopped !== 'done') process.stdout.write(`${o.name}: stopped at step ${o.result?.steps} (${o.result?.stopped}); checkpoint ${o.result?.lastCheckpoint}. Run the same command to resume.\n`);
    else process.stdout.write(`${o.name}: ${o.result.steps} steps, final loss ${o.result.losses.at(-1)?.loss.toFixed(4)} -> ${o.modelDir}\n`);
  }
  return outcomes.some((o) => o.result && o.result.stopped !== 'done') ? 130 : 0;
}

async function cmdGenerate(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: 'string' },
      adapter: { type: 'string' },
      prompt: { type: 'string', multiple: true },
      chat: { type: 'boolean', default: false },
      'max-new-tokens': { type: 'string', default: '64' },
      temperature: { type: 'string', default: '0' },
      'top-k': { type: 'string', default: '0' },
      'top-p': { type: 'string', default: '1' },
      seed: { type: 'string', default: '0' },
      device: { type: 'string', default: 'cpu' },
    },
  });
  if (!values.model) throw new UsageError('generate needs --model DIR');
  if (!values.prompt?.length) throw new UsageError('generate needs --prompt TEXT (repeat it for a batch)');
  const model = await loadModel(values.model, { device: checkDeviceOption(values.device) });
  try {
    if (values.adapter) await loadAdapter(model, values.adapter);
    const tokenizer = await loadTokenizer(values.model);
    const texts = await generate(model, tokenizer, values.prompt, {
      chat: values.chat,
      maxNewTokens: Number(values['max-new-tokens']),
      temperature: Number(values.temperature),
      topK: Number(values['top-k']),
      topP: Number(values['top-p']),
      seed: Number(values.seed),
    });
    for (const t of texts) process.stdout.write(`${t}\n`);
  } finally {
    model.dispose();
  }
  return 0;
}

async function cmdMerge(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { model: { type: 'string' }, adapter: { type: 'string' }, out: { type: 'string' } } });
  if (!values.model || !values.adapter || !values.out) throw new UsageError('merge needs --model DIR --adapter DIR --out DIR');
  const model = await loadModel(values.model);
  try {
    await loadAdapter(model, values.adapter);
    mergeLora(model);
    await saveModel(model, values.out, { tokenizerDir: values.model });
  } finally {
    model.dispose();
  }
  process.stdout.write(`merged ${values.adapter} into ${values.model} -> ${values.out}\n`);
  return 0;
}

function numberList(value: string | undefined, what: string): number[] | undefined {
  if (value === undefined) return undefined;
  const list = value.split(',').map((v) => Number(v.trim()));
  if (list.some((v) => !Number.isFinite(v))) throw new UsageError(`${what} must be a comma-separated list of numbers, got '${value}'`);
  return list;
}

async function cmdAverage(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { out: { type: 'string' }, weights: { type: 'string' }, dtype: { type: 'string' } } });
  if (positionals.length < 1 || !values.out) throw new UsageError('average needs checkpoint directories and --out DIR');
  if (values.dtype !== undefined && values.dtype !== 'f32' && values.dtype !== 'bf16') throw new UsageError(`--dtype must be f32 or bf16, got '${values.dtype}'`);
  const weights = numberList(values.weights, '--weights');
  const r = await averageCheckpoints(positionals, values.out, { ...(weights ? { weights } : {}), ...(values.dtype ? { dtype: values.dtype as 'f32' | 'bf16' } : {}) });
  process.stdout.write(`averaged ${positionals.length} checkpoints (${r.tensors} tensors, ${(r.bytes / 2 ** 20).toFixed(1)} MiB) -> ${values.out}\n`);
  return 0;
}

async function cmdEval(args: string[]): Promise<number> {
  const [what, ...rest] = args;
  if (what !== 'niah') throw new UsageError(`eval: unknown evaluation '${what ?? ''}'; available: niah`);
  const { values } = parseArgs({
    args: rest,
    options: {
      model: { type: 'string' },
      adapter: { type: 'string' },
      lengths: { type: 'string' },
      depths: { type: 'string', default: '0,0.25,0.5,0.75,1' },
      'per-cell': { type: 'string', default: '5' },
      seed: { type: 'string', default: '0' },
      chat: { type: 'boolean', default: false },
      out: { type: 'string' },
      device: { type: 'string', default: 'cpu' },
    },
  });
  if (!values.model) throw new UsageError('eval niah needs --model DIR');
  const lengths = numberList(values.lengths, '--lengths');
  if (!lengths) throw new UsageError('eval niah needs --lengths, e.g. --lengths 256,512,1024');
  await runNiahCommand({
    modelDir: values.model,
    ...(values.adapter ? { adapterDir: values.adapter } : {}),
    lengths,
    depths: numberList(values.depths, '--depths')!,
    perCell: Number(values['per-cell']),
    seed: Number(values.seed),
    chat: values.chat,
    device: checkDeviceOption(values.device),
    ...(values.out ? { out: values.out } : {}),
  });
  return 0;
}

async function cmdDemo(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { out: { type: 'string', default: 'tunekit-demo' }, quick: { type: 'boolean', default: false } } });
  const { runDemo } = await import('../demo/index.js');
  await runDemo({ outputDir: values.out!, quick: values.quick, log: (line) => process.stdout.write(`${line}\n`), progress: progressReporter });
  return 0;
}

function cmdInfo(args: string[]): number {
  const i = info();
  if (args.includes('--json')) {
    process.stdout.write(JSON.stringify(i, null, 2) + '\n');
    return 0;
  }
  const lines = [
    `tunekit ${i.version} (Node-API ${i.napi})`,
    `cpu:  ${i.cpu.isa}${i.cpu.bf16 ? ' + bf16' : ''}, ${i.cpu.threads} threads (detected: ${i.cpu.detected})`,
    `cuda: ${i.cuda.available ? i.cuda.devices.map((d) => `${d.name} (sm_${d.computeCapability.replace('.', '')})`).join(', ') : i.cuda.status ?? 'none'}${i.cuda.compiled ? `, cuBLASLt ${i.cuda.cublas ? 'yes' : 'no'}` : ''}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(usage);
    return command ? 0 : 1;
  }
  try {
    switch (command) {
      case 'info':
        return cmdInfo(rest);
      case 'train':
        return await cmdTrain(rest);
      case 'generate':
        return await cmdGenerate(rest);
      case 'merge':
        return await cmdMerge(rest);
      case 'demo':
        return await cmdDemo(rest);
      case 'average':
        return await cmdAverage(rest);
      case 'eval':
        return await cmdEval(rest);
      default:
        process.stderr.write(`tunekit: unknown command '${command}'\n\n${usage}`);
        return 2;
    }
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`tunekit ${command}: ${(err as Error).message}\n\n${usage}`);
      return 2;
    }
    process.stderr.write(`tunekit ${command}: ${(err as Error).message}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
