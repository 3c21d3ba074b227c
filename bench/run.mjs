// `npm run bench`: the peak probe first, so every figure reads as a fraction of a measured limit,
// then the kernel benchmarks. Benchmarks report; they never fail on a time.
//   npm run bench                 everything
//   npm run bench -- --quick      small shapes, short runs (a smoke check)
import * as tk from '../dist/index.js';
import { native } from '../dist/native.js';

import { benchAttention } from './attention.mjs';
import { benchGemm } from './gemm.mjs';
import { benchLinearLoss } from './linear-loss.mjs';
import { benchLoadMemory } from './load-memory.mjs';
import { benchOps } from './ops.mjs';
import { benchQlora } from './qlora.mjs';
import { benchTrainStep } from './train-step.mjs';

const quick = process.argv.includes('--quick');
const info = tk.info();
console.log(`tunekit ${info.version} | cpu ${info.cpu.isa}${info.cpu.bf16 ? '+bf16' : ''}, ${info.cpu.threads} threads | cuda ${info.cuda.available ? info.cuda.devices.map((d) => d.name).join(', ') : 'none'}`);

const peak = native().probe(quick ? 0.2 : 1, quick ? 64 << 20 : 512 << 20);
console.log(`peak probe: fp32 FMA ${peak.fp32Gflops.toFixed(0)} GFLOP/s` +
  (peak.bf16Gflops ? `, bf16 dot product ${peak.bf16Gflops.toFixed(0)} GFLOP/s` : '') +
  ` (${peak.isa}, ${peak.threads} threads), ` +
  `read ${peak.readGBs.toFixed(1)} GB/s, copy ${peak.copyGBs.toFixed(1)} GB/s (read + write)`);

await benchGemm({ peak, quick });
await benchOps({ peak, quick });
await benchAttention({ peak, quick });
await benchQlora({ quick });
benchLinearLoss({ quick });
if (!quick) await benchLoadMemory();
await benchTrainStep({ quick });
