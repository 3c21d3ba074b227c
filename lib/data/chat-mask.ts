// Assistant-only loss masks for any chat template, computed from rendered text rather than from
// `{% generation %}` markers (which most templates lack).
//
// The obvious method, "render each prefix of the conversation; turn i is the text between the render
// of messages [0, i) and of messages [0, i]", is wrong for real templates, because a rendered prefix is
// not always a prefix of the rendered whole:
//   - Qwen3 writes a <think> block into an assistant turn only while it is after the last user message,
//     so the render of [system, user, assistant] has a think block the full conversation drops;
//   - Llama 3's template appends an assistant header whether or not a generation prompt is asked for,
//     so every prefix render ends in a header that the full render replaces by the next message.
// So spans are located in the render of the whole conversation F, with a few more renders per trained
// turn i whose agreement with F pins down one boundary each:
//   1. start: P = render(messages [0, i), with the generation prompt). When P is a prefix of F the
//      turn's trained text begins at |P|, so the model learns everything it generates after the prompt
//      it gets at inference (for Qwen3's last turn that includes the empty think block the template
//      writes). When P is not a prefix of F, P is not what precedes the turn in F (Qwen3 with
//      enable_thinking=false prompts with an empty think block that earlier turns lack; Qwen3 gives the
//      first of two consecutive assistant turns a think block only while it is last; Llama 3 writes BOS
//      only before a first message; a template may end a message differently when it is last); and
//      when P ends right where the previous message's content ends (as found in 2), P holds no header
//      (a template without a generation prompt). In both cases the start is where the content begins,
//      found as in 3. Should the content be unrecognizable at its start too (Qwen3 reasoning), the end
//      of the common prefix serves, provided the messages before i render in F exactly as on their
//      own, so that only the generation prompt differs.
//   2. content end: F+ = F with a probe character (one F does not contain) appended to message i's
//      content. F+ must be F with text inserted at one point, and that point is where the content ends
//      in F, however the template transforms the content before it (trimming, splitting off reasoning).
//   3. the next message's start: the same probe prepended to message i + 1's content; the insertion
//      point is where that content begins. It bounds the search for the end marker.
// The end-of-turn marker is the text from the content's end through the first special token before the
// next message's content (<|im_end|>, <|eot_id|>, </s>, ...): generation stops at that token, so it is
// the last thing the model must learn to produce and what follows it (Qwen's "\n") is never generated.
// A template that ends turns with no special token trains the content alone.
//
// Tokens never straddle a span boundary: the render is tokenized in segments cut at span boundaries.
// The cut at a span's start is where inference cuts too (the prompt is tokenized on its own and the
// answer is generated after it), and the cut at its end follows a special token (when the template
// writes one), which never merges with its neighbours.
import { TokenizerError, type ChatMessage, type Tokenizer } from '../tokenizer/types.js';
import { DataError, excerpt, type RecordOrigin } from './errors.js';
import type { ChatTurn } from './records.js';

/** The chat template choice for rendering conversations (see Tokenizer.applyChatTemplate). */
export interface ChatRenderOptions {
  /** Which named template; default as applyChatTemplate chooses. */
  templateName?: string;
  /** Further template variables, e.g. `{ enable_thinking: false }` for Qwen3. */
  vars?: Readonly<Record<string, unknown>>;
}

/** A trained assistant turn: characters [start, end) of the rendered conversation, content plus end marker. */
export interface AssistantSpan {
  /** Index of the assistant message in the conversation. */
  message: number;
  start: number;
  end: number;
}

export interface RenderedConversation {
  /** The conversation rendered by the chat template, without a generation prompt. */
  text: string;
  /** The trained spans in order; they never overlap. */
  spans: AssistantSpan[];
}

/** Token ids and labels (-100 where a token is not trained) of one conversation. */
export interface TokenizedConversation {
  ids: number[];
  labels: number[];
}

const IGNORE = -100;

/** Special-token patterns per tokenizer; longest first, so that a token that extends another wins. */
const specialPatterns = new WeakMap<Tokenizer, RegExp | null>();

function specialPattern(tokenizer: Tokenizer): RegExp | null {
  let pattern = specialPatterns.get(tokenizer);
  if (pattern === undefined) {
    const tokens = [...tokenizer.specialTokens.keys()].filter((t) => t.length > 0).sort((a, b) => b.length - a.length);
    pattern = tokens.length === 0 ? null : new RegExp(tokens.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|'), 'g');
    specialPatterns.set(tokenizer, pattern);
  }
  return pattern;
}

/** Length of the common prefix, never ending between the two halves of a surrogate pair. */
function commonPrefix(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  if (i > 0 && i < n) {
    const c = a.charCodeAt(i - 1);
    if (c >= 0xd800 && c <= 0xdbff) i--;
  }
  return i;
}

/** A private-use character that `text` does not contain, so that where it shows up can only be the probe. */
function probeFor(text: string, origin: RecordOrigin | undefined): string {
  for (let c = 0xe000; c <= 0xf8ff; c++) {
    const ch = String.fromCharCode(c);
    if (!text.includes(ch)) return ch;
  }
  throw new DataError('the conversation contains every character of U+E000..U+F8FF, so none is left to probe the chat template with', origin);
}

/** Where `changed` is `full` with text inserted at one point, or null when it is not. */
function insertionPoint(full: string, changed: string): number | null {
  const p = commonPrefix(full, changed);
  return changed.length > full.length && changed.endsWith(full.slice(p)) ? p : null;
}

function firstDifference(a: string, b: string): string {
  const i = commonPrefix(a, b);
  return `at character ${i}: ${JSON.stringify(excerpt(a.slice(i), 40))} vs ${JSON.stringify(excerpt(b.slice(i), 40))}`;
}

/**
 * Renders a conversation and locates the text of each trained assistant turn (content plus the
 * end-of-turn marker) in it; see the top of this file for the method. Assistant turns with
 * `train: false` get no span. `origin` names the record in errors.
 */
export function renderWithSpans(tokenizer: Tokenizer, messages: readonly ChatTurn[], options: ChatRenderOptions = {}, origin?: RecordOrigin): RenderedConversation {
  const plain: ChatMessage[] = messages.map((m) => ({ role: m.role, content: m.content }));
  const render = (msgs: readonly ChatMessage[], addGenerationPrompt: boolean, what: string): string => {
    try {
      return tokenizer.applyChatTemplate(msgs, { addGenerationPrompt, templateName: options.templateName, vars: options.vars });
    } catch (e) {
      if (e instanceof TokenizerError) throw new DataError(`cannot render ${what}: ${e.message}`, origin, { cause: e });
      throw e;
    }
  };
  const withContent = (i: number, content: string): ChatMessage[] => plain.map((m, j) => (j === i ? { ...m, content } : m));

  const text = render(plain, false, 'the conversation');
  const probe = probeFor(text, origin);
  const special = specialPattern(tokenizer);
  const spans: AssistantSpan[] = [];
  let previousEnd = 0;

  messages.forEach((m, i) => {
    if (m.role !== 'assistant' || m.train === false) return;
    const turn = `messages[${i}] (assistant)`;

    const prompt = render(plain.slice(0, i), true, `the conversation before ${turn}`);
    let start = commonPrefix(text, prompt);
    // A prompt that ends where the previous message's content ends holds no header for this turn
    // (a template without a generation prompt); it cannot mark where the turn's text begins.
    const headerless = start === prompt.length && i > 0 && insertionPoint(text, render(withContent(i - 1, plain[i - 1]!.content + probe), false, `messages[${i - 1}]`)) === start;
    if (start < prompt.length || headerless) {
      const contentStart = insertionPoint(text, render(withContent(i, probe + m.content), false, turn));
      if (contentStart !== null) {
        start = contentStart;
      } else {
        // The content is transformed beyond recognition at its start (Qwen3 moves reasoning out of
        // it); the common prefix is still right if all that differs is the generation prompt.
        const before = render(plain.slice(0, i), false, `the conversation before ${turn}`);
        if (start < before.length || !text.startsWith(before)) {
          throw new DataError(
            `the chat template renders the messages before ${turn} differently inside the whole conversation than on their own ` +
              `(first difference ${firstDifference(text, before)}) and does not write the turn's content as text, so the turn cannot be located`,
            origin,
          );
        }
      }
    }

    const contentEnd = insertionPoint(text, render(withContent(i, m.content + probe), false, turn));
    if (contentEnd === null || contentEnd < start) {
      throw new DataError(`the chat template does not write the content of ${turn} into the conversation as text, so its span cannot be located`, origin);
    }

    let limit = text.length;
    if (i + 1 < messages.length) {
      const next = insertionPoint(text, render(withContent(i + 1, probe + messages[i + 1]!.content), false, `messages[${i + 1}]`));
      if (next === null || next < contentEnd) {
        throw new DataError(
          `the chat template does not write the content of messages[${i + 1}] (${messages[i + 1]!.role}) into the conversation as text, so the end of ${turn} cannot be located`,
          origin,
        );
      }
      limit = next;
    }

    let end = contentEnd;
    if (special !== null) {
      special.lastIndex = contentEnd;
      const marker = special.exec(text);
      if (marker !== null && marker.index + marker[0].length <= limit) end = marker.index + marker[0].length;
    }
    if (start < previousEnd) throw new DataError(`the chat template wrote ${turn} inside the previous assistant turn; its span cannot be separated`, origin);
    spans.push({ message: i, start, end });
    previousEnd = end;
  });
  return { text, spans };
}

/**
 * Token ids and labels of a conversation: the render tokenized in segments cut at the trained spans,
 * with labels equal to the ids inside spans and -100 elsewhere.
 */
export function tokenizeConversation(tokenizer: Tokenizer, messages: readonly ChatTurn[], options: ChatRenderOptions = {}, origin?: RecordOrigin): TokenizedConversation {
  const { text, spans } = renderWithSpans(tokenizer, messages, options, origin);
  const ids: number[] = [];
  const labels: number[] = [];
  const segment = (from: number, to: number, trained: boolean) => {
    if (to <= from) return;
    for (const id of tokenizer.encode(text.slice(from, to), { addSpecialTokens: false })) {
      ids.push(id);
      labels.push(trained ? id : IGNORE);
    }
  };
  let at = 0;
  for (const span of spans) {
    segment(at, span.start, false);
    segment(span.start, span.end, true);
    at = span.end;
  }
  segment(at, text.length, false);
  return { ids, labels };
}
