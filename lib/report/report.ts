// The training report: one self-contained HTML file (inline CSS, inline SVG, no scripts, no
// external resources) so it can be mailed, archived beside a checkpoint, or opened offline.

import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';

import { writeTextAtomic } from '../io/atomic.js';

import { escapeXml, formatNumber } from './escape.js';

export interface ReportTable {
  columns: readonly string[];
  /** Each row has one cell per column. Numbers are printed by formatNumber and right-aligned. */
  rows: readonly (readonly (string | number)[])[];
}

export interface ReportSection {
  heading: string;
  /** Plain text (never markup); blank lines separate paragraphs. */
  text?: string;
  table?: ReportTable;
  /** An <svg> element, such as lineChartSvg returns. Inserted as is: it must be trusted markup. */
  svg?: string;
}

export interface Report {
  title: string;
  subtitle?: string;
  sections: readonly ReportSection[];
}

const STYLE = `
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1d1f23;
  font: 15px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 32px 20px 64px; }
header { margin-bottom: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; }
.subtitle { color: #5b6270; margin: 0; }
section { background: #fff; border: 1px solid #e2e5ea; border-radius: 8px; padding: 20px 24px; margin: 0 0 20px; }
h2 { font-size: 18px; margin: 0 0 12px; }
p { margin: 0 0 12px; white-space: pre-wrap; }
.figure { overflow-x: auto; margin: 12px 0 0; }
.figure svg { max-width: 100%; height: auto; display: block; }
.table { overflow-x: auto; margin: 12px 0 0; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 12px; border-bottom: 1px solid #e8eaee; text-align: left; vertical-align: top; }
th { background: #f3f4f7; font-weight: 600; border-bottom-color: #d5d9e0; }
td.num, th.num { text-align: right; }
tbody tr:hover { background: #fafbfc; }
@media print { body { background: #fff; } section { border: none; padding: 0; break-inside: avoid; } }
`;

/** Renders a report as a complete HTML document. Every caller-supplied string is escaped. */
export function renderReport(report: Report): string {
  const parts: string[] = [
    '<!DOCTYPE html>',
    '<html lang="en">',
    '<head>',
    '<meta charset="utf-8">',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    '<meta name="generator" content="tunekit">',
    `<title>${escapeXml(report.title)}</title>`,
    `<style>${STYLE}</style>`,
    '</head>',
    '<body>',
    '<main>',
    '<header>',
    `<h1>${escapeXml(report.title)}</h1>`,
  ];
  if (report.subtitle) parts.push(`<p class="subtitle">${escapeXml(report.subtitle)}</p>`);
  parts.push('</header>');
  report.sections.forEach((section, i) => {
    parts.push('<section>', `<h2>${escapeXml(section.heading)}</h2>`);
    if (section.text) {
      for (const para of section.text.split(/\n\s*\n/)) {
        if (para.trim()) parts.push(`<p>${escapeXml(para.trim())}</p>`);
      }
    }
    if (section.table) parts.push(renderTable(section.table, section.heading, i));
    if (section.svg !== undefined) {
      const svg = section.svg.trim();
      // Catches plain text or a whole HTML page passed by mistake; it is not a sanitizer.
      if (!/^<svg[\s>]/.test(svg) || !svg.endsWith('</svg>')) {
        throw new TypeError(`renderReport: section ${i} ('${section.heading}'): svg must be a single <svg>…</svg> element`);
      }
      parts.push(`<div class="figure">${svg}</div>`);
    }
    parts.push('</section>');
  });
  parts.push('</main>', '</body>', '</html>', '');
  return parts.join('\n');
}

function renderTable(table: ReportTable, heading: string, index: number): string {
  const { columns, rows } = table;
  rows.forEach((row, r) => {
    if (row.length !== columns.length) {
      throw new RangeError(`renderReport: section ${index} ('${heading}'): table row ${r} has ${row.length} cells for ${columns.length} columns`);
    }
  });
  // A column is numeric (right-aligned, header included) when every cell in it is a number.
  const numeric = columns.map((_, c) => rows.length > 0 && rows.every((row) => typeof row[c] === 'number'));
  const head = columns.map((col, c) => `<th${numeric[c] ? ' class="num"' : ''}>${escapeXml(col)}</th>`).join('');
  const body = rows
    .map((row) => {
      const cells = row.map((cell) => (typeof cell === 'number' ? `<td class="num">${escapeXml(formatNumber(cell))}</td>` : `<td>${escapeXml(cell)}</td>`));
      return `<tr>${cells.join('')}</tr>`;
    })
    .join('\n');
  return `<div class="table"><table>\n<thead><tr>${head}</tr></thead>\n<tbody>\n${body}\n</tbody>\n</table></div>`;
}


/**
 * Writes a report (or an already rendered HTML string) to `path`, creating parent directories.
 * The file is written under a temporary name in the same directory, flushed and renamed, so a
 * browser refreshing during a run never shows a half-written page.
 */
export async function writeReport(path: string, report: Report | string): Promise<void> {
  const html = typeof report === 'string' ? report : renderReport(report);
  await mkdir(dirname(path), { recursive: true });
  await writeTextAtomic(path, html);
}
