// Records to training examples: token ids and per-token labels, -100 where a token is not trained.
import type { Tokenizer } from '../tokenizer/types.js';
import { tokenizeConversation, type ChatRenderOptions } from './chat-mask.js';
import { DataError, type RecordOrigin } from './errors.js';
import { readRecords, type AlpacaRecord, type ChatTurn, type FormatOptions, type FormattedRecord } from './records.js';
import type { DataSource } from './jsonl.js';

/** The label of a token that does not count in the loss (PyTorch's and tk.ops.crossEntropy's ignoreIndex). */
export const IGNORE_INDEX = -100;

export interface Example {
  ids: number[];
  /** Same length as ids: the id itself where the token is trained, IGNORE_INDEX elsewhere. */
  labels: number[];
  /** The record it came from, for error messages. */
  origin?: RecordOrigin;
  /** Pretraining text, which may be cut into seqLen chunks (splitLong); conversations never are. */
  splittable?: boolean;
}

export interface TokenizeOptions {
  /** The chat template and its variables, for alpaca and messages records. */
  chatTemplate?: ChatRenderOptions;
  /**
   * The token appended to each pretraining text; default the tokenizer's EOS, null for none. Qwen's
   * tokenizer_config names the chat end <|im_end|> as EOS, while its base models end documents with
   * <|endoftext|>: pass that id to continue pretraining a Qwen base model the way it was trained.
   */
  textEndId?: number | null;
}

/** An alpaca record as the conversation it stands for: the instruction (and input) from the user, the output from the assistant. */
export function alpacaToMessages(record: AlpacaRecord): ChatTurn[] {
  const input = record.input ?? '';
  return [
    { role: 'user', content: input === '' ? record.instruction : `${record.instruction}\n\n${input}` },
    { role: 'assistant', content: record.output },
  ];
}

/** Pretraining text: [BOS if the tokenizer has one] + the text + [end token]; every token is trained. */
export function tokenizeText(tokenizer: Tokenizer, text: string, options: TokenizeOptions = {}): Example {
  const endId = options.textEndId === undefined ? tokenizer.eosId : options.textEndId;
  if (endId !== null && !(Number.isSafeInteger(endId) && endId >= 0 && endId < tokenizer.vocabSize)) {
    throw new DataError(`textEndId must be a token id of the tokenizer (0 <= id < ${tokenizer.vocabSize}) or null, got ${String(endId)}`);
  }
  const ids = tokenizer.encode(text, { addSpecialTokens: false });
  if (tokenizer.bosId !== null) ids.unshift(tokenizer.bosId);
  if (endId !== null) ids.push(endId);
  return { ids, labels: ids.slice(), splittable: true };
}

/** One validated record to an example; conversations are masked to their assistant turns. */
export function tokenizeRecord(tokenizer: Tokenizer, item: FormattedRecord, options: TokenizeOptions = {}, origin?: RecordOrigin): Example {
  let example: Example;
  switch (item.format) {
    case 'text':
      example = tokenizeText(tokenizer, item.record.text, options);
      break;
    case 'alpaca':
      example = tokenizeConversation(tokenizer, alpacaToMessages(item.record), options.chatTemplate, origin);
      break;
    case 'messages':
      example = tokenizeConversation(tokenizer, item.record.messages, options.chatTemplate, origin);
      break;
  }
  if (origin !== undefined) example.origin = origin;
  return example;
}

/** Streams the examples of a source in stored order (no shuffling, no packing). */
export async function* readExamples(source: DataSource, tokenizer: Tokenizer, options: TokenizeOptions & FormatOptions = {}): AsyncGenerator<Example> {
  for await (const r of readRecords(source, options)) yield tokenizeRecord(tokenizer, r, options, { file: r.file, line: r.line });
}
