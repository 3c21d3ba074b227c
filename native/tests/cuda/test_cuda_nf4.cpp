// Tests of cuda/nf4_kernels against the CPU kernels of cpu/nf4 (themselves tested against
// ref/nf4_ref by test_nf4.cpp): the CUDA results must be the CPU's, byte for byte.
//
// - Quantize: packed codes, fp32 absmax, and with double quantization the 8-bit codes, scale2 and
//   the offset, compared bit for bit with nf4_quantize_cpu on: numel 1, 2, 97, 1025, 64*257 and
//   64*257+37 (a ragged last block, an odd numel), block sizes 2, 6 (neither a power of two nor a
//   multiple of 8), 32, 46, 64, 128, 2048 (the largest warp-per-block size) and 4096 (a CTA per
//   block), f32 and bf16 weights, adversarial values (every code, every fp32 threshold and its
//   neighbours, midpoints, signed zeros, an all-zero block, a block of subnormals, a tiny normal
//   absmax, negative-only blocks), 70000 blocks (grid-strided kernels, 274 double-quant
//   256-blocks), and absmaxes spread over 12 decades so that the offset's double sum must take the
//   sequential (CPU-order) path rather than the provably exact parallel one.
// - Dequantize: f32 and bf16 outputs equal nf4_dequantize_cpu's bytes, with and without double
//   quantization, for the same sizes and block sizes, at an aligned output (vector path) and an
//   output one element off (element path). Windows of W [rows, cols] (whole-row ranges, column
//   ranges whose rows straddle quantization blocks, vector-friendly windows) equal the matching
//   slice of the CPU result. nf4_absmax_cuda equals nf4_absmax_cpu. Outputs sit between guards.
// - Argument errors are tk::Errors, thrown before anything is issued.
// - --perf: dequantize GB/s (bytes read + written) next to cudaMemcpy device-to-device bandwidth
//   (2 x bytes copied per second) of the dequantized size, on 4096 x 4096 and 8192 x 28672
//   weights, and quantize time; medians of CUDA-event-timed runs. Issue 8 (b) reads the bf16, dq
//   line of the large shape (the 4096 x 4096 output fits a Hopper L2, so both of its figures are
//   cache figures). Each line is followed by a "perf-json {...}" line for scripts/gpu-measure.sh.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/cpu/nf4.h"
#include "native/cuda/nf4_kernels.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;
using tk::test::cuda::DeviceBuffer;

namespace {

void ck(cudaError_t e, const char* what) { tk::test::cuda::check(e, what); }

// Device memory with guard bytes on both sides; the payload may start `misalign` bytes past a
// 256-byte boundary.
class DeviceGuarded {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  explicit DeviceGuarded(size_t bytes, size_t misalign = 0)
      : bytes_(bytes), off_(kGuard + misalign), buf_(kGuard + misalign + bytes + kGuard, DType::U8) {
    ck(cudaMemset(buf_.data(), kPattern, buf_.bytes()), "cudaMemset");
  }
  template <class T = void>
  T* data() const { return reinterpret_cast<T*>(static_cast<unsigned char*>(buf_.data()) + off_); }
  size_t bytes() const { return bytes_; }
  void upload(const void* src) { ck(cudaMemcpy(data(), src, bytes_, cudaMemcpyHostToDevice), "cudaMemcpy H2D"); }
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> all = buf_.raw();
    return std::vector<unsigned char>(all.begin() + long(off_), all.begin() + long(off_ + bytes_));
  }
  bool intact() const {
    std::vector<unsigned char> all = buf_.raw();
    for (size_t i = 0; i < off_; ++i)
      if (all[i] != kPattern) return false;
    for (size_t i = off_ + bytes_; i < all.size(); ++i)
      if (all[i] != kPattern) return false;
    return true;
  }

 private:
  size_t bytes_, off_;
  DeviceBuffer buf_;
};

template <class T>
std::vector<unsigned char> bytes_of(const std::vector<T>& v) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v.data());
  return std::vector<unsigned char>(p, p + v.size() * sizeof(T));
}

// The buffers of one quantized tensor on the host.
struct HostQuant {
  Nf4Layout l;
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax, scale2;
  float offset = 0.0f;
  HostQuant(int64_t numel, int64_t block, bool dq) : l(nf4_layout(numel, block, dq)) {
    packed.resize(size_t(l.packed_bytes));
    if (dq) {
      qabsmax.resize(size_t(l.nblocks));
      scale2.resize(size_t(l.nblocks2));
    } else {
      absmax.resize(size_t(l.nblocks));
    }
  }
  Nf4Out out() {
    Nf4Out o;
    o.packed = packed.data();
    if (l.double_quant) {
      o.qabsmax = qabsmax.data();
      o.scale2 = scale2.data();
      o.offset = &offset;
    } else {
      o.absmax = absmax.data();
    }
    return o;
  }
  Nf4In in() const {
    Nf4In i;
    i.packed = packed.data();
    i.absmax = absmax.empty() ? nullptr : absmax.data();
    i.qabsmax = qabsmax.empty() ? nullptr : qabsmax.data();
    i.scale2 = scale2.empty() ? nullptr : scale2.data();
    i.offset = l.double_quant ? &offset : nullptr;
    return i;
  }
};

// The same buffers in guarded device memory.
struct DevQuant {
  Nf4Layout l;
  DeviceGuarded packed, absmax, scale2, offset;
  explicit DevQuant(const Nf4Layout& layout)
      : l(layout),
        packed(size_t(layout.packed_bytes)),
        absmax(size_t(layout.absmax_bytes)),
        scale2(size_t(layout.scale2_bytes)),
        offset(4) {}
  Nf4Out out() const {
    Nf4Out o;
    o.packed = packed.data<uint8_t>();
    if (l.double_quant) {
      o.qabsmax = absmax.data<uint8_t>();
      o.scale2 = scale2.data<float>();
      o.offset = offset.data<float>();
    } else {
      o.absmax = absmax.data<float>();
    }
    return o;
  }
  Nf4In in() const {
    const Nf4Out o = out();
    Nf4In i;
    i.packed = o.packed;
    i.absmax = o.absmax;
    i.qabsmax = o.qabsmax;
    i.scale2 = o.scale2;
    i.offset = o.offset;
    return i;
  }
  void upload(const HostQuant& h) {
    packed.upload(h.packed.data());
    if (l.double_quant) {
      absmax.upload(h.qabsmax.data());
      scale2.upload(h.scale2.data());
      offset.upload(&h.offset);
    } else {
      absmax.upload(h.absmax.data());
    }
  }
  bool intact() const { return packed.intact() && absmax.intact() && scale2.intact() && offset.intact(); }
};

float next_up(float x) { return std::nextafter(x, 2.0f); }
float next_down(float x) { return std::nextafter(x, -2.0f); }

// Blocks of 64 with a +-1 anchor (absmax exactly 1) holding every code, every threshold and its
// neighbours, midpoints and signed zeros; then a zero block, a subnormal-only block, a tiny normal
// absmax, negative-only blocks and a ragged tail of 37.
std::vector<double> adversarial_tensor() {
  std::vector<double> unit;
  for (int k = 0; k < 16; ++k) unit.push_back(kNf4Code[k]);
  for (int k = 0; k < 15; ++k) {
    const float t = kNf4Thresholds[k];
    for (float x : {t, next_up(t), next_down(t), next_up(next_up(t)), next_down(next_down(t))}) unit.push_back(x);
    unit.push_back(0.5 * (double(kNf4Code[k]) + double(kNf4Code[k + 1])));
  }
  unit.push_back(0.0);
  unit.push_back(-0.0);
  unit.push_back(next_down(1.0f));
  unit.push_back(-double(next_down(1.0f)));
  std::vector<double> w;
  size_t u = 0;
  for (int b = 0; b < 6; ++b) {
    w.push_back(b % 2 ? -1.0 : 1.0);
    for (int i = 1; i < 64; ++i) w.push_back(unit[u++ % unit.size()]);
  }
  for (int i = 0; i < 64; ++i) w.push_back(0.0);
  for (int i = 0; i < 64; ++i) w.push_back(i % 3 ? 1e-40 * (i % 5) : -1e-41);  // subnormal f32 only
  for (int i = 0; i < 64; ++i) w.push_back(i == 9 ? 1e-30 : 0.0);
  for (int i = 0; i < 64; ++i) w.push_back(-0.01 * double(1 + (i * 37) % 64));
  for (int i = 0; i < 64; ++i) w.push_back(i == 5 ? -3.0 : -1e-3 * i);
  for (int i = 0; i < 37; ++i) w.push_back(unit[size_t(i) * 3 % unit.size()] * 0.5);
  return w;
}

// Block magnitudes spread over 10^-8 .. 10^4: the offset's exactness test fails, so the CUDA
// kernel must add the absmaxes in block order like the CPU.
std::vector<double> wide_range_tensor(int64_t nblocks, int64_t block, uint64_t seed) {
  std::vector<double> w = randn(size_t(nblocks * block), seed);
  const std::vector<double> e = uniform(size_t(nblocks), seed + 1, -8.0, 4.0);
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t i = 0; i < block; ++i) w[size_t(b * block + i)] *= std::pow(10.0, e[size_t(b)]);
  return w;
}

struct QCase {
  std::string name;
  std::vector<double> w;
  int64_t block;
};

std::vector<QCase> quant_cases() {
  std::vector<QCase> c;
  for (int64_t n : {int64_t(1), int64_t(2), int64_t(97), int64_t(1025), int64_t(64 * 257), int64_t(64 * 257 + 37)})
    c.push_back({"randn " + std::to_string(n), randn(size_t(n), 100 + uint64_t(n)), 64});
  for (int64_t block : {int64_t(2), int64_t(6), int64_t(32), int64_t(46), int64_t(128), int64_t(2048), int64_t(4096)})
    c.push_back({"randn 9001", randn(9001, 7 + uint64_t(block)), block});
  c.push_back({"randn 70000 block 4096", randn(70000, 31), 4096});
  c.push_back({"adversarial", adversarial_tensor(), 64});
  c.push_back({"zeros", std::vector<double>(200, 0.0), 64});
  std::vector<double> small = uniform(5000, 8, -2.0, 2.0);
  for (double& x : small) x *= 1e-3;
  c.push_back({"uniform x1e-3", small, 64});
  c.push_back({"randn 70000 blocks", randn(size_t(64) * 70000, 41), 64});
  c.push_back({"wide-range absmax", wide_range_tensor(3000, 64, 51), 64});
  return c;
}

std::string label(const QCase& c, DType t, bool dq) {
  return "cuda nf4 " + c.name + " " + dtype_name(t) + " block " + std::to_string(c.block) + (dq ? " dq" : "");
}

// w as the kernels read it (rounded to t) and its bytes.
std::vector<unsigned char> weight_bytes(const std::vector<double>& w, DType t) {
  std::vector<unsigned char> b(std::max<size_t>(1, w.size()) * dtype_size(t));
  from_double(w, b.data(), t);
  return b;
}

TK_TEST(cuda_nf4_quantize_matches_cpu) {
  if (!tk::test::cuda::available()) return;
  for (const QCase& c : quant_cases())
    for (DType t : {DType::F32, DType::BF16})
      for (bool dq : {false, true}) {
        if (t == DType::BF16 && c.w.size() > 100000 && !dq) continue;  // the big cases once per dtype suffice
        const int64_t n = int64_t(c.w.size());
        const std::vector<unsigned char> wb = weight_bytes(c.w, t);
        HostQuant h(n, c.block, dq);
        nf4_quantize_cpu(wb.data(), t, n, c.block, dq, h.out(), ctx.pool);
        DeviceGuarded dw(wb.size());
        dw.upload(wb.data());
        DevQuant d(h.l);
        const std::string what = label(c, t, dq);
        try {
          nf4_quantize_cuda(dw.data(), t, n, c.block, dq, d.out(), nullptr);
          ck(cudaDeviceSynchronize(), "nf4_quantize_cuda");
        } catch (const std::exception& e) {
          ctx.check(false, what + ": threw " + e.what());
          continue;
        }
        ctx.check(d.intact() && dw.intact(), what + ": guards intact");
        const std::vector<unsigned char> got = d.packed.download();
        size_t bad = 0, first = got.size();
        for (size_t j = 0; j < got.size(); ++j)
          if (got[j] != h.packed[j]) {
            ++bad;
            first = std::min(first, j);
          }
        if (!ctx.check(bad == 0, what + ": packed bytes equal the CPU's"))
          std::printf("    %zu bytes differ, first at %zu: got 0x%02x want 0x%02x\n", bad, first, got[first],
                      h.packed[first]);
        if (dq) {
          ctx.check(d.absmax.download() == bytes_of(h.qabsmax), what + ": 8-bit absmax codes equal the CPU's");
          ctx.check(d.scale2.download() == bytes_of(h.scale2), what + ": scale2 equals the CPU's bit for bit");
          const std::vector<unsigned char> off = d.offset.download();
          float o = 0.0f;
          std::memcpy(&o, off.data(), 4);
          if (!ctx.check(std::memcmp(&o, &h.offset, 4) == 0, what + ": offset equals the CPU's bit for bit"))
            std::printf("    offset got %.9g want %.9g\n", double(o), double(h.offset));
        } else {
          ctx.check(d.absmax.download() == bytes_of(h.absmax), what + ": absmax equals the CPU's bit for bit");
        }
      }
  // numel 0: with double quantization the offset is 0.
  DevQuant z(nf4_layout(0, 64, true));
  const float junk = 3.0f;
  z.offset.upload(&junk);
  nf4_quantize_cuda(nullptr, DType::F32, 0, 64, true, z.out(), nullptr);
  const std::vector<unsigned char> off = z.offset.download();
  ctx.check(off == std::vector<unsigned char>(4, 0), "cuda nf4 quantize numel 0 writes offset 0");
}

// CPU-quantized buffers, dequantized on both devices.
TK_TEST(cuda_nf4_dequantize_matches_cpu) {
  if (!tk::test::cuda::available()) return;
  for (const QCase& c : quant_cases())
    for (bool dq : {false, true}) {
      const int64_t n = int64_t(c.w.size());
      const std::vector<unsigned char> wb = weight_bytes(c.w, DType::F32);
      HostQuant h(n, c.block, dq);
      nf4_quantize_cpu(wb.data(), DType::F32, n, c.block, dq, h.out(), ctx.pool);
      DevQuant d(h.l);
      d.upload(h);
      for (DType t : {DType::F32, DType::BF16}) {
        std::vector<unsigned char> want(std::max<size_t>(1, size_t(n) * dtype_size(t)));
        nf4_dequantize_cpu(h.in(), n, c.block, dq, want.data(), t, ctx.pool);
        want.resize(size_t(n) * dtype_size(t));
        for (size_t mis : {size_t(0), dtype_size(t)}) {
          const std::string what = label(c, t, dq) + (mis ? " dequantize, output misaligned" : " dequantize");
          DeviceGuarded out(size_t(n) * dtype_size(t), mis);
          try {
            nf4_dequantize_cuda(d.in(), n, c.block, dq, out.data(), t, nullptr);
            ck(cudaDeviceSynchronize(), "nf4_dequantize_cuda");
          } catch (const std::exception& e) {
            ctx.check(false, what + ": threw " + e.what());
            continue;
          }
          ctx.check(out.intact() && d.intact(), what + ": guards intact");
          ctx.check(out.download() == want, what + ": equals the CPU's bytes");
        }
      }
      // The per-block absmax.
      std::vector<float> amax(size_t(h.l.nblocks));
      nf4_absmax_cpu(h.in(), h.l.nblocks, dq, amax.data());
      DeviceGuarded da(size_t(h.l.nblocks) * 4);
      nf4_absmax_cuda(d.in(), h.l.nblocks, dq, da.data<float>(), nullptr);
      ctx.check(da.download() == bytes_of(amax) && da.intact(), label(c, DType::F32, dq) + ": absmax equals the CPU's");
    }
}

TK_TEST(cuda_nf4_dequantize_window) {
  if (!tk::test::cuda::available()) return;
  struct W { int64_t rows, cols, block; };
  const W shapes[] = {{7, 33, 64}, {97, 65, 64}, {40, 130, 32}, {17, 257, 6}, {64, 128, 64}, {33, 96, 46}};
  uint64_t seed = 500;
  for (const W& s : shapes)
    for (bool dq : {false, true}) {
      const int64_t n = s.rows * s.cols;
      const std::vector<unsigned char> wb = weight_bytes(randn(size_t(n), seed++), DType::F32);
      HostQuant h(n, s.block, dq);
      nf4_quantize_cpu(wb.data(), DType::F32, n, s.block, dq, h.out(), ctx.pool);
      DevQuant d(h.l);
      d.upload(h);
      struct Win { int64_t r0, nr, c0, nc; };
      const Win wins[] = {{0, s.rows, 0, s.cols},                         // everything
                          {s.rows / 3, s.rows - s.rows / 3, 0, s.cols},   // whole rows
                          {1, s.rows - 2, 3, s.cols - 5},                 // a column range
                          {0, s.rows, 8, std::min<int64_t>(64, s.cols - 8)},  // vector-friendly when cols % 8 == 0
                          {2, 1, 5, s.cols - 5},                          // one partial row
                          {0, 0, 0, s.cols}};                             // nothing
      for (DType t : {DType::F32, DType::BF16}) {
        std::vector<unsigned char> full(size_t(n) * dtype_size(t));
        nf4_dequantize_cpu(h.in(), n, s.block, dq, full.data(), t, ctx.pool);
        for (const Win& w : wins) {
          const size_t es = dtype_size(t);
          std::vector<unsigned char> want;
          for (int64_t r = w.r0; r < w.r0 + w.nr; ++r) {
            const unsigned char* row = full.data() + size_t(r * s.cols + w.c0) * es;
            want.insert(want.end(), row, row + size_t(w.nc) * es);
          }
          char what[200];
          std::snprintf(what, sizeof what,
                        "cuda nf4 window W[%lld, %lld] block %lld%s rows [%lld, +%lld) cols [%lld, +%lld) %s",
                        (long long)s.rows, (long long)s.cols, (long long)s.block, dq ? " dq" : "", (long long)w.r0,
                        (long long)w.nr, (long long)w.c0, (long long)w.nc, dtype_name(t));
          DeviceGuarded out(std::max<size_t>(1, want.size()));
          nf4_dequantize_window_cuda(d.in(), h.l, s.rows, s.cols, w.r0, w.nr, w.c0, w.nc, out.data(), t, nullptr);
          std::vector<unsigned char> got = out.download();
          got.resize(want.size());
          ctx.check(got == want && out.intact(), std::string(what) + ": equals the CPU slice");
        }
      }
    }
}

TK_TEST(cuda_nf4_rejects_bad_arguments) {
  if (!tk::test::cuda::available()) return;
  auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const Error&) {
      return true;
    }
    return false;
  };
  DevQuant d(nf4_layout(128, 64, true));
  DeviceBuffer w(128, DType::F32), out(128, DType::F32);
  Nf4Out o = d.out();
  ctx.check(!throws([&] { nf4_quantize_cuda(w.data(), DType::F32, 128, 64, true, o, nullptr); }),
            "cuda nf4 quantize accepts valid arguments");
  ctx.check(throws([&] { nf4_quantize_cuda(w.data(), DType::F32, 128, 63, true, o, nullptr); }),
            "cuda nf4 quantize rejects an odd block size");
  ctx.check(throws([&] { nf4_quantize_cuda(w.data(), DType::F16, 128, 64, true, o, nullptr); }),
            "cuda nf4 quantize rejects f16 weights");
  Nf4Out no_scale = o;
  no_scale.scale2 = nullptr;
  ctx.check(throws([&] { nf4_quantize_cuda(w.data(), DType::F32, 128, 64, true, no_scale, nullptr); }),
            "cuda nf4 quantize rejects double quantization without scale2");
  ctx.check(throws([&] { nf4_dequantize_cuda(d.in(), 128, 64, false, out.data(), DType::F32, nullptr); }),
            "cuda nf4 dequantize rejects a missing absmax");
  ctx.check(throws([&] { nf4_dequantize_cuda(d.in(), 128, 64, true, out.data(), DType::I32, nullptr); }),
            "cuda nf4 dequantize rejects an i32 output");
  ctx.check(throws([&] {
              nf4_dequantize_window_cuda(d.in(), d.l, 2, 64, 1, 2, 0, 64, out.data(), DType::F32, nullptr);
            }),
            "cuda nf4 window rejects rows outside W");
  ctx.check(throws([&] {
              nf4_dequantize_window_cuda(d.in(), d.l, 4, 64, 0, 1, 0, 64, out.data(), DType::F32, nullptr);
            }),
            "cuda nf4 window rejects W dims that do not match the layout");
  ck(cudaDeviceSynchronize(), "nf4");
}

// ==== --perf ==========================================================================================

// Median seconds of fn over `reps` CUDA-event-timed runs, after one warm-up run.
double gpu_median(const std::function<void()>& fn, int reps = 11) {
  cudaEvent_t e0, e1;
  ck(cudaEventCreate(&e0), "cudaEventCreate");
  ck(cudaEventCreate(&e1), "cudaEventCreate");
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    ck(cudaEventRecord(e0, nullptr), "cudaEventRecord");
    fn();
    ck(cudaEventRecord(e1, nullptr), "cudaEventRecord");
    ck(cudaEventSynchronize(e1), "perf");
    float ms = 0;
    ck(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    t.push_back(double(ms) * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

TK_TEST(cuda_nf4_perf) {
  if (!tk::test::cuda::available()) return;
  struct Shape { int64_t rows, cols; };
  const Shape shapes[] = {{4096, 4096}, {8192, 28672}};
  const int64_t tile = int64_t(1) << 22;  // random values uploaded once and repeated
  const std::vector<unsigned char> rnd = weight_bytes(randn(size_t(tile), 9), DType::BF16);
  std::printf("  perf cuda nf4 on %s (block 64, median of 11):\n", tk::cuda::device_props(0).name.c_str());
  for (const Shape& s : shapes) {
    const int64_t n = s.rows * s.cols;
    DeviceBuffer w(size_t(n), DType::BF16);
    for (int64_t off = 0; off < n; off += tile)
      ck(cudaMemcpy(static_cast<uint16_t*>(w.data()) + off, rnd.data(), size_t(std::min(tile, n - off)) * 2,
                    cudaMemcpyHostToDevice),
         "upload");
    for (bool dq : {true, false}) {
      const Nf4Layout l = nf4_layout(n, 64, dq);
      DeviceBuffer packed(size_t(l.packed_bytes), DType::U8), absmax(size_t(l.absmax_bytes), DType::U8),
          scale2(size_t(std::max<int64_t>(4, l.scale2_bytes)), DType::U8), offset(4, DType::U8);
      Nf4Out o;
      o.packed = static_cast<uint8_t*>(packed.data());
      if (dq) {
        o.qabsmax = static_cast<uint8_t*>(absmax.data());
        o.scale2 = static_cast<float*>(scale2.data());
        o.offset = static_cast<float*>(offset.data());
      } else {
        o.absmax = static_cast<float*>(absmax.data());
      }
      const double tq = gpu_median([&] { nf4_quantize_cuda(w.data(), DType::BF16, n, 64, dq, o, nullptr); }, 3);
      Nf4In in;
      in.packed = o.packed;
      in.absmax = o.absmax;
      in.qabsmax = o.qabsmax;
      in.scale2 = o.scale2;
      in.offset = o.offset;
      std::printf("    [%lld, %lld]%s quantize bf16: %8.3f ms\n", (long long)s.rows, (long long)s.cols,
                  dq ? " dq" : "   ", tq * 1e3);
      for (DType t : {DType::BF16, DType::F32}) {
        DeviceBuffer out(size_t(n), t), copy(size_t(n), t);
        const double td = gpu_median([&] { nf4_dequantize_cuda(in, n, 64, dq, out.data(), t, nullptr); });
        const double tc = gpu_median([&] {
          ck(cudaMemcpyAsync(copy.data(), out.data(), out.bytes(), cudaMemcpyDeviceToDevice, nullptr), "memcpy");
        });
        const double moved = double(l.total_bytes()) + double(out.bytes());
        const double gbs = moved / td * 1e-9, copy_gbs = 2.0 * double(out.bytes()) / tc * 1e-9;
        std::printf("    [%lld, %lld]%s dequantize -> %-4s %8.3f ms %7.1f GB/s   cudaMemcpy D2D %7.1f GB/s   "
                    "ratio %.2f\n",
                    (long long)s.rows, (long long)s.cols, dq ? " dq" : "   ", dtype_name(t), td * 1e3, gbs, copy_gbs,
                    gbs / copy_gbs);
        std::printf("    perf-json {\"test\":\"cuda_nf4_dequant\",\"rows\":%lld,\"cols\":%lld,\"double_quant\":%s,"
                    "\"out\":\"%s\",\"ms\":%.6f,\"gbs\":%.2f,\"copy_gbs\":%.2f,\"ratio\":%.4f,\"quantize_ms\":%.6f}\n",
                    (long long)s.rows, (long long)s.cols, dq ? "true" : "false", dtype_name(t), td * 1e3, gbs, copy_gbs,
                    gbs / copy_gbs, tq * 1e3);
      }
    }
  }
}

}  // namespace
