// Model evaluations that run a model: needle in a haystack (lengths × depths, with heatmaps).
export {
  answerLogLikelihoods,
  evaluateNiah,
  niahHeatmapSvg,
  niahHtmlReport,
  niahTable,
  runNiahCommand,
  writeNiahReport,
} from './niah.js';
export type {
  AnswerLogLikelihoodOptions,
  Generate,
  NiahCaseResult,
  NiahCellResult,
  NiahCommandOptions,
  NiahCommandResult,
  NiahHeatmapOptions,
  NiahMetric,
  NiahOptions,
  NiahReport,
  NiahSummary,
} from './niah.js';
