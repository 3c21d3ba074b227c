// AdamW (Loshchilov & Hutter: decoupled weight decay) over a list of parameters, one fused
// multi-tensor kernel per step on the parameters' device queue, with fp32 moments. The moments
// are allocated on the first step a parameter has a gradient.
import { native } from '../native.js';
import { detached } from '../scope.js';
import { Tensor } from '../tensor.js';

export interface AdamWOptions {
  /** Learning rate. Default 1e-3. May be changed between steps (schedules) through `lr`. */
  lr?: number;
  /** Default [0.9, 0.999]. */
  betas?: readonly [number, number];
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay (times lr). Default 0.01, as torch.optim.AdamW. */
  weightDecay?: number;
}

export interface AdamWState {
  step: number;
  /** Per parameter (same order): the moments, or null before its first update. */
  moments: ({ m: Tensor; v: Tensor } | null)[];
}

export class AdamW {
  readonly params: readonly Tensor[];
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  #step = 0;
  #moments: ({ m: Tensor; v: Tensor } | null)[];

  constructor(params: Iterable<Tensor>, options: AdamWOptions = {}) {
    const list = [...params];
    list.forEach((p, i) => {
      if (!(p instanceof Tensor)) throw new TypeError(`AdamW: parameter ${i} is not a Tensor`);
      if (!p.requiresGrad) throw new TypeError(`AdamW: parameter ${i} ${p.toString()} does not require gradients; set p.requiresGrad = true or leave it out`);
    });
    if (new Set(list).size !== list.length) throw new TypeError('AdamW: a parameter is listed twice');
    this.params = list;
    this.lr = options.lr ?? 1e-3;
    [this.beta1, this.beta2] = options.betas ?? [0.9, 0.999];
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? 0.01;
    checkHyper(this.lr, this.beta1, this.beta2, this.eps, this.weightDecay);
    this.#moments = list.map(() => null);
  }

  /** Steps taken so far. */
  get stepCount(): number {
    return this.#step;
  }

  /**
   * Updates every parameter that has a gradient, in place. gradScale multiplies the gradients
   * first (e.g. 1 / number of accumulated tokens when they hold sums).
   */
  step(options: { gradScale?: number } = {}): void {
    const gradScale = options.gradScale ?? 1;
    if (!Number.isFinite(gradScale)) throw new RangeError(`AdamW.step: gradScale must be finite, got ${gradScale}`);
    checkHyper(this.lr, this.beta1, this.beta2, this.eps, this.weightDecay);
    const idx = this.params.map((p, i) => (p.grad && !p.disposed ? i : -1)).filter((i) => i >= 0);
    if (idx.length === 0) return;
    this.#step++;
    for (const i of idx) {
      if (this.#moments[i]) continue;
      const p = this.params[i]!;
      this.#moments[i] = detached((s) => ({
        m: s.keep(Tensor.fromNative(native().full([...p.shape], 'f32', p.device, 0))),
        v: s.keep(Tensor.fromNative(native().full([...p.shape], 'f32', p.device, 0))),
      }));
    }
    // One call per device: each device's queue runs its own fused kernel.
    const byDevice = new Map<string, number[]>();
    for (const i of idx) byDevice.set(this.params[i]!.device, [...(byDevice.get(this.params[i]!.device) ?? []), i]);
    for (const list of byDevice.values()) {
      native().adamwStep(
        list.map((i) => this.params[i]!.handle('AdamW parameter')),
        list.map((i) => this.params[i]!.grad!.handle('AdamW gradient')),
        list.map((i) => this.#moments[i]!.m.handle()),
        list.map((i) => this.#moments[i]!.v.handle()),
        { lr: this.lr, beta1: this.beta1, beta2: this.beta2, eps: this.eps, weightDecay: this.weightDecay, step: this.#step, gradScale },
      );
    }
  }

  /** Drops every parameter's gradient (the next backward starts from zero). */
  zeroGrad(): void {
    for (const p of this.params) p.grad = null;
  }

  /** The optimizer state (the tensors stay owned by the optimizer). */
  state(): AdamWState {
    return { step: this.#step, moments: this.#moments.map((m) => (m ? { ...m } : null)) };
  }

  /** Replaces the state with copies of `state`'s tensors (resume from a checkpoint). */
  loadState(state: AdamWState): void {
    if (!Number.isInteger(state.step) || state.step < 0) throw new RangeError(`AdamW.loadState: step must be a non-negative integer, got ${state.step}`);
    if (state.moments.length !== this.params.length)
      throw new RangeError(`AdamW.loadState: the state has moments for ${state.moments.length} parameters, this optimizer has ${this.params.length}`);
    const next = state.moments.map((mv, i) => {
      if (!mv) return null;
      const p = this.params[i]!;
      for (const t of [mv.m, mv.v])
        if (t.shape.join() !== p.shape.join() || t.dtype !== 'f32')
          throw new RangeError(`AdamW.loadState: moments of parameter ${i} must be f32 [${p.shape.join(', ')}], got ${t.toString()}`);
      return detached((s) => ({ m: s.keep(copyTo(mv.m, p.device)), v: s.keep(copyTo(mv.v, p.device)) }));
    });
    this.dispose();
    this.#moments = next;
    this.#step = state.step;
  }

  /** Releases the moments. */
  dispose(): void {
    for (const mv of this.#moments) {
      mv?.m.dispose();
      mv?.v.dispose();
    }
    this.#moments = this.params.map(() => null);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

function copyTo(t: Tensor, device: string): Tensor {
  return Tensor.fromNative(t.device === device ? native().cast(t.handle(), t.dtype) : native().toDevice(t.handle(), device));
}

function checkHyper(lr: number, beta1: number, beta2: number, eps: number, weightDecay: number): void {
  if (!Number.isFinite(lr) || lr < 0) throw new RangeError(`AdamW: lr must be a finite number >= 0, got ${lr}`);
  for (const [name, b] of [['betas[0]', beta1], ['betas[1]', beta2]] as const)
    if (!(b >= 0 && b < 1)) throw new RangeError(`AdamW: ${name} must be in [0, 1), got ${b}`);
  if (!(eps > 0) || !Number.isFinite(eps)) throw new RangeError(`AdamW: eps must be a finite number > 0, got ${eps}`);
  if (!Number.isFinite(weightDecay) || weightDecay < 0) throw new RangeError(`AdamW: weightDecay must be a finite number >= 0, got ${weightDecay}`);
}

/**
 * The global L2 norm of the parameters' gradients, as f32 [] (read it with await norm.toArray());
 * with maxNorm > 0 the gradients are scaled in place by min(1, maxNorm / (norm + 1e-6)) first
 * (torch.nn.utils.clip_grad_norm_). Runs on the queue: nothing waits.
 */
export function clipGradNorm(params: Iterable<Tensor>, maxNorm: number): Tensor {
  if (typeof maxNorm !== 'number' || !Number.isFinite(maxNorm) || maxNorm < 0) throw new RangeError(`clipGradNorm: maxNorm must be a finite number >= 0, got ${String(maxNorm)}`);
  const grads = [...params].map((p) => p.grad).filter((g): g is Tensor => g !== null);
  if (grads.length === 0) return Tensor.fromNative(native().full([], 'f32', 'cpu', 0));
  const devices = new Set(grads.map((g) => g.device));
  if (devices.size > 1) throw new Error(`clipGradNorm: gradients live on several devices (${[...devices].join(', ')}); clip per device`);
  return Tensor.fromNative(native().clipGradNorm(grads.map((g) => g.handle('clipGradNorm')), maxNorm));
}
