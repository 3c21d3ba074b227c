// Chat templates rendered with @huggingface/jinja, with the variables and template selection of
// transformers' apply_chat_template, so a template behaves here as it does in Python.
import { Template } from '@huggingface/jinja';

import { TokenizerError, type ChatMessage, type ChatTemplateOptions } from './types.js';
import { describe } from './util.js';

/** Template variables the options set; `vars` may not shadow them or the template would see two values. */
const RESERVED_VARS = ['messages', 'tools', 'documents', 'add_generation_prompt'];

/**
 * Turns any accepted form of chat templates (a ChatTemplateSpec, or whatever a file holds) into
 * name -> template. `where` names the origin (a file and key, or an option) for the error message.
 */
export function normalizeChatTemplates(spec: unknown, where: string): Map<string, string> {
  const out = new Map<string, string>();
  if (spec === undefined || spec === null) return out;
  if (typeof spec === 'string') {
    out.set('default', spec);
    return out;
  }
  if (Array.isArray(spec)) {
    spec.forEach((entry: unknown, i) => {
      const e = entry as { name?: unknown; template?: unknown } | null;
      if (typeof e !== 'object' || e === null || typeof e.name !== 'string' || typeof e.template !== 'string') {
        throw new TokenizerError(`${where}: entry ${i} of the chat template list must be { name: string, template: string }, got ${describe(entry)}`);
      }
      if (out.has(e.name)) throw new TokenizerError(`${where}: the chat template list names '${e.name}' twice`);
      out.set(e.name, e.template);
    });
    return out;
  }
  if (typeof spec === 'object') {
    for (const [name, template] of Object.entries(spec)) {
      if (typeof template !== 'string') throw new TokenizerError(`${where}: chat template '${name}' must be a string, got ${describe(template)}`);
      out.set(name, template);
    }
    return out;
  }
  throw new TokenizerError(`${where}: a chat template must be a string, a list of { name, template } or a record of name -> template, got ${describe(spec)}`);
}

/** Back to the tokenizer_config.json form: a plain string when there is only 'default', as HF writes it. */
export function chatTemplatesToConfig(templates: ReadonlyMap<string, string>): string | Array<{ name: string; template: string }> | undefined {
  if (templates.size === 0) return undefined;
  if (templates.size === 1 && templates.has('default')) return templates.get('default');
  return [...templates].map(([name, template]) => ({ name, template }));
}

export class ChatTemplates {
  readonly templates: ReadonlyMap<string, string>;
  private readonly compiled = new Map<string, Template>();

  /**
   * @param source the tokenizer's directory or label, for messages
   * @param specialVars bos_token, eos_token, ... as strings, the way transformers passes its special-tokens map
   * @param missingHint how to give this tokenizer a template, for the message when it has none
   */
  constructor(
    templates: ReadonlyMap<string, string>,
    private readonly source: string,
    private readonly specialVars: Readonly<Record<string, unknown>>,
    private readonly missingHint: string,
  ) {
    this.templates = templates;
  }

  render(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (!Array.isArray(messages)) throw new TokenizerError(`applyChatTemplate (${this.source}): messages must be an array of { role, content }, got ${describe(messages)}`);
    messages.forEach((m, i) => {
      if (typeof m !== 'object' || m === null || typeof m.role !== 'string') {
        throw new TokenizerError(`applyChatTemplate (${this.source}): message ${i} must be an object with a string role, got ${describe(m)}`);
      }
    });
    const vars = options.vars ?? {};
    for (const key of RESERVED_VARS) {
      if (Object.hasOwn(vars, key)) throw new TokenizerError(`applyChatTemplate (${this.source}): vars.${key} is set by the options (messages, tools, documents, addGenerationPrompt); pass it there`);
    }
    const name = this.select(options.templateName, options.tools !== undefined && options.tools !== null);
    const template = this.compile(name);
    try {
      // tools and documents are null, not absent, when not given: templates test `tools is not none`.
      return template.render({
        ...this.specialVars,
        ...vars,
        messages,
        tools: options.tools ?? null,
        documents: options.documents ?? null,
        add_generation_prompt: options.addGenerationPrompt ?? false,
      });
    } catch (e) {
      throw new TokenizerError(`applyChatTemplate (${this.source}): chat template '${name}' failed: ${(e as Error).message}`, { cause: e });
    }
  }

  private select(requested: string | undefined, hasTools: boolean): string {
    const names = [...this.templates.keys()];
    if (requested !== undefined) {
      if (!this.templates.has(requested)) {
        const known = names.length > 0 ? `the templates are: ${names.map((n) => `'${n}'`).join(', ')}` : 'it has no chat templates';
        throw new TokenizerError(`applyChatTemplate (${this.source}): no chat template named '${requested}'; ${known}`);
      }
      return requested;
    }
    if (hasTools && this.templates.has('tool_use')) return 'tool_use';
    if (this.templates.has('default')) return 'default';
    if (names.length === 0) throw new TokenizerError(`applyChatTemplate (${this.source}): this tokenizer has no chat template; ${this.missingHint}`);
    throw new TokenizerError(
      `applyChatTemplate (${this.source}): there is no template named 'default'; choose one with { templateName }: ${names.map((n) => `'${n}'`).join(', ')}`,
    );
  }

  private compile(name: string): Template {
    let t = this.compiled.get(name);
    if (t === undefined) {
      try {
        t = new Template(this.templates.get(name)!);
      } catch (e) {
        throw new TokenizerError(`applyChatTemplate (${this.source}): chat template '${name}' does not parse: ${(e as Error).message}`, { cause: e });
      }
      this.compiled.set(name, t);
    }
    return t;
  }
}
