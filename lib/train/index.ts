export { latestCheckpoint, loadCheckpoint, saveCheckpoint, type TrainerState } from './checkpoint.js';
export { lrAt, type Schedule, type ScheduleKind } from './schedule.js';
export { train, TrainError, type Batch, type BatchSource, type ProgressEvent, type TrainerOptions, type TrainResult } from './trainer.js';
export { parseRecipe, readRecipe, recipeSchema, RecipeError, type Recipe, type RecipeInput, type StageConfig } from './recipe.js';
export { runRecipe, type RunRecipeOptions, type StageOutcome } from './stages.js';
export { dpoLossFn, preferenceAccuracy, readPreferences, referenceLogprobs, samplePreferencePairs, tokenizePair, PreferenceSource, type Judge, type PreferenceBatch, type PreferenceRecord, type TokenizedPair } from './dpo.js';
export { distillLossFn, type DistillStageOptions } from './distill.js';
export { lmLoss, type LossFn, type MicroLoss } from './trainer.js';
