// CMake (through cmake-js) and node-gyp must build the same CPU sources.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');

function cmakeList(text: string, name: string): string[] {
  const m = new RegExp(`set\\(${name}\\s+([^)]*)\\)`).exec(text);
  if (!m) throw new Error(`CMakeLists.txt has no set(${name} ...)`);
  return m[1]!.split(/\s+/).filter(Boolean);
}

it('binding.gyp lists exactly the CMake CPU and addon sources, and they all exist', () => {
  const cmake = readFileSync(join(root, 'CMakeLists.txt'), 'utf8');
  const fromCmake = [...cmakeList(cmake, 'TUNEKIT_CPU_SOURCES'), ...cmakeList(cmake, 'TUNEKIT_ADDON_SOURCES')].sort();
  // binding.gyp is Python-literal JSON with comments.
  const gypText = readFileSync(join(root, 'binding.gyp'), 'utf8').replace(/^\s*#.*$/gm, '');
  const gyp = JSON.parse(gypText) as { targets: { target_name: string; sources: string[] }[] };
  const target = gyp.targets.find((t) => t.target_name === 'tunekit');
  expect(target).toBeDefined();
  expect([...target!.sources].sort()).toEqual(fromCmake);
  expect(fromCmake.length).toBeGreaterThan(5);
  for (const f of fromCmake) expect(existsSync(join(root, f)), f).toBe(true);
  // The CUDA backend is every .cu of native/cuda, in CMake as in scripts/check-cuda-compile.sh.
  expect(cmake).toMatch(/file\(GLOB TUNEKIT_CUDA_SOURCES CONFIGURE_DEPENDS \$\{CMAKE_CURRENT_SOURCE_DIR\}\/native\/cuda\/\*\.cu\)/);
  expect(readFileSync(join(root, 'scripts', 'check-cuda-compile.sh'), 'utf8')).toContain('files=(native/cuda/*.cu)');
  expect(readdirSync(join(root, 'native', 'cuda')).filter((f) => f.endsWith('.cu')).length).toBeGreaterThan(5);
});
