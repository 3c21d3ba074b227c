// Builds the native kernel test binary with CMake (no Node involved in the binary) and runs it.
// Arguments after the script's own are passed to the binary (--perf, --grad, --filter=...).
//   node scripts/native-tests.mjs              build, then run correctness and gradient modes
//   node scripts/native-tests.mjs --perf       build, then run the perf mode
//   node scripts/native-tests.mjs --build-only
import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const build = join(root, 'build-tests');
const args = process.argv.slice(2);

function run(cmd, argv) {
  const r = spawnSync(cmd, argv, { cwd: root, stdio: 'inherit' });
  if (r.error) {
    console.error(`native tests: could not run ${cmd}: ${r.error.message}`);
    process.exit(1);
  }
  if (r.status !== 0) process.exit(r.status ?? 1);
}

run('cmake', ['-S', root, '-B', build, '-DTUNEKIT_NATIVE_TESTS=ON', `-DTUNEKIT_CUDA=${process.env.TUNEKIT_CUDA ?? 'OFF'}`, '-DCMAKE_BUILD_TYPE=Release']);
run('cmake', ['--build', build, '--target', 'tunekit_native_tests', '-j', String(Math.max(1, cpus().length))]);
if (args.includes('--build-only')) process.exit(0);
const binary = join(build, 'tunekit_native_tests');
if (args.length) {
  run(binary, args);
} else {
  run(binary, []);
  run(binary, ['--grad']);
}
