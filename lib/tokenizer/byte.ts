// The byte-level tokenizer for models built from scratch: no training, no merges, every UTF-8 string
// round-trips exactly, and the vocabulary is small enough for a toy model's embedding table.
//
// It is saved as a native Hugging Face tokenizer.json: a BPE model with the 256 byte symbols of the
// GPT-2 byte-level alphabet and no merges, a ByteLevel pre-tokenizer (no regex split) and decoder, and
// the special tokens as added tokens. @huggingface/tokenizers and the Rust `tokenizers` read that file
// and produce the same ids, so a model trained from scratch loads in the Python ecosystem unchanged.
// tokenizer_config.json also carries `"tunekit_tokenizer": "byte"`, which transformers keeps and
// ignores, so that loadTokenizer can give back a ByteTokenizer rather than a general BPE tokenizer.
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';

import { ChatTemplates, chatTemplatesToConfig, normalizeChatTemplates } from './chat.js';
import { checkIds, describe } from './util.js';
import {
  TokenizerError,
  type ChatMessage,
  type ChatTemplateOptions,
  type ChatTemplateSpec,
  type DecodeOptions,
  type EncodeOptions,
  type Tokenizer,
} from './types.js';

/**
 * The special tokens every ByteTokenizer has, with ids 256..261 in this order: <|bos|> 256,
 * <|eos|> 257, <|pad|> 258, <|system|> 259, <|user|> 260, <|assistant|> 261. Extra special tokens
 * follow from 262, so the default vocabulary size is 262.
 */
export const BYTE_SPECIAL_TOKENS = ['<|bos|>', '<|eos|>', '<|pad|>', '<|system|>', '<|user|>', '<|assistant|>'] as const;

/** The tokenizer_config.json key and value by which loadTokenizer recognizes a saved ByteTokenizer. */
export const BYTE_TOKENIZER_MARKER = { key: 'tunekit_tokenizer', value: 'byte' } as const;

/**
 * The built-in chat template: `<|bos|>`, then each turn as `<|role|>content<|eos|>`; the generation
 * prompt is `<|assistant|>`. Ending turns with EOS means generation stops at `eosId` with no extra
 * stop token, and a rendered prefix is always a prefix of the rendered whole, which loss masks rely on.
 */
export const BYTE_CHAT_TEMPLATE = `{{- bos_token }}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('the byte-level chat template knows the roles system, user and assistant, not ' + message.role) }}
    {%- endif %}
    {{- '<|' + message.role + '|>' + message.content + eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- endif %}`;

/**
 * GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are
 * shifted to code points from 256 up so that every byte is a visible character in tokenizer.json.
 */
const BYTE_TO_CHAR: readonly string[] = (() => {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const out: string[] = [];
  let shifted = 0;
  for (let b = 0; b < 256; b++) out.push(String.fromCharCode(printable(b) ? b : 256 + shifted++));
  return out;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

export interface ByteTokenizerOptions {
  /** More special tokens, with ids from 262 in order (e.g. tool-call markers). */
  extraSpecialTokens?: readonly string[];
  /** Chat templates to use instead of BYTE_CHAT_TEMPLATE. */
  chatTemplate?: ChatTemplateSpec;
  /** The directory or label named in error messages. Default 'byte tokenizer'. */
  source?: string;
  /** How to give this tokenizer a chat template; ends the error raised when it has none. */
  missingTemplateHint?: string;
}

export interface ByteEncodeOptions extends EncodeOptions {
  /**
   * Recognize special tokens written in the text (default true, as Hugging Face tokenizers do, so
   * rendered chat text encodes to its role tokens). With false, `<|eos|>` in the text is 7 bytes.
   */
  parseSpecialTokens?: boolean;
}

export class ByteTokenizer implements Tokenizer {
  readonly source: string;
  readonly vocabSize: number;
  readonly bosToken: string = '<|bos|>';
  readonly eosToken: string = '<|eos|>';
  readonly padToken: string = '<|pad|>';
  readonly bosId: number = 256;
  readonly eosId: number = 257;
  readonly padId: number = 258;
  readonly specialTokens: ReadonlyMap<string, number>;
  readonly chatTemplates: ReadonlyMap<string, string>;
  /** The special tokens in id order (id = 256 + index). */
  private readonly specials: readonly string[];
  private readonly specialPattern: RegExp;
  private readonly chat: ChatTemplates;
  private readonly utf8 = new TextEncoder();
  // ignoreBOM keeps a leading U+FEFF in the text instead of eating it, so the round trip is exact.
  private readonly utf8Lossy = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

  constructor(options: ByteTokenizerOptions = {}) {
    this.source = options.source ?? 'byte tokenizer';
    const extras = options.extraSpecialTokens ?? [];
    if (!Array.isArray(extras)) throw new TokenizerError(`ByteTokenizer (${this.source}): extraSpecialTokens must be a list of strings, got ${describe(extras)}`);
    const specials: string[] = [...BYTE_SPECIAL_TOKENS];
    for (const t of extras) {
      if (typeof t !== 'string' || t.length === 0) throw new TokenizerError(`ByteTokenizer (${this.source}): special tokens must be non-empty strings, got ${describe(t)}`);
      if (specials.includes(t)) throw new TokenizerError(`ByteTokenizer (${this.source}): special token ${JSON.stringify(t)} is given twice`);
      specials.push(t);
    }
    this.specials = specials;
    this.vocabSize = 256 + specials.length;
    this.specialTokens = new Map(specials.map((t, i) => [t, 256 + i]));
    // Longest first, so that a special token that extends another one wins.
    const alternatives = [...specials].sort((a, b) => b.length - a.length).map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
    this.specialPattern = new RegExp(alternatives.join('|'), 'g');

    this.chatTemplates =
      options.chatTemplate === undefined
        ? new Map([['default', BYTE_CHAT_TEMPLATE]])
        : normalizeChatTemplates(options.chatTemplate, `ByteTokenizer (${this.source}): chatTemplate`);
    this.chat = new ChatTemplates(
      this.chatTemplates,
      this.source,
      { bos_token: this.bosToken, eos_token: this.eosToken, pad_token: this.padToken, additional_special_tokens: specials.slice(3) },
      options.missingTemplateHint ?? 'pass one with new ByteTokenizer({ chatTemplate })',
    );
  }

  encode(text: string, options: ByteEncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TokenizerError(`encode (${this.source}): text must be a string, got ${describe(text)}`);
    const ids: number[] = options.addSpecialTokens ?? true ? [this.bosId] : [];
    const pushBytes = (s: string) => {
      for (const b of this.utf8.encode(s)) ids.push(b);
    };
    if (options.parseSpecialTokens ?? true) {
      let last = 0;
      for (const m of text.matchAll(this.specialPattern)) {
        pushBytes(text.slice(last, m.index));
        ids.push(this.specialTokens.get(m[0])!);
        last = m.index + m[0].length;
      }
      pushBytes(text.slice(last));
    } else {
      pushBytes(text);
    }
    return ids;
  }

  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    const list = checkIds(ids, this.vocabSize, this.source);
    const skip = options.skipSpecialTokens ?? false;
    let out = '';
    let run: number[] = [];
    const flush = () => {
      if (run.length > 0) out += this.utf8Lossy.decode(Uint8Array.from(run));
      run = [];
    };
    // A skipped special token joins the bytes around it, as Hugging Face's ByteLevel decoder does (it
    // removes skipped tokens before decoding), so the ids decode to the same text in Python.
    for (const id of list) {
      if (id < 256) {
        run.push(id);
      } else if (!skip) {
        flush();
        out += this.specials[id - 256]!;
      }
    }
    flush();
    return out;
  }

  /** Bytes are named by their byte-level symbol (space is 'Ġ'), as in the saved tokenizer.json. */
  tokenToId(token: string): number | undefined {
    return CHAR_TO_BYTE.get(token) ?? this.specialTokens.get(token);
  }

  idToToken(id: number): string | undefined {
    if (!Number.isInteger(id) || id < 0) return undefined;
    return id < 256 ? BYTE_TO_CHAR[id] : this.specials[id - 256];
  }

  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string {
    return this.chat.render(messages, options);
  }

  /** The tokenizer.json contents: a byte-level BPE with no merges (see the top of this file). */
  tokenizerJson(): Record<string, unknown> {
    const bos = { SpecialToken: { id: this.bosToken, type_id: 0 } };
    return {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: this.specials.map((content, i) => ({
        id: 256 + i,
        content,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: true,
      })),
      normalizer: null,
      pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
      // addSpecialTokens puts <|bos|> first, as Llama tokenizers do.
      post_processor: {
        type: 'TemplateProcessing',
        single: [bos, { Sequence: { id: 'A', type_id: 0 } }],
        pair: [bos, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: this.bosToken, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
        special_tokens: { [this.bosToken]: { id: this.bosToken, ids: [this.bosId], tokens: [this.bosToken] } },
      },
      decoder: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
      model: {
        type: 'BPE',
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: false,
        vocab: Object.fromEntries(BYTE_TO_CHAR.map((c, b) => [c, b])),
        merges: [],
      },
    };
  }

  /** The tokenizer_config.json contents, readable by transformers' PreTrainedTokenizerFast. */
  tokenizerConfig(): Record<string, unknown> {
    const config: Record<string, unknown> = {
      tokenizer_class: 'PreTrainedTokenizerFast',
      [BYTE_TOKENIZER_MARKER.key]: BYTE_TOKENIZER_MARKER.value,
      bos_token: this.bosToken,
      eos_token: this.eosToken,
      pad_token: this.padToken,
      unk_token: null,
      additional_special_tokens: this.specials.slice(3),
      added_tokens_decoder: Object.fromEntries(
        this.specials.map((content, i) => [
          String(256 + i),
          { content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true },
        ]),
      ),
      clean_up_tokenization_spaces: false,
    };
    const chatTemplate = chatTemplatesToConfig(this.chatTemplates);
    if (chatTemplate !== undefined) config.chat_template = chatTemplate;
    return config;
  }

  /** Writes tokenizer.json and tokenizer_config.json into `dir` (created if needed). */
  async save(dir: string): Promise<void> {
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(this.tokenizerJson(), null, 2) + '\n');
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(this.tokenizerConfig(), null, 2) + '\n');
  }

  /**
   * Rebuilds a saved ByteTokenizer from its parsed files. The files must be exactly what `save` writes
   * (up to key order and the chat templates): a ByteTokenizer decodes bytes itself, so a tokenizer.json
   * that was edited into something else must not be silently read as one.
   */
  static fromFiles(
    tokenizerJson: unknown,
    tokenizerConfig: Record<string, unknown>,
    options: { source: string; chatTemplates: ReadonlyMap<string, string>; missingTemplateHint?: string },
  ): ByteTokenizer {
    const { source } = options;
    const where = `${source}: tokenizer_config.json says "${BYTE_TOKENIZER_MARKER.key}": "${BYTE_TOKENIZER_MARKER.value}", but`;
    const fix = `remove that key to load the files as a general Hugging Face tokenizer`;
    const json = tokenizerJson as Record<string, unknown>;
    const added = Array.isArray(json?.added_tokens) ? (json.added_tokens as unknown[]) : [];
    const contents = added.map((t) => (t as { content?: unknown } | null)?.content);
    const extras = contents.slice(BYTE_SPECIAL_TOKENS.length);
    if (!BYTE_SPECIAL_TOKENS.every((t, i) => contents[i] === t) || !extras.every((t) => typeof t === 'string')) {
      throw new TokenizerError(`${where} tokenizer.json's added_tokens do not start with ${BYTE_SPECIAL_TOKENS.join(' ')}; ${fix}`);
    }
    let tok: ByteTokenizer;
    try {
      tok = new ByteTokenizer({
        extraSpecialTokens: extras as string[],
        chatTemplate: Object.fromEntries(options.chatTemplates),
        source,
        missingTemplateHint: options.missingTemplateHint,
      });
    } catch (e) {
      throw new TokenizerError(`${where} ${(e as Error).message}; ${fix}`, { cause: e });
    }
    const expected = tok.tokenizerJson();
    const differs = [...new Set([...Object.keys(expected), ...Object.keys(json)])].filter((k) => !isDeepStrictEqual(expected[k], json[k]));
    if (differs.length > 0) throw new TokenizerError(`${where} tokenizer.json differs from a byte tokenizer's in ${differs.join(', ')}; ${fix}`);
    for (const key of ['bos_token', 'eos_token', 'pad_token'] as const) {
      const value = tokenizerConfig[key];
      const name = typeof value === 'object' && value !== null ? (value as { content?: unknown }).content : value;
      if (name !== tok[key === 'bos_token' ? 'bosToken' : key === 'eos_token' ? 'eosToken' : 'padToken']) {
        throw new TokenizerError(`${where} its ${key} is ${describe(name)}, not the byte tokenizer's; ${fix}`);
      }
    }
    return tok;
  }
}
