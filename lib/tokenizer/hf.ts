// A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) run by @huggingface/tokenizers.
import { Tokenizer as JsTokenizer } from '@huggingface/tokenizers';

import { ChatTemplates, normalizeChatTemplates } from './chat.js';
import { checkIds, describe } from './util.js';
import {
  TokenizerError,
  type ChatMessage,
  type ChatTemplateOptions,
  type DecodeOptions,
  type EncodeOptions,
  type Tokenizer,
} from './types.js';

/**
 * The part of @huggingface/tokenizers' Tokenizer used here. Its published .d.ts files import each other
 * without file extensions, which NodeNext resolution cannot follow, so the class arrives untyped.
 */
interface JsTokenizerApi {
  encode(text: string, options: { add_special_tokens: boolean }): { ids: Array<number | undefined>; tokens: string[] };
  decode(ids: number[], options: { skip_special_tokens: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_added_tokens_decoder(): Map<number, { content: string; special: boolean }>;
  get_vocab(withAddedTokens: boolean): Map<string, number>;
}

/** The special-token keys of tokenizer_config.json; transformers passes each one that is set to templates. */
const SPECIAL_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'] as const;

export interface HfTokenizerOptions {
  /** The directory or label named in error messages. Default 'tokenizer'. */
  source?: string;
  /** Chat templates to use instead of tokenizer_config.json's `chat_template`. */
  chatTemplates?: ReadonlyMap<string, string>;
  /** How to give this tokenizer a chat template; ends the error raised when it has none. */
  missingTemplateHint?: string;
}

/**
 * The name of a special token from tokenizer_config.json, which writes it either as a string or as a
 * serialized AddedToken `{ content, lstrip, ... }`.
 */
export function tokenContent(value: unknown, where: string): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value === 'string') return value;
  if (typeof value === 'object' && typeof (value as { content?: unknown }).content === 'string') return (value as { content: string }).content;
  throw new TokenizerError(`${where} must be a string, an AddedToken object { content: ... } or null, got ${describe(value)}`);
}

export class HfTokenizer implements Tokenizer {
  readonly source: string;
  readonly vocabSize: number;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly padToken: string | null;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly padId: number | null;
  readonly specialTokens: ReadonlyMap<string, number>;
  readonly chatTemplates: ReadonlyMap<string, string>;
  private readonly inner: JsTokenizerApi;
  private readonly chat: ChatTemplates;

  /**
   * @param tokenizerJson the parsed tokenizer.json
   * @param tokenizerConfig the parsed tokenizer_config.json
   */
  constructor(tokenizerJson: unknown, tokenizerConfig: unknown, options: HfTokenizerOptions = {}) {
    const source = options.source ?? 'tokenizer';
    this.source = source;
    if (typeof tokenizerJson !== 'object' || tokenizerJson === null || Array.isArray(tokenizerJson)) {
      throw new TokenizerError(`${source}: tokenizer.json must hold a JSON object, got ${describe(tokenizerJson)}`);
    }
    const json = tokenizerJson as Record<string, unknown>;
    if (typeof json.model !== 'object' || json.model === null) {
      throw new TokenizerError(`${source}: tokenizer.json has no "model" object; expected the file written by a Hugging Face fast tokenizer (tokenizer.save_pretrained)`);
    }
    if (json.added_tokens !== undefined && !Array.isArray(json.added_tokens)) {
      throw new TokenizerError(`${source}: tokenizer.json "added_tokens" must be a list, got ${describe(json.added_tokens)}`);
    }
    if (typeof tokenizerConfig !== 'object' || tokenizerConfig === null || Array.isArray(tokenizerConfig)) {
      throw new TokenizerError(`${source}: tokenizer_config.json must hold a JSON object, got ${describe(tokenizerConfig)}`);
    }
    const config: Record<string, unknown> = { ...(tokenizerConfig as Record<string, unknown>) };

    // @huggingface/tokenizers compares special tokens as strings, so AddedToken objects become their content.
    const names: Partial<Record<(typeof SPECIAL_KEYS)[number], string>> = {};
    for (const key of SPECIAL_KEYS) {
      const name = tokenContent(config[key], `${source}: tokenizer_config.json ${key}`);
      if (name === null) delete config[key];
      else config[key] = names[key] = name;
    }
    let additional: string[] = [];
    if (config.additional_special_tokens !== undefined && config.additional_special_tokens !== null) {
      if (!Array.isArray(config.additional_special_tokens)) {
        throw new TokenizerError(`${source}: tokenizer_config.json additional_special_tokens must be a list, got ${describe(config.additional_special_tokens)}`);
      }
      additional = config.additional_special_tokens.map((t: unknown, i) => {
        const where = `${source}: tokenizer_config.json additional_special_tokens[${i}]`;
        const name = tokenContent(t, where);
        if (name === null) throw new TokenizerError(`${where} must be a string or an AddedToken object, got null`);
        return name;
      });
      config.additional_special_tokens = additional;
    }

    try {
      this.inner = new JsTokenizer({ ...json, added_tokens: json.added_tokens ?? [] }, config) as JsTokenizerApi;
    } catch (e) {
      throw new TokenizerError(`${source}: @huggingface/tokenizers cannot build a tokenizer from tokenizer.json: ${(e as Error).message}`, { cause: e });
    }

    let maxId = -1;
    for (const id of this.inner.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;

    const idOf = (name: string, where: string): number => {
      const id = this.inner.token_to_id(name);
      if (id === undefined) throw new TokenizerError(`${source}: tokenizer_config.json ${where} '${name}' is not a token of tokenizer.json`);
      return id;
    };
    this.bosToken = names.bos_token ?? null;
    this.eosToken = names.eos_token ?? null;
    this.padToken = names.pad_token ?? null;
    this.bosId = this.bosToken === null ? null : idOf(this.bosToken, 'bos_token');
    this.eosId = this.eosToken === null ? null : idOf(this.eosToken, 'eos_token');
    this.padId = this.padToken === null ? null : idOf(this.padToken, 'pad_token');

    const special = new Map<string, number>();
    for (const [id, token] of this.inner.get_added_tokens_decoder()) if (token.special) special.set(token.content, id);
    additional.forEach((name, i) => special.set(name, idOf(name, `additional_special_tokens[${i}]`)));
    for (const key of SPECIAL_KEYS) if (names[key] !== undefined) special.set(names[key]!, idOf(names[key]!, key));
    this.specialTokens = special;

    this.chatTemplates = options.chatTemplates ?? normalizeChatTemplates(config.chat_template, `${source}: tokenizer_config.json chat_template`);
    const specialVars: Record<string, unknown> = { ...names };
    if (additional.length > 0) specialVars.additional_special_tokens = additional;
    this.chat = new ChatTemplates(
      this.chatTemplates,
      source,
      specialVars,
      options.missingTemplateHint ?? 'pass one with { chatTemplates } or set chat_template in tokenizer_config.json',
    );
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TokenizerError(`encode (${this.source}): text must be a string, got ${describe(text)}`);
    const { ids, tokens } = this.inner.encode(text, { add_special_tokens: options.addSpecialTokens ?? true });
    // A vocabulary without an unknown token leaves pieces it cannot map as undefined; say which.
    const bad = ids.findIndex((id) => id === undefined || id === null);
    if (bad >= 0) throw new TokenizerError(`encode (${this.source}): the piece ${JSON.stringify(tokens[bad])} has no id and the tokenizer has no unknown token`);
    return ids as number[];
  }

  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    const list = checkIds(ids, this.vocabSize, this.source, (id) => this.inner.id_to_token(id) !== undefined);
    // @huggingface/tokenizers rejects an empty list; the empty sequence is the empty string.
    if (list.length === 0) return '';
    return this.inner.decode(list, { skip_special_tokens: options.skipSpecialTokens ?? false });
  }

  tokenToId(token: string): number | undefined {
    return this.inner.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.inner.id_to_token(id);
  }

  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string {
    return this.chat.render(messages, options);
  }
}
