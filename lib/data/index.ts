// Training data: streaming JSONL readers for the three record shapes, tokenization with assistant-only
// loss masks for any chat template, packing without cross-document attention, replay mixing, and a
// pipeline that resumes exactly from a saved position.
export { DataError, formatOrigin, type RecordOrigin } from './errors.js';
export { readJsonl, readLines, sourceName, type DataSource, type JsonlRecord } from './jsonl.js';
export {
  CHAT_ROLES,
  DATA_FORMATS,
  FORMAT_SHAPES,
  detectFormat,
  readRecords,
  resolveFormat,
  validateRecord,
  type AlpacaRecord,
  type ChatRole,
  type ChatTurn,
  type DataFormat,
  type FormatOptions,
  type FormattedRecord,
  type MessagesRecord,
  type SourceRecord,
  type TextRecord,
} from './records.js';
export { renderWithSpans, tokenizeConversation, type AssistantSpan, type ChatRenderOptions, type RenderedConversation, type TokenizedConversation } from './chat-mask.js';
export { alpacaToMessages, IGNORE_INDEX, readExamples, tokenizeRecord, tokenizeText, type Example, type TokenizeOptions } from './examples.js';
export { collateRows, packExamples, RowPacker, shiftTargets, type Batch, type CompletedRow, type PackedRow, type PackMode, type PackOptions, type RowStart } from './pack.js';
export { DataPipeline, type DataPipelineOptions, type DataPosition, type PipelineBatch, type ReplayOptions, type StreamPosition } from './pipeline.js';
