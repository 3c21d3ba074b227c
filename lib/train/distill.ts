// Knowledge distillation as a training loss: alpha * CE(student, targets) + (1 - alpha) *
// distill(kind, temperature) against a teacher, through the fused, chunked linear distillation
// loss (neither model's [N, V] logits ever exist at once). The teacher's hidden states come from a
// forward pass without gradients, per batch.
import { noGrad } from '../autograd.js';
import type { CausalLM } from '../models/llama.js';
import { scale } from '../ops/elementwise.js';
import { linearDistillLoss } from '../ops/loss.js';
import { tensor } from '../tensor.js';
import { batchHidden, TrainError, type Batch, type LossFn } from './trainer.js';

export interface DistillStageOptions {
  /** Weight of the cross entropy on the data's targets. Default 0.5. */
  alpha?: number;
  kind?: 'forward_kl' | 'reverse_kl' | 'jsd';
  temperature?: number;
  /** JSD's mixture weight. */
  beta?: number;
}

/** Checks that a teacher can teach a student token by token. */
export function checkTeacher(student: CausalLM, teacher: CausalLM): void {
  if (student.config.vocabSize !== teacher.config.vocabSize)
    throw new TrainError(`distill: the teacher's vocabulary (${teacher.config.vocabSize} tokens) differs from the student's (${student.config.vocabSize}); token-level distillation needs the same tokenizer`);
}

export function distillLossFn(teacher: CausalLM, options: DistillStageOptions = {}): LossFn<Batch> {
  const { alpha = 0.5, kind = 'forward_kl', temperature = 1, beta = 0.5 } = options;
  return (model, b, { checkpointLayers }) => {
    const { targets, h } = batchHidden(model, b, checkpointLayers);
    const shape = [b.batchSize, b.seqLen];
    const { device } = teacher;
    const th = noGrad(() =>
      teacher.hidden(tensor(b.ids, shape, { device }), {
        positions: b.positions ? tensor(b.positions, shape, { device }) : undefined,
        segmentIds: b.segmentIds ? tensor(b.segmentIds, shape, { device }) : undefined,
      }),
    );
    // The loss is a mean over the counted tokens; the trainer wants their sum.
    const mean = linearDistillLoss(h, model.lmHeadWeight, th, teacher.lmHeadWeight, { targets, alpha, kind, temperature, beta });
    return { loss: scale(mean, b.tokens), units: b.tokens };
  };
}
