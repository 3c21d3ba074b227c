// Models: building from presets, save -> load round trips, LoRA / QLoRA in PEFT's layout, merging,
// gradients of a whole micro model against finite differences, and the loader's errors.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import * as tk from '../lib/index.js';
import type { CausalLM, Tensor } from '../lib/index.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tunekit-models-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const ids = (B: number, T: number, V: number, seed = 1) => {
  const out = new Int32Array(B * T);
  let s = seed;
  for (let i = 0; i < out.length; i++) {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    out[i] = s % V;
  }
  return tk.tensor(out, [B, T]);
};

function logitsOf(model: CausalLM, x: Tensor): Float32Array {
  return tk.tidy(() => tk.noGrad(() => model.forward(x).toArraySync() as Float32Array));
}

describe('models', () => {
  it('builds every model type from a config, with Hugging Face parameter names', () => {
    for (const modelType of tk.MODEL_TYPES) {
      const config = tk.presetConfig('micro', 50, { model_type: modelType, head_dim: 12, tie_word_embeddings: modelType !== 'llama' });
      const model = tk.createModel(config, { seed: 3 });
      const names = model.namedParameters().map(([n]) => n);
      expect(names).toContain('model.embed_tokens.weight');
      expect(names).toContain('model.layers.1.self_attn.q_proj.weight');
      expect(names).toContain('model.layers.0.mlp.down_proj.weight');
      expect(names).toContain('model.norm.weight');
      expect(names.includes('lm_head.weight')).toBe(modelType === 'llama');
      expect(names.includes('model.layers.0.self_attn.q_norm.weight')).toBe(modelType === 'qwen3');
      expect(names.includes('model.layers.0.self_attn.q_proj.bias')).toBe(modelType === 'qwen2');
      expect(model.getModule('model.layers.0.self_attn.q_proj')).toBeInstanceOf(tk.nn.Linear);
      const x = ids(2, 5, 50);
      const logits = tk.tidy(() => model.forward(x));
      expect(logits.shape).toEqual([2, 5, 50]);
      logits.dispose();
      x.dispose();
      model.dispose();
    }
  });

  it('save -> load round trips bit-exactly (f32 and bf16), with the tokenizer', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 262 }, { seed: 5 });
    const tokenizer = new tk.ByteTokenizer();
    const out = join(dir, 'roundtrip');
    await tk.saveModel(model, out, { tokenizer });
    const config = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
    expect(config.architectures).toEqual(['LlamaForCausalLM']);
    expect(config.torch_dtype).toBe('float32');
    const loaded = await tk.loadModel(out);
    for (const [name, t] of model.namedParameters()) {
      const u = loaded.namedParameters().find(([n]) => n === name)![1];
      expect(Buffer.from(await u.handle().read()).equals(Buffer.from(await t.handle().read())), name).toBe(true);
    }
    const x = ids(1, 7, 262);
    expect(logitsOf(loaded, x)).toEqual(logitsOf(model, x));
    const tok = await tk.loadTokenizer(out);
    expect(tok.decode(tok.encode('héllo', { addSpecialTokens: false }))).toBe('héllo');

    const half = join(dir, 'roundtrip-bf16');
    await tk.saveModel(model, half, { dtype: 'bf16' });
    const a = await tk.loadModel(half, { dtype: 'bf16' });
    await tk.saveModel(a, join(dir, 'roundtrip-bf16-again'));
    const b = await tk.loadModel(join(dir, 'roundtrip-bf16-again'), { dtype: 'bf16' });
    for (const [name, t] of a.namedParameters()) {
      const u = b.namedParameters().find(([n]) => n === name)![1];
      expect(u.dtype).toBe('bf16');
      expect(Buffer.from(await u.handle().read()).equals(Buffer.from(await t.handle().read())), name).toBe(true);
    }
    for (const m of [model, loaded, a, b]) m.dispose();
    x.dispose();
  });

  it('loads sharded checkpoints', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 64 }, { seed: 6 });
    const out = join(dir, 'sharded');
    await tk.saveModel(model, out, { maxShardBytes: 20000 });
    const index = JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8'));
    expect(new Set(Object.values(index.weight_map)).size).toBeGreaterThan(1);
    const loaded = await tk.loadModel(out);
    const x = ids(2, 4, 64);
    expect(logitsOf(loaded, x)).toEqual(logitsOf(model, x));
    model.dispose();
    loaded.dispose();
    x.dispose();
  });

  it('a micro model: gradients of the loss match finite differences', () => {
    const model = tk.createModel(tk.presetConfig('micro', 23, { model_type: 'qwen3', head_dim: 6, hidden_size: 16, intermediate_size: 24 }), { seed: 7 });
    model.requiresGrad(true);
    const x = ids(2, 6, 23, 3);
    const targets = ids(2, 6, 23, 4);
    const loss = () => tk.ops.crossEntropy(model.forward(x), targets);
    tk.tidy(() => loss().backward());
    for (const name of ['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.k_norm.weight', 'model.layers.1.mlp.down_proj.weight', 'model.norm.weight']) {
      const p = model.namedParameters().find(([n]) => n === name)![1];
      const grad = p.grad!.toArraySync();
      const values = p.toArraySync() as Float32Array;
      let maxGrad = 0;
      for (const g of grad) maxGrad = Math.max(maxGrad, Math.abs(g));
      for (const i of [0, 5, Math.floor(values.length / 2), values.length - 1]) {
        const at = (v: number) => {
          const copy = values.slice();
          copy[i] = v;
          model.setParameter(name, tk.nn.owned(() => tk.tensor(copy, [...p.shape])));
          const l = tk.tidy(() => tk.noGrad(() => loss().toArraySync()[0]!));
          return l;
        };
        const h = 1e-2;
        const fd = (at(values[i]! + h) - at(values[i]! - h)) / (2 * h);
        at(values[i]!);
        expect(Math.abs(fd - grad[i]!), `${name}[${i}]: ${grad[i]} vs ${fd}`).toBeLessThan(2e-2 * maxGrad + 1e-4);
      }
    }
    model.dispose();
    x.dispose();
    targets.dispose();
  });
});

describe('LoRA', () => {
  it('applies to the targeted layers only, starts as the identity and trains A and B only', () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 40 }, { seed: 8 });
    const x = ids(2, 5, 40);
    const before = logitsOf(model, x);
    const state = tk.applyLora(model, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] });
    expect(state.modules).toEqual([
      'model.layers.0.self_attn.q_proj',
      'model.layers.0.self_attn.v_proj',
      'model.layers.0.mlp.down_proj',
      'model.layers.1.self_attn.q_proj',
      'model.layers.1.self_attn.v_proj',
      'model.layers.1.mlp.down_proj',
    ]);
    expect(logitsOf(model, x)).toEqual(before);
    const trainable = model.trainableParameters().map(([n]) => n);
    expect(trainable).toHaveLength(12);
    expect(trainable.every((n) => /lora_[AB]\.weight$/.test(n))).toBe(true);
    const regex = tk.createModel({ preset: 'micro', vocabSize: 40 }, { seed: 8 });
    expect(tk.applyLora(regex, { r: 2, targetModules: String.raw`.*layers\.1\.self_attn\.(k|o)_proj` }).modules).toEqual(['model.layers.1.self_attn.k_proj', 'model.layers.1.self_attn.o_proj']);
    const none = tk.createModel({ preset: 'micro', vocabSize: 40 });
    expect(() => tk.applyLora(none, { r: 2, targetModules: ['nope'] })).toThrow(/matches no linear layer; the model's are .*q_proj/);
    for (const m of [model, regex, none]) m.dispose();
    x.dispose();
  });

  it('saves in PEFT layout, loads back exactly, and merging equals the adapted model', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 40 }, { seed: 9 });
    tk.applyLora(model, { r: 4, alpha: 16, dropout: 0.1, targetModules: ['q_proj', 'up_proj'], rslora: true, seed: 1 });
    // Give B non-zero values, as training would.
    for (const [name, t] of model.trainableParameters())
      if (name.endsWith('lora_B.weight')) model.setParameter(name, tk.nn.owned(() => tk.randn([...t.shape], { seed: 4, std: 0.05 })));
    const out = join(dir, 'adapter');
    await tk.saveAdapter(model, out, { baseModelNameOrPath: 'tiny-base' });
    const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
    expect(config).toMatchObject({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 4, lora_alpha: 16, lora_dropout: 0.1, target_modules: ['q_proj', 'up_proj'], use_rslora: true, base_model_name_or_path: 'tiny-base' });
    const file = await tk.io.SafetensorsFile.open(join(out, 'adapter_model.safetensors'));
    expect(file.tensors.get('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')!.shape).toEqual([4, 32]);
    expect(file.tensors.get('base_model.model.model.layers.1.mlp.up_proj.lora_B.weight')!.shape).toEqual([64, 4]);
    expect(file.tensors.size).toBe(8);
    await file.close();

    const x = ids(2, 5, 40);
    model.eval();
    const adapted = logitsOf(model, x);
    // Unknown keys in adapter_config.json are kept and ignored.
    await writeFile(join(out, 'adapter_config.json'), JSON.stringify({ ...config, some_future_key: { a: 1 } }));
    const other = tk.createModel({ preset: 'micro', vocabSize: 40 }, { seed: 9 });
    const state = await tk.loadAdapter(other, out);
    expect(state.config?.some_future_key).toEqual({ a: 1 });
    other.eval();
    expect(logitsOf(other, x)).toEqual(adapted);

    tk.mergeLora(model);
    expect(model.trainableParameters()).toHaveLength(0);
    const merged = logitsOf(model, x);
    let worst = 0;
    for (let i = 0; i < merged.length; i++) worst = Math.max(worst, Math.abs(merged[i]! - adapted[i]!));
    expect(worst).toBeLessThan(1e-4);
    for (const m of [model, other]) m.dispose();
    x.dispose();
  });

  it('QLoRA: an NF4 base with adapters, merged into a full-precision model', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 40 }, { seed: 10 });
    const out = join(dir, 'qbase');
    await tk.saveModel(model, out);
    const q = await tk.loadModel(out, { quantize: 'nf4' });
    const layer = q.getModule('model.layers.0.mlp.gate_proj') as tk.nn.Linear;
    expect(layer.quantized).not.toBeNull();
    expect(q.namedParameters().some(([n]) => n === 'model.layers.0.mlp.gate_proj.weight')).toBe(false);
    const x = ids(1, 6, 40);
    // NF4 error on logits of a random model: small against the logits' own scale.
    const dense = logitsOf(model, x);
    const quant = logitsOf(q, x);
    let num = 0;
    let den = 0;
    for (let i = 0; i < dense.length; i++) {
      num += (dense[i]! - quant[i]!) ** 2;
      den += dense[i]! ** 2;
    }
    expect(num / den).toBeLessThan(0.02);
    tk.applyLora(q, { r: 2, targetModules: 'all-linear', seed: 2 });
    for (const [name, t] of q.trainableParameters())
      if (name.endsWith('lora_B.weight')) q.setParameter(name, tk.nn.owned(() => tk.randn([...t.shape], { seed: 5, std: 0.05 })));
    q.eval();
    const adapted = logitsOf(q, x);
    tk.mergeLora(q);
    expect((q.getModule('model.layers.0.mlp.gate_proj') as tk.nn.Linear).quantized).toBeNull();
    const merged = logitsOf(q, x);
    for (let i = 0; i < merged.length; i++) expect(Math.abs(merged[i]! - adapted[i]!)).toBeLessThan(1e-4);
    await tk.saveModel(q, join(dir, 'merged'));
    const back = await tk.loadModel(join(dir, 'merged'));
    expect(logitsOf(back, x)).toEqual(merged);
    for (const m of [model, q, back]) m.dispose();
    x.dispose();
  });
});

describe('config.json', () => {
  it('reads rope_scaling (type or rope_type) and the newer rope_parameters alike', () => {
    const base = tk.presetConfig('micro', 10);
    const scaling = { factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 };
    const classic = tk.parseConfig({ ...base, rope_theta: 500000, rope_scaling: { type: 'llama3', ...scaling } });
    const typed = tk.parseConfig({ ...base, rope_theta: 500000, rope_scaling: { rope_type: 'llama3', ...scaling } });
    const params = tk.parseConfig({ ...base, rope_theta: undefined, rope_scaling: undefined, rope_parameters: { rope_type: 'llama3', rope_theta: 500000, ...scaling } });
    for (const c of [typed, params]) {
      expect(c.ropeTheta).toBe(500000);
      expect(c.ropeScaling).toEqual(classic.ropeScaling);
    }
    expect(classic.ropeScaling).toEqual({ ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 64 });
    expect(tk.parseConfig({ ...base, rope_parameters: { rope_type: 'default', rope_theta: 1e6 } }).ropeScaling).toBeNull();
    expect(() => tk.parseConfig({ ...base, rope_scaling: { type: 'longrope', factor: 2 } })).toThrow(/rope_scaling\.rope_type 'longrope' is not supported/);
    expect(() => tk.parseConfig({ ...base, rope_scaling: { type: 'yarn' } })).toThrow(/rope_scaling\.factor is required/);
  });
});

describe('loader errors name the file, the tensor and the fix', () => {
  it('missing directory or config, malformed config, unsupported model type', async () => {
    await expect(tk.loadModel(join(dir, 'nope'))).rejects.toThrow(/config\.json does not exist/);
    const bad = join(dir, 'bad-config');
    const model = tk.createModel({ preset: 'micro', vocabSize: 20 });
    await tk.saveModel(model, bad);
    model.dispose();
    const config = JSON.parse(await readFile(join(bad, 'config.json'), 'utf8'));
    await writeFile(join(bad, 'config.json'), '{ not json');
    await expect(tk.loadModel(bad)).rejects.toThrow(/not valid JSON/);
    await writeFile(join(bad, 'config.json'), JSON.stringify({ ...config, hidden_size: 'big' }));
    await expect(tk.loadModel(bad)).rejects.toThrow(/hidden_size: .*number/);
    await writeFile(join(bad, 'config.json'), JSON.stringify({ ...config, model_type: 'gpt2' }));
    await expect(tk.loadModel(bad)).rejects.toThrow(/model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3/);
    await writeFile(join(bad, 'config.json'), JSON.stringify({ ...config, num_key_value_heads: 3 }));
    await expect(tk.loadModel(bad)).rejects.toThrow(/multiple of num_key_value_heads/);
  });

  it('a tensor whose name or shape does not match the config', async () => {
    const out = join(dir, 'mismatch');
    const model = tk.createModel({ preset: 'micro', vocabSize: 20 });
    await tk.saveModel(model, out);
    model.dispose();
    const config = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
    await writeFile(join(out, 'config.json'), JSON.stringify({ ...config, intermediate_size: 48 }));
    await expect(tk.loadModel(out)).rejects.toThrow(/tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[64, 32\], but config\.json implies \[48, 32\]/);
    await writeFile(join(out, 'config.json'), JSON.stringify({ ...config, num_hidden_layers: 1 }));
    await expect(tk.loadModel(out)).rejects.toThrow(/tensor 'model\.layers\.1\..*' is not part of a llama model/);
    await writeFile(join(out, 'config.json'), JSON.stringify({ ...config, num_hidden_layers: 3 }));
    await expect(tk.loadModel(out)).rejects.toThrow(/no tensor 'model\.layers\.2\..*', which config\.json implies/);
  });

  it('a missing or malformed adapter', async () => {
    const model = tk.createModel({ preset: 'micro', vocabSize: 20 });
    await expect(tk.loadAdapter(model, join(dir, 'no-adapter'))).rejects.toThrow(/adapter_config\.json does not exist/);
    await expect(tk.saveAdapter(model, join(dir, 'x'))).rejects.toThrow(/no LoRA adapters/);
    model.dispose();
  });
});
