export { add, mul, scale, sub } from './elementwise.js';
export { matmul, type MatmulOptions } from './matmul.js';
export { sum, type SumOptions } from './reduce.js';
export { cast, permute, reshape, transpose } from './shape.js';
