import { needsGrad, record } from '../autograd.js';
import { native, type NativeTensor } from '../native.js';
import { checkTensor, Tensor } from '../tensor.js';

function checkIgnoreIndex(op: string, i: unknown): number {
  if (typeof i !== 'number' || !Number.isInteger(i) || i < -(2 ** 31) || i >= 2 ** 31) throw new TypeError(`${op}: ignoreIndex must be an int32, got ${String(i)}`);
  return i;
}

export interface CrossEntropyOptions {
  /** Targets equal to this are skipped. Default -100. */
  ignoreIndex?: number;
  /** 'mean' over non-ignored targets (0 when there are none), 'sum', or 'none' (per target). Default 'mean'. */
  reduction?: 'mean' | 'sum' | 'none';
}

/**
 * Cross entropy of logits [..., V] (f32 or bf16, computed in fp32 with an online logsumexp)
 * against i32 targets [...]: a scalar [] for mean and sum, [...] for none. Differentiable in logits.
 */
export function crossEntropy(logits: Tensor, targets: Tensor, options: CrossEntropyOptions = {}): Tensor {
  const hl = checkTensor(logits, 'crossEntropy', 'logits');
  const ht = checkTensor(targets, 'crossEntropy', 'targets');
  const reduction = options.reduction ?? 'mean';
  if (!['mean', 'sum', 'none'].includes(reduction)) throw new TypeError(`crossEntropy: reduction must be 'mean', 'sum' or 'none', got ${String(reduction)}`);
  const ignoreIndex = checkIgnoreIndex('crossEntropy', options.ignoreIndex ?? -100);
  if (!needsGrad(logits)) return Tensor.fromNative(native().crossEntropy(hl, ht, ignoreIndex, reduction));
  const r = native().crossEntropyTrain(hl, ht, ignoreIndex, reduction);
  const lse = Tensor.fromNative(r.lse);
  try {
    return record(Tensor.fromNative(r.loss), 'crossEntropy', [logits], [logits, targets, lse], (g, [sl, st, ss]) => [
      Tensor.fromNative(native().crossEntropyBackward(g.handle(), sl!.handle(), st!.handle(), ss!.handle(), ignoreIndex, reduction)),
    ]);
  } finally {
    lse.dispose();
  }
}

/** [B] sums of log p(target) over non-ignored positions, for logits [B, T, V] and targets [B, T]. Differentiable in logits. */
export function sequenceLogprobs(logits: Tensor, targets: Tensor, options: { ignoreIndex?: number } = {}): Tensor {
  const hl = checkTensor(logits, 'sequenceLogprobs', 'logits');
  const ht = checkTensor(targets, 'sequenceLogprobs', 'targets');
  const ignoreIndex = checkIgnoreIndex('sequenceLogprobs', options.ignoreIndex ?? -100);
  if (!needsGrad(logits)) return Tensor.fromNative(native().sequenceLogprobs(hl, ht, ignoreIndex));
  const r = native().sequenceLogprobsTrain(hl, ht, ignoreIndex);
  const lse = Tensor.fromNative(r.lse);
  try {
    return record(Tensor.fromNative(r.out), 'sequenceLogprobs', [logits], [logits, targets, lse], (g, [sl, st, ss]) => [
      Tensor.fromNative(native().sequenceLogprobsBackward(g.handle(), sl!.handle(), st!.handle(), ss!.handle(), ignoreIndex)),
    ]);
  } finally {
    lse.dispose();
  }
}

export interface DpoOptions {
  /** Strength of the KL constraint to the reference. Default 0.1. */
  beta?: number;
  /** TRL's loss types: 'sigmoid' (DPO), 'ipo', 'hinge'. Default 'sigmoid'. */
  kind?: 'sigmoid' | 'ipo' | 'hinge';
  /** Conservative DPO's label smoothing in [0, 0.5] (sigmoid only). Default 0. */
  labelSmoothing?: number;
}

export interface DpoResult {
  /** Mean over pairs, shape []. */
  loss: Tensor;
  /** beta * (policyChosen - refChosen), [B]. */
  chosenRewards: Tensor;
  /** beta * (policyRejected - refRejected), [B]. */
  rejectedRewards: Tensor;
}

/**
 * The DPO loss from f32 [B] sequence log-probs of the policy and the reference. The loss is
 * differentiable in the policy's log-probs; the rewards are reported values (no gradient), as in TRL.
 */
export function dpoLoss(policyChosen: Tensor, policyRejected: Tensor, refChosen: Tensor, refRejected: Tensor, options: DpoOptions = {}): DpoResult {
  const op = 'dpoLoss';
  const h = [checkTensor(policyChosen, op, 'policyChosen'), checkTensor(policyRejected, op, 'policyRejected'), checkTensor(refChosen, op, 'refChosen'), checkTensor(refRejected, op, 'refRejected')] as const;
  const beta = options.beta ?? 0.1;
  const kind = options.kind ?? 'sigmoid';
  const ls = options.labelSmoothing ?? 0;
  if (typeof beta !== 'number' || !(beta > 0) || !Number.isFinite(beta)) throw new RangeError(`${op}: beta must be a finite number > 0, got ${String(beta)}`);
  if (!['sigmoid', 'ipo', 'hinge'].includes(kind)) throw new TypeError(`${op}: kind must be 'sigmoid', 'ipo' or 'hinge', got ${String(kind)}`);
  if (typeof ls !== 'number' || !(ls >= 0 && ls <= 0.5)) throw new RangeError(`${op}: labelSmoothing must be in [0, 0.5], got ${String(ls)}`);
  const r = native().dpoLoss(h[0], h[1], h[2], h[3], beta, kind, ls);
  const loss = record(Tensor.fromNative(r.loss), 'dpoLoss', [policyChosen, policyRejected], [policyChosen, policyRejected, refChosen, refRejected], (g, [pc, pr, rc, rr]) => {
    const d = native().dpoLossBackward(g.handle(), pc!.handle(), pr!.handle(), rc!.handle(), rr!.handle(), beta, kind, ls);
    return [Tensor.fromNative(d.dChosen), Tensor.fromNative(d.dRejected)];
  });
  return { loss, chosenRewards: Tensor.fromNative(r.chosenRewards), rejectedRewards: Tensor.fromNative(r.rejectedRewards) };
}

export interface DistillOptions {
  /** 'forward_kl' = KL(teacher || student), 'reverse_kl' = KL(student || teacher), or 'jsd' (generalized, with beta). Default 'forward_kl'. */
  kind?: 'forward_kl' | 'reverse_kl' | 'jsd';
  /** JSD's mixture weight in [0, 1]: m = beta * p_teacher + (1 - beta) * p_student. Default 0.5. */
  beta?: number;
  /** Both logits are divided by it; the loss is scaled by its square. Default 1. */
  temperature?: number;
  /** Optional i32 targets [...]: rows whose target is ignoreIndex do not count. */
  targets?: Tensor;
  ignoreIndex?: number;
}

/**
 * Knowledge-distillation loss of student logits against teacher logits [..., V] (same
 * vocabulary), averaged over the rows that count, shape []. Differentiable in the student's
 * logits (the teacher is a constant).
 */
export function distillLoss(student: Tensor, teacher: Tensor, options: DistillOptions = {}): Tensor {
  const op = 'distillLoss';
  const hs = checkTensor(student, op, 'student');
  const ht = checkTensor(teacher, op, 'teacher');
  const kind = options.kind ?? 'forward_kl';
  if (!['forward_kl', 'reverse_kl', 'jsd'].includes(kind)) throw new TypeError(`${op}: kind must be 'forward_kl', 'reverse_kl' or 'jsd', got ${String(kind)}`);
  const beta = options.beta ?? 0.5;
  const temperature = options.temperature ?? 1;
  if (typeof beta !== 'number' || !(beta >= 0 && beta <= 1)) throw new RangeError(`${op}: beta must be in [0, 1], got ${String(beta)}`);
  if (typeof temperature !== 'number' || !Number.isFinite(temperature) || !(temperature > 0)) throw new RangeError(`${op}: temperature must be a finite number > 0, got ${String(temperature)}`);
  const targets = options.targets === undefined ? null : checkTensor(options.targets, op, 'targets');
  const ignoreIndex = checkIgnoreIndex(op, options.ignoreIndex ?? -100);
  const out = Tensor.fromNative(native().distillLoss(hs, ht, targets, kind, beta, temperature, ignoreIndex));
  const save = [student, teacher, ...(options.targets ? [options.targets] : [])];
  return record(out, 'distillLoss', [student], save, (g, [ss, st, sy]) => [
    Tensor.fromNative(native().distillLossBackward(g.handle(), ss!.handle(), st!.handle(), sy ? sy.handle() : null, kind, beta, temperature, ignoreIndex)),
  ]);
}

export interface LinearCrossEntropyOptions {
  /** Targets equal to this are skipped. Default -100. */
  ignoreIndex?: number;
  /** 'mean' over non-ignored targets (0 when there are none) or 'sum'. Default 'mean'. */
  reduction?: 'mean' | 'sum';
}

/**
 * The saved gradients (for an upstream gradient of 1) times the actual upstream scalar, in place:
 * the saved tensor belongs to this graph node alone, and a copy would double the [V, D] memory.
 */
function scaleSaved(saved: Tensor | undefined, g: Tensor): Tensor | null {
  if (!saved) return null;
  return Tensor.fromNative(native().scaleByInplace(saved.handle(), g.dtype === 'f32' ? g.handle() : g.to('f32').handle()));
}

/**
 * Cross entropy of the logits hidden [..., D] x weight [V, D]^T against i32 targets [...], fused
 * and chunked over rows (Liger-Kernel's FusedLinearCrossEntropy): the [N, V] logits never exist at
 * once. When gradients are needed they are computed in the same pass and kept for backward.
 * Differentiable in hidden and weight.
 */
export function linearCrossEntropy(hidden: Tensor, weight: Tensor, targets: Tensor, options: LinearCrossEntropyOptions = {}): Tensor {
  const op = 'linearCrossEntropy';
  const hh = checkTensor(hidden, op, 'hidden');
  const hw = checkTensor(weight, op, 'weight');
  const ht = checkTensor(targets, op, 'targets');
  const reduction = options.reduction ?? 'mean';
  if (reduction !== 'mean' && reduction !== 'sum') throw new TypeError(`${op}: reduction must be 'mean' or 'sum', got ${String(reduction)}`);
  const ignoreIndex = checkIgnoreIndex(op, options.ignoreIndex ?? -100);
  const r = native().linearCrossEntropy(hh, hw, ht, ignoreIndex, reduction, needsGrad(hidden), needsGrad(weight));
  return withSavedGrads(op, Tensor.fromNative(r.loss), [hidden, weight], r);
}

function withSavedGrads(op: string, loss: Tensor, inputs: [Tensor, Tensor], r: { dhidden?: NativeTensor; dweight?: NativeTensor }): Tensor {
  if (!r.dhidden && !r.dweight) return loss;
  const dh = r.dhidden ? Tensor.fromNative(r.dhidden) : null;
  const dw = r.dweight ? Tensor.fromNative(r.dweight) : null;
  try {
    // Record only the inputs whose gradient was computed (the others need none).
    return record(loss, op, [dh ? inputs[0] : null, dw ? inputs[1] : null], [dh, dw].filter((t): t is Tensor => t !== null), (g, saved) => {
      let k = 0;
      const gh = dh ? scaleSaved(saved[k++], g) : null;
      const gw = dw ? scaleSaved(saved[k++], g) : null;
      return [gh, gw];
    });
  } finally {
    dh?.dispose();
    dw?.dispose();
  }
}

export interface LinearDistillOptions extends DistillOptions {
  /** Weight of the cross entropy on targets: loss = alpha CE + (1 - alpha) distill. Default 0. */
  alpha?: number;
}

/**
 * Distillation with the language-model heads fused in and chunked over rows: the student's logits
 * studentHidden [..., Ds] x studentWeight [V, Ds]^T against the teacher's teacherHidden [..., Dt] x
 * teacherWeight [V, Dt]^T, without either [N, V] logits at once; optionally mixed with cross
 * entropy (alpha). Differentiable in the student's hidden states and weight (the teacher is a constant).
 */
export function linearDistillLoss(studentHidden: Tensor, studentWeight: Tensor, teacherHidden: Tensor, teacherWeight: Tensor, options: LinearDistillOptions = {}): Tensor {
  const op = 'linearDistillLoss';
  const h = [checkTensor(studentHidden, op, 'studentHidden'), checkTensor(studentWeight, op, 'studentWeight'), checkTensor(teacherHidden, op, 'teacherHidden'), checkTensor(teacherWeight, op, 'teacherWeight')] as const;
  const kind = options.kind ?? 'forward_kl';
  if (!['forward_kl', 'reverse_kl', 'jsd'].includes(kind)) throw new TypeError(`${op}: kind must be 'forward_kl', 'reverse_kl' or 'jsd', got ${String(kind)}`);
  const beta = options.beta ?? 0.5;
  const temperature = options.temperature ?? 1;
  const alpha = options.alpha ?? 0;
  if (typeof beta !== 'number' || !(beta >= 0 && beta <= 1)) throw new RangeError(`${op}: beta must be in [0, 1], got ${String(beta)}`);
  if (typeof temperature !== 'number' || !Number.isFinite(temperature) || !(temperature > 0)) throw new RangeError(`${op}: temperature must be a finite number > 0, got ${String(temperature)}`);
  if (typeof alpha !== 'number' || !(alpha >= 0 && alpha <= 1)) throw new RangeError(`${op}: alpha must be in [0, 1], got ${String(alpha)}`);
  const targets = options.targets === undefined ? null : checkTensor(options.targets, op, 'targets');
  if (alpha > 0 && !targets) throw new TypeError(`${op}: alpha > 0 mixes in cross entropy, which needs targets`);
  const ignoreIndex = checkIgnoreIndex(op, options.ignoreIndex ?? -100);
  const r = native().linearDistillLoss(h[0], h[1], h[2], h[3], targets, kind, beta, temperature, ignoreIndex, alpha, needsGrad(studentHidden), needsGrad(studentWeight));
  return withSavedGrads(op, Tensor.fromNative(r.loss), [studentHidden, studentWeight], r);
}
