// The contract every tokenizer in tunekit meets, whether it wraps a Hugging Face tokenizer.json or is
// the byte-level tokenizer of a model built from scratch: training code depends on this, never on a class.

/** Thrown for unreadable tokenizer files, bad template names and templates that fail to render. */
export class TokenizerError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TokenizerError';
  }
}

/** One chat turn as chat templates see it; extra fields (tool_calls, reasoning_content, ...) pass through. */
export interface ChatMessage {
  role: string;
  content?: unknown;
  [key: string]: unknown;
}

/**
 * Where chat templates come from: one template (named 'default'), Hugging Face's list of
 * `{ name, template }`, or a record of name -> template.
 */
export type ChatTemplateSpec = string | ReadonlyArray<{ name: string; template: string }> | Readonly<Record<string, string>>;

export interface EncodeOptions {
  /**
   * Add the tokenizer's own special tokens around the text (its post-processor, e.g. a BOS token).
   * Default true, as in Hugging Face. Encode rendered chat text with false: templates write BOS themselves.
   */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave special tokens out of the text. Default false. */
  skipSpecialTokens?: boolean;
}

export interface ChatTemplateOptions {
  /** Append the opening of an assistant turn (the template's `add_generation_prompt`). Default false. */
  addGenerationPrompt?: boolean;
  /** Which named template to use; default 'tool_use' when `tools` is given and one exists, else 'default'. */
  templateName?: string;
  /** Tool (function) schemas, passed to the template as `tools`. */
  tools?: readonly unknown[];
  /** Retrieval documents, passed to the template as `documents`. */
  documents?: readonly unknown[];
  /** Further template variables, e.g. `{ enable_thinking: false }`; they override the special-token names. */
  vars?: Readonly<Record<string, unknown>>;
}

export interface Tokenizer {
  /** The directory (or label) the tokenizer came from; error messages name it. */
  readonly source: string;
  /** One more than the largest id the tokenizer can produce or decode (base vocabulary plus added tokens). */
  readonly vocabSize: number;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly padToken: string | null;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly padId: number | null;
  /** Every special token (content -> id); these are what `skipSpecialTokens` removes. */
  readonly specialTokens: ReadonlyMap<string, number>;
  /** The chat templates by name; empty when the tokenizer has none. */
  readonly chatTemplates: ReadonlyMap<string, string>;
  /** Text to token ids. Special tokens written in the text are recognized as single tokens. */
  encode(text: string, options?: EncodeOptions): number[];
  /** Token ids to text; bytes that are not valid UTF-8 become U+FFFD. */
  decode(ids: ArrayLike<number>, options?: DecodeOptions): string;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
  /**
   * Renders a conversation to text with a Jinja chat template, with the variables Hugging Face passes
   * (`messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token`, `eos_token`, ...).
   * Rendering each prefix of a conversation gives the character span of each message, which is how
   * assistant-only loss masks are built for templates without generation markers.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string;
}
