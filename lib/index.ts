// tunekit: fine-tune large language models from Node.js. The public surface (DESIGN.md).
export { checkpoint, isGradEnabled, noGrad } from './autograd.js';
export { DisposedError, NativeLoadError } from './errors.js';
export { info, memory, resetPeakMemory, setThreads, synchronize, type Info } from './runtime.js';
export { scope, tidy, Scope } from './scope.js';
export {
  Tensor,
  full,
  manualSeed,
  ones,
  randn,
  tensor,
  zeros,
  type DType,
  type Device,
  type NestedNumbers,
  type RandnOptions,
  type TensorData,
  type TensorOptions,
} from './tensor.js';
export { version } from './version.js';
export * as ops from './ops/index.js';
export * as nf4 from './nf4.js';
export * as optim from './optim/index.js';
export {
  ByteTokenizer,
  HfTokenizer,
  loadTokenizer,
  TokenizerError,
  type ChatMessage,
  type ChatTemplateOptions,
  type LoadTokenizerOptions,
  type Tokenizer,
} from './tokenizer/index.js';
export { CausalLM, type ForwardOptions } from './models/llama.js';
export { ConfigError, MODEL_TYPES, parseConfig, presetConfig, PRESETS, type HfConfig, type ModelConfig, type ModelType, type PresetName } from './models/config.js';
export { createModel, loadModel, ModelLoadError, readConfig, saveModel, type LoadModelOptions, type SaveModelOptions } from './models/io.js';
export { AdapterError, applyLora, loadAdapter, loraState, mergeLora, saveAdapter, type LoraOptions, type LoraState } from './models/lora.js';
export * as nn from './nn/index.js';
export * as io from './io/index.js';
export * as synthetic from './data/synthetic/index.js';
export { generate, generateTokens, GenerateError, type GenerateOptions, type SamplingOptions } from './generate/index.js';
export { KvCache } from './models/llama.js';
export * as training from './train/index.js';
export * as data from './data/index.js';
export { averageCheckpoints, AverageError, type AverageOptions, type AverageProgress, type AverageResult } from './models/average.js';
export * as evals from './eval/index.js';
export * as report from './report/index.js';
