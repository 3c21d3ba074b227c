// tunekit's side of issue 8 (b)-(d), through the public API on one device, on the shapes of
// bench/torch_cuda_kernels.py (PyTorch's side) and the native --perf tests:
//   (b) NF4 dequantization GB/s (packed codes + absmax state read, bf16 written) next to the device
//       copy bandwidth measured the same way (x.to('bf16') of a bf16 tensor: tunekit's copy kernel,
//       bytes read + written). Goal: dequant >= 80% of copy.
//   (c) qloraLinear forward + backward (dx, dA, dB) over the dense bf16 layer of the same shape
//       through tk.ops.matmul forward + backward with W frozen (dx only). Goal: ratio <= 1.3.
//   (d) linearCrossEntropy forward + backward (fused, chunked) against tunekit's own materialized
//       path (matmul to [N, V] logits, then crossEntropy), head frozen (LoRA SFT: dh) and trained
//       (dh and dW): time, and the peak of tunekit's allocator above what was allocated before the
//       call. PyTorch's materialized cross entropy is in the torch script; goal: fused <= 1/4 of its
//       memory and <= 1.2x its time.
// Times: each repetition runs the op `inner` times between two tk.synchronize calls (inner grows
// until a repetition takes ~20 ms, so a sync's own cost stays small), and the figure is the median
// per call over the repetitions, after a warm-up. Inputs are random, never zeros.
//
// Memory: tk.memory()'s allocator peak, which counts every tensor and the kernels' scratch (the
// CUDA kernels take it from the same caching allocator).
//
//   node bench/cuda-kernels.mjs                      the shapes on 'cuda'
//   node bench/cuda-kernels.mjs --device cpu         small shapes: checks that everything runs
//   node bench/cuda-kernels.mjs --device cuda --small
// Prints readable lines, then one JSON line (the last line of stdout) with every figure.
import * as tk from '../dist/index.js';

const argv = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const device = (() => {
  const d = arg('device', 'cuda');
  return d === 'cuda' ? 'cuda:0' : d;
})();
const small = argv.includes('--small') || device === 'cpu';
const reps = Number(arg('reps', small ? 3 : 10));

const shapes = small
  ? { copyMiB: 8, nf4: [[256, 512], [512, 1024]], qlora: [[64, 128, 128, 16], [64, 128, 256, 16]], ce: [256, 64, 1000] }
  : {
      copyMiB: 1024,
      // 4096 x 4096 bf16 (32 MiB) fits the H100's 50 MB L2: the 8192 x 28672 row is the DRAM figure.
      nf4: [[4096, 4096], [8192, 28672]],
      qlora: [[2048, 4096, 4096, 16], [4096, 4096, 4096, 16], [2048, 4096, 14336, 16], [4096, 4096, 14336, 16]],
      ce: [8192, 4096, 128256],
    };

const sync = () => tk.synchronize(device);
const mem = () => tk.memory()[device] ?? { allocatedBytes: 0, peakAllocatedBytes: 0 };

/** Median seconds per call of fn (which must leave nothing behind), after a warm-up call. */
function timeOp(fn) {
  fn();
  sync();
  let t0 = performance.now();
  fn();
  sync();
  const once = (performance.now() - t0) / 1e3;
  const inner = Math.max(1, Math.min(50, Math.ceil(0.02 / Math.max(once, 1e-6))));
  const per = [];
  for (let r = 0; r < reps; r++) {
    t0 = performance.now();
    for (let i = 0; i < inner; i++) fn();
    sync();
    per.push((performance.now() - t0) / 1e3 / inner);
  }
  per.sort((a, b) => a - b);
  return per[Math.floor(per.length / 2)];
}

/** Bytes tunekit's allocator peaked at above its allocation before fn, for one call of fn. */
function peakAbove(fn) {
  sync();
  const base = mem().allocatedBytes;
  tk.resetPeakMemory(device);
  fn();
  sync();
  return mem().peakAllocatedBytes - base;
}

const info = tk.info();
const devName = device === 'cpu' ? `cpu ${info.cpu.isa}, ${info.cpu.threads} threads` : (info.cuda.devices[Number(device.split(':')[1] ?? 0)]?.name ?? device);
if (device !== 'cpu' && !info.cuda.available) {
  console.error(`cuda-kernels: no usable CUDA device (${info.cuda.status ?? 'compiled without CUDA'})`);
  process.exit(1);
}
console.log(`tunekit ${info.version} kernels on ${devName} (median of ${reps})`);
const MiB = 2 ** 20;
const result = { bench: 'tunekit_cuda_kernels', version: info.version, device: devName, reps };

// ---- (b) copy bandwidth and NF4 dequantization --------------------------------------------------
{
  const n = (shapes.copyMiB * MiB) / 2;
  const src = tk.randn([n], { dtype: 'bf16', device, seed: 1 });
  const t = timeOp(() => src.to('bf16').dispose());
  src.dispose();
  result.copy = { bytes: n * 2, ms: t * 1e3, gbs: (4 * n) / t / 1e9 };
  console.log(`  copy bf16 ${shapes.copyMiB} MiB (x.to('bf16')): ${(t * 1e3).toFixed(3)} ms, ${result.copy.gbs.toFixed(0)} GB/s (read + write)`);
}
result.nf4 = [];
for (const [rows, cols] of shapes.nf4) {
  const w = tk.randn([rows, cols], { dtype: 'bf16', device, seed: 2, std: 0.02 });
  const q = tk.nf4.quantize(w);  // block 64, double quantization: QLoRA's storage
  const tq = timeOp(() => tk.nf4.quantize(w).dispose());
  w.dispose();
  const t = timeOp(() => tk.nf4.dequantize(q, { dtype: 'bf16' }).dispose());
  // The copy of the dequantized size, so that both sit at the same point of the cache hierarchy.
  const out = tk.nf4.dequantize(q, { dtype: 'bf16' });
  const tc = timeOp(() => out.to('bf16').dispose());
  out.dispose();
  const moved = q.bytes + rows * cols * 2;
  const row = { rows, cols, quantize_ms: tq * 1e3, dequant_ms: t * 1e3, dequant_gbs: moved / t / 1e9, copy_gbs: (4 * rows * cols) / tc / 1e9 };
  row.ratio_vs_copy = row.dequant_gbs / row.copy_gbs;
  row.ratio_vs_big_copy = row.dequant_gbs / result.copy.gbs;
  q.dispose();
  result.nf4.push(row);
  console.log(`  nf4 [${rows}, ${cols}] dq: dequantize -> bf16 ${row.dequant_ms.toFixed(3)} ms ${row.dequant_gbs.toFixed(0)} GB/s;` +
    ` copy of the output size ${row.copy_gbs.toFixed(0)} GB/s; ratio ${row.ratio_vs_copy.toFixed(2)} (vs the ${shapes.copyMiB} MiB copy ${row.ratio_vs_big_copy.toFixed(2)});` +
    ` quantize ${row.quantize_ms.toFixed(3)} ms`);
}

// ---- (c) qloraLinear against the dense bf16 layer ---------------------------------------------
result.qlora = [];
for (const [N, IN, OUT, R] of shapes.qlora) {
  const w = tk.randn([OUT, IN], { dtype: 'bf16', device, seed: 3, std: 0.02 });
  const q = tk.nf4.quantize(w);
  const x = tk.randn([N, IN], { dtype: 'bf16', device, seed: 4, requiresGrad: true });
  // A and B both random (PEFT starts B at zero; the arithmetic is the same either way).
  const a = tk.randn([R, IN], { dtype: 'bf16', device, seed: 5, std: 0.02, requiresGrad: true });
  const b = tk.randn([OUT, R], { dtype: 'bf16', device, seed: 6, std: 0.02, requiresGrad: true });
  const dy = tk.randn([N, OUT], { dtype: 'bf16', device, seed: 7 });
  const clear = () => {
    for (const t of [x, a, b]) t.grad = null;
  };
  const dense = () => tk.ops.matmul(x, w, { transB: true });
  const qlora = () => tk.ops.qloraLinear(x, q, a, b, { scale: 2 });
  const fwd = (f) => () => tk.tidy(() => void tk.noGrad(f));
  const fwdBwd = (f) => () => {
    tk.tidy(() => f().backward(dy));
    clear();
  };
  const row = {
    N, in: IN, out: OUT, r: R,
    dense_fwd_ms: timeOp(fwd(dense)) * 1e3,
    qlora_fwd_ms: timeOp(fwd(qlora)) * 1e3,
    dense_fwd_bwd_ms: timeOp(fwdBwd(dense)) * 1e3,
    qlora_fwd_bwd_ms: timeOp(fwdBwd(qlora)) * 1e3,
  };
  row.fwd_ratio = row.qlora_fwd_ms / row.dense_fwd_ms;
  row.fwd_bwd_ratio = row.qlora_fwd_bwd_ms / row.dense_fwd_bwd_ms;
  result.qlora.push(row);
  for (const t of [w, x, a, b, dy]) t.dispose();
  q.dispose();
  console.log(`  qlora N ${N} in ${IN} out ${OUT} r ${R}: fwd ${row.qlora_fwd_ms.toFixed(3)} ms / dense ${row.dense_fwd_ms.toFixed(3)} ms = ${row.fwd_ratio.toFixed(2)};` +
    ` fwd+bwd ${row.qlora_fwd_bwd_ms.toFixed(3)} ms / dense fwd+dx ${row.dense_fwd_bwd_ms.toFixed(3)} ms = ${row.fwd_bwd_ratio.toFixed(2)}`);
}

// ---- (d) linearCrossEntropy against materialized logits -----------------------------------------
result.ce = [];
{
  const [N, D, V] = shapes.ce;
  const targets = tk.tensor(Int32Array.from({ length: N }, (_, i) => (i * 7919 + 13) % V), [N], { dtype: 'i32', device });
  for (const trainHead of [false, true]) {
    const h = tk.randn([N, D], { dtype: 'bf16', device, seed: 8, requiresGrad: true });
    const w = tk.randn([V, D], { dtype: 'bf16', device, seed: 9, std: 2.5 / Math.sqrt(D), requiresGrad: trainHead });
    const run = (f) => () => {
      tk.tidy(() => f().backward());
      h.grad = null;
      w.grad = null;
    };
    const fused = run(() => tk.ops.linearCrossEntropy(h, w, targets));
    const materialized = run(() => tk.ops.crossEntropy(tk.ops.matmul(h, w, { transB: true }), targets));
    const row = { head: trainHead ? 'trained' : 'frozen', N, D, V };
    row.fused_ms = timeOp(fused) * 1e3;
    row.fused_peak_bytes = peakAbove(fused);
    row.materialized_ms = timeOp(materialized) * 1e3;
    row.materialized_peak_bytes = peakAbove(materialized);
    row.time_ratio = row.fused_ms / row.materialized_ms;
    row.memory_ratio = row.fused_peak_bytes / row.materialized_peak_bytes;
    result.ce.push(row);
    h.dispose();
    w.dispose();
    console.log(`  linearCrossEntropy N ${N} D ${D} V ${V}, head ${row.head}: fused ${row.fused_ms.toFixed(2)} ms, ${(row.fused_peak_bytes / MiB).toFixed(0)} MiB;` +
      ` materialized ${row.materialized_ms.toFixed(2)} ms, ${(row.materialized_peak_bytes / MiB).toFixed(0)} MiB;` +
      ` time ratio ${row.time_ratio.toFixed(2)}, memory ratio ${row.memory_ratio.toFixed(3)} (allocator peaks above the inputs)`);
  }
  targets.dispose();
}
console.log(JSON.stringify(result));
