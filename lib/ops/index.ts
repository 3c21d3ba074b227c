export { attention, type AttentionOptions } from './attention.js';
export { add, dropout, mul, scale, sub, type DropoutOptions } from './elementwise.js';
export {
  crossEntropy,
  distillLoss,
  dpoLoss,
  linearCrossEntropy,
  linearDistillLoss,
  sequenceLogprobs,
  type CrossEntropyOptions,
  type DistillOptions,
  type DpoOptions,
  type DpoResult,
  type LinearCrossEntropyOptions,
  type LinearDistillOptions,
} from './loss.js';
export { matmul, type MatmulOptions } from './matmul.js';
export { embedding, rmsNorm, swiglu, type RmsNormOptions } from './norm.js';
export { broadcastTo, sum, type SumOptions } from './reduce.js';
export { rope, type RopeOptions, type RopeScaling } from './rope.js';
export { cast, concat, narrow, permute, reshape, transpose } from './shape.js';
export { qloraLinear, type QloraLinearOptions } from './qlora.js';
