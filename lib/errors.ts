/** Thrown when a tensor is used after `dispose()`. */
export class DisposedError extends Error {
  constructor(what: string) {
    super(`${what}: the tensor has been disposed; keep it alive (scope.keep(t), or return it from tidy) or use it before dispose()`);
    this.name = 'DisposedError';
  }
}

/** Thrown when the native addon cannot be loaded; the message lists what was tried and the fix. */
export class NativeLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NativeLoadError';
  }
}
