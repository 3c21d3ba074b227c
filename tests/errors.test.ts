// Every bad input is a JavaScript Error that names the function and the problem: never a crash.
import { describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';

describe('bad input to tensor creation', () => {
  it('data of the wrong length', () => {
    expect(() => tk.tensor([1, 2, 3], [2, 2])).toThrow('tensor: shape [2, 2] holds 4 elements but the data has 3');
    expect(() => tk.tensor(new Float32Array(5), [2, 3])).toThrow(/holds 6 elements but the data has 5/);
  });

  it('ragged and non-numeric nested arrays', () => {
    expect(() => tk.tensor([[1, 2], [3]])).toThrow(/tensor: data is ragged: data\[1\] should be an array of length 2/);
    expect(() => tk.tensor([[1, 2], [3, 'x' as unknown as number]])).toThrow(/tensor: data\[1\]\[1\] must be a number/);
    expect(() => tk.tensor('abc' as unknown as number[])).toThrow(/tensor: data must be a number, nested arrays/);
  });

  it('negative, fractional and non-number sizes', () => {
    expect(() => tk.zeros([2, -1])).toThrow('zeros: shape [2, -1] must hold non-negative integers, got -1');
    expect(() => tk.zeros([2.5])).toThrow(/zeros: shape \[2.5\] must hold non-negative integers, got 2.5/);
    expect(() => tk.ones([NaN])).toThrow(/ones: shape/);
    expect(() => tk.randn(['3' as unknown as number])).toThrow(/randn: shape .* got '3'/);
    expect(() => tk.zeros(5 as unknown as number[])).toThrow(/zeros: shape must be an array/);
    expect(() => tk.zeros([1, 1, 1, 1, 1, 1, 1, 1, 1])).toThrow(/zeros: shape .* has 9 dimensions; at most 8/);
  });

  it('sizes too large to allocate are refused before allocating', () => {
    expect(() => tk.zeros([2 ** 40, 2 ** 20])).toThrow(/too many elements|too large/);
    expect(() => tk.zeros([2 ** 50])).toThrow(/full: shape \[1125899906842624\] is too large|out of host memory/);
  });

  it('unknown dtypes and devices', () => {
    expect(() => tk.zeros([2], { dtype: 'f64' as tk.DType })).toThrow("zeros: unknown dtype 'f64'; use one of 'f32', 'bf16', 'f16', 'i32', 'u8'");
    expect(() => tk.zeros([2], { device: 'tpu' as tk.Device })).toThrow("zeros: unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N'");
    expect(() => tk.randn([2], { dtype: 'i32' })).toThrow(/randn: dtype 'i32' is not a floating type/);
  });

  it('values that do not fit an integer dtype', () => {
    expect(() => tk.tensor([1.5], [1], { dtype: 'i32' })).toThrow('tensor: element 0 (1.5) is not a i32 value (integers from -2147483648 to 2147483647)');
    expect(() => tk.tensor([256], [1], { dtype: 'u8' })).toThrow(/element 0 \(256\) is not a u8 value/);
    expect(() => tk.tensor(new Uint16Array(2), [2])).toThrow(/a Uint16Array holds raw bf16 or f16 bits/);
  });

  it('bad randn options', () => {
    expect(() => tk.randn([2], { seed: -1 })).toThrow(/randn: seed must be a non-negative integer/);
    expect(() => tk.randn([2], { std: -1 })).toThrow(/randn: mean must be finite and std finite and >= 0/);
    expect(() => tk.manualSeed(1.5)).toThrow(/manualSeed: seed must be a non-negative integer/);
  });

  it('a CUDA device that this build or machine lacks', () => {
    const i = tk.info();
    if (i.cuda.available) return; // covered by the CUDA suites on GPU machines
    expect(() => tk.zeros([2], { device: 'cuda' })).toThrow(/device 'cuda:0' is not available/);
    using t = tk.zeros([2]);
    expect(() => t.to('cuda:1')).toThrow(/device 'cuda:1' is not available/);
  });

  it('Tensor cannot be constructed directly', () => {
    expect(() => new (tk.Tensor as unknown as new (a: symbol, b: unknown) => unknown)(Symbol('x'), {})).toThrow(/use tk.tensor\(\)/);
  });
});

describe('bad input to ops', () => {
  it('matmul shapes, ranks and batches', () => {
    using a = tk.zeros([2, 3]);
    using b = tk.zeros([4, 5]);
    using v = tk.zeros([3]);
    using ba = tk.zeros([2, 2, 3]);
    using bb = tk.zeros([3, 3, 5]);
    expect(() => tk.ops.matmul(a, b)).toThrow('matmul: inner dimensions differ: a [2, 3] has K=3, b [4, 5] has K=4');
    expect(() => tk.ops.matmul(a, b, { transB: true })).toThrow(/matmul: inner dimensions differ: a \[2, 3\] has K=3, b \[4, 5\] \(transposed\) has K=5/);
    expect(() => tk.ops.matmul(a, v)).toThrow(/matmul: operands need at least 2 dimensions/);
    expect(() => tk.ops.matmul(ba, bb)).toThrow('matmul: batch dimensions of a [2, 2, 3] and b [3, 3, 5] must be equal, or one operand must be 2-D');
    expect(() => tk.ops.matmul(a, a, { transA: 1 as unknown as boolean })).toThrow(/matmul: transA and transB must be booleans/);
  });

  it('dtype and device mismatches', () => {
    using a = tk.zeros([2, 2]);
    using b = tk.zeros([2, 2], { dtype: 'bf16' });
    using i = tk.zeros([2, 2], { dtype: 'i32' });
    using u = tk.zeros([2], { dtype: 'u8' });
    expect(() => tk.ops.matmul(a, b)).toThrow("matmul: dtypes differ ([2, 2] f32 on cpu and [2, 2] bf16 on cpu); cast one with t.to('f32')");
    expect(() => tk.ops.add(a, b)).toThrow(/add: dtypes differ/);
    expect(() => tk.ops.matmul(i, i)).toThrow("matmul: dtype i32 is not supported; use f32 or bf16 (cast with t.to('f32'))");
    expect(() => tk.ops.scale(i, 2)).toThrow(/scale: dtype i32 is not a floating type/);
    expect(() => tk.ops.add(u, u)).toThrow(/add: dtype u8 is not supported/);
    expect(() => tk.ops.sum(u)).toThrow(/sum: dtype u8 is not supported/);
  });

  it('broadcasting, axes and permutations', () => {
    using a = tk.zeros([2, 3]);
    using b = tk.zeros([4, 3, 2]);
    expect(() => tk.ops.add(a, b)).toThrow('add: shapes [2, 3] and [4, 3, 2] do not broadcast (dimension 1: 2 vs 3)');
    expect(() => tk.ops.sum(a, { axis: 2 })).toThrow('sum: axis 2 is out of range for shape [2, 3] (valid: -2 .. 1)');
    expect(() => tk.ops.sum(a, { axis: [0, -2] })).toThrow(/sum: axis 0 is listed twice/);
    expect(() => tk.ops.sum(a, { axis: [] })).toThrow(/sum: axis is an empty list/);
    expect(() => tk.ops.sum(a, { axis: 0.5 })).toThrow(/sum: axis must be an integer/);
    expect(() => tk.ops.permute(a, [0])).toThrow('permute: 1 axes given for [2, 3] f32 on cpu of rank 2');
    expect(() => tk.ops.permute(a, [1, 1])).toThrow(/permute: axis 1 appears twice/);
    expect(() => tk.ops.transpose(a, 0, 5)).toThrow(/transpose: axis 5 is out of range/);
    expect(() => a.reshape([4, 2])).toThrow('reshape: cannot view [2, 3] f32 on cpu (6 elements) as [4, 2] (8 elements)');
    expect(() => a.reshape([-1, 4])).toThrow(/reshape: cannot infer the -1 in \[-1, 4\] for 6 elements/);
    expect(() => a.to('f64' as tk.DType)).toThrow("to: 'f64' is neither a device ('cpu', 'cuda', 'cuda:N') nor a dtype ('f32', 'bf16', 'f16', 'i32', 'u8')");
  });

  it('non-tensor operands', () => {
    using a = tk.zeros([2]);
    expect(() => tk.ops.add(a, [1, 2] as unknown as tk.Tensor)).toThrow('add: b must be a Tensor, got an array of length 2');
    expect(() => tk.ops.matmul(null as unknown as tk.Tensor, a)).toThrow('matmul: a must be a Tensor, got null');
    expect(() => tk.ops.scale(a, 'x' as unknown as number)).toThrow(/scale: alpha must be a number/);
    expect(() => tk.tidy(5 as unknown as () => void)).toThrow(/tidy: expected a function/);
  });
});
