// `npm install` hook: use a prebuilt addon when one loads, else build from source with cmake-js.
// TUNEKIT_NATIVE=path skips the build (the loader uses that file); --from-source (what
// `npm run build:native` passes) or TUNEKIT_BUILD_FROM_SOURCE=1 builds even when a prebuild
// exists. TUNEKIT_CUDA=AUTO|ON|OFF is passed to CMake.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);

function prebuildLoads() {
  const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  if (!existsSync(dir)) return false;
  for (const f of readdirSync(dir).filter((f) => f.endsWith('.node'))) {
    try {
      require(join(dir, f));
      console.log(`tunekit: using the prebuilt addon ${join('prebuilds', `${process.platform}-${process.arch}`, f)}`);
      return true;
    } catch {
      // a prebuild for another libc or Node-API level: try the next, then build
    }
  }
  return false;
}

if (process.env.TUNEKIT_NATIVE && !process.argv.includes('--from-source')) {
  console.log(`tunekit: TUNEKIT_NATIVE is set (${process.env.TUNEKIT_NATIVE}); not building the addon`);
  process.exit(0);
}
const fromSource = process.argv.includes('--from-source') || !!process.env.TUNEKIT_BUILD_FROM_SOURCE;
if (!fromSource && prebuildLoads()) process.exit(0);

const cmake = spawnSync('cmake', ['--version'], { encoding: 'utf8' });
if (cmake.error || cmake.status !== 0) {
  console.error(
    'tunekit: building the native addon needs CMake >= 3.18 and a C++17 compiler, and `cmake` was not found on PATH.\n' +
      'Install CMake (e.g. `apt-get install cmake`, `brew install cmake`, or `pip install cmake`), then run `npm rebuild tunekit`.',
  );
  process.exit(1);
}

const cmakeJs = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js');
const args = [cmakeJs, 'compile'];
const cuda = process.env.TUNEKIT_CUDA;
if (cuda) args.push(`--CDTUNEKIT_CUDA=${cuda}`);
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  console.error('tunekit: building the native addon failed (output above). Fix the error and run `npm rebuild tunekit`.');
  process.exit(r.status ?? 1);
}
