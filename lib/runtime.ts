import { native, type NativeInfo, type NativeMemory } from './native.js';
import { checkDevice } from './tensor.js';
import { version } from './version.js';

export type Info = NativeInfo & { version: string; napi: number };

/** What this build and machine offer: version, CPU ISA in use, threads, bf16 support, CUDA devices and cuBLAS. */
export function info(): Info {
  const n = native();
  return { version, napi: n.napiVersion, ...n.info() };
}

/** Live tensors and bytes per device ('cpu', 'cuda:0', ...), plus the caching allocator's figures. */
export function memory(): Record<string, NativeMemory> {
  return native().memory();
}

/** Threads the CPU kernels use (takes effect for work queued after this call). */
export function setThreads(threads: number): void {
  if (!Number.isInteger(threads) || threads < 1 || threads > 1024) throw new RangeError(`setThreads: threads must be an integer from 1 to 1024, got ${threads}`);
  native().setThreads(threads);
}

/**
 * Waits for the device's queue, then restarts its peakAllocatedBytes (tk.memory()) at the bytes
 * allocated now, so that a phase's peak can be measured on its own.
 */
export function resetPeakMemory(device = 'cpu'): void {
  native().resetPeakMemory(checkDevice(device, 'resetPeakMemory'));
}

/** Waits until all work queued on `device` has run; rethrows a deferred device error. */
export function synchronize(device = 'cpu'): void {
  native().synchronize(checkDevice(device, 'synchronize'));
}
