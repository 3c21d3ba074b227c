// Shared pieces of the CUDA kernel tests (built only with the CUDA backend): device buffers that
// copy to and from host vectors, and the rule that a machine without a usable device skips the
// CUDA tests (saying so once) instead of failing them. The tests compare every CUDA kernel with
// the double-precision references of native/ref, like the CPU tests, with tolerances a small
// multiple of a naive same-precision kernel's error (DESIGN.md).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "native/core/dtype.h"
#include "native/cuda/device.h"
#include "native/tests/harness.h"

namespace tk::test::cuda {

// True when a CUDA device is usable; prints the skip reason once otherwise.
inline bool available() {
  static const bool ok = [] {
    bool usable = tk::cuda::device_count() > 0;
    if (!usable) std::printf("  (CUDA tests skipped: %s)\n", tk::cuda::driver_status().c_str());
    return usable;
  }();
  return ok;
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device buffer of n elements of `dtype`, filled from / read back as doubles.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t n, DType dtype) : n_(n), dtype_(dtype) {
    check(cudaMalloc(&ptr_, bytes() ? bytes() : 1), "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  size_t n() const { return n_; }
  DType dtype() const { return dtype_; }
  size_t bytes() const { return n_ * dtype_size(dtype_); }
  void* data() const { return ptr_; }

  void set(const std::vector<double>& v) {
    std::vector<uint8_t> host(bytes());
    from_double(v, host.data(), dtype_);
    check(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void set_bytes(const void* src) { check(cudaMemcpy(ptr_, src, bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D"); }
  std::vector<double> values() const {
    std::vector<uint8_t> host(bytes());
    check(cudaDeviceSynchronize(), "kernel");
    check(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return to_double(host.data(), dtype_, n_);
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> host(bytes());
    check(cudaDeviceSynchronize(), "kernel");
    check(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }

 private:
  size_t n_;
  DType dtype_;
  void* ptr_ = nullptr;
};

}  // namespace tk::test::cuda
