#!/usr/bin/env node
// The tunekit command line. Commands arrive with the issues that build them; this one reports
// what the build and machine offer.
import { info } from '../runtime.js';

const usage = `usage: tunekit <command>

commands:
  info       version, CPU ISA and threads, CUDA devices and cuBLAS (add --json for JSON)
`;

function main(argv: string[]): number {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(usage);
    return command ? 0 : 1;
  }
  if (command === 'info') {
    const i = info();
    if (rest.includes('--json')) {
      process.stdout.write(JSON.stringify(i, null, 2) + '\n');
      return 0;
    }
    const lines = [
      `tunekit ${i.version} (Node-API ${i.napi})`,
      `cpu:  ${i.cpu.isa}${i.cpu.bf16 ? ' + bf16' : ''}, ${i.cpu.threads} threads (detected: ${i.cpu.detected})`,
      `cuda: ${i.cuda.available ? i.cuda.devices.map((d) => `${d.name} (sm_${d.computeCapability.replace('.', '')})`).join(', ') : i.cuda.status ?? 'none'}${i.cuda.compiled ? `, cuBLASLt ${i.cuda.cublas ? 'yes' : 'no'}` : ''}`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    return 0;
  }
  process.stderr.write(`tunekit: unknown command '${command}'\n\n${usage}`);
  return 2;
}

process.exitCode = main(process.argv.slice(2));
