// Tokenizers: Hugging Face tokenizer.json directories, the byte-level tokenizer for models built from
// scratch, and Jinja chat templates for both.
export { loadTokenizer, type LoadTokenizerOptions } from './load.js';
export { HfTokenizer, type HfTokenizerOptions } from './hf.js';
export {
  BYTE_CHAT_TEMPLATE,
  BYTE_SPECIAL_TOKENS,
  BYTE_TOKENIZER_MARKER,
  ByteTokenizer,
  type ByteEncodeOptions,
  type ByteTokenizerOptions,
} from './byte.js';
export {
  TokenizerError,
  type ChatMessage,
  type ChatTemplateOptions,
  type ChatTemplateSpec,
  type DecodeOptions,
  type EncodeOptions,
  type Tokenizer,
} from './types.js';
