#!/usr/bin/env node
// Long run of the safetensors reader fuzzer (the test suite runs a short one with the same code).
// Usage: node scripts/fuzz-safetensors.mjs [count=100000] [seed=1]
// Runs against dist/ (build first: npx tsc -p .); exits 1 on any failure. Every 100th case goes
// through a real file so the fs path is fuzzed too.
import { formatFuzzReport, runFuzz } from '../dist/io/safetensors-fuzz.js';

const [countArg = '100000', seedArg = '1'] = process.argv.slice(2);
const count = Number(countArg);
const seed = Number(seedArg);
if (!Number.isSafeInteger(count) || count <= 0 || !Number.isSafeInteger(seed) || seed < 0) {
  console.error('usage: node scripts/fuzz-safetensors.mjs [count=100000] [seed=1]');
  process.exit(2);
}

const report = await runFuzz({ seed, count, fileEvery: 100 });
console.log(formatFuzzReport(report));
process.exit(report.failureCount === 0 ? 0 : 1);
