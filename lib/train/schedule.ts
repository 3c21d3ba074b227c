// Learning-rate schedules: linear warmup from 0, then cosine or linear decay to minLrRatio * lr,
// or constant. Step counts from 0 (the first optimizer step uses lrAt(0)).

export type ScheduleKind = 'cosine' | 'linear' | 'constant';

export interface Schedule {
  lr: number;
  kind?: ScheduleKind;
  warmupSteps?: number;
  totalSteps: number;
  /** The floor of the decay as a fraction of lr. Default 0.1 for cosine and linear. */
  minLrRatio?: number;
}

export function lrAt(s: Schedule, step: number): number {
  const { lr, kind = 'cosine', warmupSteps = 0, totalSteps } = s;
  const floor = lr * (s.minLrRatio ?? 0.1);
  if (step < warmupSteps) return (lr * (step + 1)) / warmupSteps;
  if (kind === 'constant') return lr;
  const span = Math.max(1, totalSteps - warmupSteps);
  const progress = Math.min(1, (step - warmupSteps) / span);
  if (kind === 'linear') return lr - (lr - floor) * progress;
  return floor + 0.5 * (lr - floor) * (1 + Math.cos(Math.PI * progress));
}
