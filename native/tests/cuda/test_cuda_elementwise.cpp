// Tests of cuda/elementwise_kernels against the CPU kernels and ref/elementwise_ref.
//
// Every case runs the CUDA kernel into a guarded device buffer (64 pattern bytes on each side)
// and, on the same inputs, the CPU kernel. Expected values:
// - binary, scale, copy/cast, fill, concat, dropout: a single fp32 operation (or none) per
//   element, rounded once with core/dtype.h's rule, on both devices: the bytes must equal the
//   CPU's. Binary and scale are also held to the reference (NMSE <= 1e-12, i32 exact), casts to
//   ref::cast exactly (NaN == NaN).
// - sum: fp32 accumulation in a fixed order against the double reference, NMSE < 1e-10 for f32;
//   bf16/f16 outputs against the reference rounded to that dtype, NMSE < 1e-5 (the CPU test's
//   bounds); i32 exact; two runs give the same bytes.
// - randn: bit for bit equal to a host evaluation of the same recipe (Philox uniforms, log/sin/
//   cos correctly rounded to fp32 via double; see elementwise_kernels.h), NMSE < 1e-11 against the
//   double reference; against randn_cpu (host libm logf/sinf/cosf) at most 3% of samples may
//   differ (1.2-1.4% measured with glibc 2.36), each by at most 8 units of 2^-24 of the sample's
//   scale |mean| + |std z| (3.5 measured); 16-bit outputs by at most one ulp of their format.
// Sizes are odd (7, 97, 257, 1025, 100003) and views are offset by one element where a 128-bit
// path could otherwise hide the scalar tail path. Every test returns at once without a device.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "native/core/error.h"
#include "native/core/queue.h"
#include "native/core/rng.h"
#include "native/cpu/elementwise.h"
#include "native/cuda/elementwise_kernels.h"
#include "native/ref/elementwise_ref.h"
#include "native/tests/cuda/cuda_test.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;
using tk::test::cuda::available;
using tk::test::cuda::check;

const DType kAllTypes[] = {DType::F32, DType::BF16, DType::F16, DType::I32, DType::U8};
const DType kFloatTypes[] = {DType::F32, DType::BF16, DType::F16};

// The queue stream of device 0 for every launch of this file: kernels take scratch memory from
// the stream-ordered allocator tagged with their stream, so the tests use the stream tunekit
// itself uses. The queue lives as long as the process.
cudaStream_t test_stream() {
  static Queue* q = tk::cuda::make_queue(0).release();
  return static_cast<cudaStream_t>(tk::cuda::stream_of(*q));
}
void* stream() { return test_stream(); }
void sync() { check(cudaStreamSynchronize(test_stream()), "cudaStreamSynchronize"); }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

TensorView view_of(void* data, DType t, Device dev, const Shape& shape, const Shape& strides) {
  TensorView v = make_view(data, t, dev, shape);
  if (!strides.empty())
    for (int i = 0; i < v.ndim; ++i) v.strides[i] = strides[size_t(i)];
  return v;
}

// `elems` elements of device storage, `offset` elements past a 256-byte aligned address, with
// 64 pattern bytes on either side (checked by intact()).
class Dev {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kPattern = 0xA5;
  Dev(int64_t elems, DType t, int64_t offset = 0) : n_(elems), dtype_(t) {
    pre_ = kGuard + size_t(offset) * dtype_size(t);
    total_ = pre_ + bytes() + kGuard;
    check(cudaMalloc(&base_, total_), "cudaMalloc");
    check(cudaMemset(base_, kPattern, total_), "cudaMemset");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  ~Dev() { cudaFree(base_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  size_t bytes() const { return size_t(n_) * dtype_size(dtype_); }
  void* data() const { return static_cast<char*>(base_) + pre_; }
  DType dtype() const { return dtype_; }
  TensorView view(const Shape& shape, const Shape& strides = {}) const {
    return view_of(data(), dtype_, Device{DeviceType::CUDA, 0}, shape, strides);
  }
  void set_bytes(const void* src) {
    check(cudaMemcpyAsync(data(), src, bytes(), cudaMemcpyHostToDevice, test_stream()), "cudaMemcpyAsync H2D");
    sync();
  }
  void set(const std::vector<double>& v) {
    std::vector<uint8_t> h(bytes());
    from_double(v, h.data(), dtype_);
    set_bytes(h.data());
  }
  void fill(unsigned char byte) {
    check(cudaMemsetAsync(data(), byte, bytes(), test_stream()), "cudaMemsetAsync");
    sync();
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> h(bytes());
    sync();
    check(cudaMemcpy(h.data(), data(), bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
  std::vector<double> values() const {
    std::vector<uint8_t> h = raw();
    return to_double(h.data(), dtype_, size_t(n_));
  }
  bool intact() const {
    std::vector<unsigned char> h(total_);
    sync();
    check(cudaMemcpy(h.data(), base_, total_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    for (size_t i = 0; i < total_; ++i)
      if ((i < pre_ || i >= pre_ + bytes()) && h[i] != kPattern) return false;
    return true;
  }

 private:
  int64_t n_;
  DType dtype_;
  void* base_ = nullptr;
  size_t pre_ = 0, total_ = 0;
};

// Host storage mirroring a Dev, for the CPU kernels and the references.
struct Host {
  Host(int64_t elems, DType t) : mem(size_t(elems) * dtype_size(t) + 16), dtype(t), n(elems) {}
  std::vector<uint8_t> mem;
  DType dtype;
  int64_t n;
  void* data() { return mem.data(); }
  TensorView view(const Shape& shape, const Shape& strides = {}) {
    return view_of(mem.data(), dtype, Device{}, shape, strides);
  }
  std::vector<uint8_t> raw() const { return std::vector<uint8_t>(mem.begin(), mem.begin() + int64_t(n * dtype_size(dtype))); }
  std::vector<double> values() const { return to_double(mem.data(), dtype, size_t(n)); }
};

// The same values in device and host storage.
struct Operand {
  Operand(int64_t elems, DType t, int64_t offset = 0) : dev(elems, t, offset), host(elems, t) {}
  Dev dev;
  Host host;
  void set(const std::vector<double>& v) {
    from_double(v, host.data(), host.dtype);
    dev.set_bytes(host.data());
  }
};

// Values suited to the dtype: normal * scale for floats, integers for i32 / u8.
std::vector<double> values_for(DType t, int64_t n, uint64_t seed, double scale = 1.0) {
  std::vector<double> v;
  if (t == DType::U8) {
    v = uniform(size_t(n), seed, 0, 256);
    for (double& x : v) x = std::min(255.0, std::floor(x));
  } else if (t == DType::I32) {
    v = uniform(size_t(n), seed, -100000, 100001);
    for (double& x : v) x = std::floor(x);
  } else {
    v = randn(size_t(n), seed);
    for (double& x : v) x *= scale;
  }
  return v;
}

bool same_doubles(const std::vector<double>& a, const std::vector<double>& b, std::string* where) {
  if (a.size() != b.size()) {
    *where = ": size mismatch";
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    const bool both_nan = std::isnan(a[i]) && std::isnan(b[i]);
    if (!both_nan && a[i] != b[i]) {
      char buf[128];
      std::snprintf(buf, sizeof buf, ": element %zu is %.9g, expected %.9g", i, a[i], b[i]);
      *where = buf;
      return false;
    }
  }
  return true;
}

bool same_bytes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, std::string* where) {
  if (a.size() != b.size()) {
    *where = ": size mismatch";
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) {
      *where = ": first differing byte at " + std::to_string(i);
      return false;
    }
  return true;
}

const char* op_name(BinaryOp op) { return op == BinaryOp::Add ? "add" : op == BinaryOp::Sub ? "sub" : "mul"; }

template <class F>
bool throws_with(F&& fn, const char* part, std::string* msg) {
  try {
    fn();
  } catch (const Error& e) {
    *msg = e.what();
    return msg->find(part) != std::string::npos;
  }
  *msg = "(no exception)";
  return false;
}

}  // namespace

// ==== binary / scale ==================================================================================

TK_TEST(cuda_ew_binary) {
  if (!available()) return;
  struct Case {
    const char* name;
    Shape shape;
    int64_t a_elems, b_elems;
    Shape a_strides, b_strides;  // empty: contiguous
    int64_t offset;
  };
  const std::vector<Case> cases = {
      {"contiguous", {97, 257}, 97 * 257, 97 * 257, {}, {}, 0},
      {"contiguous, offset by one element", {97, 257}, 97 * 257, 97 * 257, {}, {}, 1},
      {"b broadcast over rows", {97, 257}, 97 * 257, 257, {}, {0, 1}, 0},
      {"a broadcast over columns", {97, 257}, 97, 97 * 257, {1, 0}, {}, 0},
      {"b scalar", {1025}, 1025, 1, {}, {0}, 0},
      {"a transposed", {97, 257}, 97 * 257, 97 * 257, {1, 97}, {}, 0},
      {"rank 3, b [3, 1, 5]", {3, 97, 5}, 3 * 97 * 5, 15, {}, {5, 0, 1}, 0},
      {"single element", {1}, 1, 1, {}, {}, 0},
      {"seven elements", {7}, 7, 7, {}, {}, 0},
  };
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I32})
    for (const Case& c : cases)
      for (BinaryOp op : {BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul}) {
        const int64_t n = numel(c.shape);
        Operand a(c.a_elems, t, c.offset), b(c.b_elems, t, c.offset), out(n, t, c.offset);
        a.set(values_for(t, c.a_elems, 11 + uint64_t(n)));
        b.set(values_for(t, c.b_elems, 12 + uint64_t(n)));
        binary_cuda(op, a.dev.view(c.shape, c.a_strides), b.dev.view(c.shape, c.b_strides), out.dev.view(c.shape),
                    stream());
        binary_cpu(op, a.host.view(c.shape, c.a_strides), b.host.view(c.shape, c.b_strides), out.host.view(c.shape),
                   ctx.pool);
        const std::string what = std::string("binary ") + op_name(op) + " " + c.name + " " + shape_str(c.shape) + " " +
                                 dtype_name(t);
        std::string where;
        ctx.check(same_bytes(out.dev.raw(), out.host.raw(), &where), what + ": bytes equal the CPU's" + where);
        const std::vector<double> want =
            ref::store_as(t, ref::binary(op, a.host.view(c.shape, c.a_strides), b.host.view(c.shape, c.b_strides)));
        ctx.check_nmse(what + " vs reference", out.dev.values(), want, t == DType::I32 ? 0.0 : 1e-12);
        ctx.check(out.dev.intact(), what + ": guard bytes");
      }
}

TK_TEST(cuda_ew_scale) {
  if (!available()) return;
  for (DType t : kFloatTypes)
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(97), int64_t(1025), int64_t(257 * 1025)})
      for (int64_t offset : {0, 1}) {
        Operand x(n, t, offset), out(n, t, offset);
        x.set(values_for(t, n, 21 + uint64_t(n)));
        scale_cuda(x.dev.view({n}), -0.37f, out.dev.view({n}), stream());
        scale_cpu(x.host.view({n}), -0.37f, out.host.view({n}), ctx.pool);
        const std::string what = "scale [" + std::to_string(n) + "] " + dtype_name(t) + " offset " + std::to_string(offset);
        std::string where;
        ctx.check(same_bytes(out.dev.raw(), out.host.raw(), &where), what + ": bytes equal the CPU's" + where);
        ctx.check_nmse(what + " vs reference", out.dev.values(), ref::store_as(t, ref::scale(x.host.view({n}), -0.37)),
                       1e-12);
        // In place: out is x.
        scale_cuda(x.dev.view({n}), -0.37f, x.dev.view({n}), stream());
        ctx.check(same_bytes(x.dev.raw(), out.host.raw(), &where), what + ": in place" + where);
        ctx.check(out.dev.intact() && x.dev.intact(), what + ": guard bytes");
      }
}

// ==== sum =============================================================================================

TK_TEST(cuda_ew_sum) {
  if (!available()) return;
  struct Case {
    Shape shape;
    int64_t elems;
    Shape strides;  // empty: contiguous
    std::vector<uint32_t> masks;
  };
  const std::vector<Case> cases = {
      {{97, 257}, 97 * 257, {}, {0, 1, 2, 3}},
      {{3, 97, 257}, 3 * 97 * 257, {}, {1, 2, 3, 4, 5, 6, 7}},
      {{5, 7, 3, 11}, 5 * 7 * 3 * 11, {}, {0b0101, 0b1010, 0b1111, 0b0110}},
      {{97, 257}, 97 * 257, {1, 97}, {1, 2, 3}},                 // transposed view
      {{1025, 7}, 1025 * 7, {}, {1}},                            // column mode, narrow rows
      {{4099, 33}, 4099 * 33, {}, {1}},                          // column mode with splits
      {{257 * 1025}, 257 * 1025, {}, {1}},                       // one output, split runs
      {{2, 131073}, 2 * 131073, {}, {2}},                        // few outputs, split runs
      {{65537, 3}, 65537 * 3, {}, {2}},                          // many short runs: a thread each
      {{97, 3, 5, 2}, 97 * 30, {}, {0b1010}},                    // short runs over two strided dims
      {{7, 1, 97}, 7 * 97, {}, {2, 5}},                          // size-1 dims
  };
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I32})
    for (const Case& c : cases)
      for (uint32_t mask : c.masks) {
        Shape os = c.shape;
        for (size_t d = 0; d < os.size(); ++d)
          if ((mask >> d) & 1u) os[d] = 1;
        const int64_t m = numel(os);
        Operand x(c.elems, t);
        Dev out(m, t), again(m, t);
        x.set(values_for(t, c.elems, 31 + uint64_t(c.elems) + mask));
        out.fill(0x7f);
        sum_cuda(x.dev.view(c.shape, c.strides), mask, out.view(os), stream());
        sum_cuda(x.dev.view(c.shape, c.strides), mask, again.view(os), stream());
        char buf[64];
        std::snprintf(buf, sizeof buf, " mask 0x%x ", mask);
        const std::string what = "sum " + shape_str(c.shape) + (c.strides.empty() ? "" : " strided") + buf + dtype_name(t);
        const std::vector<double> want = ref::sum(x.host.view(c.shape, c.strides), mask);
        const std::vector<double> got = out.values();
        if (t == DType::F32) ctx.check_nmse(what, got, want, 1e-10);
        else if (t == DType::I32) ctx.check_nmse(what, got, want, 0.0);
        else ctx.check_nmse(what + " vs reference rounded", got, ref::store_as(t, want), 1e-5);
        std::string where;
        ctx.check(same_bytes(again.raw(), out.raw(), &where), what + ": two runs give the same bytes" + where);
        ctx.check(out.intact() && again.intact(), what + ": guard bytes");
      }
}

// ==== copy / cast / concat / fill =====================================================================

TK_TEST(cuda_ew_copy_cast) {
  if (!available()) return;
  struct Layout {
    const char* name;
    Shape shape;
    int64_t elems;
    Shape strides;
    int64_t offset;
  };
  const std::vector<Layout> layouts = {
      {"contiguous", {97, 257}, 97 * 257, {}, 0},
      {"contiguous, offset by one element", {97, 257}, 97 * 257, {}, 1},
      {"transposed", {97, 257}, 97 * 257, {1, 97}, 0},
      {"permuted (2, 0, 1)", {257, 3, 97}, 3 * 97 * 257, {1, 97 * 257, 257}, 0},
      {"broadcast columns", {97, 257}, 97, {1, 0}, 0},
      {"every other column", {97, 257}, 97 * 514, {514, 2}, 0},
  };
  for (const Layout& l : layouts)
    for (DType st : kAllTypes)
      for (DType dt : kAllTypes) {
        const int64_t n = numel(l.shape);
        Operand src(l.elems, st, l.offset);
        std::vector<double> v = values_for(st, l.elems, 41 + uint64_t(l.elems), 300.0);
        if (is_floating(st)) {
          const double specials[] = {std::nan(""), INFINITY, -INFINITY, 1e10,  -1e10, 255.5, 256.0,
                                     -0.7,         65520.0,  1e-40,     3e38,  -3e38, 2147483648.0, -2147483649.0};
          for (size_t i = 0; i < std::size(specials) && i < v.size(); ++i) v[i * 7] = specials[i];
        } else if (st == DType::I32) {
          v[0] = 2147483647.0;
          v[7] = -2147483648.0;
          v[14] = 16777217.0;  // not an fp32 value
        }
        src.set(v);
        Operand dst(n, dt, l.offset);
        copy_cuda(src.dev.view(l.shape, l.strides), dst.dev.view(l.shape), stream());
        copy_cpu(src.host.view(l.shape, l.strides), dst.host.view(l.shape), ctx.pool);
        const std::string what = std::string("copy ") + l.name + " " + shape_str(l.shape) + " " + dtype_name(st) +
                                 " -> " + dtype_name(dt);
        std::string where;
        ctx.check(same_bytes(dst.dev.raw(), dst.host.raw(), &where), what + ": bytes equal the CPU's" + where);
        ctx.check(same_doubles(dst.dev.values(), ref::cast(src.host.view(l.shape, l.strides), dt), &where),
                  what + ": equals ref::cast" + where);
        ctx.check(dst.dev.intact(), what + ": guard bytes");
      }
}

TK_TEST(cuda_ew_concat) {
  if (!available()) return;
  struct Case {
    DType t;
    int axis;
    Shape base;                  // out's shape with the axis set per input
    std::vector<int64_t> sizes;  // each input's size on the axis
  };
  const std::vector<Case> cases = {
      {DType::F32, 0, {0, 5, 7}, {1, 7, 97}},
      {DType::BF16, 1, {3, 0, 5}, {1, 7, 97, 2, 3, 4, 5, 6, 8, 9, 10}},  // 11 inputs: two launches
      {DType::U8, 2, {3, 4, 0}, {1, 7, 3, 97}},                          // byte units
      {DType::I32, 2, {3, 4, 0}, {1, 7, 3}},                             // 4-byte units
      {DType::F32, 2, {3, 5, 0}, {4, 8, 12}},                            // 16-byte units
      {DType::F16, 0, {0, 257}, {0, 3, 0, 5}},                           // empty inputs
  };
  for (const Case& c : cases) {
    std::vector<std::unique_ptr<Operand>> ins;
    std::vector<TensorView> dv, hv;
    int64_t total = 0;
    for (size_t i = 0; i < c.sizes.size(); ++i) {
      Shape s = c.base;
      s[size_t(c.axis)] = c.sizes[i];
      total += c.sizes[i];
      ins.emplace_back(new Operand(numel(s), c.t));
      ins.back()->set(values_for(c.t, numel(s), 51 + i));
      dv.push_back(ins.back()->dev.view(s));
      hv.push_back(ins.back()->host.view(s));
    }
    Shape os = c.base;
    os[size_t(c.axis)] = total;
    Operand out(numel(os), c.t);
    concat_cuda(dv.data(), int(dv.size()), c.axis, out.dev.view(os), stream());
    concat_cpu(hv.data(), int(hv.size()), c.axis, out.host.view(os), ctx.pool);
    const std::string what = std::string("concat ") + std::to_string(c.sizes.size()) + " inputs on axis " +
                             std::to_string(c.axis) + " into " + shape_str(os) + " " + dtype_name(c.t);
    std::string where;
    ctx.check(same_bytes(out.dev.raw(), out.host.raw(), &where), what + ": bytes equal the CPU's" + where);
    ctx.check(out.dev.intact(), what + ": guard bytes");
  }
}

TK_TEST(cuda_ew_fill) {
  if (!available()) return;
  const double values[] = {0.0, 1.5, -3.25, 1e10, -1e10, std::nan(""), 300.7, 65519.0};
  for (DType t : kAllTypes)
    for (double value : values)
      for (int64_t n : {int64_t(1), int64_t(7), int64_t(97), int64_t(1027)})
        for (int64_t offset : {0, 1}) {
          Operand out(n, t, offset);
          fill_cuda(out.dev.view({n}), value, stream());
          fill_cpu(out.host.view({n}), value, ctx.pool);
          char buf[128];
          std::snprintf(buf, sizeof buf, "fill [%lld] %s with %g, offset %lld", static_cast<long long>(n), dtype_name(t),
                        value, static_cast<long long>(offset));
          std::string where;
          ctx.check(same_bytes(out.dev.raw(), out.host.raw(), &where), std::string(buf) + ": bytes equal the CPU's" + where);
          ctx.check(out.dev.intact(), std::string(buf) + ": guard bytes");
        }
}

// ==== randn / dropout ==================================================================================

namespace {

// Sample i of the CUDA recipe on the host: the rng.h uniforms, log/sin/cos in double rounded once
// to fp32, every fp32 operation rounded on its own (volatile keeps a compiler from fusing).
float host_normal(uint64_t seed, uint64_t i, float mean, float stddev) {
  const Philox4x32 r = philox_block(seed, i);
  const unsigned lane = unsigned(i & 3u), pair = lane >> 1;
  const float u1 = uniform24(r.v[2 * pair]), u2 = uniform24(r.v[2 * pair + 1]);
  volatile float l = float(std::log(double(u1)));
  volatile float m2 = -2.0f * l;
  volatile float radius = std::sqrt(float(m2));
  volatile float theta = 6.28318530717958647692f * u2;
  volatile float tr = float((lane & 1u) ? std::sin(double(theta)) : std::cos(double(theta)));
  volatile float z = radius * tr;
  volatile float scaled = stddev * z;
  return mean + scaled;
}

}  // namespace

TK_TEST(cuda_ew_randn) {
  if (!available()) return;
  struct Params {
    uint64_t seed;
    float mean, stddev;
  };
  const Params params[] = {{0, 0.0f, 1.0f}, {42, 0.5f, 2.0f}, {0x123456789abcdefull, -1.0f, 0.02f}};
  for (DType t : kFloatTypes)
    for (int64_t n : {int64_t(1), int64_t(5), int64_t(97), int64_t(1025), int64_t(100003)})
      for (const Params& p : params) {
        Operand out(n, t);
        out.dev.fill(0x7f);
        randn_cuda(out.dev.view({n}), p.seed, p.mean, p.stddev, stream());
        randn_cpu(out.host.view({n}), p.seed, p.mean, p.stddev, ctx.pool);
        char buf[128];
        std::snprintf(buf, sizeof buf, "randn [%lld] %s seed %llu", static_cast<long long>(n), dtype_name(t),
                      static_cast<unsigned long long>(p.seed));
        const std::string what = buf;
        std::vector<double> host(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) host[size_t(i)] = double(host_normal(p.seed, uint64_t(i), p.mean, p.stddev));
        const std::vector<double> got = out.dev.values();
        std::string where;
        ctx.check(same_doubles(got, ref::store_as(t, host), &where), what + ": equals the host evaluation" + where);
        const std::vector<double> want = ref::randn(n, p.seed, p.mean, p.stddev);
        ctx.check_nmse(what + " vs reference", got, t == DType::F32 ? want : ref::store_as(t, want),
                       t == DType::F32 ? 1e-11 : 1e-5);
        // Against the CPU kernel: equal except where the host libm's fp32 log/sin/cos round the
        // other way (about 1.3% of samples with glibc 2.36), and then by a few units of the last
        // place of the sample's scale |mean| + |std * z| (an ulp count of the sum itself would
        // blow up where mean and std * z cancel). 16-bit outputs differ by at most one ulp of
        // their format.
        const std::vector<double> cpu = out.host.values();
        const double unit = t == DType::F32 ? 0x1p-24 : t == DType::BF16 ? 0x1p-8 : 0x1p-11;
        int64_t differ = 0;
        double worst = 0;
        for (int64_t i = 0; i < n; ++i) {
          const double a = got[size_t(i)], b = cpu[size_t(i)];
          if (a == b) continue;
          ++differ;
          const double scale = std::fabs(double(p.mean)) + std::fabs(b - double(p.mean));
          worst = std::max(worst, std::fabs(a - b) / (scale * unit));
        }
        char sbuf[192];
        std::snprintf(sbuf, sizeof sbuf, ": %lld of %lld samples differ from randn_cpu, by at most %.2f units",
                      static_cast<long long>(differ), static_cast<long long>(n), worst);
        ctx.check(double(differ) <= 0.03 * double(n) + 2 && worst <= (t == DType::F32 ? 8.0 : 2.0), what + sbuf);
        ctx.check(out.dev.intact(), what + ": guard bytes");
      }
}

TK_TEST(cuda_ew_dropout) {
  if (!available()) return;
  for (DType t : kFloatTypes)
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(97), int64_t(1025), int64_t(100003)})
      for (float p : {0.0f, 0.1f, 0.5f, 0.9f})
        for (int64_t offset : {0, 1}) {
          const uint64_t seed = 1234 + uint64_t(n);
          Operand x(n, t, offset), out(n, t, offset);
          x.set(values_for(t, n, 61 + uint64_t(n)));
          dropout_cuda(x.dev.view({n}), p, seed, out.dev.view({n}), stream());
          dropout_cpu(x.host.view({n}), p, seed, out.host.view({n}), ctx.pool);
          char buf[128];
          std::snprintf(buf, sizeof buf, "dropout [%lld] %s p %.1f offset %lld", static_cast<long long>(n),
                        dtype_name(t), double(p), static_cast<long long>(offset));
          const std::string what = buf;
          std::string where;
          ctx.check(same_bytes(out.dev.raw(), out.host.raw(), &where), what + ": bytes equal the CPU's" + where);
          ctx.check_nmse(what + " vs reference", out.dev.values(),
                         ref::store_as(t, ref::dropout(x.host.values(), p, seed)), t == DType::F32 ? 1e-12 : 1e-5);
          dropout_cuda(x.dev.view({n}), p, seed, x.dev.view({n}), stream());  // in place
          ctx.check(same_bytes(x.dev.raw(), out.host.raw(), &where), what + ": in place" + where);
          ctx.check(out.dev.intact() && x.dev.intact(), what + ": guard bytes");
        }
}

// ==== edges and errors =================================================================================

TK_TEST(cuda_ew_empty_and_rejects) {
  if (!available()) return;
  // Empty tensors are no-ops; an empty sum is zero.
  Dev e(1, DType::F32), z(3, DType::F32);
  e.fill(0x5a);
  binary_cuda(BinaryOp::Add, e.view({0, 4}), e.view({0, 4}), e.view({0, 4}), stream());
  copy_cuda(e.view({4, 0}), e.view({4, 0}), stream());
  randn_cuda(e.view({0}), 1, 0.0f, 1.0f, stream());
  z.fill(0x7f);
  sum_cuda(e.view({0, 3}), 1u, z.view({1, 3}), stream());
  ctx.check_nmse("sum of an empty axis is zero", z.values(), std::vector<double>(3, 0.0), 0.0);
  ctx.check(e.raw() == std::vector<uint8_t>(4, 0x5a) && e.intact(), "empty ops write nothing");

  std::string msg;
  Dev a(12, DType::F32), b(12, DType::BF16), o(12, DType::F32);
  std::vector<float> host(12);
  const TensorView cpu = make_view(host.data(), DType::F32, Device{}, {3, 4});
  ctx.check(throws_with([&] { binary_cuda(BinaryOp::Add, cpu, a.view({3, 4}), o.view({3, 4}), stream()); },
                        "expected cuda", &msg),
            "binary_cuda rejects a cpu tensor: " + msg);
  ctx.check(throws_with([&] { binary_cuda(BinaryOp::Add, a.view({3, 4}), b.view({3, 4}), o.view({3, 4}), stream()); },
                        "dtypes differ", &msg),
            "binary_cuda rejects mixed dtypes: " + msg);
  ctx.check(throws_with([&] { copy_cuda(a.view({3, 4}), o.view({3, 4}, {1, 3}), stream()); }, "contiguous", &msg),
            "copy_cuda rejects a strided dst: " + msg);
  ctx.check(throws_with([&] { sum_cuda(a.view({3, 4}), 4u, o.view({3, 4}), stream()); }, "beyond rank", &msg),
            "sum_cuda rejects a mask beyond the rank: " + msg);
  ctx.check(throws_with([&] { dropout_cuda(a.view({12}), 1.0f, 1, o.view({12}), stream()); }, "[0, 1)", &msg),
            "dropout_cuda rejects p = 1: " + msg);
  ctx.check(a.intact() && o.intact(), "rejected calls write nothing");
}
