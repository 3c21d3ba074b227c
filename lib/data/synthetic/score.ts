// Scoring is exact match after whitespace normalization: a tiny model either produced the answer or it
// did not, and partial credit would blur the before/after comparison the demo exists to show.

/** Trims and collapses every run of whitespace to one space. */
export function normalizeAnswer(text: string): string {
  return text.trim().replace(/\s+/g, ' ');
}

/** True when `output` equals `answer` up to surrounding and repeated whitespace. */
export function exactMatch(output: string, answer: string): boolean {
  return normalizeAnswer(output) === normalizeAnswer(answer);
}
