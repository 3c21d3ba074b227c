// Scopes dispose the tensors made while they are open. The open scope is carried by
// AsyncLocalStorage, so `using scope = tk.scope()` in an async function keeps collecting tensors
// made after an `await` (and in the async calls it makes), not tensors of unrelated work that
// started elsewhere. tk.tidy is the synchronous form: it also keeps what the function returns.
import { AsyncLocalStorage } from 'node:async_hooks';

import type { Tensor } from './tensor.js';

const current = new AsyncLocalStorage<Scope | undefined>();

export class Scope {
  readonly #tensors = new Set<Tensor>();
  readonly #parent: Scope | undefined;
  #open = true;

  /** @internal */
  constructor(parent: Scope | undefined) {
    this.#parent = parent;
  }

  get open(): boolean {
    return this.#open;
  }

  /** @internal */
  add(t: Tensor): void {
    this.#tensors.add(t);
  }

  /** Excludes tensors from this scope's disposal; they move to the enclosing scope, if any. */
  keep<T extends Tensor | readonly Tensor[]>(t: T): T {
    const list = (Array.isArray(t) ? t : [t]) as Tensor[];
    for (const x of list) {
      this.#tensors.delete(x);
      openAncestor(this.#parent)?.add(x);
    }
    return t;
  }

  /** Disposes every tensor made in this scope and not kept, and closes it. Idempotent. */
  dispose(): void {
    if (!this.#open) return;
    this.#open = false;
    for (const t of this.#tensors) t.dispose();
    this.#tensors.clear();
    if (current.getStore() === this) current.enterWith(openAncestor(this.#parent));
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** @internal */
  get parent(): Scope | undefined {
    return this.#parent;
  }
}

function openAncestor(s: Scope | undefined): Scope | undefined {
  while (s && !s.open) s = s.parent;
  return s;
}

/** @internal Called for every new tensor. */
export function track(t: Tensor): void {
  openAncestor(current.getStore())?.add(t);
}

/**
 * `using scope = tk.scope()` opens a scope for the rest of the enclosing function, awaits
 * included. Caveat of AsyncLocalStorage: an async function that opens one before its first
 * await also lends it to its caller's code that runs before the caller awaits it; the callback
 * form, `await tk.scope(async (scope) => ...)`, is isolated and keeps the tensors it returns.
 */
export function scope(): Scope;
export function scope<T>(fn: (scope: Scope) => Promise<T> | T): Promise<T>;
export function scope<T>(fn?: (scope: Scope) => Promise<T> | T): Scope | Promise<T> {
  const s = new Scope(openAncestor(current.getStore()));
  if (fn === undefined) {
    current.enterWith(s);
    return s;
  }
  if (typeof fn !== 'function') throw new TypeError('scope: expected no argument or a function');
  return current.run(s, async () => {
    try {
      const result = await fn(s);
      for (const t of returnedTensors(result)) s.keep(t);
      return result;
    } finally {
      s.dispose();
    }
  });
}

/**
 * Runs fn and disposes the tensors it made, except those it returns (a tensor, or arrays and
 * plain objects of tensors, one level deep). Synchronous only: for async code use tk.scope().
 */
export function tidy<T>(fn: () => T): T {
  if (typeof fn !== 'function') throw new TypeError('tidy: expected a function');
  const s = new Scope(openAncestor(current.getStore()));
  let result: T;
  try {
    result = current.run(s, fn);
  } catch (err) {
    s.dispose();
    throw err;
  }
  if (result instanceof Promise) {
    s.dispose();
    throw new TypeError('tidy: fn returned a Promise, and tensors used after an await would already be disposed; use `using scope = tk.scope()` in async code');
  }
  for (const t of returnedTensors(result)) s.keep(t);
  s.dispose();
  return result;
}

/**
 * @internal Runs fn in a scope with no parent: tensors fn makes are disposed at the end unless
 * fn keeps them with `s.keep(t)`, which leaves them owned by nobody (gradients, optimizer state:
 * their owner disposes them). Synchronous only.
 */
export function detached<T>(fn: (s: Scope) => T): T {
  const s = new Scope(undefined);
  try {
    return current.run(s, () => fn(s));
  } finally {
    s.dispose();
  }
}

function isTensor(x: unknown): x is Tensor {
  return typeof x === 'object' && x !== null && typeof (x as Tensor).handle === 'function' && 'shape' in x && 'dtype' in x;
}

function returnedTensors(x: unknown): Tensor[] {
  if (isTensor(x)) return [x];
  const values = Array.isArray(x) ? x : x && typeof x === 'object' && Object.getPrototypeOf(x) === Object.prototype ? Object.values(x) : [];
  return values.filter(isTensor);
}
