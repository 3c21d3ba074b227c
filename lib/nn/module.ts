// Modules: a tree of named parameters whose dotted names are Hugging Face's
// (`model.layers.0.self_attn.q_proj.weight`), so loading, saving and PEFT adapters map one to one.
// A module owns its parameters: they belong to no scope, and module.dispose() releases them.
import { detached } from '../scope.js';
import type { Tensor } from '../tensor.js';

export class Module {
  /** Dropout and other training-only behaviour are on while true (module.train() / module.eval()). */
  training = true;
  readonly #params = new Map<string, Tensor | null>();
  readonly #children = new Map<string, Module>();

  /** Registers (or replaces, disposing the old one) a parameter of this module. */
  protected setParam(name: string, t: Tensor | null): Tensor | null {
    const old = this.#params.get(name);
    if (old && old !== t) old.dispose();
    this.#params.set(name, t);
    return t;
  }

  protected param(name: string): Tensor {
    const t = this.#params.get(name);
    if (!t) throw new Error(`${this.constructor.name}: parameter '${name}' is not loaded`);
    return t;
  }

  protected hasParam(name: string): boolean {
    return !!this.#params.get(name);
  }

  protected deleteParam(name: string): void {
    this.#params.get(name)?.dispose();
    this.#params.delete(name);
  }

  /** Registers a child module under `name` (a path component: "layers", "0", "self_attn"). */
  protected addModule<M extends Module>(name: string, m: M): M {
    this.#children.get(name)?.dispose();
    this.#children.set(name, m);
    return m;
  }

  protected deleteModule(name: string): void {
    this.#children.get(name)?.dispose();
    this.#children.delete(name);
  }

  /** Child modules by name. */
  children(): [string, Module][] {
    return [...this.#children];
  }

  /** Every module in the tree with its dotted path ('' for this one), parents first. */
  namedModules(prefix = ''): [string, Module][] {
    const out: [string, Module][] = [[prefix, this]];
    for (const [name, child] of this.#children) out.push(...child.namedModules(prefix ? `${prefix}.${name}` : name));
    return out;
  }

  /** Every loaded parameter with its dotted name, in registration order. */
  namedParameters(prefix = ''): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [name, t] of this.#params) if (t) out.push([prefix ? `${prefix}.${name}` : name, t]);
    for (const [name, child] of this.#children) out.push(...child.namedParameters(prefix ? `${prefix}.${name}` : name));
    return out;
  }

  parameters(): Tensor[] {
    return this.namedParameters().map(([, t]) => t);
  }

  /** The parameters that require gradients (what an optimizer should get). */
  trainableParameters(): [string, Tensor][] {
    return this.namedParameters().filter(([, t]) => t.requiresGrad);
  }

  /** The module at a dotted path, or undefined. */
  getModule(path: string): Module | undefined {
    let m: Module | undefined = this;
    for (const part of path ? path.split('.') : []) {
      if (!m) return undefined;
      m = m.#children.get(part);
    }
    return m;
  }

  /** Replaces the parameter at a dotted path (the module takes ownership of t). */
  setParameter(path: string, t: Tensor): void {
    const dot = path.lastIndexOf('.');
    const owner = this.getModule(dot < 0 ? '' : path.slice(0, dot));
    const name = path.slice(dot + 1);
    if (!owner || !owner.#params.has(name)) throw new Error(`setParameter: this ${this.constructor.name} has no parameter '${path}'`);
    owner.setParam(name, t);
  }

  /** Whether the parameter at a dotted path is declared (loaded or not). */
  declaresParameter(path: string): boolean {
    const dot = path.lastIndexOf('.');
    const owner = this.getModule(dot < 0 ? '' : path.slice(0, dot));
    return !!owner && owner.#params.has(path.slice(dot + 1));
  }

  /** Declared parameter names (loaded or not), in order. */
  declaredParameters(prefix = ''): string[] {
    const out: string[] = [];
    for (const name of this.#params.keys()) out.push(prefix ? `${prefix}.${name}` : name);
    for (const [name, child] of this.#children) out.push(...child.declaredParameters(prefix ? `${prefix}.${name}` : name));
    return out;
  }

  train(on = true): this {
    for (const [, m] of this.namedModules()) m.training = on;
    return this;
  }

  eval(): this {
    return this.train(false);
  }

  /** Sets requiresGrad on every parameter. */
  requiresGrad(on: boolean): this {
    for (const t of this.parameters()) t.requiresGrad = on;
    return this;
  }

  /** Releases every parameter (and gradient) of the tree. */
  dispose(): void {
    for (const t of this.#params.values()) t?.dispose();
    this.#params.clear();
    for (const child of this.#children.values()) child.dispose();
    this.#children.clear();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Children named 0, 1, 2, ... (a model's `layers`). */
export class ModuleList<M extends Module = Module> extends Module {
  readonly items: M[] = [];

  push(m: M): M {
    this.items.push(this.addModule(String(this.items.length), m));
    return m;
  }
}

/** Runs fn and returns the tensor it makes, owned by no scope (a parameter, optimizer state). */
export function owned(fn: () => Tensor): Tensor {
  return detached((s) => s.keep(fn()));
}
