// Escaping and number printing shared by the SVG charts and the HTML page. Every string that came
// from a caller (titles, labels, series names, table cells) goes through escapeXml, because a run's
// names are user data (a stage called "<sft & dpo>" must not break the report or inject markup).

const XML_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

// Characters XML 1.0 forbids outright (C0 controls other than tab, LF, CR; lone surrogates;
// U+FFFE/U+FFFF). Escaping cannot make them legal, so they are replaced with U+FFFD.
// eslint-disable-next-line no-control-regex
const XML_FORBIDDEN = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\uFFFE\uFFFF]|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** Escapes text for use in XML/HTML content and in double- or single-quoted attribute values. */
export function escapeXml(value: unknown): string {
  return String(value).replace(XML_FORBIDDEN, '\uFFFD').replace(/[&<>"']/g, (c) => XML_ESCAPES[c]!);
}

/** A coordinate in an SVG path or attribute: two decimals are sub-pixel, and keep files small. */
export function coord(n: number): string {
  const r = Math.round(n * 100) / 100;
  return Object.is(r, -0) ? '0' : String(r);
}

/**
 * A value for people to read: integers as they are, other numbers with `digits` significant
 * digits (trailing zeros dropped), very large or small magnitudes in exponent form, and the
 * non-finite values by name.
 */
export function formatNumber(v: number, digits = 4): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '∞';
  if (v === -Infinity) return '−∞';
  if (Number.isInteger(v) && Math.abs(v) < 1e15) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e9 || a < 1e-4)) return trimExponent(v.toExponential(Math.max(0, digits - 1)));
  const s = v.toPrecision(digits);
  return s.includes('e') ? trimExponent(s) : trimZeros(s);
}

function trimZeros(s: string): string {
  return s.includes('.') && !s.includes('e') ? s.replace(/\.?0+$/, '') : s;
}

function trimExponent(s: string): string {
  const [mantissa, exp] = s.split('e');
  return `${trimZeros(mantissa!)}e${exp!.replace('+', '')}`;
}
