// Tasks with answers computed by code. Texts stay short ASCII because the demo model reads bytes: every
// character is a token, so a compact prompt ("12+35=") is what lets a model trained from scratch on a
// CPU in minutes learn the task at all.
//
// Train and held-out data are separated by the example itself, not by the seed: an example belongs to
// the held-out split when a hash of its task name and key falls below the task's held-out fraction.
// Whatever seeds the caller picks, a held-out prompt can never appear in a training set, a pretraining
// corpus or a preference set, so accuracy on it measures generalization rather than recall.
import { createRng, hashUnit, type Rng } from './rng.js';
import { exactMatch, normalizeAnswer } from './score.js';

export type Split = 'train' | 'eval';

export interface Example {
  /** What the model is given. */
  readonly prompt: string;
  /** The one correct completion. */
  readonly answer: string;
  /** The example's identity within its task: decides its split, and duplicates share it. */
  readonly key: string;
}

export interface Task<E extends Example = Example> {
  /** Stable across options, so that the train/held-out partition of shared examples never moves. */
  readonly name: string;
  /** Put between prompt and answer when the pair is written as one text (pretraining). */
  readonly separator: string;
  /** The share of the example space that is held out for evaluation, in (0, 1). */
  readonly heldOutFraction: number;
  /** One example drawn from the whole space, either split. */
  sample(rng: Rng): E;
  /** A plausible answer that is wrong: the rejected side of a preference pair. */
  wrongAnswer(example: E, rng: Rng): string;
  /** Whether a model's output is correct. */
  score(output: string, answer: string): boolean;
}

/** Which split an example belongs to: depends on the task name and the example's key only. */
export function splitOf(task: Pick<Task, 'name' | 'heldOutFraction'>, example: Pick<Example, 'key'>): Split {
  return hashUnit(`${task.name}\u0000${example.key}`) < task.heldOutFraction ? 'eval' : 'train';
}

export function checkCount(name: string, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${name} must be a non-negative integer, got ${String(n)}`);
}

function checkIntIn(name: string, value: number, lo: number, hi: number): void {
  if (!Number.isSafeInteger(value) || value < lo || value > hi) {
    throw new RangeError(`${name} must be an integer in [${lo}, ${hi}], got ${String(value)}`);
  }
}

function checkFraction(value: number): number {
  if (!(value > 0 && value < 1)) throw new RangeError(`heldOutFraction must be in (0, 1), got ${String(value)}`);
  return value;
}

// A split usually holds a fifth or four fifths of the space, so a few draws find an example; the bound
// turns a space that is too small for the request into an error instead of an endless loop.
function drawLimit(n: number): number {
  return 1000 + 100 * n;
}

/** Draws one example of the given split from `rng`. */
export function drawInSplit<E extends Example>(task: Task<E>, rng: Rng, split: Split): E {
  const limit = drawLimit(1);
  for (let i = 0; i < limit; i++) {
    const example = task.sample(rng);
    if (splitOf(task, example) === split) return example;
  }
  throw new RangeError(`task ${task.name}: no ${split} example in ${limit} draws; widen the task's ranges or change heldOutFraction`);
}

/** Draws `n` examples of a split from `rng`; with `unique`, no two share a key. */
export function drawExamples<E extends Example>(task: Task<E>, n: number, rng: Rng, split: Split, unique: boolean): E[] {
  checkCount('n', n);
  const out: E[] = [];
  const seen = new Set<string>();
  const limit = drawLimit(n);
  let draws = 0;
  while (out.length < n) {
    if (draws++ >= limit) {
      throw new RangeError(
        `task ${task.name}: found only ${out.length} distinct ${split} examples of ${n} in ${limit} draws; ` +
          'widen the task\'s ranges or ask for fewer',
      );
    }
    const example = task.sample(rng);
    if (splitOf(task, example) !== split) continue;
    if (unique) {
      if (seen.has(example.key)) continue;
      seen.add(example.key);
    }
    out.push(example);
  }
  return out;
}

export interface SampleOptions {
  /** Default 'train'. */
  split?: Split;
  /** No two examples with the same key. Default false. */
  unique?: boolean;
}

/**
 * `n` examples of one split, deterministic in (task, seed, split). A prefix of a longer list equals the
 * shorter list, so growing n only appends.
 */
export function sampleExamples<E extends Example>(task: Task<E>, n: number, seed: number, options: SampleOptions = {}): E[] {
  const split = options.split ?? 'train';
  return drawExamples(task, n, createRng(seed, task.name, split), split, options.unique ?? false);
}

/** `n` distinct held-out examples: the evaluation set. */
export function heldOutSet<E extends Example>(task: Task<E>, n: number, seed: number): E[] {
  return sampleExamples(task, n, seed, { split: 'eval', unique: true });
}

/** How many of `b`'s prompts also occur in `a` (after whitespace normalization). */
export function countOverlap(a: ReadonlyArray<{ prompt: string }>, b: ReadonlyArray<{ prompt: string }>): number {
  const prompts = new Set(a.map((e) => normalizeAnswer(e.prompt)));
  return b.filter((e) => prompts.has(normalizeAnswer(e.prompt))).length;
}

/** Returns a different decimal number: one digit pair swapped, or the value moved by one. */
function nearbyNumber(value: number, rng: Rng, allowNegative: boolean): string {
  const sign = value < 0 ? '-' : '';
  const digits = String(Math.abs(value));
  const swaps: number[] = [];
  for (let i = 0; i + 1 < digits.length; i++) {
    // A swap that puts a 0 in front would read as a different format, not a plausible slip.
    if (digits[i] !== digits[i + 1] && !(i === 0 && digits[1] === '0')) swaps.push(i);
  }
  if (swaps.length > 0 && rng.chance(0.5)) {
    const i = rng.pick(swaps);
    return sign + digits.slice(0, i) + digits[i + 1] + digits[i] + digits.slice(i + 2);
  }
  const steps = [1, -1].filter((d) => allowNegative || value + d >= 0);
  return String(value + rng.pick(steps));
}

export type ArithmeticOp = '+' | '-';

export interface ArithmeticOptions {
  /** Smallest operand, default 0. */
  min?: number;
  /** Largest operand, default 99. */
  max?: number;
  /** Default ['+', '-']. */
  ops?: readonly ArithmeticOp[];
  /** Let subtraction go below zero; default false (operands are ordered so that a >= b). */
  allowNegative?: boolean;
  /** Default 0.2. */
  heldOutFraction?: number;
}

export interface ArithmeticExample extends Example {
  readonly a: number;
  readonly b: number;
  readonly op: ArithmeticOp;
}

/** Additions and subtractions written "12+35=" with the answer "47". */
export function arithmetic(options: ArithmeticOptions = {}): Task<ArithmeticExample> {
  const min = options.min ?? 0;
  const max = options.max ?? 99;
  checkIntIn('min', min, 0, 1e9);
  checkIntIn('max', max, min, 1e9);
  const ops = options.ops ?? ['+', '-'];
  if (ops.length === 0 || ops.some((op) => op !== '+' && op !== '-')) {
    throw new RangeError(`ops must be a non-empty list of '+' and '-', got ${JSON.stringify(ops)}`);
  }
  const allowNegative = options.allowNegative ?? false;
  return {
    name: 'arithmetic',
    separator: '',
    heldOutFraction: checkFraction(options.heldOutFraction ?? 0.2),
    sample(rng) {
      const op = rng.pick(ops);
      let a = rng.int(min, max);
      let b = rng.int(min, max);
      if (op === '-' && !allowNegative && a < b) [a, b] = [b, a];
      const value = op === '+' ? a + b : a - b;
      return { prompt: `${a}${op}${b}=`, answer: String(value), key: `${a}${op}${b}`, a, b, op };
    },
    wrongAnswer(example, rng) {
      return nearbyNumber(Number(example.answer), rng, allowNegative);
    },
    score: exactMatch,
  };
}

export interface KeyValueOptions {
  /** Pairs in each prompt, default 4. */
  pairs?: number;
  /** Letters per key, default 1. */
  keyLength?: number;
  /** Values are integers in [0, maxValue], default 99. */
  maxValue?: number;
  /** Default 0.2. */
  heldOutFraction?: number;
}

export interface KeyValueExample extends Example {
  readonly pairs: ReadonlyArray<readonly [string, number]>;
  /** The key asked for. */
  readonly query: string;
}

const LETTERS = 'abcdefghijklmnopqrstuvwxyz';

/** Recall from context: "k=37 m=12 z=85 m?" with the answer "12". */
export function keyValue(options: KeyValueOptions = {}): Task<KeyValueExample> {
  const keyLength = options.keyLength ?? 1;
  checkIntIn('keyLength', keyLength, 1, 8);
  const pairCount = options.pairs ?? 4;
  checkIntIn('pairs', pairCount, 1, Math.min(64, LETTERS.length ** keyLength));
  const maxValue = options.maxValue ?? 99;
  // Below 1 there is no wrong value to offer as a rejected answer.
  checkIntIn('maxValue', maxValue, 1, 1e9);
  const singleLetters = [...LETTERS];

  const drawKeys = (rng: Rng): string[] => {
    if (keyLength === 1) return rng.sample(singleLetters, pairCount);
    const keys = new Set<string>();
    while (keys.size < pairCount) {
      let key = '';
      for (let i = 0; i < keyLength; i++) key += rng.pick(singleLetters);
      keys.add(key);
    }
    return [...keys];
  };

  return {
    name: 'key-value',
    separator: '',
    heldOutFraction: checkFraction(options.heldOutFraction ?? 0.2),
    sample(rng) {
      const pairs = drawKeys(rng).map((k) => [k, rng.int(0, maxValue)] as const);
      const [query, value] = rng.pick(pairs);
      const prompt = `${pairs.map(([k, v]) => `${k}=${v}`).join(' ')} ${query}?`;
      return { prompt, answer: String(value), key: prompt, pairs, query };
    },
    wrongAnswer(example, rng) {
      // Another key's value is the mistake a model that attends to the wrong pair makes.
      const others = [...new Set(example.pairs.map(([, v]) => String(v)))].filter((v) => v !== example.answer);
      if (others.length > 0) return rng.pick(others);
      return String((Number(example.answer) + 1) % (maxValue + 1));
    },
    score: exactMatch,
  };
}

export interface StringTaskOptions {
  /** Default 3. */
  minLength?: number;
  /** Default 8. */
  maxLength?: number;
  /** Characters to draw from: printable ASCII, no spaces, no '='; default a-z. */
  alphabet?: string;
  /** Default 0.2. */
  heldOutFraction?: number;
}

export interface StringExample extends Example {
  readonly input: string;
}

function stringTask(mode: 'copy' | 'reverse', options: StringTaskOptions): Task<StringExample> {
  const minLength = options.minLength ?? 3;
  const maxLength = options.maxLength ?? 8;
  checkIntIn('minLength', minLength, 1, 1000);
  checkIntIn('maxLength', maxLength, minLength, 1000);
  const alphabet = [...new Set(options.alphabet ?? LETTERS)];
  if (alphabet.length < 2 || alphabet.some((c) => c < '!' || c > '~' || c === '=')) {
    throw new RangeError('alphabet must hold at least 2 distinct printable ASCII characters other than space and \'=\'');
  }
  const word = mode === 'copy' ? 'copy' : 'rev';
  return {
    name: mode,
    separator: '',
    heldOutFraction: checkFraction(options.heldOutFraction ?? 0.2),
    sample(rng) {
      const length = rng.int(minLength, maxLength);
      let input = '';
      for (let i = 0; i < length; i++) input += rng.pick(alphabet);
      const answer = mode === 'copy' ? input : [...input].reverse().join('');
      return { prompt: `${word} ${input}=`, answer, key: input, input };
    },
    wrongAnswer(example, rng) {
      const s = [...example.answer];
      const swaps: number[] = [];
      for (let i = 0; i + 1 < s.length; i++) if (s[i] !== s[i + 1]) swaps.push(i);
      if (swaps.length > 0) {
        const i = rng.pick(swaps);
        [s[i], s[i + 1]] = [s[i + 1]!, s[i]!];
      } else {
        const i = rng.int(0, s.length - 1);
        s[i] = rng.pick(alphabet.filter((c) => c !== s[i]));
      }
      return s.join('');
    },
    score: exactMatch,
  };
}

/** "copy abc=" with the answer "abc". */
export function copyString(options: StringTaskOptions = {}): Task<StringExample> {
  return stringTask('copy', options);
}

/** "rev abc=" with the answer "cba". */
export function reverseString(options: StringTaskOptions = {}): Task<StringExample> {
  return stringTask('reverse', options);
}

/**
 * The correct answer to a prompt in one of the tasks' formats, or null when the prompt is not one:
 * a judge for responses generated from prompts alone (iterative DPO).
 */
export function solvePrompt(task: 'arithmetic' | 'keyValue' | 'copy' | 'reverse', prompt: string): string | null {
  const p = prompt.trim();
  switch (task) {
    case 'arithmetic': {
      const m = /^(\d+)([+-])(\d+)=$/.exec(p);
      return m ? String(m[2] === '+' ? Number(m[1]) + Number(m[3]) : Number(m[1]) - Number(m[3])) : null;
    }
    case 'keyValue': {
      const m = /^((?:\S+=\d+ )+)(\S+)\?$/.exec(p);
      if (!m) return null;
      const pairs = new Map(m[1]!.trim().split(' ').map((kv) => kv.split('=') as [string, string]));
      return pairs.get(m[2]!) ?? null;
    }
    case 'copy': {
      const m = /^copy (\S+)=$/.exec(p);
      return m ? m[1]! : null;
    }
    case 'reverse': {
      const m = /^rev (\S+)=$/.exec(p);
      return m ? [...m[1]!].reverse().join('') : null;
    }
  }
}
