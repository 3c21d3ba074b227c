import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  MAX_SENTENCE_LENGTH,
  NEEDLE_QUESTION,
  arithmetic,
  copyString,
  countOverlap,
  createRng,
  evaluate,
  evaluateNiah,
  evaluateTask,
  exactMatch,
  fillerText,
  heldOutSet,
  instructionSet,
  keyValue,
  minNeedleLength,
  needle,
  needleCorpus,
  needleSentence,
  niahGrid,
  preferenceSet,
  pretrainCorpus,
  reverseString,
  sampleExamples,
  splitOf,
  toMessages,
  formatNiahTable,
  writeJsonl,
  type Example,
  type Generate,
  type Task,
} from '../lib/data/synthetic/index.js';

// Independent of the generator: reads the operands back out of the prompt text.
function solveArithmetic(prompt: string): string {
  const m = /^(\d+)([+-])(\d+)=$/.exec(prompt);
  if (!m) throw new Error(`not an arithmetic prompt: ${prompt}`);
  const a = Number(m[1]);
  const b = Number(m[3]);
  return String(m[2] === '+' ? a + b : a - b);
}

function solveKeyValue(prompt: string): string {
  const m = /^((?:[a-z]+=\d+ )+)([a-z]+)\?$/.exec(prompt);
  if (!m) throw new Error(`not a key-value prompt: ${prompt}`);
  const pairs = m[1]!.trim().split(' ').map((p) => p.split('='));
  const hit = pairs.filter(([k]) => k === m[2]);
  expect(hit).toHaveLength(1);
  return hit[0]![1]!;
}

const oracle = (solve: (p: string) => string): Generate => async (prompts) => prompts.map(solve);

const TASKS: Array<[string, Task]> = [
  ['arithmetic', arithmetic()],
  ['key-value', keyValue()],
  ['copy', copyString()],
  ['reverse', reverseString()],
  ['needle', needle({ length: 200, depth: 0.5 })],
];

describe('seeded randomness', () => {
  it('repeats for one seed and label, and differs across seeds and labels', () => {
    const draw = (seed: number, ...labels: string[]) => {
      const rng = createRng(seed, ...labels);
      return Array.from({ length: 8 }, () => rng.uint32());
    };
    expect(draw(7, 'a')).toEqual(draw(7, 'a'));
    expect(draw(7, 'a')).not.toEqual(draw(8, 'a'));
    expect(draw(7, 'a')).not.toEqual(draw(7, 'b'));
    expect(draw(1)).not.toEqual(draw(2 ** 32 + 1));
    expect(draw(-1)).not.toEqual(draw(2 ** 32 - 1));
  });

  it('draws integers in range, covering it, and rejects seeds that are not integers', () => {
    const rng = createRng(3);
    const seen = new Set<number>();
    for (let i = 0; i < 2000; i++) {
      const v = rng.int(-3, 5);
      expect(v).toBeGreaterThanOrEqual(-3);
      expect(v).toBeLessThanOrEqual(5);
      seen.add(v);
    }
    expect(seen.size).toBe(9);
    expect(() => createRng(1.5)).toThrow(RangeError);
    expect(() => createRng(Number.NaN)).toThrow(RangeError);
    expect(() => rng.int(2, 1)).toThrow(RangeError);
  });
});

describe('tasks', () => {
  it('are deterministic in the seed and differ across seeds', () => {
    for (const [, task] of TASKS) {
      expect(sampleExamples(task, 20, 11)).toEqual(sampleExamples(task, 20, 11));
      expect(sampleExamples(task, 20, 11).map((e) => e.prompt)).not.toEqual(sampleExamples(task, 20, 12).map((e) => e.prompt));
      // Growing n only appends.
      expect(sampleExamples(task, 30, 11).slice(0, 20)).toEqual(sampleExamples(task, 20, 11));
    }
  });

  it('arithmetic answers are right, operands stay in range, no negatives unless allowed', () => {
    for (const e of sampleExamples(arithmetic({ min: 5, max: 60 }), 500, 1)) {
      expect(e.answer).toBe(solveArithmetic(e.prompt));
      expect(e.a).toBeGreaterThanOrEqual(5);
      expect(e.b).toBeLessThanOrEqual(60);
      expect(Number(e.answer)).toBeGreaterThanOrEqual(0);
    }
    const negatives = sampleExamples(arithmetic({ ops: ['-'], allowNegative: true }), 200, 1);
    expect(negatives.every((e) => e.op === '-' && e.answer === solveArithmetic(e.prompt))).toBe(true);
    expect(negatives.some((e) => Number(e.answer) < 0)).toBe(true);
    expect(sampleExamples(arithmetic({ ops: ['+'] }), 50, 1).every((e) => e.prompt.includes('+'))).toBe(true);
    expect(() => arithmetic({ min: 10, max: 5 })).toThrow(RangeError);
    expect(() => arithmetic({ ops: [] })).toThrow(RangeError);
  });

  it('key-value answers are the queried key\'s value, with distinct keys', () => {
    for (const e of sampleExamples(keyValue({ pairs: 6 }), 300, 2)) {
      expect(e.answer).toBe(solveKeyValue(e.prompt));
      expect(new Set(e.pairs.map(([k]) => k)).size).toBe(6);
    }
    for (const e of sampleExamples(keyValue({ pairs: 3, keyLength: 2, maxValue: 9 }), 100, 2)) {
      expect(e.answer).toBe(solveKeyValue(e.prompt));
      expect(Number(e.answer)).toBeLessThanOrEqual(9);
    }
  });

  it('copy and reverse answers are right', () => {
    for (const e of sampleExamples(copyString(), 100, 3)) expect(`copy ${e.answer}=`).toBe(e.prompt);
    for (const e of sampleExamples(reverseString({ minLength: 2, maxLength: 4 }), 100, 3)) {
      const input = /^rev (\w+)=$/.exec(e.prompt)![1]!;
      expect(input.length).toBeGreaterThanOrEqual(2);
      expect(input.length).toBeLessThanOrEqual(4);
      expect(e.answer).toBe(input.split('').reverse().join(''));
    }
  });

  it('gives the chat form as a user turn and an assistant turn', () => {
    expect(toMessages({ prompt: '1+2=', answer: '3' })).toEqual([
      { role: 'user', content: '1+2=' },
      { role: 'assistant', content: '3' },
    ]);
  });
});

describe('scoring', () => {
  it('is exact match up to whitespace', () => {
    expect(exactMatch('47', '47')).toBe(true);
    expect(exactMatch('  47\n', '47')).toBe(true);
    expect(exactMatch('a  b', 'a b')).toBe(true);
    expect(exactMatch('470', '47')).toBe(false);
    expect(exactMatch('47.', '47')).toBe(false);
    expect(exactMatch('4 7', '47')).toBe(false);
    expect(exactMatch('', '47')).toBe(false);
    expect(arithmetic().score(' 12 ', '12')).toBe(true);
  });
});

describe('train / held-out separation', () => {
  it('never shares an example, whatever the seeds, and holds out about the requested share', () => {
    // A space of 100 additions: small enough that a seed-only split would overlap heavily.
    const task = arithmetic({ min: 0, max: 9, ops: ['+'] });
    const train = [...sampleExamples(task, 2000, 1), ...sampleExamples(task, 2000, 2)];
    const held = heldOutSet(task, 10, 1);
    expect(countOverlap(train, held)).toBe(0);
    expect(countOverlap(held, train)).toBe(0);
    expect(new Set(held.map((e) => e.key)).size).toBe(10);
    expect(held.every((e) => splitOf(task, e) === 'eval')).toBe(true);
    expect(new Set(train.map((e) => e.key)).size).toBeGreaterThan(60);

    let evalShare = 0;
    for (let a = 0; a < 100; a++) {
      for (let b = 0; b < 100; b++) if (splitOf(arithmetic(), { key: `${a}+${b}` }) === 'eval') evalShare++;
    }
    expect(evalShare / 10_000).toBeGreaterThan(0.17);
    expect(evalShare / 10_000).toBeLessThan(0.23);
  });

  it('keeps every stage\'s training data out of the held-out set', () => {
    const arith = arithmetic({ min: 0, max: 19 });
    const held = heldOutSet(arith, 40, 5);
    const pretrainFacts = pretrainCorpus(300, 5, { mix: { arithmetic: 1 }, arithmetic: { min: 0, max: 19 } })
      .flatMap((r) => r.text.split('\n'))
      .map((line) => ({ prompt: line.slice(0, line.indexOf('=') + 1) }));
    expect(countOverlap(pretrainFacts, held)).toBe(0);
    const sft = instructionSet(arith, 500, 5, { form: 'alpaca' }).map((r) => ({ prompt: r.instruction }));
    expect(countOverlap(sft, held)).toBe(0);
    expect(countOverlap(preferenceSet(arith, 500, 5), held)).toBe(0);

    // Needles are keyed by their number: no training needle number is a held-out one.
    const grid = niahGrid({ lengths: [100], depths: [0, 1], perCell: 30 });
    const trainNumbers = new Set(needleCorpus(200, 5, { length: 100 }).map((r) => /magic number is (\d+)\./.exec(r.text)![1]));
    expect(grid.some((c) => trainNumbers.has(c.answer))).toBe(false);
  });

  it('says so when the held-out space is too small for the request', () => {
    expect(() => heldOutSet(arithmetic({ min: 0, max: 2, ops: ['+'] }), 50, 0)).toThrow(/distinct eval examples/);
  });
});

describe('needle in a haystack', () => {
  it('puts the needle at the requested depth and keeps the prompt within the requested length', () => {
    for (const length of [minNeedleLength(), 90, 257, 1000, 4096]) {
      for (const depth of [0, 0.1, 0.25, 0.5, 0.77, 1]) {
        const [e] = sampleExamples(needle({ length, depth }), 1, length);
        const n = needleSentence(e!.answer);
        expect(e!.prompt.length).toBeLessThanOrEqual(length);
        expect(e!.prompt.length).toBeGreaterThan(length - MAX_SENTENCE_LENGTH - 1);
        expect(e!.prompt.endsWith(` ${NEEDLE_QUESTION}`)).toBe(true);
        expect(e!.prompt.indexOf(n)).toBe(e!.needleOffset);
        // The needle is the only number and the only mention of the magic number before the question.
        expect(e!.prompt.match(/\d+/g)).toEqual([e!.answer]);
        expect(e!.prompt.split('magic').length).toBe(3);
        expect(e!.answer).toMatch(/^[1-9]\d{3}$/);
        const fillerLength = e!.prompt.length - n.length - NEEDLE_QUESTION.length - 1;
        expect(e!.actualDepth).toBeCloseTo(fillerLength === 0 ? 0 : e!.needleOffset / fillerLength, 12);
        if (fillerLength > 0) expect(Math.abs(e!.actualDepth - depth)).toBeLessThanOrEqual((MAX_SENTENCE_LENGTH + 1) / 2 / fillerLength + 1e-9);
      }
    }
    expect(() => needle({ length: minNeedleLength() - 1, depth: 0 })).toThrow(RangeError);
    expect(() => needle({ length: 500, depth: 1.5 })).toThrow(RangeError);
    expect(sampleExamples(needle({ length: 100, depth: 0, digits: 6 }), 5, 0).every((e) => /^\d{6}$/.test(e.answer))).toBe(true);
  });

  it('builds a lengths × depths grid in order, with cells independent of the rest of the grid', () => {
    const grid = niahGrid({ lengths: [128, 512], depths: [0, 0.5, 1], perCell: 2, seed: 3 });
    expect(grid.map((c) => [c.length, c.depth])).toEqual([
      [128, 0], [128, 0], [128, 0.5], [128, 0.5], [128, 1], [128, 1],
      [512, 0], [512, 0], [512, 0.5], [512, 0.5], [512, 1], [512, 1],
    ]);
    expect(niahGrid({ lengths: [128, 512], depths: [0, 0.5, 1], perCell: 2, seed: 3 })).toEqual(grid);
    expect(niahGrid({ lengths: [128, 512], depths: [0, 0.5, 1], perCell: 2, seed: 4 })).not.toEqual(grid);
    const wider = niahGrid({ lengths: [64, 512], depths: [0.5], perCell: 2, seed: 3 });
    expect(wider.slice(2)).toEqual(grid.filter((c) => c.length === 512 && c.depth === 0.5));
  });

  it('writes needle training documents with their answers', () => {
    const docs = needleCorpus(20, 1, { length: [150, 300] });
    expect(docs).toEqual(needleCorpus(20, 1, { length: [150, 300] }));
    for (const { text } of docs) {
      const number = /magic number is (\d+)\./.exec(text)![1]!;
      expect(text.endsWith(`${NEEDLE_QUESTION} ${number}`)).toBe(true);
      expect(text.length).toBeLessThanOrEqual(300 + 1 + number.length);
    }
    expect(fillerText(createRng(0), 200).length).toBeLessThanOrEqual(200);
    expect(fillerText(createRng(0), 200).length).toBeGreaterThan(200 - MAX_SENTENCE_LENGTH - 1);
  });
});

describe('stage data', () => {
  it('pretraining text mixes solved tasks, prose and needles, deterministically', () => {
    const corpus = pretrainCorpus(200, 9);
    expect(corpus).toEqual(pretrainCorpus(200, 9));
    expect(corpus).not.toEqual(pretrainCorpus(200, 10));
    expect(pretrainCorpus(250, 9).slice(0, 200)).toEqual(corpus);
    expect(corpus.every((r) => Object.keys(r).join() === 'text' && /^[\x20-\x7e\n]+$/.test(r.text))).toBe(true);
    let facts = 0;
    let recalls = 0;
    let needles = 0;
    for (const { text } of corpus) {
      if (text.includes('magic')) needles++;
      for (const line of text.split('\n')) {
        const arith = /^(\d+[+-]\d+=)(\d+)$/.exec(line);
        if (arith) {
          expect(arith[2]).toBe(solveArithmetic(arith[1]!));
          facts++;
        }
        const kv = /^(.*\?)(\d+)$/.exec(line);
        if (kv && !line.includes('magic')) {
          expect(kv[2]).toBe(solveKeyValue(kv[1]!));
          recalls++;
        }
      }
    }
    expect(facts).toBeGreaterThan(100);
    expect(recalls).toBeGreaterThan(50);
    expect(needles).toBeGreaterThan(5);
    const only = pretrainCorpus(20, 9, { mix: { reverse: 1 }, factsPerRecord: 2 });
    expect(only.every((r) => r.text.split('\n').length === 2 && r.text.startsWith('rev '))).toBe(true);
    expect(() => pretrainCorpus(1, 0, { mix: { arithmetic: 0 } })).toThrow(RangeError);
  });

  it('instruction sets come in alpaca and chat form, from the training examples', () => {
    const task = keyValue();
    const examples = sampleExamples(task, 10, 4);
    expect(instructionSet(task, 10, 4, { form: 'alpaca' })).toEqual(examples.map((e) => ({ instruction: e.prompt, input: '', output: e.answer })));
    expect(instructionSet(task, 10, 4)).toEqual(examples.map((e) => ({ messages: toMessages(e) })));
  });

  it('preference pairs prefer the correct answer to a plausible wrong one', () => {
    for (const [, task] of TASKS) {
      const pairs = preferenceSet(task, 200, 6);
      expect(pairs).toEqual(preferenceSet(task, 200, 6));
      for (const p of pairs) {
        expect(p.rejected).not.toBe(p.chosen);
        expect(task.score(p.rejected, p.chosen)).toBe(false);
        expect(p.rejected.length).toBeGreaterThan(0);
      }
    }
    for (const p of preferenceSet(arithmetic(), 300, 7)) {
      expect(p.chosen).toBe(solveArithmetic(p.prompt));
      const swapped = [...p.chosen].sort().join() === [...p.rejected].sort().join();
      const offByOne = Math.abs(Number(p.rejected) - Number(p.chosen)) === 1;
      expect(swapped || offByOne).toBe(true);
      expect(p.rejected).toMatch(/^(0|[1-9]\d*)$/);
    }
    for (const p of preferenceSet(keyValue(), 100, 7)) {
      expect(p.chosen).toBe(solveKeyValue(p.prompt));
    }
    const messages = preferenceSet(arithmetic(), 3, 6, { form: 'messages' });
    const text = preferenceSet(arithmetic(), 3, 6);
    expect(messages).toEqual(
      text.map((p) => ({
        prompt: [{ role: 'user', content: p.prompt }],
        chosen: [{ role: 'assistant', content: p.chosen }],
        rejected: [{ role: 'assistant', content: p.rejected }],
      })),
    );
    const heldPairs = preferenceSet(arithmetic(), 50, 6, { split: 'eval' });
    expect(heldPairs.every((p) => splitOf(arithmetic(), { key: p.prompt.slice(0, -1) }) === 'eval')).toBe(true);
  });
});

describe('evaluation', () => {
  it('scores accuracy over the held-out set in batches', async () => {
    const task = arithmetic();
    const batches: number[] = [];
    const perfect = await evaluateTask(task, async (prompts) => {
      batches.push(prompts.length);
      return prompts.map((p) => ` ${solveArithmetic(p)}\n`);
    }, { n: 50, batchSize: 16 });
    expect(batches).toEqual([16, 16, 16, 2]);
    expect(perfect).toMatchObject({ correct: 50, total: 50, accuracy: 1 });
    expect(perfect.results.map((r) => r.prompt)).toEqual(heldOutSet(task, 50, 0).map((e) => e.prompt));

    const offByOne = await evaluateTask(task, async (prompts) => prompts.map((p) => String(Number(solveArithmetic(p)) + 1)), { n: 20 });
    expect(offByOne).toMatchObject({ correct: 0, total: 20, accuracy: 0 });

    const examples: Example[] = heldOutSet(keyValue(), 10, 1);
    const half = await evaluate(oracle((p) => (p < 'm' ? solveKeyValue(p) : 'x')), examples);
    expect(half.correct).toBe(examples.filter((e) => e.prompt < 'm').length);
    expect(half.accuracy).toBeCloseTo(half.correct / 10, 12);
    expect(await evaluate(oracle(() => ''), [])).toMatchObject({ correct: 0, total: 0, accuracy: 0 });
  });

  it('rejects a generate function that answers the wrong number of prompts', async () => {
    await expect(evaluate(async (p) => p.slice(1), heldOutSet(arithmetic(), 3, 0))).rejects.toThrow(/2 outputs for 3 prompts/);
    await expect(evaluate(async (p) => p.map(() => 1 as unknown as string), heldOutSet(arithmetic(), 3, 0))).rejects.toThrow(TypeError);
    await expect(evaluate(oracle(() => ''), heldOutSet(arithmetic(), 3, 0), { batchSize: 0 })).rejects.toThrow(RangeError);
  });

  it('tabulates needle recall per length and depth', async () => {
    const cases = niahGrid({ lengths: [100, 400], depths: [0, 1], perCell: 3 });
    // A model with a 200-character context: it finds the needle only in short prompts.
    const shortSighted: Generate = async (prompts) => prompts.map((p) => (p.length <= 200 ? /is (\d+)\./.exec(p)![1]! : '1234'));
    const result = await evaluateNiah(shortSighted, cases);
    expect(result.cells).toEqual([
      { length: 100, depth: 0, correct: 3, total: 3 },
      { length: 100, depth: 1, correct: 3, total: 3 },
      { length: 400, depth: 0, correct: cases.filter((c) => c.length === 400 && c.depth === 0 && c.answer === '1234').length, total: 3 },
      { length: 400, depth: 1, correct: cases.filter((c) => c.length === 400 && c.depth === 1 && c.answer === '1234').length, total: 3 },
    ]);
    expect(result.total).toBe(12);
    expect(formatNiahTable(result.cells).split('\n')).toEqual([
      'depth   100  400',
      ' 0.00  100%   0%',
      ' 1.00  100%   0%',
    ]);
  });
});

describe('writeJsonl', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tunekit-synthetic-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('round-trips every record shape and leaves no temporary file', async () => {
    const sets = {
      text: pretrainCorpus(30, 1),
      alpaca: instructionSet(arithmetic(), 10, 1, { form: 'alpaca' }),
      messages: instructionSet(keyValue(), 10, 1),
      prefs: preferenceSet(arithmetic(), 10, 1),
      prefMessages: preferenceSet(reverseString(), 10, 1, { form: 'messages' }),
      needles: niahGrid({ lengths: [300], depths: [0.5], perCell: 4 }),
    };
    for (const [name, records] of Object.entries(sets)) {
      const path = join(dir, 'nested', `${name}.jsonl`);
      expect(await writeJsonl(path, records)).toBe(records.length);
      const text = await readFile(path, 'utf8');
      expect(text.endsWith('\n')).toBe(true);
      expect(text.trimEnd().split('\n').map((line) => JSON.parse(line))).toEqual(records);
    }
    expect((await readdir(join(dir, 'nested'))).sort()).toEqual(Object.keys(sets).map((n) => `${n}.jsonl`).sort());
  });

  it('replaces a file whole and leaves it untouched when a record cannot be written', async () => {
    const path = join(dir, 'replace.jsonl');
    await writeFile(path, 'old\n');
    expect(await writeJsonl(path, [{ a: 1 }])).toBe(1);
    expect(await readFile(path, 'utf8')).toBe('{"a":1}\n');
    await expect(writeJsonl(path, [{ a: 2 }, 'text'])).rejects.toThrow(/record 1 is not an object/);
    await expect(writeJsonl(path, [{ a: 2 }, { big: 1n }])).rejects.toThrow(/record 1 cannot be written as JSON/);
    expect(await readFile(path, 'utf8')).toBe('{"a":1}\n');
    expect((await readdir(dir)).filter((f) => f.includes('replace'))).toEqual(['replace.jsonl']);
    expect(await writeJsonl(join(dir, 'empty.jsonl'), [])).toBe(0);
    expect(await readFile(join(dir, 'empty.jsonl'), 'utf8')).toBe('');
  });
});
