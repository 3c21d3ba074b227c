// loadTokenizer: a tokenizer directory in Hugging Face layout to a Tokenizer.
import { access, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { BYTE_TOKENIZER_MARKER, ByteTokenizer } from './byte.js';
import { normalizeChatTemplates } from './chat.js';
import { HfTokenizer } from './hf.js';
import { TokenizerError, type ChatTemplateSpec, type Tokenizer } from './types.js';
import { describe } from './util.js';

export interface LoadTokenizerOptions {
  /** Chat templates to use instead of the directory's (tokenizer_config.json, chat_template.jinja). */
  chatTemplate?: ChatTemplateSpec;
}

function errnoCode(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | null)?.code;
}

/** Reads a file as text, or null when it does not exist. */
async function readOptional(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (e) {
    if (errnoCode(e) === 'ENOENT') return null;
    throw new TokenizerError(`loadTokenizer: cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
}

async function readJson(path: string, expected: string, missingHint: () => Promise<string> = async () => ''): Promise<unknown> {
  const text = await readOptional(path);
  if (text === null) throw new TokenizerError(`loadTokenizer: ${path} not found; expected ${expected}${await missingHint()}`);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new TokenizerError(`loadTokenizer: ${path} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The directory's chat templates, as transformers finds them: tokenizer_config.json's `chat_template`
 * (a string or a list of { name, template }), overridden by chat_template.jinja (the 'default'
 * template) and by additional_chat_templates/<name>.jinja.
 */
async function readChatTemplates(dir: string, config: Record<string, unknown>): Promise<Map<string, string>> {
  const templates = normalizeChatTemplates(config.chat_template, `${join(dir, 'tokenizer_config.json')} chat_template`);
  const jinja = await readOptional(join(dir, 'chat_template.jinja'));
  if (jinja !== null) templates.set('default', jinja);
  const extraDir = join(dir, 'additional_chat_templates');
  let names: string[] = [];
  try {
    names = (await readdir(extraDir)).filter((f) => f.endsWith('.jinja')).sort();
  } catch (e) {
    if (errnoCode(e) !== 'ENOENT' && errnoCode(e) !== 'ENOTDIR') throw new TokenizerError(`loadTokenizer: cannot list ${extraDir}: ${(e as Error).message}`, { cause: e });
  }
  for (const f of names) templates.set(f.slice(0, -'.jinja'.length), (await readOptional(join(extraDir, f)))!);
  return templates;
}

/**
 * Loads the tokenizer of a model directory: tokenizer.json and tokenizer_config.json (both required),
 * plus chat_template.jinja and additional_chat_templates/ when present. A directory saved by
 * `ByteTokenizer.save` loads as a ByteTokenizer; any other as an HfTokenizer.
 */
export async function loadTokenizer(dir: string, options: LoadTokenizerOptions = {}): Promise<Tokenizer> {
  if (typeof dir !== 'string' || dir.length === 0) throw new TokenizerError(`loadTokenizer: dir must be a directory path, got ${describe(dir)}`);
  const layout = 'a directory with tokenizer.json and tokenizer_config.json (Hugging Face layout)';
  try {
    if (!(await stat(dir)).isDirectory()) throw new TokenizerError(`loadTokenizer: ${dir} is not a directory; expected ${layout}`);
  } catch (e) {
    if (e instanceof TokenizerError) throw e;
    if (errnoCode(e) === 'ENOENT') throw new TokenizerError(`loadTokenizer: ${dir} does not exist; expected ${layout}`, { cause: e });
    throw new TokenizerError(`loadTokenizer: cannot read ${dir}: ${(e as Error).message}`, { cause: e });
  }

  const jsonPath = join(dir, 'tokenizer.json');
  const configPath = join(dir, 'tokenizer_config.json');
  // A slow-tokenizer-only directory is common enough to deserve its own hint.
  const json = await readJson(jsonPath, 'the fast-tokenizer file of Hugging Face tokenizers (tokenizer.save_pretrained writes it)', async () =>
    (await exists(join(dir, 'tokenizer.model')))
      ? `; ${dir} has only a SentencePiece tokenizer.model: convert it once in Python with AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`
      : '',
  );
  const config = await readJson(configPath, 'the tokenizer settings (bos_token, eos_token, chat_template, ...) that save_pretrained writes beside tokenizer.json');
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new TokenizerError(`loadTokenizer: ${jsonPath} must hold a JSON object, got ${describe(json)}`);
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new TokenizerError(`loadTokenizer: ${configPath} must hold a JSON object, got ${describe(config)}`);
  const cfg = config as Record<string, unknown>;

  const chatTemplates =
    options.chatTemplate !== undefined ? normalizeChatTemplates(options.chatTemplate, 'loadTokenizer: options.chatTemplate') : await readChatTemplates(dir, cfg);
  const missingTemplateHint = `write one to ${join(dir, 'chat_template.jinja')}, set chat_template in ${configPath}, or pass loadTokenizer(dir, { chatTemplate })`;

  const marker = cfg[BYTE_TOKENIZER_MARKER.key];
  if (marker !== undefined) {
    if (marker !== BYTE_TOKENIZER_MARKER.value) {
      throw new TokenizerError(`loadTokenizer: ${configPath} has ${BYTE_TOKENIZER_MARKER.key} = ${describe(marker)}; the only kind tunekit knows is "${BYTE_TOKENIZER_MARKER.value}"`);
    }
    return ByteTokenizer.fromFiles(json, cfg, { source: dir, chatTemplates, missingTemplateHint });
  }
  return new HfTokenizer(json, cfg, { source: dir, chatTemplates, missingTemplateHint });
}
