// Tensors as JavaScript sees them: a handle to native memory on a device, with shape and dtype.
// Work on tensors is enqueued on the device's queue and returns at once; values come back with
// `await t.toArray()`. Memory is released explicitly (dispose, `using`, scopes): the garbage
// collector cannot see device memory, so the native finalizer is only a safety net.
import { backward as runBackward, record, type GradNode } from './autograd.js';
import { DisposedError } from './errors.js';
import { native, type DType, type NativeTensor } from './native.js';
import { detached, track } from './scope.js';

export type { DType } from './native.js';
/**
 * 'cuda-standin' is a device for tests on machines without a GPU (a CUDA build with
 * TUNEKIT_CUDA_STANDIN=1): CPU memory and kernels, but a device of its own that accepts only ops
 * with a CUDA kernel, so code that runs on it places every tensor and op as it would on 'cuda'.
 */
export type Device = 'cpu' | 'cuda' | `cuda:${number}` | 'cuda-standin';
export type TensorData = Float32Array | Int32Array | Uint8Array;
/** Nested arrays of numbers, e.g. [[1, 2], [3, 4]]. */
export type NestedNumbers = number | readonly NestedNumbers[];

export const DTYPES: readonly DType[] = ['f32', 'bf16', 'f16', 'i32', 'u8'];
const BYTES: Record<DType, number> = { f32: 4, bf16: 2, f16: 2, i32: 4, u8: 1 };
export const MAX_DIMS = 8;

const constructToken = Symbol('tunekit.tensor');

export class Tensor {
  #handle: NativeTensor | null;
  #requiresGrad = false;
  #grad: Tensor | null = null;
  #gradFn: GradNode | null = null;
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly device: Device;

  /** @internal Tensors are made by tk.tensor, tk.zeros, tk.randn and the ops. */
  constructor(token: symbol, handle: NativeTensor) {
    if (token !== constructToken) throw new TypeError('Tensor: use tk.tensor(), tk.zeros(), tk.randn() or an op to make tensors');
    this.#handle = handle;
    this.shape = Object.freeze(handle.shape);
    this.dtype = handle.dtype;
    this.device = handle.device as Device;
    track(this);
  }

  /** @internal Wraps a native handle made by an op. */
  static fromNative(handle: NativeTensor): Tensor {
    return new Tensor(constructToken, handle);
  }

  /** Number of elements. */
  get size(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  get disposed(): boolean {
    return this.#handle === null;
  }

  /** @internal The native handle; throws DisposedError after dispose(). */
  handle(what = 'tensor'): NativeTensor {
    if (this.#handle === null) throw new DisposedError(what);
    return this.#handle;
  }

  /** The values, once all work queued before this call has run. bf16 and f16 widen to Float32Array. */
  async toArray(): Promise<TensorData> {
    return decode(await this.handle('toArray').read(), this.dtype);
  }

  /** The values, blocking this thread until they are ready. For tests and scripts. */
  toArraySync(): TensorData {
    return decode(this.handle('toArraySync').readSync(), this.dtype);
  }

  /** A copy on another device, or in another dtype. */
  to(target: Device | DType): Tensor {
    const h = this.handle('to');
    if ((DTYPES as readonly string[]).includes(target)) {
      const from = this.dtype;
      const out = Tensor.fromNative(native().cast(h, target as DType));
      return record(out, 'cast', [this], [], (g) => [g.to(from)]);
    }
    if (typeof target !== 'string' || !DEVICE_PATTERN.test(target))
      throw new TypeError(`to: ${describe(target)} is neither a device ('cpu', 'cuda', 'cuda:N') nor a dtype (${DTYPES.map((d) => `'${d}'`).join(', ')})`);
    const from = this.device;
    const out = Tensor.fromNative(native().toDevice(h, target));
    return record(out, 'to', [this], [], (g) => [g.to(from)]);
  }

  /** A tensor with the same values in another shape (shares memory; -1 infers one size). */
  reshape(shape: readonly number[]): Tensor {
    const h = this.handle('reshape');
    const from = [...this.shape];
    const out = Tensor.fromNative(native().reshape(h, inferShape(shape, this.size, 'reshape')));
    return record(out, 'reshape', [this], [], (g) => [g.reshape(from)]);
  }

  // ---- autograd --------------------------------------------------------------------------------

  /**
   * Whether gradients flow to this tensor. Set it on leaves (parameters); outputs of ops get it
   * when one of their inputs has it (outside tk.noGrad).
   */
  get requiresGrad(): boolean {
    return this.#requiresGrad;
  }

  set requiresGrad(value: boolean) {
    if (typeof value !== 'boolean') throw new TypeError('requiresGrad must be a boolean');
    if (this.#gradFn) throw new Error('requiresGrad can only be set on leaf tensors (this one was made by an op that records gradients); use t.detach() for a leaf copy');
    if (value && this.dtype !== 'f32' && this.dtype !== 'bf16' && this.dtype !== 'f16')
      throw new TypeError(`requiresGrad: only floating tensors can require gradients, this one is ${this.dtype}`);
    this.#requiresGrad = value;
  }

  /** The accumulated gradient of a leaf after backward(), or null. Owned by this tensor: disposed with it. */
  get grad(): Tensor | null {
    return this.#grad;
  }

  set grad(value: Tensor | null) {
    if (value !== null && !(value instanceof Tensor)) throw new TypeError('grad must be a Tensor or null');
    if (value && value.shape.join() !== this.shape.join())
      throw new RangeError(`grad: shape [${value.shape.join(', ')}] does not match the tensor's [${this.shape.join(', ')}]`);
    if (this.#grad && this.#grad !== value) this.#grad.dispose();
    this.#grad = value;
  }

  /** @internal The node that made this tensor, if it records gradients. */
  get gradFn(): GradNode | null {
    return this.#gradFn;
  }

  /** @internal */
  attachGradFn(node: GradNode): void {
    this.#gradFn = node;
    this.#requiresGrad = true;
  }

  /** @internal Adds g (owned by nobody) into this leaf's gradient. */
  accumulateGrad(g: Tensor): void {
    if (this.#grad === null) {
      this.#grad = g;
      return;
    }
    const prev = this.#grad;
    const sum = detached((s) => s.keep(Tensor.fromNative(native().binary('add', prev.handle('grad'), g.handle('grad')))));
    prev.dispose();
    g.dispose();
    this.#grad = sum;
  }

  /**
   * Backpropagates from this tensor: every leaf it depends on that requires a gradient gets
   * d(this)/d(leaf) added into leaf.grad. grad defaults to 1 for a single-element tensor (a loss).
   */
  backward(grad?: Tensor): void {
    this.handle('backward');
    runBackward(this, grad);
  }

  /** The same values (shared memory) as a leaf without gradient history. */
  detach(): Tensor {
    return Tensor.fromNative(native().reshape(this.handle('detach'), [...this.shape]));
  }

  /** Releases the memory once queued work that reads it has run; also its grad. Idempotent. */
  dispose(): void {
    if (this.#handle === null) return;
    this.#handle.dispose();
    this.#handle = null;
    this.#grad?.dispose();
    this.#grad = null;
    const node = this.#gradFn;
    this.#gradFn = null;
    node?.release();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    return `Tensor([${this.shape.join(', ')}] ${this.dtype} on ${this.device}${this.disposed ? ', disposed' : ''})`;
  }
}

// ---- validation ----------------------------------------------------------------------------------

export function checkShape(shape: unknown, what: string): number[] {
  if (!Array.isArray(shape)) throw new TypeError(`${what}: shape must be an array of non-negative integers, got ${describe(shape)}`);
  if (shape.length > MAX_DIMS) throw new RangeError(`${what}: shape [${shape.join(', ')}] has ${shape.length} dimensions; at most ${MAX_DIMS} are supported`);
  for (const d of shape) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0)
      throw new RangeError(`${what}: shape [${shape.join(', ')}] must hold non-negative integers, got ${describe(d)}`);
  }
  return [...shape];
}

export function checkDType(dtype: unknown, what: string): DType {
  if (typeof dtype !== 'string' || !(DTYPES as readonly string[]).includes(dtype))
    throw new TypeError(`${what}: unknown dtype ${describe(dtype)}; use one of ${DTYPES.map((d) => `'${d}'`).join(', ')}`);
  return dtype as DType;
}

/** The device names: 'cpu', 'cuda', 'cuda:N', and the test device 'cuda-standin'. */
export const DEVICE_PATTERN = /^(cpu|cuda(:\d{1,2})?|cuda-standin)$/;

export function checkDevice(device: unknown, what: string): string {
  if (typeof device !== 'string' || !DEVICE_PATTERN.test(device))
    throw new TypeError(`${what}: unknown device ${describe(device)}; use 'cpu', 'cuda' or 'cuda:N'`);
  return device;
}

/** The name tensors report for a device: 'cuda' is 'cuda:0'. */
export function canonicalDevice(device: unknown, what: string): Device {
  const d = checkDevice(device, what);
  return (d === 'cuda' ? 'cuda:0' : d) as Device;
}

export function checkTensor(t: unknown, op: string, name: string): NativeTensor {
  if (!(t instanceof Tensor)) throw new TypeError(`${op}: ${name} must be a Tensor, got ${describe(t)}`);
  return t.handle(`${op}: ${name}`);
}

function describe(v: unknown): string {
  if (typeof v === 'string') return `'${v}'`;
  if (Array.isArray(v)) return `an array of length ${v.length}`;
  if (v === null) return 'null';
  if (typeof v === 'object') return (v as object).constructor?.name ?? 'an object';
  return String(v);
}

/** Resolves one -1 in `shape` so that it holds `size` elements. */
function inferShape(shape: readonly number[], size: number, what: string): number[] {
  if (!Array.isArray(shape)) return checkShape(shape, what);
  const free = shape.indexOf(-1);
  if (free < 0) return checkShape(shape, what);
  const rest = shape.filter((_, i) => i !== free);
  const known = checkShape(rest, what).reduce((a, b) => a * b, 1);
  if (known === 0 || size % known !== 0)
    throw new RangeError(`${what}: cannot infer the -1 in [${shape.join(', ')}] for ${size} elements`);
  const out = [...shape];
  out[free] = size / known;
  return out;
}

// ---- host <-> native values ------------------------------------------------------------------------

function decode(buf: ArrayBuffer, dtype: DType): TensorData {
  switch (dtype) {
    case 'f32': return new Float32Array(buf);
    case 'i32': return new Int32Array(buf);
    case 'u8': return new Uint8Array(buf);
    case 'bf16': {
      const h = new Uint16Array(buf);
      const bits = new Uint32Array(h.length);
      for (let i = 0; i < h.length; i++) bits[i] = h[i]! << 16;
      return new Float32Array(bits.buffer);
    }
    case 'f16': {
      const h = new Uint16Array(buf);
      const out = new Float32Array(h.length);
      for (let i = 0; i < h.length; i++) out[i] = halfToFloat(h[i]!);
      return out;
    }
  }
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

function flatten(data: NestedNumbers, what: string): { values: number[]; shape: number[] } {
  const shape: number[] = [];
  let level: NestedNumbers = data;
  while (Array.isArray(level)) {
    shape.push(level.length);
    level = level.length ? (level[0] as NestedNumbers) : 0;
    if (shape.length > MAX_DIMS) throw new RangeError(`${what}: data nests deeper than ${MAX_DIMS} dimensions`);
  }
  const values: number[] = [];
  const walk = (x: NestedNumbers, depth: number, path: string) => {
    if (depth === shape.length) {
      if (typeof x !== 'number') throw new TypeError(`${what}: data${path} must be a number, got ${describe(x)}`);
      values.push(x);
      return;
    }
    if (!Array.isArray(x) || x.length !== shape[depth])
      throw new RangeError(`${what}: data is ragged: data${path} should be an array of length ${shape[depth]}, got ${describe(x)}`);
    x.forEach((y, i) => walk(y, depth + 1, `${path}[${i}]`));
  };
  walk(data, 0, '');
  return { values, shape };
}

export interface TensorOptions {
  dtype?: DType;
  device?: Device;
  /** Make a leaf that accumulates gradients in t.grad (a trainable parameter). */
  requiresGrad?: boolean;
}

function withGrad(t: Tensor, options: TensorOptions): Tensor {
  if (options.requiresGrad) t.requiresGrad = true;
  return t;
}

type HostData = NestedNumbers | Float32Array | Float64Array | Int32Array | Uint8Array | Uint16Array;

/**
 * A tensor from JavaScript values: nested arrays (shape inferred), or flat arrays and typed
 * arrays with an explicit shape. The dtype defaults to the typed array's (f32 for numbers). A
 * Uint16Array with dtype 'bf16' or 'f16' is taken as raw bits.
 */
export function tensor(data: HostData, shape?: readonly number[], options: TensorOptions = {}): Tensor {
  const what = 'tensor';
  const device = checkDevice(options.device ?? 'cpu', what);
  let values: ArrayLike<number>;
  let inferred: number[];
  if (ArrayBuffer.isView(data)) {
    values = data;
    inferred = [data.length];
  } else if (Array.isArray(data) || typeof data === 'number') {
    const flat = flatten(data as NestedNumbers, what);
    values = flat.values;
    inferred = flat.shape;
  } else {
    throw new TypeError(`${what}: data must be a number, nested arrays of numbers or a typed array, got ${describe(data)}`);
  }
  const dims = shape === undefined ? inferred : checkShape(shape, what);
  const size = dims.reduce((a, b) => a * b, 1);
  if (size !== values.length)
    throw new RangeError(`${what}: shape [${dims.join(', ')}] holds ${size} elements but the data has ${values.length}`);
  const defaultDType: DType = data instanceof Int32Array ? 'i32' : data instanceof Uint8Array ? 'u8' : 'f32';
  const dtype = checkDType(options.dtype ?? defaultDType, what);
  const n = native();

  if (data instanceof Uint16Array) {
    if (dtype !== 'bf16' && dtype !== 'f16')
      throw new TypeError(`${what}: a Uint16Array holds raw bf16 or f16 bits; pass { dtype: 'bf16' } or { dtype: 'f16' }`);
    return withGrad(Tensor.fromNative(n.fromHost(data, dims, dtype, device)), options);
  }
  if (dtype === 'i32' || dtype === 'u8') {
    const [lo, hi] = dtype === 'i32' ? [-(2 ** 31), 2 ** 31 - 1] : [0, 255];
    for (let i = 0; i < values.length; i++) {
      const v = values[i]!;
      if (!Number.isInteger(v) || v < lo || v > hi)
        throw new RangeError(`${what}: element ${i} (${v}) is not a ${dtype} value (integers from ${lo} to ${hi})`);
    }
    const typed = dtype === 'i32' ? Int32Array.from(values) : Uint8Array.from(values);
    return withGrad(Tensor.fromNative(n.fromHost(typed, dims, dtype, device)), options);
  }
  const f32 = data instanceof Float32Array ? data : Float32Array.from(values);
  if (dtype === 'f32') return withGrad(Tensor.fromNative(n.fromHost(f32, dims, 'f32', device)), options);
  // bf16 / f16: round natively (nearest even), through a temporary f32 tensor.
  const wide = n.fromHost(f32, dims, 'f32', device);
  try {
    return withGrad(Tensor.fromNative(n.cast(wide, dtype)), options);
  } finally {
    wide.dispose();
  }
}

function filled(shape: readonly number[], value: number, options: TensorOptions, what: string): Tensor {
  const dims = checkShape(shape, what);
  const dtype = checkDType(options.dtype ?? 'f32', what);
  const device = checkDevice(options.device ?? 'cpu', what);
  return withGrad(Tensor.fromNative(native().full(dims, dtype, device, value)), options);
}

export function zeros(shape: readonly number[], options: TensorOptions = {}): Tensor {
  return filled(shape, 0, options, 'zeros');
}

export function ones(shape: readonly number[], options: TensorOptions = {}): Tensor {
  return filled(shape, 1, options, 'ones');
}

export function full(shape: readonly number[], value: number, options: TensorOptions = {}): Tensor {
  if (typeof value !== 'number') throw new TypeError(`full: value must be a number, got ${describe(value)}`);
  return filled(shape, value, options, 'full');
}

export interface RandnOptions extends TensorOptions {
  /** Same seed, same values, on every device and thread count. Default: the next seed of tk.manualSeed's sequence. */
  seed?: number;
  mean?: number;
  std?: number;
}

let seedSequence = Math.floor(Math.random() * 2 ** 32);

/** @internal The seed sequence's position (checkpoint replays a function with the same seeds). */
export function seedState(): number {
  return seedSequence;
}

/** @internal */
export function restoreSeedState(state: number): void {
  seedSequence = state;
}

/** @internal The next seed of the sequence (randn without a seed, dropout masks). */
export function nextSeed(): number {
  return seedSequence++;
}

/** Sets the seed sequence that randn uses when no seed is given. */
export function manualSeed(seed: number): void {
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`manualSeed: seed must be a non-negative integer, got ${seed}`);
  seedSequence = seed;
}

/** Samples from N(mean, std^2) with a counter-based generator. */
export function randn(shape: readonly number[], options: RandnOptions = {}): Tensor {
  const what = 'randn';
  const dims = checkShape(shape, what);
  const dtype = checkDType(options.dtype ?? 'f32', what);
  if (dtype !== 'f32' && dtype !== 'bf16' && dtype !== 'f16') throw new TypeError(`randn: dtype '${dtype}' is not a floating type; use 'f32', 'bf16' or 'f16'`);
  const device = checkDevice(options.device ?? 'cpu', what);
  const seed = options.seed ?? nextSeed();
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`randn: seed must be a non-negative integer, got ${seed}`);
  const mean = options.mean ?? 0;
  const std = options.std ?? 1;
  if (!Number.isFinite(mean) || !Number.isFinite(std) || std < 0)
    throw new RangeError(`randn: mean must be finite and std finite and >= 0, got mean ${mean}, std ${std}`);
  return withGrad(Tensor.fromNative(native().randn(dims, dtype, device, seed, mean, std)), options);
}

export function bytesOf(dtype: DType): number {
  return BYTES[dtype];
}
