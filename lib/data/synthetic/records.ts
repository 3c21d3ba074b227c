// The data of each training stage as plain records in the JSONL shapes the trainers read: {text} for
// pretraining, {instruction, input, output} or {messages} for SFT, {prompt, chosen, rejected} for DPO.
// Everything drawn here comes from the training split, so held-out examples stay unseen by every stage.
import { createRng } from './rng.js';
import { fillerSentence, minNeedleLength, needle } from './needle.js';
import { normalizeAnswer } from './score.js';
import {
  arithmetic,
  checkCount,
  drawExamples,
  drawInSplit,
  keyValue,
  reverseString,
  sampleExamples,
  type ArithmeticOptions,
  type Example,
  type KeyValueOptions,
  type Split,
  type StringTaskOptions,
  type Task,
} from './tasks.js';

export interface Turn {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

export interface TextRecord {
  text: string;
}

export interface AlpacaRecord {
  instruction: string;
  input: string;
  output: string;
}

export interface MessagesRecord {
  messages: Turn[];
}

export interface PreferenceRecord {
  prompt: string;
  chosen: string;
  rejected: string;
}

/** TRL's conversational preference shape: the prompt turns, then each completion as its own turns. */
export interface PreferenceMessagesRecord {
  prompt: Turn[];
  chosen: Turn[];
  rejected: Turn[];
}

/** The example as a chat: the prompt as the user's turn, the answer as the assistant's. */
export function toMessages(example: Pick<Example, 'prompt' | 'answer'>): Turn[] {
  return [
    { role: 'user', content: example.prompt },
    { role: 'assistant', content: example.answer },
  ];
}

/** The example as one text, the way pretraining sees it ("12+35=47"). */
export function toText(task: Pick<Task, 'separator'>, example: Pick<Example, 'prompt' | 'answer'>): string {
  return example.prompt + task.separator + example.answer;
}

export interface InstructionSetOptions {
  /** Default 'train'. */
  split?: Split;
}

/**
 * SFT records for a task: the examples of sampleExamples(task, n, seed) in alpaca or chat form. The
 * alpaca instruction is the prompt itself with an empty input, so that however a trainer joins
 * instruction and input, the model is trained on exactly the text it is evaluated on.
 */
export function instructionSet(task: Task, n: number, seed: number, options: InstructionSetOptions & { form: 'alpaca' }): AlpacaRecord[];
export function instructionSet(task: Task, n: number, seed: number, options?: InstructionSetOptions & { form?: 'messages' }): MessagesRecord[];
export function instructionSet(
  task: Task,
  n: number,
  seed: number,
  options: InstructionSetOptions & { form?: 'alpaca' | 'messages' } = {},
): AlpacaRecord[] | MessagesRecord[] {
  const examples = sampleExamples(task, n, seed, { split: options.split ?? 'train' });
  if (options.form === 'alpaca') return examples.map((e) => ({ instruction: e.prompt, input: '', output: e.answer }));
  return examples.map((e) => ({ messages: toMessages(e) }));
}

export interface PreferenceSetOptions {
  /** Default 'train'; 'eval' gives held-out pairs for measuring preference accuracy. */
  split?: Split;
}

/**
 * DPO pairs: the correct answer chosen, a plausible wrong one (off by one, two digits swapped, another
 * key's value, ...) rejected. The stream is separate from instructionSet's, so the same seed gives DPO
 * prompts that are not simply the SFT prompts again.
 */
export function preferenceSet(task: Task, n: number, seed: number, options: PreferenceSetOptions & { form: 'messages' }): PreferenceMessagesRecord[];
export function preferenceSet(task: Task, n: number, seed: number, options?: PreferenceSetOptions & { form?: 'text' }): PreferenceRecord[];
export function preferenceSet(
  task: Task,
  n: number,
  seed: number,
  options: PreferenceSetOptions & { form?: 'text' | 'messages' } = {},
): PreferenceRecord[] | PreferenceMessagesRecord[] {
  const split = options.split ?? 'train';
  const rng = createRng(seed, task.name, split, 'preference');
  const pairs = drawExamples(task, n, rng, split, false).map((example) => {
    const rejected = task.wrongAnswer(example, rng);
    if (normalizeAnswer(rejected) === normalizeAnswer(example.answer) || task.score(rejected, example.answer)) {
      throw new Error(`task ${task.name}: wrongAnswer returned a correct answer (${JSON.stringify(rejected)}) for ${JSON.stringify(example.prompt)}`);
    }
    return { prompt: example.prompt, chosen: example.answer, rejected };
  });
  if (options.form === 'messages') {
    return pairs.map((p): PreferenceMessagesRecord => ({
      prompt: [{ role: 'user', content: p.prompt }],
      chosen: [{ role: 'assistant', content: p.chosen }],
      rejected: [{ role: 'assistant', content: p.rejected }],
    }));
  }
  return pairs;
}

export type PretrainKind = 'arithmetic' | 'keyValue' | 'prose' | 'needle' | 'reverse';

const PRETRAIN_KINDS: readonly PretrainKind[] = ['arithmetic', 'keyValue', 'prose', 'needle', 'reverse'];

export interface PretrainOptions {
  /**
   * Relative weights of the record kinds. Default { arithmetic: 4, keyValue: 3, prose: 2, needle: 1 };
   * a kind left out of a given mix has weight 0.
   */
  mix?: Partial<Record<PretrainKind, number>>;
  arithmetic?: ArithmeticOptions;
  keyValue?: KeyValueOptions;
  reverse?: StringTaskOptions;
  /** Solved examples per arithmetic, key-value or reverse record, one per line; default 4. */
  factsPerRecord?: number;
  /** Prompt length of needle records in characters; default 160. */
  needleLength?: number;
}

/**
 * Pretraining text that teaches the formats and some of the skills: solved arithmetic ("12+35=47"),
 * solved key-value recall, filler prose, and short needle documents, so that a later SFT stage
 * sharpens skills the model has already met rather than introducing the notation.
 */
export function pretrainCorpus(n: number, seed: number, options: PretrainOptions = {}): TextRecord[] {
  checkCount('n', n);
  const mix = options.mix ?? { arithmetic: 4, keyValue: 3, prose: 2, needle: 1 };
  const weights = PRETRAIN_KINDS.map((kind) => {
    const w = mix[kind] ?? 0;
    if (!(w >= 0 && Number.isFinite(w))) throw new RangeError(`mix.${kind} must be a finite weight >= 0, got ${String(w)}`);
    return w;
  });
  if (!(weights.reduce((a, b) => a + b, 0) > 0)) throw new RangeError('mix must give at least one kind a weight above 0');
  const facts = options.factsPerRecord ?? 4;
  if (!Number.isSafeInteger(facts) || facts < 1) throw new RangeError(`factsPerRecord must be a positive integer, got ${String(facts)}`);

  const needleLength = options.needleLength ?? 160;
  if (!Number.isSafeInteger(needleLength) || needleLength < minNeedleLength()) {
    throw new RangeError(`needleLength must be an integer >= ${minNeedleLength()}, got ${String(needleLength)}`);
  }
  const tasks: Record<'arithmetic' | 'keyValue' | 'reverse', Task> = {
    arithmetic: arithmetic(options.arithmetic),
    keyValue: keyValue(options.keyValue),
    reverse: reverseString(options.reverse),
  };
  const rng = createRng(seed, 'pretrain');
  const solved = (task: Task): string => {
    const lines: string[] = [];
    for (let i = 0; i < facts; i++) lines.push(toText(task, drawInSplit(task, rng, 'train')));
    return lines.join('\n');
  };

  const out: TextRecord[] = [];
  for (let i = 0; i < n; i++) {
    const kind = PRETRAIN_KINDS[rng.weighted(weights)]!;
    let text: string;
    switch (kind) {
      case 'arithmetic':
      case 'keyValue':
      case 'reverse':
        text = solved(tasks[kind]);
        break;
      case 'prose': {
        const sentences: string[] = [];
        const count = rng.int(2, 5);
        for (let j = 0; j < count; j++) sentences.push(fillerSentence(rng));
        text = sentences.join(' ');
        break;
      }
      case 'needle': {
        const task = needle({ length: needleLength, depth: rng.float() });
        text = toText(task, drawInSplit(task, rng, 'train'));
        break;
      }
    }
    out.push({ text });
  }
  return out;
}
