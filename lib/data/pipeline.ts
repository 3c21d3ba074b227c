// The data pipeline of a training stage: records -> shuffled per epoch -> (mixed with replay data) ->
// tokenized and masked -> packed into rows -> batches, every batch carrying the position from which a
// new pipeline reproduces exactly the batches that follow.
//
// Resuming works without saving any buffer, because everything is a pure function of the seed:
//   - an epoch's order comes from a shuffle buffer whose generator is seeded by (seed, stream, epoch),
//     so the order is rebuilt by re-reading the file and the first `index` items are skipped before
//     they are parsed or tokenized;
//   - whether mixed-stream slot j draws replay data is a hash of (seed, j), not a generator's state;
//   - greedy packing starts every row at the start of an example (or of a chunk of a split one), so
//     the rows after a batch depend only on the examples from the start of the row left open.
// A position is therefore { epoch, index } of the domain stream, { slot, epoch, index } of the replay
// stream, and a token offset into the first example (for chunks of a split document).
import type { Tokenizer } from '../tokenizer/types.js';
import { DataError, describeValue } from './errors.js';
import { tokenizeRecord, type Example, type TokenizeOptions } from './examples.js';
import { checkSource, parseItem, readRawItems, sourceName, type DataSource, type RawItem } from './jsonl.js';
import { checkPackOptions, collateRows, RowPacker, type Batch, type CompletedRow, type PackOptions } from './pack.js';
import { SeededRandom, uniform } from './random.js';
import { resolveFormat, validateRecord, type DataFormat, type FormatOptions } from './records.js';

/** General data mixed into a stage's own data against forgetting (replay). */
export interface ReplayOptions {
  source: DataSource;
  /** The fraction of examples drawn from `source`, 0 <= ratio < 1 (e.g. 0.2: one example in five). */
  ratio: number;
  /** Its format; default detected from its first record (within the stage's `formats`). */
  format?: DataFormat;
}

export interface DataPipelineOptions extends TokenizeOptions, FormatOptions, Omit<PackOptions, 'padId'> {
  source: DataSource;
  tokenizer: Tokenizer;
  /** Rows per batch; the last batch of the run may have fewer. */
  batchSize: number;
  /** Passes over `source`; default 1. Replay data cycles on its own and never ends a run. */
  epochs?: number;
  /** Seeds the per-epoch shuffles and the replay draws; default 0. */
  seed?: number;
  /** Shuffle each epoch; default true. */
  shuffle?: boolean;
  /**
   * Records held by the shuffle buffer (default 8192): a buffer at least as large as the data set gives
   * a uniform shuffle, a smaller one a local shuffle with memory bounded by the buffer.
   */
  shuffleBuffer?: number;
  replay?: ReplayOptions;
  /** Default the tokenizer's pad id, else its EOS id, else 0. */
  padId?: number;
}

/** Where a stream is: the `index`-th item of epoch `epoch`'s order is the next one drawn. */
export interface StreamPosition {
  epoch: number;
  index: number;
}

/** A pipeline's place; pass it to `batches(position)` to continue exactly where the batch that carried it left off. */
export interface DataPosition extends StreamPosition {
  /** Tokens of the next example already trained (inside a document split by splitLong). */
  offset: number;
  /** The replay stream's place and the mixed stream's next slot, when the pipeline has replay. */
  replay?: StreamPosition & { slot: number };
}

export interface PipelineBatch extends Batch {
  /** Resume here to get the batches after this one. */
  position: DataPosition;
}

type StreamState = Omit<DataPosition, 'offset'>;

interface Drawn<S> {
  example: Example;
  /** The position just before the example is drawn, and just after. */
  before: S;
  after: S;
}

interface StreamConfig {
  source: DataSource;
  format: DataFormat;
  /** Separates the shuffles of the domain and replay streams that share a seed. */
  tag: number;
}

const DOMAIN_TAG = 1;
const REPLAY_STREAM_TAG = 2;
const REPLAY_DRAW_TAG = 3;

function checkInt(name: string, value: unknown, min: number): number {
  if (!Number.isSafeInteger(value) || (value as number) < min) throw new DataError(`${name} must be an integer >= ${min}, got ${describeValue(value)}`);
  return value as number;
}

export class DataPipeline {
  private readonly options: DataPipelineOptions;
  private readonly epochs: number;
  private readonly seed: number;
  private readonly shuffle: boolean;
  private readonly shuffleBuffer: number;
  private readonly batchSize: number;
  private readonly pack: Required<PackOptions>;
  private formats: Promise<{ domain: DataFormat; replay: DataFormat | null }> | undefined;
  private current: DataPosition;

  constructor(options: DataPipelineOptions) {
    if (typeof options !== 'object' || options === null) throw new DataError(`DataPipeline: options must be an object, got ${describeValue(options)}`);
    checkSource(options.source, 'source');
    const tok = options.tokenizer as Partial<Tokenizer> | undefined;
    if (typeof tok?.encode !== 'function' || typeof tok.applyChatTemplate !== 'function') {
      throw new DataError(`tokenizer must be a Tokenizer (from loadTokenizer or new ByteTokenizer()), got ${describeValue(options.tokenizer)}`);
    }
    this.options = options;
    this.batchSize = checkInt('batchSize', options.batchSize, 1);
    this.epochs = checkInt('epochs', options.epochs ?? 1, 1);
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed)) throw new DataError(`seed must be an integer, got ${describeValue(seed)}`);
    this.seed = seed;
    this.shuffleBuffer = checkInt('shuffleBuffer', options.shuffleBuffer ?? 8192, 1);
    if (typeof (options.shuffle ?? true) !== 'boolean') throw new DataError(`shuffle must be a boolean, got ${describeValue(options.shuffle)}`);
    this.shuffle = options.shuffle ?? true;
    this.pack = checkPackOptions({ ...options, padId: options.padId ?? options.tokenizer.padId ?? options.tokenizer.eosId ?? 0 });
    const replay = options.replay;
    if (replay !== undefined) {
      if (typeof replay !== 'object' || replay === null) throw new DataError(`replay must be { source, ratio }, got ${describeValue(replay)}`);
      checkSource(replay.source, 'replay.source');
      if (typeof replay.ratio !== 'number' || !(replay.ratio >= 0 && replay.ratio < 1)) {
        throw new DataError(`replay.ratio is the fraction of examples drawn from the replay data and must be in [0, 1), got ${describeValue(replay.ratio)}`);
      }
    }
    this.current = this.initialPosition();
  }

  /** Where the pipeline is: the position after the last batch yielded (the start before any). */
  get position(): DataPosition {
    return structuredClone(this.current);
  }

  /** The position of a fresh run. */
  initialPosition(): DataPosition {
    return this.options.replay === undefined ? { epoch: 0, index: 0, offset: 0 } : { epoch: 0, index: 0, offset: 0, replay: { slot: 0, epoch: 0, index: 0 } };
  }

  /**
   * The batches from `from` (default: the start) to the end of the last epoch. Rows are never split
   * across batches and rows of a run continue across epoch boundaries; the last batch may be smaller.
   */
  async *batches(from?: DataPosition): AsyncGenerator<PipelineBatch> {
    const start = from === undefined ? this.initialPosition() : this.checkPosition(from);
    const formats = await this.resolveFormats();
    const packer = new RowPacker<StreamState>(this.pack);
    const pending: CompletedRow<StreamState>[] = [];
    const emit = (rows: readonly CompletedRow<StreamState>[]): PipelineBatch => {
      const next = rows.at(-1)!.next;
      const position: DataPosition = { ...structuredClone(next.at), offset: next.offset };
      this.current = structuredClone(position);
      return { ...collateRows(rows.map((r) => r.row)), position };
    };
    const { offset, ...state } = start;
    let last: StreamState = state;
    let first = true;
    for await (const item of this.drawn(state, formats)) {
      pending.push(...packer.push(item.example, item.before, item.after, first ? offset : 0));
      first = false;
      last = item.after;
      while (pending.length >= this.batchSize) yield emit(pending.splice(0, this.batchSize));
    }
    if (first && offset > 0) throw new DataError(`cannot resume at ${JSON.stringify(start)}: there is no example there to take token ${offset} of`);
    pending.push(...packer.finish(last));
    if (pending.length > 0) yield emit(pending);
  }

  private resolveFormats(): Promise<{ domain: DataFormat; replay: DataFormat | null }> {
    this.formats ??= (async () => {
      const { format, formats, replay } = this.options;
      const domain = await resolveFormat(this.options.source, { format, formats });
      const other = replay === undefined ? null : await resolveFormat(replay.source, { format: replay.format, formats });
      return { domain, replay: other };
    })();
    return this.formats;
  }

  private checkPosition(from: DataPosition): DataPosition {
    const bad = (why: string) => new DataError(`cannot resume at ${JSON.stringify(from)}: ${why}; pass a position from a batch of a pipeline with the same options`);
    if (typeof from !== 'object' || from === null) throw bad('a position is { epoch, index, offset, replay? }');
    for (const key of ['epoch', 'index', 'offset'] as const) {
      if (!Number.isSafeInteger(from[key]) || from[key] < 0) throw bad(`${key} must be an integer >= 0`);
    }
    if ((from.replay === undefined) !== (this.options.replay === undefined)) {
      throw bad(this.options.replay === undefined ? 'it has replay state and this pipeline has no replay' : 'it has no replay state and this pipeline has replay');
    }
    if (from.replay !== undefined) {
      for (const key of ['slot', 'epoch', 'index'] as const) {
        if (!Number.isSafeInteger(from.replay[key]) || from.replay[key] < 0) throw bad(`replay.${key} must be an integer >= 0`);
      }
    }
    return structuredClone(from);
  }

  /** An epoch's items in order: stored order, or through a shuffle buffer seeded by (seed, stream, epoch). */
  private async *epochItems(config: StreamConfig, epoch: number): AsyncGenerator<RawItem> {
    if (!this.shuffle) {
      yield* readRawItems(config.source);
      return;
    }
    const random = new SeededRandom(this.seed, config.tag, epoch);
    const buffer: RawItem[] = [];
    for await (const item of readRawItems(config.source)) {
      if (buffer.length < this.shuffleBuffer) {
        buffer.push(item);
        continue;
      }
      const j = random.below(buffer.length);
      const out = buffer[j]!;
      buffer[j] = item;
      yield out;
    }
    while (buffer.length > 0) {
      const j = random.below(buffer.length);
      const out = buffer[j]!;
      buffer[j] = buffer[buffer.length - 1]!;
      buffer.pop();
      yield out;
    }
  }

  /** The examples of one source from `start`, epoch after epoch, up to `epochs` (Infinity cycles). */
  private async *examples(config: StreamConfig, start: StreamPosition, epochs: number): AsyncGenerator<Drawn<StreamPosition>> {
    const { tokenizer } = this.options;
    for (let epoch = start.epoch; epoch < epochs; epoch++) {
      const skip = epoch === start.epoch ? start.index : 0;
      let index = 0;
      for await (const item of this.epochItems(config, epoch)) {
        if (index >= skip) {
          const record = validateRecord(parseItem(item), config.format, item.origin);
          const example = tokenizeRecord(tokenizer, record, this.options, item.origin);
          yield { example, before: { epoch, index }, after: { epoch, index: index + 1 } };
        }
        index++;
      }
      if (index === 0) throw new DataError(`${sourceName(config.source)} has no records`);
      if (skip > index) throw new DataError(`cannot resume at example ${skip} of epoch ${epoch}: ${sourceName(config.source)} has only ${index} records`);
    }
  }

  /** The mixed stream: each slot draws replay data with probability `ratio`, decided by a hash of (seed, slot). */
  private async *drawn(start: StreamState, formats: { domain: DataFormat; replay: DataFormat | null }): AsyncGenerator<Drawn<StreamState>> {
    const domain = this.examples({ source: this.options.source, format: formats.domain, tag: DOMAIN_TAG }, start, this.epochs);
    const replay = this.options.replay;
    if (replay === undefined || start.replay === undefined || formats.replay === null) {
      yield* domain;
      return;
    }
    const general = this.examples({ source: replay.source, format: formats.replay, tag: REPLAY_STREAM_TAG }, start.replay, Infinity);
    let slot = start.replay.slot;
    let d: StreamPosition = { epoch: start.epoch, index: start.index };
    let g: StreamPosition = { epoch: start.replay.epoch, index: start.replay.index };
    try {
      for (;;) {
        const fromReplay = uniform(this.seed, REPLAY_DRAW_TAG, slot) < replay.ratio;
        const next = await (fromReplay ? general : domain).next();
        // The domain stream ends the run; the replay stream cycles through its epochs forever.
        if (next.done) return;
        const before: StreamState = fromReplay ? { ...d, replay: { slot, ...next.value.before } } : { ...next.value.before, replay: { slot, ...g } };
        if (fromReplay) g = next.value.after;
        else d = next.value.after;
        slot++;
        yield { example: next.value.example, before, after: { ...d, replay: { slot, ...g } } };
      }
    } finally {
      await general.return(undefined);
      await domain.return(undefined);
    }
  }
}
