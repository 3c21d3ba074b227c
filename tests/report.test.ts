import { mkdir, mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  PALETTE,
  barChartSvg,
  escapeXml,
  formatNumber,
  heatColor,
  heatmapSvg,
  lineChartSvg,
  logTicks,
  niceStep,
  niceTicks,
  renderReport,
  sequentialColor,
  seriesStyle,
  textColorOn,
  writeReport,
  type Report,
} from '../lib/report/index.js';

// ---- a small XML well-formedness checker ---------------------------------------------------------
// Enough of XML 1.0 to catch what a chart writer can get wrong: unbalanced or misnested tags,
// unquoted or duplicated attributes, a raw '<' or a bare '&' in text or attribute values, more than
// one root element, stray text outside the root. In 'html' mode the doctype and HTML's void
// elements (which have no end tag) are accepted, and <style> content is raw text.

interface XmlNode {
  name: string;
  attrs: Record<string, string>;
  children: XmlNode[];
  text: string;
}

const HTML_VOID = new Set(['meta', 'link', 'br', 'hr', 'img', 'input']);
const ENTITY = /&(?:amp|lt|gt|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);/y;

function checkText(s: string, where: string): string {
  for (let i = s.indexOf('&'); i >= 0; i = s.indexOf('&', i + 1)) {
    ENTITY.lastIndex = i;
    if (!ENTITY.test(s)) throw new Error(`bare '&' in ${where}: ${JSON.stringify(s.slice(i, i + 12))}`);
  }
  if (s.includes('<')) throw new Error(`raw '<' in ${where}`);
  return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&amp;/g, '&');
}

function parseXml(src: string, mode: 'xml' | 'html' = 'xml'): XmlNode {
  const root: XmlNode = { name: '#document', attrs: {}, children: [], text: '' };
  const stack: XmlNode[] = [root];
  let i = 0;
  const tagRe = /<(\/?)([A-Za-z][\w:.-]*)((?:\s+[^\s=/>]+\s*=\s*(?:"[^"]*"|'[^']*'))*)\s*(\/?)>/y;
  const attrRe = /\s+([^\s=/>]+)\s*=\s*(?:"([^"]*)"|'([^']*)')/g;
  while (i < src.length) {
    const lt = src.indexOf('<', i);
    const chunk = lt < 0 ? src.slice(i) : src.slice(i, lt);
    if (chunk.length > 0) {
      const top = stack[stack.length - 1]!;
      if (top === root && chunk.trim()) throw new Error(`text outside the root element: ${JSON.stringify(chunk.slice(0, 20))}`);
      top.text += checkText(chunk, `<${top.name}> text`);
    }
    if (lt < 0) break;
    if (src.startsWith('<!--', lt)) {
      const end = src.indexOf('-->', lt);
      if (end < 0) throw new Error('unterminated comment');
      i = end + 3;
      continue;
    }
    if (mode === 'html' && /^<!DOCTYPE html>/i.test(src.slice(lt, lt + 15))) {
      i = lt + 15;
      continue;
    }
    if (src.startsWith('<?xml', lt)) {
      i = src.indexOf('?>', lt) + 2;
      continue;
    }
    tagRe.lastIndex = lt;
    const m = tagRe.exec(src);
    if (!m) throw new Error(`malformed tag at ${lt}: ${JSON.stringify(src.slice(lt, lt + 40))}`);
    const [whole, closing, name, attrText, selfClosing] = m;
    i = lt + whole.length;
    if (closing) {
      if (attrText || selfClosing) throw new Error(`end tag </${name}> with attributes`);
      const open = stack.pop()!;
      if (open.name !== name) throw new Error(`</${name}> closes <${open.name}>`);
      continue;
    }
    const attrs: Record<string, string> = {};
    for (const a of attrText!.matchAll(attrRe)) {
      if (a[1]! in attrs) throw new Error(`duplicate attribute ${a[1]} on <${name}>`);
      attrs[a[1]!] = checkText(a[2] ?? a[3]!, `attribute ${a[1]} of <${name}>`);
    }
    const node: XmlNode = { name: name!, attrs, children: [], text: '' };
    const parent = stack[stack.length - 1]!;
    if (parent === root && root.children.length > 0) throw new Error(`second root element <${name}>`);
    parent.children.push(node);
    if (selfClosing || (mode === 'html' && HTML_VOID.has(name!.toLowerCase()))) continue;
    if (mode === 'html' && (name === 'style' || name === 'script')) {
      const end = src.indexOf(`</${name}>`, i);
      if (end < 0) throw new Error(`unterminated <${name}>`);
      node.text = src.slice(i, end);
      i = end + name.length + 3;
      continue;
    }
    stack.push(node);
  }
  if (stack.length !== 1) throw new Error(`unclosed <${stack[stack.length - 1]!.name}>`);
  if (root.children.length !== 1) throw new Error('no root element');
  return root.children[0]!;
}

function* walk(node: XmlNode): Generator<XmlNode> {
  yield node;
  for (const c of node.children) yield* walk(c);
}

function find(node: XmlNode, name: string): XmlNode[] {
  return [...walk(node)].filter((n) => n.name === name);
}

function allText(node: XmlNode): string {
  return [...walk(node)].map((n) => n.text).join(' ');
}

/** Parses an SVG and checks what every chart must satisfy: the root, sizes, and no NaN anywhere. */
function parseSvg(svg: string): XmlNode {
  const root = parseXml(svg);
  expect(root.name).toBe('svg');
  expect(root.attrs.xmlns).toBe('http://www.w3.org/2000/svg');
  expect(svg).not.toMatch(/NaN|Infinity|undefined/);
  for (const n of walk(root)) {
    for (const key of ['x', 'y', 'width', 'height', 'cx', 'cy', 'r', 'x1', 'x2', 'y1', 'y2']) {
      if (key in n.attrs) expect(Number.isFinite(Number(n.attrs[key])), `${n.name} ${key}=${n.attrs[key]}`).toBe(true);
    }
    if ('width' in n.attrs) expect(Number(n.attrs.width)).toBeGreaterThanOrEqual(0);
    if ('height' in n.attrs) expect(Number(n.attrs.height)).toBeGreaterThanOrEqual(0);
  }
  return root;
}

const NASTY = `a<b & "c" > 'd'`;

describe('the test XML checker', () => {
  it('accepts well-formed XML and rejects the usual breakages', () => {
    expect(parseXml('<a x="1"><b/>t &amp; u<c y=\'2\'></c></a>').children.map((c) => c.name)).toEqual(['b', 'c']);
    for (const bad of ['<a><b></a></b>', '<a>', '<a></a><b/>', '<a>x & y</a>', '<a x="<">', '<a x=1/>', '<a x="1" x="2"/>', 'text<a/>', '<a>1 < 2</a>']) {
      expect(() => parseXml(bad), bad).toThrow();
    }
  });
});

// ---- ticks ---------------------------------------------------------------------------------------

function isNiceStep(step: number): boolean {
  const mag = 10 ** Math.floor(Math.log10(step) + 1e-9);
  const m = Math.round((step / mag) * 1e6) / 1e6;
  return m === 1 || m === 2 || m === 5 || m === 10;
}

describe('niceTicks', () => {
  it('picks 1-2-5 steps', () => {
    expect([0.7, 1, 1.3, 2, 2.1, 4.9, 5, 7, 9.99, 1000, 0.0003].map(niceStep)).toEqual([1, 1, 2, 2, 5, 5, 5, 10, 10, 1000, 0.0005]);
    expect(() => niceStep(0)).toThrow(RangeError);
    expect(() => niceStep(NaN)).toThrow(RangeError);
  });

  it('produces the ticks a person would draw', () => {
    expect(niceTicks(0, 1).values).toEqual([0, 0.2, 0.4, 0.6, 0.8, 1]);
    expect(niceTicks(0, 1).labels).toEqual(['0', '0.2', '0.4', '0.6', '0.8', '1.0']);
    expect(niceTicks(-3.2, 47).values).toEqual([-10, 0, 10, 20, 30, 40, 50]);
    expect(niceTicks(0.1, 0.7, 6).values).toEqual([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
    expect(niceTicks(1.93, 5.41, 4).values).toEqual([1, 2, 3, 4, 5, 6]);
    expect(niceTicks(0, 2000, 4).labels).toEqual(['0', '500', '1000', '1500', '2000']);
  });

  it('covers random ranges with evenly spaced nice ticks and no float noise', () => {
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
    for (let k = 0; k < 500; k++) {
      const scale = 10 ** Math.floor(rand() * 16 - 8);
      const a = (rand() - 0.5) * 10 * scale;
      const b = a + rand() * 10 * scale;
      const target = 2 + Math.floor(rand() * 8);
      const t = niceTicks(a, b, target);
      const where = `[${a}, ${b}] target ${target}: ${t.values.join(', ')}`;
      expect(t.min, where).toBeLessThanOrEqual(Math.min(a, b));
      expect(t.max, where).toBeGreaterThanOrEqual(Math.max(a, b));
      expect(isNiceStep(t.step), where).toBe(true);
      expect(t.values.length, where).toBeGreaterThanOrEqual(2);
      expect(t.values.length, where).toBeLessThanOrEqual(target + 3);
      for (let i = 1; i < t.values.length; i++) {
        expect(t.values[i]! - t.values[i - 1]!, where).toBeCloseTo(t.step, 6 - Math.floor(Math.log10(t.step)));
      }
      // Float noise (0.30000000000000004) would survive in the SVG and in labels.
      for (const v of t.values) expect(Number(v.toPrecision(12)), where).toBe(v);
      expect(new Set(t.labels).size, where).toBe(t.labels.length);
    }
  });

  it('widens a single value around itself and survives bad input', () => {
    const one = niceTicks(5, 5);
    expect(one.min).toBeLessThan(5);
    expect(one.max).toBeGreaterThan(5);
    expect(niceTicks(0, 0).values).toContain(0);
    expect(niceTicks(0, 0).min).toBeLessThan(0);
    expect(niceTicks(NaN, 3).values).toEqual([0, 0.2, 0.4, 0.6, 0.8, 1]);
    expect(niceTicks(10, -10).min).toBe(-10);
    const huge = niceTicks(-1e308, 1e308);
    expect(huge.values.every(Number.isFinite)).toBe(true);
  });

  it('prints very large and very small ticks in exponent form', () => {
    expect(niceTicks(0, 3e9, 3).labels).toEqual(['0', '1e9', '2e9', '3e9']);
    expect(niceTicks(1e-7, 5e-7, 4).labels).toEqual(['1e-7', '2e-7', '3e-7', '4e-7', '5e-7']);
    expect(niceTicks(0, 1e9, 5).labels).toEqual(['0', '2e8', '4e8', '6e8', '8e8', '1e9']);
    expect(niceTicks(0, 1.5e9, 3).labels).toEqual(['0', '5e8', '1e9', '1.5e9']);
  });
});

describe('logTicks', () => {
  it('uses powers of ten over wide ranges', () => {
    expect(logTicks(0.003, 40).values).toEqual([0.001, 0.01, 0.1, 1, 10, 100]);
    const wide = logTicks(1e-12, 1e12, 5);
    expect(wide.values.length).toBeLessThanOrEqual(7);
    expect(wide.min).toBeLessThanOrEqual(1e-12);
    expect(wide.max).toBeGreaterThanOrEqual(1e12);
  });

  it('adds 2 and 5 multiples within a decade or two', () => {
    expect(logTicks(2.5, 8).values).toEqual([2, 5, 10]);
    expect(logTicks(0.3, 4).values).toEqual([0.2, 0.5, 1, 2, 5]);
    expect(logTicks(0.03, 0.07).labels).toEqual(['0.02', '0.05', '0.1']);
  });

  it('falls back to one decade without positive data', () => {
    expect(logTicks(Infinity, -Infinity).values).toEqual([1, 2, 5, 10]);
    expect(logTicks(-1, 0).min).toBe(1);
  });
});

// ---- escaping and colors -------------------------------------------------------------------------

describe('escaping and formatting', () => {
  it('escapes markup characters and replaces characters XML forbids', () => {
    expect(escapeXml(NASTY)).toBe('a&lt;b &amp; &quot;c&quot; &gt; &#39;d&#39;');
    expect(escapeXml('bell\u0007 and \uD800 lone')).toBe('bell\uFFFD and \uFFFD lone');
    expect(escapeXml('emoji \u{1F600} stays')).toBe('emoji \u{1F600} stays');
  });

  it('formats numbers for people', () => {
    expect([3, -12, 0.5, 1 / 3, 2.5e-7, 1234567890123.5, NaN, Infinity, -Infinity, 123456.789].map((v) => formatNumber(v))).toEqual([
      '3', '-12', '0.5', '0.3333', '2.5e-7', '1.235e12', 'NaN', '∞', '−∞', '1.235e5',
    ]);
    // Integers (token counts, steps) are exact, however long.
    expect(formatNumber(1234560000000)).toBe('1234560000000');
  });

  it('maps the ends of the heat scale to the ends of the color ramp', () => {
    expect(heatColor(0, 0, 1)).toBe(sequentialColor(0));
    expect(heatColor(1, 0, 1)).toBe(sequentialColor(1));
    expect(sequentialColor(0)).toBe('#440154');
    expect(sequentialColor(1)).toBe('#fde725');
    expect(heatColor(-5, 0, 1)).toBe('#440154');
    expect(heatColor(7, 7, 7)).toBe(sequentialColor(0.5));
    expect(textColorOn('#440154')).toBe('#ffffff');
    expect(textColorOn('#fde725')).toBe('#000000');
  });

  it('gives many series distinct styles', () => {
    const styles = Array.from({ length: 40 }, (_, i) => seriesStyle(i));
    expect(new Set(styles.map((s) => `${s.color}|${s.dash}`)).size).toBe(40);
    expect(new Set(PALETTE).size).toBe(PALETTE.length);
  });
});

// ---- line chart ----------------------------------------------------------------------------------

function pathStarts(svg: XmlNode): number[] {
  return find(svg, 'path').map((p) => (p.attrs.d!.match(/M/g) ?? []).length);
}

describe('lineChartSvg', () => {
  const loss = Array.from({ length: 50 }, (_, i) => [i * 10, 3 * Math.exp(-i / 15) + 0.5] as [number, number]);

  it('draws a well-formed chart with axes, grid, legend and one path per series', () => {
    const svg = lineChartSvg({
      title: 'Training loss',
      xLabel: 'step',
      yLabel: 'loss',
      series: [
        { name: 'train', points: loss },
        { name: 'validation', points: loss.map(([x, y]) => [x, y + 0.1] as [number, number]) },
      ],
    });
    const root = parseSvg(svg);
    expect(root.attrs.width).toBe('640');
    expect(root.attrs.height).toBe('360');
    expect(pathStarts(root)).toEqual([1, 1]);
    const strokes = find(root, 'path').map((p) => p.attrs.stroke);
    expect(new Set(strokes).size).toBe(2);
    const text = allText(root);
    for (const s of ['Training loss', 'step', 'loss', 'train', 'validation', '0', '500']) expect(text).toContain(s);
    expect(find(root, 'line').length).toBeGreaterThan(8);
  });

  it('escapes the title, axis labels and series names', () => {
    const svg = lineChartSvg({ title: NASTY, xLabel: NASTY, yLabel: NASTY, series: [{ name: NASTY, points: loss }] });
    const root = parseSvg(svg);
    expect(svg).not.toContain(NASTY);
    expect(svg).toContain('a&lt;b &amp; &quot;c&quot; &gt;');
    expect(root.attrs['aria-label']).toBe(NASTY);
    expect(find(root, 'title')[0]!.text).toBe(NASTY);
    expect(find(root, 'text').filter((t) => t.text === NASTY).length).toBe(4);
  });

  it('breaks lines at NaN and infinite points and keeps an isolated point visible', () => {
    const points: [number, number][] = [[0, 1], [1, 2], [2, NaN], [3, 4], [4, 5], [5, Infinity], [6, 3], [NaN, 1], [7, 2], [8, 1]];
    const root = parseSvg(lineChartSvg({ title: 'gaps', series: [{ name: 's', points }], markers: false }));
    expect(pathStarts(root)).toEqual([3]);
    expect(find(root, 'circle').length).toBe(1);
    const withMarkers = parseSvg(lineChartSvg({ title: 'gaps', series: [{ name: 's', points }] }));
    expect(find(withMarkers, 'circle').length).toBe(7);
  });

  it('handles empty and single-point series', () => {
    const none = parseSvg(lineChartSvg({ title: 'nothing', series: [] }));
    expect(allText(none)).toContain('no data');
    const empty = parseSvg(lineChartSvg({ title: 'empty', series: [{ name: 'e', points: [] }, { name: 'n', points: [[NaN, NaN]] }] }));
    expect(allText(empty)).toContain('no data');
    expect(find(empty, 'path')).toEqual([]);
    const one = parseSvg(lineChartSvg({ title: 'one', series: [{ name: 'p', points: [[3, 7]] }], markers: false }));
    const [dot] = find(one, 'circle');
    expect(dot).toBeDefined();
    // The lone point sits inside the plot, not on its border.
    const axis = find(one, 'line').filter((l) => l.attrs.stroke === '#444444');
    const xs = axis.flatMap((l) => [Number(l.attrs.x1), Number(l.attrs.x2)]);
    expect(Number(dot!.attrs.cx)).toBeGreaterThan(Math.min(...xs));
    expect(Number(dot!.attrs.cx)).toBeLessThan(Math.max(...xs));
  });

  it('plots a log axis and drops points it cannot place', () => {
    const points: [number, number][] = [[0, 100], [1, 10], [2, 0], [3, 0.1], [4, -1], [5, 0.01]];
    const root = parseSvg(lineChartSvg({ title: 'log', series: [{ name: 'ppl', points }], logY: true, markers: false }));
    expect(pathStarts(root)).toEqual([1]);
    expect(find(root, 'circle').length).toBe(2);
    for (const label of ['0.01', '0.1', '1', '10', '100']) expect(find(root, 'text').some((t) => t.text === label)).toBe(true);
  });

  it('gives each of many series its own style and wraps the legend', () => {
    const series = Array.from({ length: 14 }, (_, i) => ({ name: `run-${i}-with-a-long-name`, points: loss.map(([x, y]) => [x, y * (1 + i / 10)] as [number, number]) }));
    const root = parseSvg(lineChartSvg({ title: 'sweep', series, width: 480, height: 420 }));
    const styles = find(root, 'path').map((p) => `${p.attrs.stroke}|${p.attrs['stroke-dasharray'] ?? ''}`);
    expect(new Set(styles).size).toBe(14);
    const legendYs = new Set(find(root, 'text').filter((t) => t.text.startsWith('run-')).map((t) => t.attrs.y));
    expect(legendYs.size).toBeGreaterThan(1);
  });

  it('rejects nonsensical sizes', () => {
    expect(() => lineChartSvg({ title: 't', series: [], width: NaN })).toThrow(RangeError);
    expect(() => lineChartSvg({ title: 't', series: [], height: 5 })).toThrow(RangeError);
  });
});

// ---- heatmap -------------------------------------------------------------------------------------

describe('heatmapSvg', () => {
  const depths = ['0%', '25%', '50%', '75%', '100%'];
  const lengths = [256, 512, 1024, 2048];
  const recall = depths.map((_, r) => lengths.map((_, c) => (c < 2 ? 1 : Math.max(0, 1 - (r + 1) * (c - 1) * 0.2))));

  function cells(root: XmlNode): XmlNode[] {
    return find(root, 'rect').filter((r) => find(r, 'title').length > 0);
  }

  it('draws one cell per value, colored by value, with the values printed', () => {
    const root = parseSvg(heatmapSvg({ title: 'Needle recall', xLabels: lengths, yLabels: depths, values: recall, xLabel: 'context length', yLabel: 'depth' }));
    const grid = cells(root);
    expect(grid.length).toBe(20);
    const min = Math.min(...recall.flat());
    const max = Math.max(...recall.flat());
    expect(min).toBe(0);
    expect(grid[0]!.attrs.fill).toBe('#fde725');
    const minCell = grid[recall.flat().indexOf(min)]!;
    expect(minCell.attrs.fill).toBe('#440154');
    expect(find(minCell, 'title')[0]!.text).toBe('50% · 2048: 0');
    const text = find(root, 'text').map((t) => t.text);
    expect(text.filter((t) => t === '1').length).toBeGreaterThanOrEqual(10);
    for (const s of ['Needle recall', 'context length', 'depth', '256', '2048', '0%', '100%', '0.6']) expect(text).toContain(s);
    // The legend: a ramp from the max color at the top to the min color at the bottom.
    const ramp = find(root, 'rect').filter((r) => r.attrs.width === '14' && r.attrs.fill !== 'none');
    expect(ramp.length).toBe(32);
    expect(ramp[0]!.attrs.fill).toBe(heatColor(max - (max - min) / 64, min, max));
    expect(ramp[31]!.attrs.fill).toBe(heatColor(min + (max - min) / 64, min, max));
  });

  it('honours an explicit range and a format, and marks missing cells', () => {
    const values = [[0.5, NaN], [0.25, 0.75]];
    const root = parseSvg(heatmapSvg({ title: 'h', xLabels: ['a', 'b'], yLabels: ['x', 'y'], values, min: 0, max: 1, format: (v) => `${Math.round(v * 100)}%` }));
    const grid = cells(root);
    expect(grid.map((c) => c.attrs.fill)).toEqual([heatColor(0.5, 0, 1), '#f2f2f2', heatColor(0.25, 0, 1), heatColor(0.75, 0, 1)]);
    const text = find(root, 'text').map((t) => t.text);
    for (const s of ['50%', '25%', '75%', 'n/a', '0%', '100%']) expect(text).toContain(s);
  });

  it('prints values in a contrasting color', () => {
    const root = parseSvg(heatmapSvg({ title: 'h', xLabels: ['lo', 'hi'], yLabels: ['r'], values: [[0, 1]] }));
    const printed = find(root, 'text').filter((t) => t.attrs['font-size'] !== undefined && (t.text === '0' || t.text === '1'));
    expect(printed.map((t) => t.attrs.fill)).toEqual(['#ffffff', '#000000']);
  });

  it('escapes labels and survives empty, constant and wide grids', () => {
    const svg = heatmapSvg({ title: NASTY, xLabels: [NASTY], yLabels: [NASTY], values: [[3]] });
    parseSvg(svg);
    expect(svg).not.toContain(NASTY);
    parseSvg(heatmapSvg({ title: 'empty', xLabels: [], yLabels: [], values: [] }));
    const constant = parseSvg(heatmapSvg({ title: 'c', xLabels: ['a', 'b'], yLabels: ['r'], values: [[2, 2]] }));
    expect(cells(constant).map((c) => c.attrs.fill)).toEqual([sequentialColor(0.5), sequentialColor(0.5)]);
    const many = Array.from({ length: 40 }, (_, i) => `ctx-${(i + 1) * 1024}`);
    const wide = parseSvg(heatmapSvg({ title: 'w', xLabels: many, yLabels: ['r'], values: [many.map((_, i) => i / 39)] }));
    expect(find(wide, 'text').some((t) => (t.attrs.transform ?? '').includes('rotate(-45)'))).toBe(true);
  });

  it('rejects values that do not match the labels', () => {
    expect(() => heatmapSvg({ title: 'h', xLabels: ['a'], yLabels: ['x', 'y'], values: [[1]] })).toThrow(/1 rows of values for 2 y labels/);
    expect(() => heatmapSvg({ title: 'h', xLabels: ['a', 'b'], yLabels: ['x'], values: [[1]] })).toThrow(/row 0 has 1 values for 2 x labels/);
    expect(() => heatmapSvg({ title: 'h', xLabels: ['a'], yLabels: ['x'], values: [[1]], min: 2, max: 1 })).toThrow(RangeError);
  });
});

// ---- bar chart -----------------------------------------------------------------------------------

describe('barChartSvg', () => {
  function bars(root: XmlNode): XmlNode[] {
    return find(root, 'rect').filter((r) => find(r, 'title').length > 0);
  }

  it('draws grouped bars from zero with values and a legend', () => {
    const root = parseSvg(barChartSvg({
      title: 'Accuracy',
      groups: ['arithmetic', 'kv recall', 'needle'],
      series: [{ name: 'before', values: [0.12, 0.05, 0.3] }, { name: 'after', values: [0.81, 0.64, 0.9] }],
      yLabel: 'accuracy',
    }));
    const b = bars(root);
    expect(b.length).toBe(6);
    expect(new Set(b.map((r) => r.attrs.fill)).size).toBe(2);
    const bottoms = b.map((r) => Math.round(Number(r.attrs.y) + Number(r.attrs.height)));
    expect(new Set(bottoms).size).toBe(1);
    const heights = b.map((r) => Number(r.attrs.height));
    expect(heights[1]! / heights[0]!).toBeCloseTo(0.81 / 0.12, 1);
    const text = find(root, 'text').map((t) => t.text);
    for (const s of ['Accuracy', 'arithmetic', 'kv recall', 'needle', 'before', 'after', '0.81', 'accuracy']) expect(text).toContain(s);
  });

  it('handles negative, missing and escaped values', () => {
    const svg = barChartSvg({ title: NASTY, groups: [NASTY, 'b'], series: [{ name: NASTY, values: [-2, NaN] }, { name: 'y', values: [3, 1] }] });
    const root = parseSvg(svg);
    expect(svg).not.toContain(NASTY);
    const b = bars(root);
    expect(b.length).toBe(3);
    const zeroLine = find(root, 'line').filter((l) => l.attrs.stroke === '#444444' && l.attrs.y1 === l.attrs.y2).at(-1)!;
    expect(Number(b[0]!.attrs.y)).toBeCloseTo(Number(zeroLine.attrs.y1), 1);
  });

  it('survives empty input and rotates long group names', () => {
    expect(allText(parseSvg(barChartSvg({ title: 'none', groups: [], series: [] })))).toContain('no data');
    const groups = Array.from({ length: 12 }, (_, i) => `a rather long task name ${i}`);
    const root = parseSvg(barChartSvg({ title: 'long', groups, series: [{ name: 's', values: groups.map((_, i) => i) }] }));
    expect(find(root, 'text').filter((t) => (t.attrs.transform ?? '').includes('rotate(-45)')).length).toBe(12);
  });

  it('rejects series whose length does not match the groups', () => {
    expect(() => barChartSvg({ title: 't', groups: ['a', 'b'], series: [{ name: 's', values: [1] }] })).toThrow(/series 's' has 1 values for 2 groups/);
  });
});

// ---- the HTML report -----------------------------------------------------------------------------

describe('renderReport', () => {
  const chart = lineChartSvg({ title: 'loss', series: [{ name: 'train', points: [[0, 2], [1, 1]] }] });
  const report: Report = {
    title: `Run ${NASTY}`,
    subtitle: 'tiny model <cpu>',
    sections: [
      { heading: 'Loss & accuracy', text: 'First paragraph with <b>not bold</b>.\n\nSecond paragraph.', svg: chart },
      { heading: 'Results', table: { columns: ['task', 'before', 'after'], rows: [['<script>', 0.125, 0.875], ['a & b', 1 / 3, 2]] } },
    ],
  };

  it('is a self-contained, well-formed HTML document', () => {
    const html = renderReport(report);
    expect(html.startsWith('<!DOCTYPE html>')).toBe(true);
    const root = parseXml(html, 'html');
    expect(root.name).toBe('html');
    expect(find(root, 'style')).toHaveLength(1);
    expect(find(root, 'svg')).toHaveLength(1);
    expect(find(root, 'section')).toHaveLength(2);
    expect(find(root, 'meta').some((m) => m.attrs.charset === 'utf-8')).toBe(true);
    for (const external of [/<script/i, /<link/i, /\ssrc=/i, /url\(/i, /@import/i, /<iframe/i]) expect(html).not.toMatch(external);
    expect(html.replace('xmlns="http://www.w3.org/2000/svg"', '')).not.toMatch(/https?:/);
  });

  it('escapes the title, text and table cells', () => {
    const html = renderReport(report);
    const root = parseXml(html, 'html');
    expect(html).not.toContain(NASTY);
    expect(html).not.toContain('<b>not bold</b>');
    expect(html).not.toContain('<script>');
    expect(find(root, 'title')[0]!.text).toBe(`Run ${NASTY}`);
    expect(find(root, 'h1')[0]!.text).toBe(`Run ${NASTY}`);
    expect(find(root, 'h2').map((h) => h.text)).toEqual(['Loss & accuracy', 'Results']);
    expect(find(root, 'p').map((p) => p.text)).toEqual(['tiny model <cpu>', 'First paragraph with <b>not bold</b>.', 'Second paragraph.']);
    const cells = find(root, 'td');
    expect(cells.map((c) => c.text)).toEqual(['<script>', '0.125', '0.875', 'a & b', '0.3333', '2']);
    expect(cells.map((c) => c.attrs.class ?? '')).toEqual(['', 'num', 'num', '', 'num', 'num']);
    expect(find(root, 'th').map((c) => c.attrs.class ?? '')).toEqual(['', 'num', 'num']);
  });

  it('rejects tables with ragged rows and svg that is not an <svg> element', () => {
    expect(() => renderReport({ title: 't', sections: [{ heading: 'h', table: { columns: ['a', 'b'], rows: [[1]] } }] })).toThrow(/row 0 has 1 cells for 2 columns/);
    expect(() => renderReport({ title: 't', sections: [{ heading: 'h', svg: 'a chart' }] })).toThrow(TypeError);
    expect(() => renderReport({ title: 't', sections: [{ heading: 'h', svg: '<html><svg></svg></html>' }] })).toThrow(TypeError);
  });

  it('renders a report with no sections', () => {
    const root = parseXml(renderReport({ title: 'empty', sections: [] }), 'html');
    expect(find(root, 'section')).toHaveLength(0);
  });
});

describe('writeReport', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tunekit-report-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('writes the rendered report, creating directories, and leaves no temporary file', async () => {
    const report: Report = { title: 'r', sections: [{ heading: 'h', text: 'x' }] };
    const path = join(dir, 'nested', 'deeper', 'report.html');
    await writeReport(path, report);
    expect(await readFile(path, 'utf8')).toBe(renderReport(report));
    expect(await readdir(join(dir, 'nested', 'deeper'))).toEqual(['report.html']);
    await writeReport(path, '<!DOCTYPE html><html></html>');
    expect(await readFile(path, 'utf8')).toBe('<!DOCTYPE html><html></html>');
    expect(await readdir(join(dir, 'nested', 'deeper'))).toEqual(['report.html']);
  });

  it('cleans up its temporary file when the rename fails', async () => {
    const target = join(dir, 'occupied');
    await mkdir(join(target, 'child'), { recursive: true });
    await expect(writeReport(target, { title: 'r', sections: [] })).rejects.toThrow();
    expect((await stat(target)).isDirectory()).toBe(true);
    expect(await readdir(dir)).not.toContainEqual(expect.stringMatching(/\.tmp$/));
  });
});
