// TensorView: what a kernel sees of a tensor. A pointer, a dtype, a device, and up to kMaxDims
// sizes with strides counted in elements (not bytes). Views never own memory; ownership lives in
// core/storage (Buffer) and is released through the device queue, so that a buffer outlives every
// kernel queued against it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"

namespace tk {

enum class DeviceType : uint8_t { CPU = 0, CUDA = 1 };

// CPU index 1 is the CUDA stand-in ('cuda-standin'), a device for testing device placement on
// machines without a GPU: its memory and kernels are the CPU's, but it is a device of its own (an
// op mixing it with 'cpu' tensors fails as it would with 'cuda'), and an op runs on it only if the
// op has a CUDA kernel in this build. So a training run on the stand-in proves that every tensor
// lands on the model's device and every op it uses exists on CUDA; it proves nothing about the
// CUDA kernels themselves. It exists only in a CUDA build with TUNEKIT_CUDA_STANDIN=1 set.
constexpr int kCudaStandinIndex = 1;

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  bool is_cuda_standin() const { return type == DeviceType::CPU && index == kCudaStandinIndex; }
  std::string name() const {
    if (type == DeviceType::CUDA) return "cuda:" + std::to_string(index);
    return is_cuda_standin() ? "cuda-standin" : "cpu";
  }
};

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Row-major strides for a shape.
inline void contiguous_strides(int ndim, const int64_t* shape, int64_t* strides) {
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
}

inline TensorView make_view(void* data, DType dtype, Device dev, const std::vector<int64_t>& shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = dev;
  v.ndim = int(shape.size());
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = shape[i];
  contiguous_strides(v.ndim, v.shape, v.strides);
  return v;
}

// "[2, 3, 4] f32" — for error messages.
inline std::string describe(const TensorView& v) {
  std::string s = "[";
  for (int i = 0; i < v.ndim; ++i) s += (i ? ", " : "") + std::to_string(v.shape[i]);
  return s + "] " + dtype_name(v.dtype);
}

}  // namespace tk
