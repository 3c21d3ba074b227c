// Examples to fixed-length rows. Each row holds whole documents (or one, padded), with next-token
// targets already shifted inside each document, a segment id per document so that attention never
// crosses documents, and positions restarting at 0 per document, so a packed row trains exactly as its
// documents would one by one.
import { DataError, describeValue, formatOrigin } from './errors.js';
import { IGNORE_INDEX, type Example } from './examples.js';

/** 'pack': greedy, several documents per row; 'pad': one document per row, padded to seqLen. */
export type PackMode = 'pack' | 'pad';

export interface PackOptions {
  seqLen: number;
  /** Default 'pack'. */
  mode?: PackMode;
  /**
   * Cut pretraining text longer than seqLen into seqLen-token chunks (each then packed as a document)
   * instead of rejecting it. Conversations are never cut: a cut answer would teach a truncated turn.
   */
  splitLong?: boolean;
  /** The id written into padding; its value never matters (ignored targets, own segment). Default 0. */
  padId?: number;
}

export interface PackedRow {
  /** Token ids, padded with padId. */
  ids: Int32Array;
  /** targets[t]: the label of token t + 1 of the same document; IGNORE_INDEX at a document's last token and on padding. */
  targets: Int32Array;
  /** The document's index within the row, 0, 1, ...; padding has the next id. */
  segmentIds: Int32Array;
  /** The token's position within its document (and within the padding). */
  positions: Int32Array;
  /** The number of documents (chunks of a split document count one each). */
  documents: number;
  /** The number of targets that are not IGNORE_INDEX. */
  targetCount: number;
}

/** Rows stacked into row-major [batchSize, seqLen] arrays, the layout the model and the losses take. */
export interface Batch {
  ids: Int32Array;
  targets: Int32Array;
  segmentIds: Int32Array;
  positions: Int32Array;
  batchSize: number;
  seqLen: number;
  /**
   * Targets that count in the loss. Sum it over the micro-batches of an optimizer step and divide the
   * summed losses by the total, so every trained token weighs the same however rows are split.
   */
  targetCount: number;
}

/** Where to restart so that the next row produced is a given row: an opaque stream position and a token offset into the example drawn there. */
export interface RowStart<P> {
  at: P;
  offset: number;
}

export interface CompletedRow<P> {
  row: PackedRow;
  /** Restart here (with an empty packer) to produce exactly the rows that follow this one. */
  next: RowStart<P>;
}

interface Piece<P> {
  ids: ArrayLike<number>;
  targets: Int32Array;
  start: RowStart<P>;
  end: RowStart<P>;
}

export function checkPackOptions(options: PackOptions): Required<PackOptions> {
  const { seqLen, mode = 'pack', splitLong = false, padId = 0 } = options;
  if (!Number.isSafeInteger(seqLen) || seqLen < 1) throw new DataError(`seqLen must be a positive integer, got ${String(seqLen)}`);
  if (mode !== 'pack' && mode !== 'pad') throw new DataError(`mode must be 'pack' or 'pad', got ${String(mode)}`);
  if (typeof splitLong !== 'boolean') throw new DataError(`splitLong must be a boolean, got ${String(splitLong)}`);
  if (!Number.isSafeInteger(padId) || padId < 0 || padId > 0x7fffffff) throw new DataError(`padId must be a token id, got ${String(padId)}`);
  return { seqLen, mode, splitLong, padId };
}

/** Next-token targets of one document: labels shifted left by one, IGNORE_INDEX at the last token. */
export function shiftTargets(labels: ArrayLike<number>): Int32Array {
  const out = new Int32Array(labels.length);
  for (let t = 0; t + 1 < labels.length; t++) out[t] = labels[t + 1]!;
  if (labels.length > 0) out[labels.length - 1] = IGNORE_INDEX;
  return out;
}

/**
 * Packs a stream of examples into rows, tracking for every row where a restart reproduces the rows
 * after it. Greedy packing keeps that simple: a row always begins at the start of an example (or of a
 * chunk of a split one), and what follows depends only on the examples from there on.
 */
export class RowPacker<P> {
  private readonly options: Required<PackOptions>;
  private open: Piece<P>[] = [];
  private used = 0;

  constructor(options: PackOptions) {
    this.options = checkPackOptions(options);
  }

  /**
   * Adds an example drawn at stream position `before` (`after` is the position once it is consumed);
   * `offset` skips its first tokens when resuming inside a split document. `label` names it in errors
   * when it has no origin. Returns the rows this completes.
   */
  push(example: Example, before: P, after: P, offset = 0, label = 'an example'): CompletedRow<P>[] {
    const { seqLen, splitLong, mode } = this.options;
    const name = formatOrigin(example.origin) ?? label;
    if (!Array.isArray(example.ids) || !Array.isArray(example.labels) || example.labels.length !== example.ids.length) {
      throw new DataError(`${name}: ids and labels must be lists of the same length, got ${describeValue(example.ids)} and ${describeValue(example.labels)}`);
    }
    const n = example.ids.length;
    if (n === 0) throw new DataError(`${name}: the example has no tokens`);
    if (n > seqLen && !(splitLong && example.splittable)) {
      const fixes = example.splittable
        ? 'raise seqLen, shorten or drop the record, or set splitLong: true to cut pretraining text into seqLen chunks'
        : 'raise seqLen or shorten or drop the record (conversations are never cut)';
      throw new DataError(`${name}: the example is ${n} tokens, longer than seqLen ${seqLen}; ${fixes}`);
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || offset >= n || offset % seqLen !== 0) {
      throw new DataError(`${name}: cannot resume at token ${offset} of an example of ${n} tokens (chunks start at multiples of seqLen ${seqLen}); the position does not belong to this data`);
    }
    const targets = shiftTargets(example.labels);
    const done: CompletedRow<P>[] = [];
    for (let a = offset; a < n; a += seqLen) {
      const b = Math.min(a + seqLen, n);
      const whole = a === 0 && b === n;
      const piece: Piece<P> = {
        ids: whole ? example.ids : example.ids.slice(a, b),
        targets: whole ? targets : targets.subarray(a, b),
        start: { at: before, offset: a },
        end: b < n ? { at: before, offset: b } : { at: after, offset: 0 },
      };
      const len = b - a;
      if (this.used + len > seqLen) done.push(this.close(piece.start));
      this.open.push(piece);
      this.used += len;
      if (mode === 'pad' || this.used === seqLen) done.push(this.close(piece.end));
    }
    return done;
  }

  /** Closes the last, partly filled row; `end` is the position after the last example. */
  finish(end: P): CompletedRow<P>[] {
    return this.open.length === 0 ? [] : [this.close({ at: end, offset: 0 })];
  }

  private close(next: RowStart<P>): CompletedRow<P> {
    const T = this.options.seqLen;
    const ids = new Int32Array(T).fill(this.options.padId);
    const targets = new Int32Array(T).fill(IGNORE_INDEX);
    const segmentIds = new Int32Array(T);
    const positions = new Int32Array(T);
    let t = 0;
    let targetCount = 0;
    this.open.forEach((piece, doc) => {
      ids.set(piece.ids, t);
      targets.set(piece.targets, t);
      for (let j = 0; j < piece.targets.length; j++) {
        segmentIds[t + j] = doc;
        positions[t + j] = j;
        if (piece.targets[j] !== IGNORE_INDEX) targetCount++;
      }
      t += piece.targets.length;
    });
    for (let j = 0; t + j < T; j++) {
      segmentIds[t + j] = this.open.length;
      positions[t + j] = j;
    }
    const row: PackedRow = { ids, targets, segmentIds, positions, documents: this.open.length, targetCount };
    this.open = [];
    this.used = 0;
    return { row, next };
  }
}

/** Packs in-memory examples into rows (see RowPacker); errors name an example by its origin or index. */
export function packExamples(examples: Iterable<Example>, options: PackOptions): PackedRow[] {
  const packer = new RowPacker<number>(options);
  const rows: PackedRow[] = [];
  let i = 0;
  for (const example of examples) {
    for (const done of packer.push(example, i, i + 1, 0, `example ${i}`)) rows.push(done.row);
    i++;
  }
  for (const done of packer.finish(i)) rows.push(done.row);
  return rows;
}

/** Stacks rows of one seqLen into a batch. */
export function collateRows(rows: readonly PackedRow[]): Batch {
  if (rows.length === 0) throw new DataError('collateRows: no rows to batch');
  const T = rows[0]!.ids.length;
  const B = rows.length;
  const batch: Batch = {
    ids: new Int32Array(B * T),
    targets: new Int32Array(B * T),
    segmentIds: new Int32Array(B * T),
    positions: new Int32Array(B * T),
    batchSize: B,
    seqLen: T,
    targetCount: 0,
  };
  rows.forEach((row, b) => {
    if (row.ids.length !== T) throw new DataError(`collateRows: row ${b} has ${row.ids.length} tokens, row 0 has ${T}; rows of a batch share one seqLen`);
    batch.ids.set(row.ids, b * T);
    batch.targets.set(row.targets, b * T);
    batch.segmentIds.set(row.segmentIds, b * T);
    batch.positions.set(row.positions, b * T);
    batch.targetCount += row.targetCount;
  });
  return batch;
}
