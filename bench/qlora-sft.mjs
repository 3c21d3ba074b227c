// tunekit's side of issue 8 (e): QLoRA SFT throughput and peak memory of a Llama-shaped model with
// random weights, beside PEFT LoRA in bf16 with PyTorch (bench/torch_lora_sft.py, same arguments).
//
// The model: tk.createModel(config, { device, dtype: 'bf16', quantize: 'nf4', seed }): every linear
// layer of the decoder NF4 (block 64, double quantization), embeddings, norms and the LM head bf16.
// LoRA on all seven projections (r 16, alpha 32, no dropout; f32 adapter weights cast to bf16 in
// the forward, as PEFT's autocast_adapter_dtype keeps them), trained with tk.optim.AdamW. One
// step is what lib/train/trainer.ts does for one micro-batch plus its optimizer step:
//   h = model.hidden(ids, { checkpointLayers }); loss = linearCrossEntropy(h, model.lmHeadWeight,
//   targets); loss.backward(); clipGradNorm(1); AdamW step; zeroGrad
// on a fresh batch of random token ids (targets = the next id, the last position ignored, as HF's
// shifted labels). Each step ends with tk.synchronize; the figure is the median step after warm-up.
//
// Memory: tk.memory()[device].peakAllocatedBytes over the timed steps (tunekit's allocator:
// weights, adapter, optimizer moments, activations, kernel scratch), beside
// torch.cuda.max_memory_allocated; scripts/gpu-measure.sh also samples the whole process's device
// memory with nvidia-smi.
//
//   node bench/qlora-sft.mjs --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8 \
//     --vocab 128256 --seq 2048 --batch 4 --tie-word-embeddings
//   node bench/qlora-sft.mjs --device cpu --hidden 64 --intermediate 128 --layers 2 --heads 4 \
//     --kv-heads 2 --vocab 512 --seq 32 --batch 2 --steps 3 --warmup 1
// Prints readable lines, then one JSON line (the last line of stdout) with every figure.
import * as tk from '../dist/index.js';

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const flag = (name) => argv.includes(`--${name}`);
const num = (name, dflt) => {
  const v = Number(opt(name, dflt));
  if (!Number.isFinite(v)) throw new RangeError(`qlora-sft: --${name} must be a number`);
  return v;
};

const a = {
  hidden: num('hidden', 2048),
  intermediate: num('intermediate', 8192),
  layers: num('layers', 16),
  heads: num('heads', 32),
  kvHeads: num('kv-heads', 8),
  vocab: num('vocab', 128256),
  tie: flag('tie-word-embeddings'),
  seq: num('seq', 2048),
  batch: num('batch', 4),
  steps: num('steps', 5),
  warmup: num('warmup', 2),
  budgetS: num('budget-s', 0),
  r: num('r', 16),
  alpha: num('alpha', 32),
  lr: num('lr', 1e-4),
  seed: num('seed', 0),
  dtype: opt('dtype', 'bf16'),
  quantize: !flag('no-quantize'),
  checkpointLayers: flag('checkpoint-layers') || flag('grad-checkpointing'),
};
const device = (() => {
  const d = opt('device', 'cuda');
  return d === 'cuda' ? 'cuda:0' : d;
})();

const info = tk.info();
if (device !== 'cpu' && !info.cuda.available) {
  console.error(`qlora-sft: no usable CUDA device (${info.cuda.status ?? 'compiled without CUDA'})`);
  process.exit(1);
}
const devName = device === 'cpu' ? `cpu ${info.cpu.isa}, ${info.cpu.threads} threads` : (info.cuda.devices[Number(device.split(':')[1])]?.name ?? device);
const mem = () => tk.memory()[device] ?? { allocatedBytes: 0, peakAllocatedBytes: 0 };
const sync = () => tk.synchronize(device);

// ---- the model ---------------------------------------------------------------------------------
const config = {
  model_type: 'llama',
  vocab_size: a.vocab,
  hidden_size: a.hidden,
  intermediate_size: a.intermediate,
  num_hidden_layers: a.layers,
  num_attention_heads: a.heads,
  num_key_value_heads: a.kvHeads,
  max_position_embeddings: Math.max(2048, a.seq),
  rms_norm_eps: 1e-5,
  tie_word_embeddings: a.tie,
};
const built = performance.now();
const model = tk.createModel(config, { device, dtype: a.dtype, ...(a.quantize ? { quantize: 'nf4' } : {}), seed: a.seed });
tk.applyLora(model, { r: a.r, alpha: a.alpha, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed: a.seed + 1 });
model.train();
sync();
const buildSeconds = (performance.now() - built) / 1e3;

const params = model.trainableParameters().map(([, t]) => t);
const trainable = params.reduce((s, t) => s + t.size, 0);
const quantizedElems = model.linearLayers().reduce((s, [, l]) => s + (l.quantized ? l.outFeatures * l.inFeatures : 0), 0);
const total = model.parameters().reduce((s, t) => s + t.size, 0) - trainable + quantizedElems;
const optimizer = new tk.optim.AdamW(params, { lr: a.lr, weightDecay: 0.01 });

// ---- data: random ids, targets the next id (the last position ignored) -------------------------
let state = (a.seed * 2654435761 + 12345) >>> 0;
const rand = () => {
  // xorshift32: the ids only need to be spread over the vocabulary.
  state ^= state << 13;
  state >>>= 0;
  state ^= state >>> 17;
  state ^= state << 5;
  state >>>= 0;
  return state;
};
function batch() {
  const [B, T] = [a.batch, a.seq];
  const ids = new Int32Array(B * T), targets = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) ids[b * T + t] = rand() % a.vocab;
    for (let t = 0; t < T; t++) targets[b * T + t] = t + 1 < T ? ids[b * T + t + 1] : -100;
  }
  return { ids, targets };
}

function step(data) {
  const loss = tk.tidy(() => {
    const ids = tk.tensor(data.ids, [a.batch, a.seq], { dtype: 'i32', device });
    const targets = tk.tensor(data.targets, [a.batch, a.seq], { dtype: 'i32', device });
    const h = model.hidden(ids, { checkpointLayers: a.checkpointLayers });
    const l = tk.ops.linearCrossEntropy(h, model.lmHeadWeight, targets);
    l.backward();
    return l.detach();
  });
  tk.optim.clipGradNorm(params, 1).dispose();
  optimizer.step();
  optimizer.zeroGrad();
  return loss;
}

const losses = [];
const readLoss = (t) => {
  losses.push(t.toArraySync()[0]);
  t.dispose();
};
for (let i = 0; i < a.warmup; i++) {
  readLoss(step(batch()));
}
sync();
const resident = mem().allocatedBytes;
tk.resetPeakMemory(device);
const times = [];
const started = performance.now();
for (let i = 0; i < a.steps; i++) {
  const data = batch();  // made before the clock starts
  const t0 = performance.now();
  const l = step(data);
  sync();
  times.push((performance.now() - t0) / 1e3);
  readLoss(l);
  if (a.budgetS > 0 && (performance.now() - started) / 1e3 > a.budgetS) break;
}
const peak = mem().peakAllocatedBytes;
const sorted = [...times].sort((x, y) => x - y);
const med = sorted[Math.floor(sorted.length / 2)];
const tokens = a.batch * a.seq;

const res = {
  bench: 'tunekit_qlora_sft',
  version: info.version,
  device: devName,
  shape: { hidden: a.hidden, intermediate: a.intermediate, layers: a.layers, heads: a.heads, kv_heads: a.kvHeads, vocab: a.vocab, tie_word_embeddings: a.tie },
  seq: a.seq,
  batch: a.batch,
  dtype: a.dtype,
  quantize: a.quantize ? 'nf4' : null,
  checkpoint_layers: a.checkpointLayers,
  lora: { r: a.r, alpha: a.alpha, adapter_dtype: params[0]?.dtype ?? 'none' },
  params_total: total,
  params_trainable: trainable,
  build_s: buildSeconds,
  steps_timed: times.length,
  warmup: a.warmup,
  step_ms: { median: med * 1e3, min: sorted[0] * 1e3, max: sorted[sorted.length - 1] * 1e3 },
  tokens_per_s: tokens / med,
  peak_bytes: peak,
  resident_bytes_after_warmup: resident,
  loss_first: losses[0],
  loss_last: losses[losses.length - 1],
};
const GiB = 2 ** 30;
console.log(`tunekit QLoRA SFT on ${devName}, tunekit ${info.version}`);
console.log(`  llama d${a.hidden} i${a.intermediate} L${a.layers} h${a.heads}/${a.kvHeads} V${a.vocab}${a.tie ? ' tied' : ''}, ${(total / 1e9).toFixed(3)}B params` +
  ` (${a.quantize ? 'nf4' : a.dtype} linears), ${(trainable / 1e6).toFixed(2)}M trainable (${res.lora.adapter_dtype}), batch ${a.batch} x ${a.seq}${a.checkpointLayers ? ', checkpointed layers' : ''}; built in ${buildSeconds.toFixed(1)} s`);
console.log(`  step ${(med * 1e3).toFixed(1)} ms median of ${times.length} (min ${(sorted[0] * 1e3).toFixed(1)}), ${Math.round(tokens / med).toLocaleString('en-US')} tokens/s;` +
  ` peak ${(peak / GiB).toFixed(2)} GiB allocated (${(resident / GiB).toFixed(2)} GiB resident after warm-up); loss ${losses[0]?.toFixed(3)} -> ${losses[losses.length - 1]?.toFixed(3)}`);
console.log(JSON.stringify(res));
optimizer.dispose();
model.dispose();
