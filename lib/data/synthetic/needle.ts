// Needle in a haystack: filler prose of a requested length with one sentence carrying a number, then a
// question about it. The filler comes from a small closed vocabulary with no digits and without the
// words of the needle, so the needle is the only place the answer can come from, and a byte-level
// model's context length in characters is exactly its length in tokens.
import { createRng, type Rng } from './rng.js';
import { exactMatch } from './score.js';
import { drawExamples, drawInSplit, checkCount, type Example, type Split, type Task } from './tasks.js';

const ADJECTIVES = ['red', 'old', 'quiet', 'small', 'green', 'tall', 'cold', 'bright', 'slow', 'soft', 'dark', 'warm'];
const NOUNS = ['fox', 'bird', 'child', 'farmer', 'dog', 'cat', 'sailor', 'horse', 'teacher', 'fish', 'baker', 'owl'];
const PLACES = ['river', 'hill', 'garden', 'market', 'forest', 'bridge', 'village', 'field', 'lake', 'road'];
const MOTIONS = ['walks to', 'runs past', 'looks at', 'sleeps near', 'waits by', 'sings to'];
const ACTIONS = ['sees', 'follows', 'helps', 'finds', 'likes', 'calls'];
const NAMES = ['Anna', 'Ben', 'Clara', 'David', 'Eva', 'Felix', 'Greta', 'Hugo'];
const TIMES = ['Today', 'At dawn', 'Later', 'In spring', 'At night', 'Once'];

const longest = (words: readonly string[]) => Math.max(...words.map((w) => w.length));
const shortest = (words: readonly string[]) => Math.min(...words.map((w) => w.length));

type Slots = readonly (readonly string[])[];

// Each template is its fixed text split around slots; the bounds below follow from the word lists, so
// the length guarantees of buildHaystack hold for any draw.
const TEMPLATES: ReadonlyArray<{ parts: readonly string[]; slots: Slots }> = [
  { parts: ['The ', ' ', ' ', ' the ', '.'], slots: [ADJECTIVES, NOUNS, MOTIONS, PLACES] },
  { parts: ['A ', ' ', ' the ', ' ', '.'], slots: [NOUNS, ACTIONS, ADJECTIVES, NOUNS] },
  { parts: ['', ' ', ' the ', '.'], slots: [NAMES, MOTIONS, PLACES] },
  { parts: ['', ', the ', ' is ', '.'], slots: [TIMES, PLACES, ADJECTIVES] },
];

function templateLength(t: { parts: readonly string[]; slots: Slots }, bound: (w: readonly string[]) => number): number {
  return t.parts.reduce((n, p) => n + p.length, 0) + t.slots.reduce((n, s) => n + bound(s), 0);
}

/** The longest filler sentence the vocabulary can produce, in characters. */
export const MAX_SENTENCE_LENGTH = Math.max(...TEMPLATES.map((t) => templateLength(t, longest)));
const MIN_SENTENCE_LENGTH = Math.min(...TEMPLATES.map((t) => templateLength(t, shortest)));

/** One filler sentence. */
export function fillerSentence(rng: Rng): string {
  const t = rng.pick(TEMPLATES);
  let out = t.parts[0]!;
  for (let i = 0; i < t.slots.length; i++) out += rng.pick(t.slots[i]!) + t.parts[i + 1]!;
  return out;
}

/** Filler prose of at most `maxChars` characters, whole sentences joined by spaces. */
export function fillerText(rng: Rng, maxChars: number): string {
  checkCount('maxChars', maxChars);
  const sentences = fillSentences(rng, maxChars + 1);
  return sentences.join(' ');
}

// Sentences whose lengths plus one space each sum to at most `budget`, leaving less than
// MAX_SENTENCE_LENGTH + 1 unused: once the slack is below that a draw can fail to fit, and a few more
// draws give a shorter sentence the chance to close the gap.
function fillSentences(rng: Rng, budget: number): string[] {
  const out: string[] = [];
  let used = 0;
  let misses = 0;
  while (budget - used >= MIN_SENTENCE_LENGTH + 1 && misses < 8) {
    const s = fillerSentence(rng);
    if (used + s.length + 1 <= budget) {
      out.push(s);
      used += s.length + 1;
      misses = 0;
    } else {
      misses++;
    }
  }
  return out;
}

export const NEEDLE_QUESTION = 'What is the magic number?';

export function needleSentence(value: string): string {
  return `The magic number is ${value}.`;
}

export interface NeedleOptions {
  /** The prompt's length in characters: it ends up in (length - MAX_SENTENCE_LENGTH - 1, length]. */
  length: number;
  /** Where the needle goes, 0 (start of the haystack) to 1 (just before the question). */
  depth: number;
  /** Digits of the magic number, default 4. */
  digits?: number;
  /** Default 0.2. */
  heldOutFraction?: number;
}

export interface NeedleExample extends Example {
  /** The requested prompt length. */
  readonly length: number;
  /** The requested depth. */
  readonly depth: number;
  /** Where the needle landed: its offset over the haystack's length less the needle's, in [0, 1]. */
  readonly actualDepth: number;
  /** Index of the needle sentence in the prompt. */
  readonly needleOffset: number;
}

/** The shortest `length` a needle example with `digits` digits fits in. */
export function minNeedleLength(digits = 4): number {
  return needleSentence('0'.repeat(digits)).length + 1 + NEEDLE_QUESTION.length;
}

function checkDigits(digits: number): void {
  if (!Number.isSafeInteger(digits) || digits < 1 || digits > 9) throw new RangeError(`digits must be an integer in [1, 9], got ${String(digits)}`);
}

function checkDepth(depth: number): void {
  if (!(depth >= 0 && depth <= 1)) throw new RangeError(`depth must be in [0, 1], got ${String(depth)}`);
}

/**
 * Builds one needle example. The filler is cut into whole sentences and the needle goes in at the
 * sentence boundary nearest the requested depth, so the needle is never split and the placement error
 * is at most half a sentence.
 */
function buildNeedleExample(rng: Rng, length: number, depth: number, value: string): NeedleExample {
  const needle = needleSentence(value);
  // Layout: sentences and the needle joined by single spaces, then a space and the question, so every
  // filler sentence costs its length plus one space. needle() has checked that the budget is not negative.
  const budget = length - needle.length - 1 - NEEDLE_QUESTION.length;
  const sentences = fillSentences(rng, budget);
  const boundaries = [0];
  for (const s of sentences) boundaries.push(boundaries[boundaries.length - 1]! + s.length + 1);
  const total = boundaries[boundaries.length - 1]!;
  const target = depth * total;
  let at = 0;
  for (let i = 1; i < boundaries.length; i++) {
    if (Math.abs(boundaries[i]! - target) < Math.abs(boundaries[at]! - target)) at = i;
  }
  const parts = [...sentences.slice(0, at), needle, ...sentences.slice(at)];
  const prompt = `${parts.join(' ')} ${NEEDLE_QUESTION}`;
  return {
    prompt,
    answer: value,
    key: value,
    length,
    depth,
    actualDepth: total === 0 ? 0 : boundaries[at]! / total,
    needleOffset: boundaries[at]!,
  };
}

/**
 * The needle task at one (length, depth). Examples are keyed by the magic number, so a number used as a
 * training needle is never a held-out needle and held-out recall cannot come from memory.
 */
export function needle(options: NeedleOptions): Task<NeedleExample> {
  const { length, depth } = options;
  const digits = options.digits ?? 4;
  checkCount('length', length);
  checkDepth(depth);
  checkDigits(digits);
  if (length < minNeedleLength(digits)) {
    throw new RangeError(`length ${length} is too short: the needle and the question alone take ${minNeedleLength(digits)} characters`);
  }
  const heldOutFraction = options.heldOutFraction ?? 0.2;
  if (!(heldOutFraction > 0 && heldOutFraction < 1)) throw new RangeError(`heldOutFraction must be in (0, 1), got ${String(heldOutFraction)}`);
  const lo = digits === 1 ? 1 : 10 ** (digits - 1);
  const hi = 10 ** digits - 1;
  return {
    name: 'needle',
    separator: ' ',
    heldOutFraction,
    sample(rng) {
      return buildNeedleExample(rng, length, depth, String(rng.int(lo, hi)));
    },
    wrongAnswer(example, rng) {
      // One digit changed: close enough to be plausible, never a leading zero.
      const s = [...example.answer];
      const i = rng.int(0, s.length - 1);
      const choices = [...'0123456789'].filter((d) => d !== s[i] && !(i === 0 && d === '0'));
      s[i] = rng.pick(choices);
      return s.join('');
    },
    score: exactMatch,
  };
}

export interface NiahGridOptions {
  /** Prompt lengths in characters (= tokens for the byte-level tokenizer). */
  lengths: readonly number[];
  /** Relative depths in [0, 1]. */
  depths: readonly number[];
  /** Cases per (length, depth) cell, default 1. */
  perCell?: number;
  /** Default 0. */
  seed?: number;
  digits?: number;
  /** Default 'eval'. */
  split?: Split;
}

/**
 * Needle cases over lengths × depths, ordered by length, then depth. Each cell has its own stream, so
 * adding a length or a depth leaves the other cells' cases as they were.
 */
export function niahGrid(options: NiahGridOptions): NeedleExample[] {
  const perCell = options.perCell ?? 1;
  const seed = options.seed ?? 0;
  const split = options.split ?? 'eval';
  checkCount('perCell', perCell);
  const out: NeedleExample[] = [];
  for (const length of options.lengths) {
    for (const depth of options.depths) {
      const task = needle({ length, depth, ...(options.digits === undefined ? {} : { digits: options.digits }) });
      out.push(...drawExamples(task, perCell, createRng(seed, 'niah', split, length, depth), split, false));
    }
  }
  return out;
}

export interface NeedleCorpusOptions {
  /** Prompt length of each document; a list is drawn from per document. */
  length: number | readonly number[];
  digits?: number;
  /** Default 'train'. */
  split?: Split;
}

/**
 * Needle documents written out with their answers ("... What is the magic number? 4821"), at uniformly
 * drawn depths: long-context training text in which attending far back is what lowers the loss. Each
 * text is the prompt plus one space and the answer, so it is a few characters longer than `length`.
 */
export function needleCorpus(n: number, seed: number, options: NeedleCorpusOptions): Array<{ text: string }> {
  checkCount('n', n);
  const lengths = typeof options.length === 'number' ? [options.length] : options.length;
  if (lengths.length === 0) throw new RangeError('needleCorpus: length must name at least one length');
  const split = options.split ?? 'train';
  const rng = createRng(seed, 'needle-corpus', split);
  const out: Array<{ text: string }> = [];
  for (let i = 0; i < n; i++) {
    const task = needle({ length: rng.pick(lengths), depth: rng.float(), ...(options.digits === undefined ? {} : { digits: options.digits }) });
    const example = drawInSplit(task, rng, split);
    out.push({ text: example.prompt + task.separator + example.answer });
  }
  return out;
}
