// Axis ticks and colors. Ticks follow the 1-2-5 rule (every step is 1, 2 or 5 times a power of
// ten) so that a reader can interpolate between grid lines at a glance.

import { formatNumber } from './escape.js';

export interface Ticks {
  /** The axis range: the data range widened outwards to whole steps. */
  readonly min: number;
  readonly max: number;
  /** Distance between ticks (for log ticks: the step in decades, for labelling only). */
  readonly step: number;
  /** Tick values from min to max inclusive, ascending. */
  readonly values: readonly number[];
  /** The tick values as labels, all printed with the same precision. */
  readonly labels: readonly string[];
}

/** The smallest 1-2-5 number that is at least `x` (x > 0). */
export function niceStep(x: number): number {
  if (!(x > 0) || !Number.isFinite(x)) throw new RangeError(`niceStep: expected a positive finite number, got ${x}`);
  const mag = 10 ** Math.floor(Math.log10(x));
  // log10 can land one ulp below an exact power of ten; the tolerance keeps 1000 from becoming 2000.
  const norm = x / mag;
  const mult = norm <= 1 + 1e-9 ? 1 : norm <= 2 + 1e-9 ? 2 : norm <= 5 + 1e-9 ? 5 : 10;
  return mult * mag;
}

/**
 * Linear ticks covering [lo, hi] with about `target` intervals (at most target + 2). An
 * empty range (lo == hi, a single point) is widened around the value so it sits mid-axis;
 * non-finite bounds give the unit range.
 */
export function niceTicks(lo: number, hi: number, target = 5): Ticks {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    lo = 0;
    hi = 1;
  }
  if (lo > hi) [lo, hi] = [hi, lo];
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  const intervals = Math.max(1, Math.floor(target));
  // hi / n - lo / n rather than (hi - lo) / n: the difference of two huge values can overflow.
  const raw = hi / intervals - lo / intervals;
  let step = niceStep(raw);
  // Steps so fine relative to the values that they fall below float resolution would repeat ticks.
  const resolution = Math.max(Math.abs(lo), Math.abs(hi)) * 1e-12;
  if (step < resolution) step = niceStep(resolution);
  else step = bestStep(lo, hi, intervals, raw) ?? step;
  const first = Math.floor(lo / step + 1e-9);
  const last = Math.ceil(hi / step - 1e-9);
  const decimals = Math.min(20, Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
  const values: number[] = [];
  for (let i = first; i <= last; i++) values.push(decimals > 0 ? Number((i * step).toFixed(decimals)) : i * step);
  const labels = values.map((v) => formatTick(v, step));
  return { min: values[0]!, max: values[values.length - 1]!, step, values, labels };
}

/**
 * The smallest 1-2-5 step at least as large as the raw step always fits, but rounding the ends
 * outwards can then leave few ticks and much empty axis (data -3.2..47 in steps of 20 spans
 * -20..60). Nearby 1-2-5 steps are scored on how far their tick count is from the target and how
 * much of the axis the data leaves empty; the best wins, never with more than target + 2 intervals.
 */
function bestStep(lo: number, hi: number, target: number, raw: number): number | null {
  const mag = 10 ** Math.floor(Math.log10(raw));
  let best: number | null = null;
  let bestScore = Infinity;
  for (const m of [1, 2, 5, 10, 20, 50]) {
    const step = m * mag;
    const n = Math.ceil(hi / step - 1e-9) - Math.floor(lo / step + 1e-9);
    if (n < 1 || n > target + 2) continue;
    const covered = (hi / step - lo / step) / n;
    const score = Math.abs(n - target) / target + (1 - covered);
    if (score < bestScore - 1e-12) {
      best = step;
      bestScore = score;
    }
  }
  return best;
}

/**
 * Logarithmic ticks covering [lo, hi] (both > 0): powers of ten, thinned to about `target` of them
 * over wide ranges, or 1-2-5 multiples within a decade or two where powers alone would leave the
 * axis nearly bare.
 */
export function logTicks(lo: number, hi: number, target = 5): Ticks {
  if (!(lo > 0) || !(hi > 0) || !Number.isFinite(lo) || !Number.isFinite(hi)) {
    lo = 1;
    hi = 10;
  }
  if (lo > hi) [lo, hi] = [hi, lo];
  let e0 = Math.floor(Math.log10(lo) + 1e-9);
  let e1 = Math.ceil(Math.log10(hi) - 1e-9);
  if (e1 === e0) e1 = e0 + 1;
  const decades = e1 - e0;
  const values: number[] = [];
  if (decades <= 2) {
    for (let e = e0; e <= e1; e++) {
      for (const m of [1, 2, 5]) {
        if (e === e1 && m > 1) break;
        values.push(Number(`${m}e${e}`));
      }
    }
    // Trim the multiples beyond the data so the axis is not mostly empty; keep one tick outside.
    while (values.length > 2 && values[1]! <= lo * (1 + 1e-9)) values.shift();
    while (values.length > 2 && values[values.length - 2]! >= hi * (1 - 1e-9)) values.pop();
  } else {
    const every = Math.max(1, Math.ceil(decades / Math.max(1, target)));
    e0 = Math.floor(e0 / every) * every;
    e1 = Math.ceil(e1 / every) * every;
    // Parsed from the literal: 10 ** -3 is 0.0010000000000000002, 1e-3 is the tick a reader expects.
    for (let e = e0; e <= e1; e += every) values.push(Number(`1e${e}`));
  }
  const labels = values.map((v) => formatNumber(v, 3));
  return { min: values[0]!, max: values[values.length - 1]!, step: decades, values, labels };
}

/** A tick label with as many decimals as the step needs, so labels on one axis line up. */
export function formatTick(v: number, step: number): string {
  if (v === 0) return '0';
  const a = Math.max(Math.abs(v), step);
  if (a >= 1e6 || a < 1e-3) {
    const digits = Math.floor(Math.log10(Math.abs(v)) + 1e-9) - Math.floor(Math.log10(step) + 1e-9) + 1;
    const [mantissa, exp] = v.toExponential(Math.min(20, Math.max(0, digits - 1))).split('e');
    return `${mantissa!.includes('.') ? mantissa!.replace(/\.?0+$/, '') : mantissa}e${exp!.replace('+', '')}`;
  }
  return v.toFixed(Math.min(20, Math.max(0, -Math.floor(Math.log10(step) + 1e-9))));
}

// ---- colors --------------------------------------------------------------------------------------

/**
 * Series colors: a ten-color qualitative palette chosen so neighbours differ in hue and lightness.
 * Beyond ten series colors repeat with a different dash pattern (see seriesStyle).
 */
export const PALETTE: readonly string[] = Object.freeze([
  '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
  '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf',
]);

const DASHES = ['', '6 3', '2 3', '8 3 2 3'];

/** Color and dash pattern of series `i`: distinct for the first 40 series. */
export function seriesStyle(i: number): { color: string; dash: string } {
  return { color: PALETTE[i % PALETTE.length]!, dash: DASHES[Math.floor(i / PALETTE.length) % DASHES.length]! };
}

// A perceptually ordered sequential scale (viridis, sampled at nine stops): dark purple for low,
// yellow for high, readable in grayscale and by most color-blind readers.
const SEQUENTIAL: readonly (readonly [number, number, number])[] = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];

/** The sequential color at t in [0, 1] (clamped; NaN gives the color for 0) as #rrggbb. */
export function sequentialColor(t: number): string {
  const x = Number.isNaN(t) ? 0 : Math.min(1, Math.max(0, t)) * (SEQUENTIAL.length - 1);
  const i = Math.min(SEQUENTIAL.length - 2, Math.floor(x));
  const f = x - i;
  const a = SEQUENTIAL[i]!;
  const b = SEQUENTIAL[i + 1]!;
  return hex(a.map((c, k) => c + (b[k]! - c) * f) as [number, number, number]);
}

/** The heatmap color of `value` on the scale [min, max]; min == max maps everything to the middle. */
export function heatColor(value: number, min: number, max: number): string {
  return sequentialColor(max > min ? (value - min) / (max - min) : 0.5);
}

/** Black or white, whichever reads better on `background` (#rrggbb), by relative luminance. */
export function textColorOn(background: string): string {
  const n = parseInt(background.slice(1), 16);
  const lin = (c: number) => {
    const s = c / 255;
    return s <= 0.04045 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  };
  const lum = 0.2126 * lin((n >> 16) & 255) + 0.7152 * lin((n >> 8) & 255) + 0.0722 * lin(n & 255);
  // The luminance at which black and white text have equal contrast (WCAG's formula).
  return lum > 0.179 ? '#000000' : '#ffffff';
}

function hex([r, g, b]: readonly [number, number, number]): string {
  return '#' + [r, g, b].map((c) => Math.round(c).toString(16).padStart(2, '0')).join('');
}
