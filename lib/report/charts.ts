// SVG charts for training reports: line charts (loss curves), grouped bar charts (before/after
// comparisons) and heatmaps (needle-in-a-haystack recall). Each returns a standalone <svg> string
// that is valid XML, so it can be saved as an .svg file or inlined into the HTML report.
//
// Charts carry no ids (no gradients, clip paths or markers by reference): several charts inlined
// into one page would otherwise collide on ids and borrow each other's definitions.

import { coord, escapeXml, formatNumber } from './escape.js';
import { heatColor, logTicks, niceTicks, seriesStyle, sequentialColor, textColorOn, type Ticks } from './scale.js';

export interface LineSeries {
  name: string;
  /** [x, y] pairs, drawn in the order given. A point with a non-finite coordinate breaks the line. */
  points: readonly (readonly [number, number])[];
}

export interface LineChartOptions {
  title: string;
  xLabel?: string;
  yLabel?: string;
  series: readonly LineSeries[];
  width?: number;
  height?: number;
  /** Logarithmic y axis; points with y <= 0 cannot be placed and break the line like NaN does. */
  logY?: boolean;
  /** Draw a dot at every point (default: for each series with at most 40 points). */
  markers?: boolean;
}

export interface BarSeries {
  name: string;
  /** One value per group; a non-finite value leaves its bar out. */
  values: readonly number[];
}

export interface BarChartOptions {
  title: string;
  /** Category labels along the x axis, e.g. task names. */
  groups: readonly string[];
  /** One bar per series in every group, e.g. "before" and "after". */
  series: readonly BarSeries[];
  xLabel?: string;
  yLabel?: string;
  width?: number;
  height?: number;
  /** How bar values are printed (default: up to 3 significant digits). */
  format?: (value: number) => string;
  /** Print each bar's value above it (default: when the labels fit the bars). */
  showValues?: boolean;
}

export interface HeatmapOptions {
  title: string;
  /** Column labels, e.g. context lengths. */
  xLabels: readonly (string | number)[];
  /** Row labels, top to bottom, e.g. needle depths. */
  yLabels: readonly (string | number)[];
  /** values[row][column]; a non-finite value is drawn as a blank cell marked n/a. */
  values: readonly (readonly number[])[];
  xLabel?: string;
  yLabel?: string;
  /** Ends of the color scale (default: the smallest and largest finite values). */
  min?: number;
  max?: number;
  /** How cell values and legend values are printed (default: up to 3 significant digits). */
  format?: (value: number) => string;
  width?: number;
  /** Default: 32 pixels per row plus the margins. */
  height?: number;
}

// ---- layout helpers ------------------------------------------------------------------------------

const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif";
const FONT_SIZE = 12;
const TITLE_SIZE = 15;
const AXIS_COLOR = '#444444';
const GRID_COLOR = '#e6e6e6';
const TEXT_COLOR = '#222222';

/**
 * Approximate rendered width of a label. SVG cannot measure text without a renderer; the average
 * advance of proportional sans-serif faces is a little under 0.6 em, which is good enough to lay
 * out margins and decide when labels must rotate.
 */
function textWidth(text: string, size = FONT_SIZE): number {
  return [...text].length * size * 0.58;
}

function checkSize(name: string, value: number | undefined, fallback: number, minimum: number): number {
  if (value === undefined) return fallback;
  if (!Number.isFinite(value) || value < minimum) throw new RangeError(`${name}: expected a finite number >= ${minimum}, got ${value}`);
  return value;
}

function svgOpen(width: number, height: number, title: string): string[] {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${coord(width)}" height="${coord(height)}" viewBox="0 0 ${coord(width)} ${coord(height)}" role="img" aria-label="${escapeXml(title)}" font-family="${escapeXml(FONT)}" font-size="${FONT_SIZE}" fill="${TEXT_COLOR}">`,
    `<title>${escapeXml(title)}</title>`,
    `<rect x="0" y="0" width="${coord(width)}" height="${coord(height)}" fill="#ffffff"/>`,
    `<text x="${coord(width / 2)}" y="22" text-anchor="middle" font-size="${TITLE_SIZE}" font-weight="600">${escapeXml(title)}</text>`,
  ];
}

function text(x: number, y: number, content: string, attrs = ''): string {
  return `<text x="${coord(x)}" y="${coord(y)}"${attrs ? ' ' + attrs : ''}>${escapeXml(content)}</text>`;
}

interface LegendItem {
  name: string;
  color: string;
  dash: string;
  kind: 'line' | 'box';
}

const LEGEND_ROW = 18;

/** Places legend items left to right in rows that fit `width`; returns the rows' item positions. */
function layoutLegend(items: readonly LegendItem[], width: number): { x: number; row: number }[] {
  const out: { x: number; row: number }[] = [];
  let x = 0;
  let row = 0;
  for (const item of items) {
    const w = 24 + textWidth(item.name) + 16;
    if (x > 0 && x + w > width) {
      row++;
      x = 0;
    }
    out.push({ x, row });
    x += w;
  }
  return out;
}

function legendRows(items: readonly LegendItem[], width: number): number {
  if (items.length === 0) return 0;
  const placed = layoutLegend(items, width);
  return placed[placed.length - 1]!.row + 1;
}

function drawLegend(items: readonly LegendItem[], left: number, top: number, width: number): string[] {
  const out: string[] = [];
  layoutLegend(items, width).forEach(({ x, row }, i) => {
    const item = items[i]!;
    const cx = left + x;
    const cy = top + row * LEGEND_ROW + LEGEND_ROW / 2;
    if (item.kind === 'line') {
      const dash = item.dash ? ` stroke-dasharray="${item.dash}"` : '';
      out.push(`<line x1="${coord(cx)}" y1="${coord(cy)}" x2="${coord(cx + 18)}" y2="${coord(cy)}" stroke="${item.color}" stroke-width="2.5"${dash}/>`);
    } else {
      out.push(`<rect x="${coord(cx + 3)}" y="${coord(cy - 6)}" width="12" height="12" fill="${item.color}"/>`);
    }
    out.push(text(cx + 24, cy + 4, item.name));
  });
  return out;
}

/** Picks the densest tick set whose labels fit side by side along `length` pixels. */
function fittingTicks(make: (target: number) => Ticks, length: number): Ticks {
  let target = Math.max(2, Math.round(length / 80));
  let ticks = make(target);
  while (target > 1) {
    const widest = Math.max(...ticks.labels.map((l) => textWidth(l)));
    if ((widest + 10) * ticks.values.length <= length) break;
    target--;
    ticks = make(target);
  }
  return ticks;
}

function axisLabels(out: string[], xLabel: string | undefined, yLabel: string | undefined, plot: Plot, width: number, height: number): void {
  if (xLabel) out.push(text(plot.left + plot.width / 2, height - 10, xLabel, 'text-anchor="middle"'));
  if (yLabel) {
    const cy = plot.top + plot.height / 2;
    out.push(`<text x="0" y="0" text-anchor="middle" transform="translate(16 ${coord(cy)}) rotate(-90)">${escapeXml(yLabel)}</text>`);
  }
}

interface Plot {
  left: number;
  top: number;
  width: number;
  height: number;
}

function plotArea(left: number, top: number, right: number, bottom: number): Plot {
  // Tiny charts still get a drawable area rather than negative sizes (which are invalid SVG).
  return { left, top, width: Math.max(10, right - left), height: Math.max(10, bottom - top) };
}

/** Horizontal grid lines, the y tick labels and the left axis line. */
function yAxis(out: string[], ticks: Ticks, y: (v: number) => number, plot: Plot): void {
  const grid: string[] = [];
  const labels: string[] = [];
  ticks.values.forEach((v, i) => {
    const py = y(v);
    grid.push(`<line x1="${coord(plot.left)}" y1="${coord(py)}" x2="${coord(plot.left + plot.width)}" y2="${coord(py)}"/>`);
    labels.push(text(plot.left - 6, py + 4, ticks.labels[i]!));
  });
  out.push(`<g stroke="${GRID_COLOR}" stroke-width="1">${grid.join('')}</g>`);
  out.push(`<g text-anchor="end">${labels.join('')}</g>`);
  out.push(`<line x1="${coord(plot.left)}" y1="${coord(plot.top)}" x2="${coord(plot.left)}" y2="${coord(plot.top + plot.height)}" stroke="${AXIS_COLOR}"/>`);
}

function yLabelWidth(ticks: Ticks): number {
  return Math.max(0, ...ticks.labels.map((l) => textWidth(l)));
}

// ---- line chart ----------------------------------------------------------------------------------

/** A line chart of one or more series, e.g. training and validation loss against steps. */
export function lineChartSvg(options: LineChartOptions): string {
  const width = checkSize('lineChartSvg width', options.width, 640, 120);
  const height = checkSize('lineChartSvg height', options.height, 360, 100);
  const logY = options.logY === true;
  const series = options.series ?? [];
  const usable = (x: number, y: number) => Number.isFinite(x) && Number.isFinite(y) && (!logY || y > 0);

  let xMin = Infinity, xMax = -Infinity, yMin = Infinity, yMax = -Infinity;
  for (const s of series) {
    for (const [x, y] of s.points) {
      if (!usable(x, y)) continue;
      if (x < xMin) xMin = x;
      if (x > xMax) xMax = x;
      if (y < yMin) yMin = y;
      if (y > yMax) yMax = y;
    }
  }
  const empty = xMin > xMax;

  const legend: LegendItem[] = series.map((s, i) => ({ name: s.name, ...seriesStyle(i), kind: 'line' as const }));
  const legendTop = 34;
  const rows = legendRows(legend, width - 32);
  const top = legendTop + rows * LEGEND_ROW + 10;
  const bottom = height - (options.xLabel ? 40 : 24);

  const plotHeight = Math.max(10, bottom - top);
  const yTarget = Math.max(2, Math.round(plotHeight / 50));
  const yTicks = logY ? logTicks(yMin, yMax, yTarget) : niceTicks(empty ? 0 : yMin, empty ? 1 : yMax, yTarget);
  const left = 12 + (options.yLabel ? 20 : 0) + yLabelWidth(yTicks) + 8;
  const makeX = (t: number) => niceTicks(empty ? 0 : xMin, empty ? 1 : xMax, t);
  // The last x label is centred on the plot's right edge; leave room for its right half.
  const right = width - Math.max(16, textWidth(makeX(5).labels.at(-1)!) / 2 + 6);
  const plot = plotArea(left, top, right, bottom);
  const xTicks = fittingTicks(makeX, plot.width);

  const sx = (x: number) => plot.left + ((x - xTicks.min) / (xTicks.max - xTicks.min)) * plot.width;
  const sy = logY
    ? (y: number) => plot.top + plot.height - ((Math.log10(y) - Math.log10(yTicks.min)) / (Math.log10(yTicks.max) - Math.log10(yTicks.min))) * plot.height
    : (y: number) => plot.top + plot.height - ((y - yTicks.min) / (yTicks.max - yTicks.min)) * plot.height;

  const out = svgOpen(width, height, options.title);
  yAxis(out, yTicks, sy, plot);
  xAxis(out, xTicks, sx, plot);
  axisLabels(out, options.xLabel, options.yLabel, plot, width, height);

  series.forEach((s, i) => {
    const { color, dash } = seriesStyle(i);
    const markers = options.markers ?? s.points.length <= 40;
    const segments: string[][] = [];
    let current: string[] = [];
    const dots: string[] = [];
    for (const [x, y] of s.points) {
      if (!usable(x, y)) {
        if (current.length > 0) segments.push(current);
        current = [];
        continue;
      }
      const p = `${coord(sx(x))} ${coord(sy(y))}`;
      current.push(p);
      if (markers) dots.push(`<circle cx="${coord(sx(x))}" cy="${coord(sy(y))}" r="2.5"/>`);
    }
    if (current.length > 0) segments.push(current);
    const paths: string[] = [];
    for (const seg of segments) {
      if (seg.length === 1 && !markers) {
        // A point isolated between gaps has no line to draw; without a dot it would vanish.
        const [cx, cy] = seg[0]!.split(' ');
        dots.push(`<circle cx="${cx}" cy="${cy}" r="2.5"/>`);
      } else if (seg.length > 1) {
        paths.push(`M${seg[0]}L${seg.slice(1).join(' ')}`);
      }
    }
    const dashAttr = dash ? ` stroke-dasharray="${dash}"` : '';
    out.push(`<g aria-label="${escapeXml(s.name)}">`);
    if (paths.length > 0) out.push(`<path d="${paths.join('')}" fill="none" stroke="${color}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round"${dashAttr}/>`);
    if (dots.length > 0) out.push(`<g fill="${color}">${dots.join('')}</g>`);
    out.push('</g>');
  });

  if (empty) out.push(text(plot.left + plot.width / 2, plot.top + plot.height / 2, 'no data', `text-anchor="middle" fill="#888888"`));
  out.push(...drawLegend(legend, 16, legendTop, width - 32));
  out.push('</svg>');
  return out.join('\n');
}

/** Vertical grid lines, x tick labels and the bottom axis line. */
function xAxis(out: string[], ticks: Ticks, x: (v: number) => number, plot: Plot): void {
  const grid: string[] = [];
  const labels: string[] = [];
  const base = plot.top + plot.height;
  ticks.values.forEach((v, i) => {
    const px = x(v);
    grid.push(`<line x1="${coord(px)}" y1="${coord(plot.top)}" x2="${coord(px)}" y2="${coord(base)}"/>`);
    labels.push(text(px, base + 16, ticks.labels[i]!));
  });
  out.push(`<g stroke="${GRID_COLOR}" stroke-width="1">${grid.join('')}</g>`);
  out.push(`<g text-anchor="middle">${labels.join('')}</g>`);
  out.push(`<line x1="${coord(plot.left)}" y1="${coord(base)}" x2="${coord(plot.left + plot.width)}" y2="${coord(base)}" stroke="${AXIS_COLOR}"/>`);
}

// ---- bar chart -----------------------------------------------------------------------------------

/** Grouped bars: one group per category, one bar per series, e.g. accuracy before and after SFT. */
export function barChartSvg(options: BarChartOptions): string {
  const width = checkSize('barChartSvg width', options.width, 640, 120);
  const height = checkSize('barChartSvg height', options.height, 360, 100);
  const groups = options.groups ?? [];
  const series = options.series ?? [];
  series.forEach((s) => {
    if (s.values.length !== groups.length) {
      throw new RangeError(`barChartSvg: series '${s.name}' has ${s.values.length} values for ${groups.length} groups`);
    }
  });
  const format = options.format ?? ((v: number) => formatNumber(v, 3));

  let lo = 0, hi = 0, any = false;
  for (const s of series) {
    for (const v of s.values) {
      if (!Number.isFinite(v)) continue;
      any = true;
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  if (!any || (lo === 0 && hi === 0)) hi = 1;

  const legend: LegendItem[] = series.map((s, i) => ({ name: s.name, color: seriesStyle(i).color, dash: '', kind: 'box' as const }));
  const legendTop = 34;
  const rows = legendRows(legend, width - 32);
  const top = legendTop + rows * LEGEND_ROW + 14;

  // The x labels' height depends on whether they must rotate, which depends on the band width,
  // which depends on the left margin: settle the y axis (with a provisional height) first.
  const provisional = niceTicks(lo, hi, 5);
  const left = 12 + (options.yLabel ? 20 : 0) + yLabelWidth(provisional) + 8;
  const right = width - 16;
  const band = Math.max(1, right - left) / Math.max(1, groups.length);
  const widestGroup = Math.max(0, ...groups.map((g) => textWidth(String(g))));
  const rotate = widestGroup > band - 6;
  const labelHeight = rotate ? Math.min(widestGroup, height / 3) * 0.71 + 14 : 20;
  const bottom = height - labelHeight - (options.xLabel ? 24 : 6);
  const plot = plotArea(left, top, right, bottom);
  const yTicks = niceTicks(lo, hi, Math.max(2, Math.round(plot.height / 50)));
  const sy = (v: number) => plot.top + plot.height - ((v - yTicks.min) / (yTicks.max - yTicks.min)) * plot.height;

  const out = svgOpen(width, height, options.title);
  yAxis(out, yTicks, sy, plot);
  axisLabels(out, options.xLabel, options.yLabel, plot, width, height);

  const inner = band * 0.8;
  const barWidth = series.length > 0 ? inner / series.length : 0;
  const valueLabels = series.flatMap((s) => s.values.filter(Number.isFinite).map(format));
  const showValues = options.showValues ?? (valueLabels.length > 0 && Math.max(...valueLabels.map((l) => textWidth(l, 10))) <= barWidth + 2);
  const zero = sy(Math.min(Math.max(0, yTicks.min), yTicks.max));

  const bars: string[] = [];
  const values: string[] = [];
  groups.forEach((_, g) => {
    series.forEach((s, i) => {
      const v = s.values[g]!;
      if (!Number.isFinite(v)) return;
      const x = plot.left + g * band + (band - inner) / 2 + i * barWidth;
      const y = sy(v);
      const y0 = Math.min(y, zero);
      const h = Math.abs(zero - y);
      bars.push(`<rect x="${coord(x + 0.5)}" y="${coord(y0)}" width="${coord(Math.max(0.5, barWidth - 1))}" height="${coord(h)}" fill="${seriesStyle(i).color}"><title>${escapeXml(`${s.name} · ${groups[g]}: ${format(v)}`)}</title></rect>`);
      if (showValues) values.push(text(x + barWidth / 2, v >= 0 ? y - 4 : y + 12, format(v)));
    });
  });
  out.push(`<g>${bars.join('')}</g>`);
  if (values.length > 0) out.push(`<g text-anchor="middle" font-size="10">${values.join('')}</g>`);
  out.push(`<line x1="${coord(plot.left)}" y1="${coord(zero)}" x2="${coord(plot.left + plot.width)}" y2="${coord(zero)}" stroke="${AXIS_COLOR}"/>`);

  const base = plot.top + plot.height;
  const labels = groups.map((gname, g) => {
    const cx = plot.left + (g + 0.5) * band;
    return rotate
      ? `<text x="0" y="0" text-anchor="end" transform="translate(${coord(cx + 4)} ${coord(base + 12)}) rotate(-45)">${escapeXml(gname)}</text>`
      : text(cx, base + 16, String(gname), 'text-anchor="middle"');
  });
  out.push(`<g>${labels.join('')}</g>`);
  if (!any) out.push(text(plot.left + plot.width / 2, plot.top + plot.height / 2, 'no data', `text-anchor="middle" fill="#888888"`));
  out.push(...drawLegend(legend, 16, legendTop, width - 32));
  out.push('</svg>');
  return out.join('\n');
}

// ---- heatmap -------------------------------------------------------------------------------------

const LEGEND_STEPS = 32;

/** A grid of colored cells with their values printed, e.g. needle recall by depth and context length. */
export function heatmapSvg(options: HeatmapOptions): string {
  const xLabels = options.xLabels.map(String);
  const yLabels = options.yLabels.map(String);
  const { values } = options;
  if (values.length !== yLabels.length) {
    throw new RangeError(`heatmapSvg: ${values.length} rows of values for ${yLabels.length} y labels`);
  }
  values.forEach((row, r) => {
    if (row.length !== xLabels.length) throw new RangeError(`heatmapSvg: row ${r} has ${row.length} values for ${xLabels.length} x labels`);
  });
  const format = options.format ?? ((v: number) => formatNumber(v, 3));

  let lo = Infinity, hi = -Infinity;
  for (const row of values) for (const v of row) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (lo > hi) { lo = 0; hi = 1; }
  // With only one end given, the other comes from the data but never crosses it.
  const min = options.min ?? Math.min(lo, options.max ?? lo);
  const max = options.max ?? Math.max(hi, min);
  if (!Number.isFinite(min) || !Number.isFinite(max) || min > max) throw new RangeError(`heatmapSvg: invalid color range [${min}, ${max}]`);

  const width = checkSize('heatmapSvg width', options.width, 640, 120);
  const legendLabels = [format(max), format((min + max) / 2), format(min)];
  const legendWidth = 14 + 6 + Math.max(...legendLabels.map((l) => textWidth(l))) + 12;
  const left = 12 + (options.yLabel ? 20 : 0) + Math.max(0, ...yLabels.map((l) => textWidth(l))) + 8;
  const right = width - 16 - legendWidth;
  const cols = Math.max(1, xLabels.length);
  const rowCount = Math.max(1, yLabels.length);
  const cellW = Math.max(1, right - left) / cols;
  const widestX = Math.max(0, ...xLabels.map((l) => textWidth(l)));
  const rotate = widestX > cellW - 4;
  const labelHeight = rotate ? widestX * 0.71 + 14 : 20;
  const top = 38;
  const bottomMargin = labelHeight + (options.xLabel ? 24 : 6);
  const height = checkSize('heatmapSvg height', options.height, top + rowCount * 32 + bottomMargin, 80);
  const plot = plotArea(left, top, right, height - bottomMargin);
  const cellH = plot.height / rowCount;

  const out = svgOpen(width, height, options.title);
  const cells: string[] = [];
  const labels: string[] = [];
  values.forEach((row, r) => {
    row.forEach((v, c) => {
      const x = plot.left + c * cellW;
      const y = plot.top + r * cellH;
      const finite = Number.isFinite(v);
      const fill = finite ? heatColor(v, min, max) : '#f2f2f2';
      const label = finite ? format(v) : 'n/a';
      cells.push(`<rect x="${coord(x)}" y="${coord(y)}" width="${coord(cellW)}" height="${coord(cellH)}" fill="${fill}" stroke="#ffffff" stroke-width="1"><title>${escapeXml(`${yLabels[r]} · ${xLabels[c]}: ${label}`)}</title></rect>`);
      // Shrink the printed value to fit its cell; below 6 px it is unreadable, and the cell's
      // <title> still shows it on hover.
      const size = Math.min(FONT_SIZE, cellH * 0.5, (cellW - 4) / Math.max(1, [...label].length * 0.58));
      if (size >= 6) {
        labels.push(text(x + cellW / 2, y + cellH / 2 + size * 0.35, label, `font-size="${coord(size)}" fill="${finite ? textColorOn(fill) : '#888888'}"`));
      }
    });
  });
  out.push(`<g>${cells.join('')}</g>`);
  out.push(`<g text-anchor="middle">${labels.join('')}</g>`);

  out.push(`<g text-anchor="end">${yLabels.map((l, r) => text(plot.left - 6, plot.top + (r + 0.5) * cellH + 4, l)).join('')}</g>`);
  const base = plot.top + plot.height;
  out.push(`<g>${xLabels
    .map((l, c) => {
      const cx = plot.left + (c + 0.5) * cellW;
      return rotate
        ? `<text x="0" y="0" text-anchor="end" transform="translate(${coord(cx + 4)} ${coord(base + 12)}) rotate(-45)">${escapeXml(l)}</text>`
        : text(cx, base + 16, l, 'text-anchor="middle"');
    })
    .join('')}</g>`);
  axisLabels(out, options.xLabel, options.yLabel, plot, width, height);

  // The color legend: a bar of flat steps (no gradient, which would need an id), max at the top.
  const lx = right + 16;
  const step = plot.height / LEGEND_STEPS;
  const swatches: string[] = [];
  for (let i = 0; i < LEGEND_STEPS; i++) {
    const t = 1 - (i + 0.5) / LEGEND_STEPS;
    swatches.push(`<rect x="${coord(lx)}" y="${coord(plot.top + i * step)}" width="14" height="${coord(step + 0.5)}" fill="${sequentialColor(t)}"/>`);
  }
  out.push(`<g>${swatches.join('')}</g>`);
  out.push(`<rect x="${coord(lx)}" y="${coord(plot.top)}" width="14" height="${coord(plot.height)}" fill="none" stroke="${AXIS_COLOR}" stroke-width="0.5"/>`);
  out.push(`<g>${[plot.top + 4, plot.top + plot.height / 2 + 4, plot.top + plot.height].map((y, i) => text(lx + 20, y, legendLabels[i]!)).join('')}</g>`);
  out.push('</svg>');
  return out.join('\n');
}
