// Reverse-mode autograd: a tape of nodes recorded by the op wrappers in lib/ops.
//
// Each differentiable op, when gradients are enabled and one of its inputs requires them, attaches
// a node to its output: the inputs (edges), aliases of the tensors its backward rule reads, and
// the rule. `loss.backward()` walks the nodes in reverse topological order and accumulates the
// gradients of leaves (tensors made with requiresGrad, the parameters) into `t.grad`.
//
// Memory follows the execution model: nothing waits for the garbage collector.
// - Saved tensors are aliases (new handles on the same storage, owned by no scope), so the user
//   may dispose an intermediate, or close the scope that made it, before calling backward.
// - A node is reference-counted: by its output tensor while that is alive, and by every node that
//   uses the output as an input. When the count reaches zero (the loss was disposed without a
//   backward, say) the node releases its aliases and its inputs' nodes in turn.
// - backward() releases the saved tensors of every node it ran, so a second backward through the
//   same graph is an error that says so.
// - Everything backward makes runs in a detached scope; only the leaf gradients survive it.
//
// tk.noGrad(fn) turns recording off for fn (synchronous or async: the flag travels with
// AsyncLocalStorage). tk.checkpoint(fn, ...inputs) keeps only fn's inputs and recomputes fn during
// backward (activation checkpointing).
import { AsyncLocalStorage } from 'node:async_hooks';

import { native } from './native.js';
import { detached } from './scope.js';
import { restoreSeedState, seedState, Tensor } from './tensor.js';

const gradMode = new AsyncLocalStorage<boolean>();

/** Whether ops record the tape here (false inside tk.noGrad). */
export function isGradEnabled(): boolean {
  return gradMode.getStore() ?? true;
}

/** Runs fn with gradient recording off (the result of a forward pass used for evaluation or generation). */
export function noGrad<T>(fn: () => T): T {
  if (typeof fn !== 'function') throw new TypeError('noGrad: expected a function');
  return gradMode.run(false, fn);
}

function enableGrad<T>(fn: () => T): T {
  return gradMode.run(true, fn);
}

/** The backward rule of one op: gradients for its inputs (null where an input needs none). */
export type BackwardRule = (grad: Tensor, saved: Tensor[], needs: boolean[]) => (Tensor | null | undefined)[];

/**
 * Where an input's gradient goes: the node that made it, or the leaf itself. Fixed when the op
 * is recorded, so disposing an intermediate tensor later does not cut the graph.
 */
export type Edge = { node: GradNode; leaf?: undefined } | { leaf: Tensor; node?: undefined } | null;

export class GradNode {
  refs = 1;
  /** One per input of the op: null where the input needs no gradient. */
  readonly edges: Edge[];
  #saved: Tensor[] | null;
  #released = false;

  constructor(
    readonly name: string,
    inputs: (Tensor | null)[],
    saved: Tensor[],
    readonly rule: BackwardRule,
  ) {
    this.#saved = saved;
    this.edges = inputs.map((x) => (!x?.requiresGrad ? null : x.gradFn ? { node: x.gradFn } : { leaf: x }));
    for (const e of this.edges) if (e?.node) e.node.refs++;
  }

  /** @internal The saved aliases; throws after the graph was freed. */
  saved(): Tensor[] {
    if (this.#saved === null)
      throw new Error(`backward: ${this.name}'s saved tensors were freed by an earlier backward() through this graph; run the forward pass again (each backward consumes its graph)`);
    return this.#saved;
  }

  /** Frees the saved tensors (after backward ran this node). */
  freeSaved(): void {
    if (this.#saved) for (const t of this.#saved) t.dispose();
    this.#saved = null;
  }

  /** Drops one reference; the last one frees this node and releases its inputs' nodes. */
  release(): void {
    if (--this.refs > 0 || this.#released) return;
    this.#released = true;
    this.freeSaved();
    for (const e of this.edges) e?.node?.release();
  }
}

/** True when recording is on and some input requires a gradient. */
export function needsGrad(...inputs: (Tensor | null | undefined)[]): boolean {
  if (!isGradEnabled()) return false;
  for (const x of inputs) if (x?.requiresGrad) return true;
  return false;
}

/**
 * @internal Records `out = op(inputs)` on the tape when needed. `save` lists the tensors the rule
 * reads; they are aliased (kept alive whatever happens to the originals). Returns out.
 */
export function record(out: Tensor, name: string, inputs: (Tensor | null | undefined)[], save: Tensor[], rule: BackwardRule): Tensor {
  if (!needsGrad(...inputs)) return out;
  const saved = save.map(alias);
  out.attachGradFn(new GradNode(name, inputs.map((x) => x ?? null), saved, rule));
  return out;
}

/** A new handle on t's storage that no scope owns. */
function alias(t: Tensor): Tensor {
  return detached((s) => s.keep(Tensor.fromNative(native().reshape(t.handle('autograd'), [...t.shape]))));
}

/**
 * Gradients of `root` with respect to every leaf that requires them, accumulated into `leaf.grad`.
 * grad defaults to 1 for a single-element root.
 */
export function backward(root: Tensor, grad?: Tensor): void {
  if (!root.requiresGrad)
    throw new Error(`backward: this tensor ${root.toString()} does not require a gradient (no input of the ops that made it has requiresGrad, or it was made under tk.noGrad)`);
  if (grad !== undefined) {
    if (!(grad instanceof Tensor)) throw new TypeError('backward: grad must be a Tensor');
    if (grad.shape.join() !== root.shape.join() || grad.dtype !== root.dtype)
      throw new RangeError(`backward: grad ${grad.toString()} must match the tensor ${root.toString()}`);
  } else if (root.size !== 1) {
    throw new RangeError(`backward: the tensor ${root.toString()} has ${root.size} elements; pass its gradient explicitly (t.backward(grad)) or reduce it to a scalar loss first`);
  }
  runBackward([root], [grad], { freeGraph: true });
}

interface RunOptions {
  freeGraph: boolean;
  /** Non-leaf tensors whose gradients the caller wants back (checkpoint's recomputed inputs). */
  capture?: Tensor[];
}

/** The walk behind backward() and checkpoint's recomputation. Returns the captured gradients. */
function runBackward(roots: Tensor[], grads: (Tensor | undefined)[], options: RunOptions): (Tensor | null)[] {
  return detached((scope) => {
    // Reverse topological order of the nodes reachable from the roots.
    const order: GradNode[] = [];
    const seen = new Set<GradNode>();
    const stack: [GradNode, boolean][] = [];
    for (const r of roots) if (r.gradFn) stack.push([r.gradFn, false]);
    while (stack.length) {
      const [node, done] = stack.pop()!;
      if (done) {
        order.push(node);
        continue;
      }
      if (seen.has(node)) continue;
      seen.add(node);
      stack.push([node, true]);
      for (const e of node.edges) if (e?.node && !seen.has(e.node)) stack.push([e.node, false]);
    }
    order.reverse();

    const pending = new Map<GradNode, Tensor>();
    const captured = new Map<Tensor, Tensor>();
    const capture = new Set(options.capture ?? []);
    const accumulate = (edge: Exclude<Edge, null>, g: Tensor) => {
      if (edge.node) {
        const prev = pending.get(edge.node);
        pending.set(edge.node, prev ? addGrads(prev, g) : g);
        return;
      }
      const t = edge.leaf;
      if (capture.has(t)) {
        const prev = captured.get(t);
        captured.set(t, prev ? addGrads(prev, g) : g);
      } else if (!t.disposed) {
        t.accumulateGrad(scope.keep(g.dtype === t.dtype ? g : g.to(t.dtype)));
      } else {
        g.dispose();  // a parameter disposed since the forward pass: nothing to hold its gradient
      }
    };
    // A caller's gradient is copied: the walk hands its tensors on and disposes them.
    roots.forEach((r, i) => {
      const g = grads[i];
      accumulate(r.gradFn ? { node: r.gradFn } : { leaf: r }, g ? copy(g) : fullLike(r, 1));
    });

    for (const node of order) {
      const g = pending.get(node);
      pending.delete(node);
      if (g === undefined) continue;  // no gradient flows to this node from the roots
      const needs = node.edges.map((e) => e !== null);
      const inputGrads = enableGradOff(() => node.rule(g, node.saved(), needs));
      if (options.freeGraph) node.freeSaved();
      // Every gradient tensor has one owner: a rule may pass g itself on (add), but a tensor
      // handed to two inputs is copied, since leaf gradients are later scaled in place (clipping).
      const used = new Set<Tensor>();
      const routed = node.edges.map((edge, i) => {
        let gi = inputGrads[i];
        if (!edge || !gi) return null;
        if (used.has(gi)) gi = copy(gi);
        used.add(gi);
        return gi;
      });
      node.edges.forEach((edge, i) => {
        if (edge && routed[i]) accumulate(edge, routed[i]);
      });
      if (!used.has(g)) g.dispose();
    }
    const out = (options.capture ?? []).map((t) => captured.get(t) ?? null);
    for (const t of out) if (t) scope.keep(t);
    return out;
  });
}

// Backward rules run without recording (no higher-order gradients).
function enableGradOff<T>(fn: () => T): T {
  return gradMode.run(false, fn);
}

function addGrads(a: Tensor, b: Tensor): Tensor {
  const sum = Tensor.fromNative(native().binary('add', a.handle('autograd'), b.handle('autograd')));
  a.dispose();
  b.dispose();
  return sum;
}

function copy(t: Tensor): Tensor {
  return Tensor.fromNative(native().cast(t.handle('autograd'), t.dtype));
}

function fullLike(t: Tensor, value: number): Tensor {
  return Tensor.fromNative(native().full([...t.shape], t.dtype, t.device, value));
}

/**
 * Activation checkpointing: returns fn(...inputs) but keeps none of fn's intermediate tensors for
 * backward; backward runs fn again (same random seeds) and backpropagates through the recomputed
 * graph. Parameters fn uses (tensors it closes over) get their gradients as usual. fn must be
 * synchronous and return one tensor.
 */
export function checkpoint(fn: (...inputs: Tensor[]) => Tensor, ...inputs: Tensor[]): Tensor {
  if (typeof fn !== 'function') throw new TypeError('checkpoint: fn must be a function');
  inputs.forEach((x, i) => {
    if (!(x instanceof Tensor)) throw new TypeError(`checkpoint: input ${i} must be a Tensor`);
  });
  if (!isGradEnabled()) return fn(...inputs);
  const seeds = seedState();
  // First pass with recording on, to learn which leaves (parameters) fn reaches. It runs in a
  // detached scope, so its intermediates and graph are released at once: only fn's output
  // outlives this call.
  const { value, leaves } = detached(() => {
    const detachedInputs = inputs.map((x) => leafAlias(x));
    try {
      const out = fn(...detachedInputs);
      if (!(out instanceof Tensor)) throw new TypeError('checkpoint: fn must return a Tensor');
      return { value: alias(out), leaves: reachableLeaves(out).filter((t) => !detachedInputs.includes(t)) };
    } finally {
      for (const t of detachedInputs) t.dispose();
    }
  });
  const result = Tensor.fromNative(native().reshape(value.handle('checkpoint'), [...value.shape]));
  value.dispose();
  if (!needsGrad(...inputs, ...leaves)) return result;
  return record(result, 'checkpoint', [...inputs, ...leaves], inputs, (grad, saved, needs) => {
    const after = seedState();
    restoreSeedState(seeds);
    try {
      return enableGrad(() =>
        detached(() => {
          const again = saved.map((x, i) => leafAlias(x, needs[i]));
          try {
            const y = fn(...again);
            const wanted = again.filter((x) => x.requiresGrad);
            const inputGrads = y.requiresGrad ? runBackward([y], [grad], { freeGraph: true, capture: wanted }) : wanted.map(() => null);
            y.dispose();
            let k = 0;
            // The leaves' gradients were accumulated by the inner walk; the outer one gets nulls for them.
            return again.map((x) => (x.requiresGrad ? inputGrads[k++] : null));
          } finally {
            for (const x of again) x.dispose();
          }
        }),
      );
    } finally {
      restoreSeedState(after);
    }
  });
}

/** A leaf on x's storage: requiresGrad as x (or as given), no history. */
function leafAlias(x: Tensor, requiresGrad = x.requiresGrad): Tensor {
  const t = alias(x);
  if (requiresGrad) t.requiresGrad = true;
  return t;
}

function reachableLeaves(root: Tensor): Tensor[] {
  const leaves = new Set<Tensor>();
  const seen = new Set<GradNode>();
  const stack = root.gradFn ? [root.gradFn] : [];
  while (stack.length) {
    const node = stack.pop()!;
    if (seen.has(node)) continue;
    seen.add(node);
    for (const e of node.edges) {
      if (e?.node) stack.push(e.node);
      else if (e?.leaf) leaves.add(e.leaf);
    }
  }
  return [...leaves];
}
