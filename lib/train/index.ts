export { latestCheckpoint, loadCheckpoint, saveCheckpoint, type TrainerState } from './checkpoint.js';
export { lrAt, type Schedule, type ScheduleKind } from './schedule.js';
export { train, TrainError, type Batch, type BatchSource, type ProgressEvent, type TrainerOptions, type TrainResult } from './trainer.js';
export { parseRecipe, readRecipe, recipeSchema, RecipeError, type Recipe, type RecipeInput, type StageConfig } from './recipe.js';
export { runRecipe, type RunRecipeOptions, type StageOutcome } from './stages.js';
