// Dependency-free HTML reports for training runs: SVG charts and a self-contained page.
export { barChartSvg, heatmapSvg, lineChartSvg } from './charts.js';
export type { BarChartOptions, BarSeries, HeatmapOptions, LineChartOptions, LineSeries } from './charts.js';
export { escapeXml, formatNumber } from './escape.js';
export { renderReport, writeReport } from './report.js';
export type { Report, ReportSection, ReportTable } from './report.js';
export { PALETTE, formatTick, heatColor, logTicks, niceStep, niceTicks, sequentialColor, seriesStyle, textColorOn } from './scale.js';
export type { Ticks } from './scale.js';
