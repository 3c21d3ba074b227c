import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    setupFiles: ['tests/setup.ts'],
    // One process per file: the addon's runtime is per process, and forks keep files independent.
    pool: 'forks',
    testTimeout: 60_000,
  },
});
