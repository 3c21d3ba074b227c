// Tests of cpu/elementwise against ref/elementwise_ref.
//
// Shapes are odd (97, 257, 1025) so that no size is a multiple of a SIMD width, a staging block
// or a tile; most cases run on every ISA level the machine has (portable, AVX2, AVX-512), write
// into guarded buffers, and cover every dtype the op accepts. Expected values:
// - binary, scale, copy/cast, fill: exact in practice. Each kernel computes in fp32 and rounds
//   once to the output dtype, and a single fp32 operation equals the double result rounded to
//   fp32, so the reference rounded through the same dtype matches bit for bit. Binary and scale
//   are checked as NMSE <= 1e-12 (i32: 0), casts and fills as equality (NaN == NaN).
// - sum: fp32 pairwise accumulation against double: NMSE < 1e-10 for f32; bf16/f16 against the
//   reference rounded to that dtype, NMSE < 1e-5; i32 exact.
// - randn: against a double-precision Box-Muller on the same Philox uniforms, plus thread-count
//   invariance and moments.
// Modes: default runs the correctness tests, --grad the finite-difference checks of the mul and
// sum backward rules, --perf the bandwidth figures.
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../core/rng.h"
#include "../cpu/elementwise.h"
#include "../cpu/isa.h"
#include "../ref/elementwise_ref.h"
#include "harness.h"

using namespace tk;
using namespace tk::test;

namespace {

using Shape = std::vector<int64_t>;

const DType kAllTypes[] = {DType::F32, DType::BF16, DType::F16, DType::I32, DType::U8};
const DType kBinaryTypes[] = {DType::F32, DType::BF16, DType::F16, DType::I32};
const DType kFloatTypes[] = {DType::F32, DType::BF16, DType::F16};
const BinaryOp kOps[] = {BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul};

bool correctness_mode(const Context& ctx) { return !ctx.opt.perf && !ctx.opt.grad; }

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
std::string shape_str(const TensorView& v) { return shape_str(Shape(v.shape, v.shape + v.ndim)); }

const char* op_name(BinaryOp op) { return op == BinaryOp::Add ? "add" : op == BinaryOp::Sub ? "sub" : "mul"; }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// A contiguous tensor in a guarded buffer.
struct Buf {
  Buf(Shape s, DType t) : shape(std::move(s)), dtype(t), mem(new Guarded(size_t(numel(shape)) * dtype_size(t))) {}
  Shape shape;
  DType dtype;
  std::unique_ptr<Guarded> mem;
  int64_t n() const { return numel(shape); }
  TensorView view() const { return make_view(mem->data(), dtype, Device{}, shape); }
  std::vector<double> values() const { return to_double(mem->data(), dtype, size_t(n())); }
  bool intact() const { return mem->intact(); }
  void set(const std::vector<double>& v) { from_double(v, mem->data(), dtype); }
};

// Deterministic contents suited to the dtype: normal * scale for floats, integers for i32/u8.
void randomize(Buf& b, uint64_t seed, double float_scale = 1.0, int64_t int_range = 1000) {
  std::vector<double> v;
  if (b.dtype == DType::U8) {
    v = uniform(size_t(b.n()), seed, 0, 256);
    for (double& x : v) x = std::floor(x);
  } else if (b.dtype == DType::I32) {
    v = uniform(size_t(b.n()), seed, double(-int_range), double(int_range + 1));
    for (double& x : v) x = std::floor(x);
  } else {
    v = randn(size_t(b.n()), seed);
    for (double& x : v) x *= float_scale;
  }
  b.set(v);
}

// v viewed with dims permuted: result dim i is v's dim perm[i].
TensorView permuted(const TensorView& v, const std::vector<int>& perm) {
  TensorView r = v;
  for (size_t i = 0; i < perm.size(); ++i) {
    r.shape[i] = v.shape[perm[i]];
    r.strides[i] = v.strides[perm[i]];
  }
  return r;
}

// v broadcast to `to` (numpy rules, right-aligned): stride 0 on new or size-1-expanded dims.
TensorView expanded(const TensorView& v, const Shape& to) {
  TensorView r = v;
  r.ndim = int(to.size());
  int lead = r.ndim - v.ndim;
  for (int i = 0; i < r.ndim; ++i) {
    int j = i - lead;
    r.shape[i] = to[size_t(i)];
    r.strides[i] = (j < 0 || v.shape[j] == 1) ? 0 : v.strides[j];
  }
  return r;
}

// The ISA levels the elementwise kernels distinguish, up to what this CPU has.
std::vector<CpuIsa> isa_levels() {
  std::vector<CpuIsa> r;
  for (CpuIsa i : {CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512})
    if (i <= detected_isa()) r.push_back(i);
  return r;
}

// Runs fn once per ISA level and restores the active level afterwards.
template <class F>
void for_each_isa(F&& fn) {
  CpuIsa saved = active_isa();
  for (CpuIsa isa : isa_levels()) {
    set_active_isa(isa);
    fn(std::string(isa_name(isa)));
  }
  set_active_isa(saved);
}

// Exact comparison (NaN equals NaN); names the first mismatch on failure.
bool check_exact(Context& ctx, const std::string& what, const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return ctx.check(false, what + ": size mismatch");
  for (size_t i = 0; i < got.size(); ++i) {
    bool same = got[i] == want[i] || (std::isnan(got[i]) && std::isnan(want[i]));
    if (!same) {
      char buf[160];
      std::snprintf(buf, sizeof buf, ": element %zu is %.9g, expected %.9g", i, got[i], want[i]);
      return ctx.check(false, what + buf);
    }
  }
  return ctx.check(true, what);
}

Shape reduced_shape(const Shape& s, uint32_t mask) {
  Shape r = s;
  for (size_t d = 0; d < s.size(); ++d)
    if ((mask >> d) & 1u) r[d] = 1;
  return r;
}

// ---- runners ---------------------------------------------------------------------------------------

void run_binary(Context& ctx, BinaryOp op, const TensorView& a, const TensorView& b, const std::string& label) {
  Shape shape(a.shape, a.shape + a.ndim);
  Buf out(shape, a.dtype);
  binary_cpu(op, a, b, out.view(), ctx.pool);
  std::string what = std::string(op_name(op)) + " " + label + " " + dtype_name(a.dtype);
  std::vector<double> want = ref::store_as(a.dtype, ref::binary(op, a, b));
  ctx.check_nmse(what, out.values(), want, a.dtype == DType::I32 ? 0.0 : 1e-12);
  ctx.check(out.intact(), what + ": guard bytes");
}

void run_sum(Context& ctx, const TensorView& x, uint32_t mask, const std::string& label) {
  Shape os = reduced_shape(Shape(x.shape, x.shape + x.ndim), mask);
  Buf out(os, x.dtype);
  sum_cpu(x, mask, out.view(), ctx.pool);
  char m[16];
  std::snprintf(m, sizeof m, "0x%x", mask);
  std::string what = "sum " + label + " mask " + m + " " + dtype_name(x.dtype);
  std::vector<double> want = ref::sum(x, mask);
  if (x.dtype == DType::F32) ctx.check_nmse(what, out.values(), want, 1e-10);
  else if (x.dtype == DType::I32) check_exact(ctx, what, out.values(), want);
  else ctx.check_nmse(what, out.values(), ref::store_as(x.dtype, want), 1e-5);
  ctx.check(out.intact(), what + ": guard bytes");
}

void run_copy(Context& ctx, const TensorView& src, DType to, const std::string& label) {
  Buf out(Shape(src.shape, src.shape + src.ndim), to);
  copy_cpu(src, out.view(), ctx.pool);
  std::string what = "copy " + label + " " + dtype_name(src.dtype) + "->" + dtype_name(to);
  check_exact(ctx, what, out.values(), ref::cast(src, to));
  ctx.check(out.intact(), what + ": guard bytes");
}

// Source contents that exercise every cast rule: fractions (truncation), values beyond u8 and
// f16 ranges (saturation, overflow to inf), negative values (u8 clamping).
void randomize_for_cast(Buf& b, uint64_t seed) {
  if (b.dtype == DType::I32) randomize(b, seed, 1.0, 70000);
  else randomize(b, seed, 150.0);
}

}  // namespace

// ==== Philox ==========================================================================================

TK_TEST(ew_philox_known_answers) {
  if (!correctness_mode(ctx)) return;
  // Random123's kat_vectors for philox4x32-10: counter[4], key[2] -> output[4].
  struct Kat {
    uint32_t c[4], k[2], want[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}, {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}, {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    Philox4x32 r = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    bool ok = true;
    for (int i = 0; i < 4; ++i) ok = ok && r.v[i] == t.want[i];
    char buf[64];
    std::snprintf(buf, sizeof buf, "philox4x32-10 KAT ctr %08x", t.c[0]);
    ctx.check(ok, buf);
  }
  // Whole-block and one-sample paths agree bit for bit (kernels mix them at chunk edges).
  bool same = true;
  for (uint64_t seed : {uint64_t(0), uint64_t(42), uint64_t(0x123456789abcdefull)})
    for (uint64_t blk : {uint64_t(0), uint64_t(1), uint64_t(77777), uint64_t(1) << 33}) {
      float z[4];
      normal_block4(seed, blk, z);
      for (int l = 0; l < 4; ++l) {
        float s = normal_sample(seed, blk * 4 + uint64_t(l));
        same = same && std::memcmp(&s, &z[l], 4) == 0;
      }
    }
  ctx.check(same, "normal_sample == normal_block4");
  ctx.check(uniform24(0) == 1.0f / 16777216.0f && uniform24(0xffffffffu) == 1.0f, "uniform24 covers (0, 1]");
}

// ==== binary ==========================================================================================

TK_TEST(ew_binary_same_shape) {
  if (!correctness_mode(ctx)) return;
  const Shape shapes[] = {{3, 97, 257}, {1025, 7}, {97}, {}, {2, 3, 5, 7, 11}};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kBinaryTypes)
      for (const Shape& s : shapes) {
        Buf a(s, t), b(s, t);
        randomize(a, 1);
        randomize(b, 2);
        for (BinaryOp op : kOps) run_binary(ctx, op, a.view(), b.view(), shape_str(s) + " " + isa);
      }
  });
}

TK_TEST(ew_binary_broadcast) {
  if (!correctness_mode(ctx)) return;
  struct Case {
    Shape a, b;
  } cases[] = {
      {{97, 257}, {257}},        // row vector
      {{257}, {97, 257}},        // the other operand broadcast
      {{97, 1}, {1, 257}},       // outer product
      {{3, 97, 257}, {}},        // scalar
      {{}, {3, 97, 257}},
      {{1025, 7}, {1025, 1}},    // column
      {{2, 1, 97, 1}, {1, 3, 1, 257}},
      {{3, 1, 257}, {97, 1}},
  };
  for_each_isa([&](const std::string& isa) {
    for (DType t : kBinaryTypes)
      for (const Case& c : cases) {
        Buf a(c.a, t), b(c.b, t);
        randomize(a, 3);
        randomize(b, 4);
        // Output shape: numpy broadcast of the two.
        size_t nd = std::max(c.a.size(), c.b.size());
        Shape out(nd);
        for (size_t i = 0; i < nd; ++i) {
          int64_t da = i + c.a.size() >= nd ? c.a[i + c.a.size() - nd] : 1;
          int64_t db = i + c.b.size() >= nd ? c.b[i + c.b.size() - nd] : 1;
          out[i] = std::max(da, db);
        }
        std::string label = shape_str(c.a) + "." + shape_str(c.b) + " " + isa;
        for (BinaryOp op : kOps) run_binary(ctx, op, expanded(a.view(), out), expanded(b.view(), out), label);
      }
  });
}

TK_TEST(ew_binary_strided_inputs) {
  if (!correctness_mode(ctx)) return;
  for_each_isa([&](const std::string& isa) {
    for (DType t : kBinaryTypes) {
      // a is the transpose of a [257, 97] tensor; b a permuted [257, 3, 97] seen as [3, 97, 257].
      Buf at({257, 97}, t), b({97, 257}, t);
      randomize(at, 5);
      randomize(b, 6);
      for (BinaryOp op : kOps) run_binary(ctx, op, permuted(at.view(), {1, 0}), b.view(), "transposed.[97, 257] " + isa);
      Buf p({257, 3, 97}, t), q({3, 97, 257}, t);
      randomize(p, 7);
      randomize(q, 8);
      for (BinaryOp op : kOps) run_binary(ctx, op, q.view(), permuted(p.view(), {1, 2, 0}), "[3, 97, 257].permuted " + isa);
    }
  });
}

TK_TEST(ew_binary_in_place_and_wrap) {
  if (!correctness_mode(ctx)) return;
  // out may be one of the inputs (gradient accumulation does a += b).
  for (DType t : kBinaryTypes) {
    Buf a({1025, 7}, t), b({1025, 7}, t);
    randomize(a, 9);
    randomize(b, 10);
    std::vector<double> want = ref::store_as(t, ref::binary(BinaryOp::Add, a.view(), b.view()));
    binary_cpu(BinaryOp::Add, a.view(), b.view(), a.view(), ctx.pool);
    ctx.check_nmse(std::string("in-place add ") + dtype_name(t), a.values(), want, t == DType::I32 ? 0 : 1e-12);
  }
  // i32 arithmetic wraps like two's complement.
  Buf a({3}, DType::I32), b({3}, DType::I32), out({3}, DType::I32);
  int32_t* pa = a.view().ptr<int32_t>();
  int32_t* pb = b.view().ptr<int32_t>();
  pa[0] = std::numeric_limits<int32_t>::max(), pb[0] = 1;
  pa[1] = std::numeric_limits<int32_t>::min(), pb[1] = 1;
  pa[2] = 65536, pb[2] = 65536;
  binary_cpu(BinaryOp::Add, a.view(), b.view(), out.view(), ctx.pool);
  ctx.check(out.view().ptr<int32_t>()[0] == std::numeric_limits<int32_t>::min(), "i32 add wraps at INT32_MAX");
  binary_cpu(BinaryOp::Sub, a.view(), b.view(), out.view(), ctx.pool);
  ctx.check(out.view().ptr<int32_t>()[1] == std::numeric_limits<int32_t>::max(), "i32 sub wraps at INT32_MIN");
  binary_cpu(BinaryOp::Mul, a.view(), b.view(), out.view(), ctx.pool);
  ctx.check(out.view().ptr<int32_t>()[2] == 0, "i32 mul wraps mod 2^32");
}

// ==== scale ===========================================================================================

TK_TEST(ew_scale) {
  if (!correctness_mode(ctx)) return;
  const Shape shapes[] = {{3, 97, 257}, {1025, 7}, {}, {17}};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kFloatTypes)
      for (const Shape& s : shapes) {
        Buf x(s, t), out(s, t);
        randomize(x, 11);
        const float alpha = -1.37f;
        scale_cpu(x.view(), alpha, out.view(), ctx.pool);
        std::string what = "scale " + shape_str(s) + " " + dtype_name(t) + " " + isa;
        std::vector<double> want = ref::store_as(t, ref::scale(x.view(), double(alpha)));
        ctx.check_nmse(what, out.values(), want, 1e-12);
        ctx.check(out.intact(), what + ": guard bytes");
        scale_cpu(x.view(), alpha, x.view(), ctx.pool);  // in place
        ctx.check_nmse(what + " in place", x.values(), want, 1e-12);
      }
  });
}

// ==== sum =============================================================================================

TK_TEST(ew_sum_rank3_every_subset) {
  if (!correctness_mode(ctx)) return;
  const Shape s = {3, 97, 257};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kBinaryTypes) {
      Buf x(s, t);
      randomize(x, 12);
      for (uint32_t mask = 0; mask < 8; ++mask) run_sum(ctx, x.view(), mask, shape_str(s) + " " + isa);
      // The same values seen through a permutation: [257, 3, 97] with strides (1, 24929, 257).
      TensorView p = permuted(x.view(), {2, 0, 1});
      for (uint32_t mask = 0; mask < 8; ++mask) run_sum(ctx, p, mask, shape_str(p) + " permuted " + isa);
    }
  });
}

TK_TEST(ew_sum_rank4) {
  if (!correctness_mode(ctx)) return;
  const Shape shapes[] = {{5, 7, 11, 13}, {2, 1, 97, 33}};
  for_each_isa([&](const std::string& isa) {
    for (DType t : kBinaryTypes)
      for (const Shape& s : shapes) {
        Buf x(s, t);
        randomize(x, 13);
        for (uint32_t mask = 0; mask < 16; ++mask) run_sum(ctx, x.view(), mask, shape_str(s) + " " + isa);
      }
  });
}

TK_TEST(ew_sum_large_and_split) {
  if (!correctness_mode(ctx)) return;
  // Sizes that cut reductions into several parts, column chunks and partial leaves.
  struct Case {
    Shape s;
    uint32_t mask;
  } cases[] = {
      {{1025, 7}, 1}, {{1025, 7}, 2},
      {{70001, 3}, 1},          // outer-axis sum, narrow rows, several row parts
      {{3, 300007}, 2},         // inner-axis sum, several run parts
      {{1025 * 1025}, 1},       // everything into one value
      {{4100, 1025}, 1},        // [N, D] over axis 0: row buffers, 65 parts
      {{300, 5001}, 1},         // rows wider than one column chunk
      {{97, 1025, 3}, 5},       // outer and inner reduced, middle kept
      {{33, 4097, 5}, 2},       // middle reduced, inner kept narrow
  };
  for (DType t : {DType::F32, DType::BF16, DType::I32})
    for (const Case& c : cases) {
      Buf x(c.s, t);
      randomize(x, 14);
      run_sum(ctx, x.view(), c.mask, shape_str(c.s));
    }
  // Broadcast inputs (stride-0 dims) are summed like materialized ones.
  for (DType t : {DType::F32, DType::F16}) {
    Buf col({97, 1}, t), row({257}, t);
    randomize(col, 22);
    randomize(row, 23);
    for (uint32_t mask = 1; mask < 4; ++mask) {
      run_sum(ctx, expanded(col.view(), {97, 257}), mask, "[97, 1] expanded to [97, 257]");
      run_sum(ctx, expanded(row.view(), {97, 257}), mask, "[257] expanded to [97, 257]");
    }
  }
}

TK_TEST(ew_sum_thread_count_invariant) {
  if (!correctness_mode(ctx)) return;
  // The summation tree depends on the shape only: 1, 2 and the default pool agree bit for bit.
  ThreadPool one(1), two(2);
  struct Case {
    Shape s;
    uint32_t mask;
  } cases[] = {{{4100, 1025}, 1}, {{3, 300007}, 2}, {{1025 * 1025}, 1}, {{97, 1025, 3}, 5},
               {{70001, 3}, 1},  {{300, 5001}, 1},   {{1025, 7}, 2}};
  for (const Case& c : cases) {
    Buf x(c.s, DType::F32);
    randomize(x, 15);
    Shape os = reduced_shape(c.s, c.mask);
    Buf o1(os, DType::F32), o2(os, DType::F32), o3(os, DType::F32);
    sum_cpu(x.view(), c.mask, o1.view(), one);
    sum_cpu(x.view(), c.mask, o2.view(), two);
    sum_cpu(x.view(), c.mask, o3.view(), ctx.pool);
    bool same = std::memcmp(o1.mem->data(), o2.mem->data(), o1.mem->bytes()) == 0 &&
                std::memcmp(o1.mem->data(), o3.mem->data(), o1.mem->bytes()) == 0;
    ctx.check(same, "sum " + shape_str(c.s) + " identical for 1, 2 and " + std::to_string(ctx.pool.size()) + " threads");
  }
}

// ==== copy / cast =====================================================================================

TK_TEST(ew_copy_permuted_casts) {
  if (!correctness_mode(ctx)) return;
  const Shape s = {3, 97, 257};
  for_each_isa([&](const std::string& isa) {
    for (DType from : kAllTypes) {
      Buf x(s, from);
      randomize_for_cast(x, 16);
      for (DType to : kAllTypes) run_copy(ctx, permuted(x.view(), {2, 0, 1}), to, "[3, 97, 257] perm (2, 0, 1) " + isa);
      const std::vector<std::vector<int>> perms = {{1, 0, 2}, {0, 2, 1}, {2, 1, 0}, {1, 2, 0}};
      for (const std::vector<int>& perm : perms)
        for (DType to : {from, DType::F32}) {
          std::string label = "[3, 97, 257] perm (" + std::to_string(perm[0]) + ", " + std::to_string(perm[1]) + ", " +
                              std::to_string(perm[2]) + ") " + isa;
          run_copy(ctx, permuted(x.view(), perm), to, label);
        }
    }
  });
}

TK_TEST(ew_copy_contiguous_broadcast_transpose) {
  if (!correctness_mode(ctx)) return;
  for_each_isa([&](const std::string& isa) {
    for (DType from : kAllTypes) {
      Buf x({1025, 7}, from);
      randomize_for_cast(x, 17);
      for (DType to : kAllTypes) run_copy(ctx, x.view(), to, "[1025, 7] contiguous " + isa);
      Buf col({97, 1}, from), row({257}, from), sc({}, from);
      randomize_for_cast(col, 18);
      randomize_for_cast(row, 19);
      randomize_for_cast(sc, 20);
      for (DType to : {from, DType::F32, DType::BF16}) {
        run_copy(ctx, expanded(col.view(), {97, 257}), to, "[97, 1] -> [97, 257] " + isa);
        run_copy(ctx, expanded(row.view(), {97, 257}), to, "[257] -> [97, 257] " + isa);
        run_copy(ctx, expanded(sc.view(), {3, 97, 257}), to, "[] -> [3, 97, 257] " + isa);
      }
      Buf m({1025, 257}, from);
      randomize_for_cast(m, 21);
      for (DType to : {from, DType::F32, DType::BF16})
        run_copy(ctx, permuted(m.view(), {1, 0}), to, "[1025, 257]^T " + isa);
    }
  });
}

TK_TEST(ew_cast_semantics) {
  if (!correctness_mode(ctx)) return;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const int32_t imax = std::numeric_limits<int32_t>::max(), imin = std::numeric_limits<int32_t>::min();
  struct F2I {
    float v;
    int32_t i32;
    uint8_t u8;
  } f2i[] = {
      {2.7f, 2, 2}, {-2.7f, -2, 0}, {nan, 0, 0}, {300.0f, 300, 255}, {-5.0f, -5, 0}, {255.9f, 255, 255},
      {-0.9f, 0, 0}, {3e9f, imax, 255}, {-3e9f, imin, 0}, {inf, imax, 255}, {-inf, imin, 0},
      {2147483520.0f, 2147483520, 255}, {-2147483648.0f, imin, 0}, {0.5f, 0, 0},
  };
  struct I2U {
    int32_t v;
    uint8_t u8;
  } i2u[] = {{-5, 0}, {300, 255}, {255, 255}, {0, 0}, {17, 17}, {imax, 255}, {imin, 0}};
  struct F2H {
    float v;
    uint16_t bf16, f16;
  } f2h[] = {
      {1.0f + 0x1p-8f, 0x3f80, 0x3c04},               // bf16 tie -> even (down); f16 exact
      {1.0f + 3 * 0x1p-8f, 0x3f82, 0x3c0c},           // bf16 tie -> even (up)
      {1.0f + 0x1p-8f + 0x1p-20f, 0x3f81, 0x3c04},    // just above the bf16 tie rounds up
      {-(1.0f + 0x1p-8f), 0xbf80, 0xbc04},
      {1.0f + 0x1p-11f, 0x3f80, 0x3c00},              // f16 tie -> even (down)
      {1.0f + 3 * 0x1p-11f, 0x3f80, 0x3c02},          // f16 tie -> even (up)
      {65519.0f, 0x4780, 0x7bff},                     // f16: rounds down to 65504
      {65520.0f, 0x4780, 0x7c00},                     // f16: tie at the top rounds to inf
      {0x1p-24f, 0x3380, 0x0001},                     // smallest f16 subnormal
      {0x1p-25f, 0x3300, 0x0000},                     // f16 subnormal tie -> 0 (even)
      {3 * 0x1p-25f, 0x33c0, 0x0002},                 // f16 subnormal tie -> 2 (even)
      {3.4028235e38f, 0x7f80, 0x7c00},                // largest float: bf16 rounds to inf
      {0x1p-130f, 0x0008, 0x0000},                    // f32 subnormal stays a bf16 subnormal
      {-0.0f, 0x8000, 0x8000},
  };
  for_each_isa([&](const std::string& isa) {
    // Repeated so the vector bodies, not just the tails, see every value.
    const int reps = 5;
    const int nf = int(sizeof f2i / sizeof f2i[0]);
    Buf src({reps * nf}, DType::F32), to_i({reps * nf}, DType::I32), to_u({reps * nf}, DType::U8);
    for (int i = 0; i < reps * nf; ++i) src.view().ptr<float>()[i] = f2i[i % nf].v;
    copy_cpu(src.view(), to_i.view(), ctx.pool);
    copy_cpu(src.view(), to_u.view(), ctx.pool);
    for (int i = 0; i < nf; ++i) {
      char what[96];
      std::snprintf(what, sizeof what, "cast f32 %g -> i32/u8 (%s)", double(f2i[i].v), isa.c_str());
      bool ok = true;
      for (int r = 0; r < reps; ++r)
        ok = ok && to_i.view().ptr<int32_t>()[r * nf + i] == f2i[i].i32 && to_u.view().ptr<uint8_t>()[r * nf + i] == f2i[i].u8;
      ctx.check(ok, what);
    }
    const int ni = int(sizeof i2u / sizeof i2u[0]);
    Buf isrc({ni}, DType::I32), iu({ni}, DType::U8);
    for (int i = 0; i < ni; ++i) isrc.view().ptr<int32_t>()[i] = i2u[i].v;
    copy_cpu(isrc.view(), iu.view(), ctx.pool);
    for (int i = 0; i < ni; ++i)
      ctx.check(iu.view().ptr<uint8_t>()[i] == i2u[i].u8, "cast i32 " + std::to_string(i2u[i].v) + " -> u8 saturates (" + isa + ")");

    const int nh = int(sizeof f2h / sizeof f2h[0]);
    Buf hs({reps * nh}, DType::F32), hb({reps * nh}, DType::BF16), hh({reps * nh}, DType::F16);
    for (int i = 0; i < reps * nh; ++i) hs.view().ptr<float>()[i] = f2h[i % nh].v;
    copy_cpu(hs.view(), hb.view(), ctx.pool);
    copy_cpu(hs.view(), hh.view(), ctx.pool);
    for (int i = 0; i < nh; ++i) {
      bool ok = true;
      for (int r = 0; r < reps; ++r)
        ok = ok && hb.view().ptr<uint16_t>()[r * nh + i] == f2h[i].bf16 && hh.view().ptr<uint16_t>()[r * nh + i] == f2h[i].f16;
      char what[96];
      std::snprintf(what, sizeof what, "cast f32 %a -> bf16 0x%04x, f16 0x%04x (%s)", double(f2h[i].v), f2h[i].bf16,
                    f2h[i].f16, isa.c_str());
      ctx.check(ok, what);
    }
    // NaN stays NaN in both 16-bit formats, whatever its payload.
    Buf ns({33}, DType::F32), nb({33}, DType::BF16), nh16({33}, DType::F16);
    for (int i = 0; i < 33; ++i) ns.view().ptr<float>()[i] = bits_to_f32(0x7f800001u + uint32_t(i) * 0x3fffu);
    copy_cpu(ns.view(), nb.view(), ctx.pool);
    copy_cpu(ns.view(), nh16.view(), ctx.pool);
    bool all_nan = true;
    for (int i = 0; i < 33; ++i) {
      all_nan = all_nan && std::isnan(bf16_to_f32(nb.view().ptr<uint16_t>()[i]));
      all_nan = all_nan && std::isnan(f16_to_f32(nh16.view().ptr<uint16_t>()[i]));
    }
    ctx.check(all_nan, "cast NaN payloads -> bf16/f16 stay NaN (" + isa + ")");
  });
}

TK_TEST(ew_16bit_conversions_exhaustive) {
  if (!correctness_mode(ctx)) return;
  // Every bf16 and f16 bit pattern widens exactly; random f32 bit patterns (all exponents,
  // subnormals, infinities and NaNs) round like the independent reference.
  for_each_isa([&](const std::string& isa) {
    for (DType t : {DType::BF16, DType::F16}) {
      Buf h({65536}, t), f({65536}, DType::F32);
      for (int i = 0; i < 65536; ++i) h.view().ptr<uint16_t>()[i] = uint16_t(i);
      copy_cpu(h.view(), f.view(), ctx.pool);
      check_exact(ctx, std::string("widen every ") + dtype_name(t) + " (" + isa + ")", f.values(), ref::read(h.view()));
      const int64_t n = 1 << 20;
      Buf r({n}, DType::F32), o({n}, t);
      uint64_t s = 0x9e3779b97f4a7c15ull;
      for (int64_t i = 0; i < n; ++i) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        r.view().ptr<uint32_t>()[i] = uint32_t(s >> 32);
      }
      copy_cpu(r.view(), o.view(), ctx.pool);
      check_exact(ctx, std::string("narrow random f32 bits to ") + dtype_name(t) + " (" + isa + ")", ref::read(o.view()),
                  ref::cast(r.view(), t));
    }
  });
}

// ==== fill / randn / edge shapes ======================================================================

TK_TEST(ew_fill) {
  if (!correctness_mode(ctx)) return;
  const double values[] = {2.5, -3.7, 300.0, 1e10, -1e10, std::nan(""), 1.0 + 1.0 / 256};
  for (DType t : kAllTypes)
    for (double v : values) {
      Buf out({1025, 7}, t);
      fill_cpu(out.view(), v, ctx.pool);
      char what[64];
      std::snprintf(what, sizeof what, "fill %s %g", dtype_name(t), v);
      check_exact(ctx, what, out.values(), std::vector<double>(size_t(out.n()), ref::store_as(t, v)));
      ctx.check(out.intact(), std::string(what) + ": guard bytes");
    }
}

TK_TEST(ew_dropout) {
  if (!correctness_mode(ctx)) return;
  for (DType t : {DType::F32, DType::BF16})
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(1025), int64_t(100003)})
      for (float p : {0.0f, 0.3f, 0.9f}) {
        const uint64_t seed = 77 + uint64_t(n);
        Buf x({n}, t), out({n}, t);
        x.set(randn(size_t(n), seed));
        dropout_cpu(x.view(), p, seed, out.view(), ctx.pool);
        char what[96];
        std::snprintf(what, sizeof what, "dropout %s n=%lld p=%.1f", dtype_name(t), (long long)n, double(p));
        std::vector<double> want = ref::dropout(x.values(), p, seed), got = out.values();
        int64_t mask_mismatch = 0;
        for (size_t i = 0; i < got.size(); ++i) mask_mismatch += (got[i] == 0.0) != (want[i] == 0.0);
        ctx.check(mask_mismatch == 0, std::string(what) + ": the same elements dropped as the reference");
        ctx.check_nmse(what, got, want, t == DType::F32 ? 1e-13 : 1e-5);
        ctx.check(out.intact(), std::string(what) + ": guard bytes");
        if (n == 100003) {
          int64_t kept = 0;
          for (double v : out.values()) kept += v != 0.0;
          double rate = double(kept) / double(n), sd = std::sqrt(p * (1 - p) / double(n));
          ctx.check(std::fabs(rate - (1 - p)) <= 5 * sd + 1e-9, std::string(what) + ": kept fraction within 5 sigma");
        }
      }
}

TK_TEST(ew_randn) {
  if (!correctness_mode(ctx)) return;
  const int64_t n = 1000000;
  const uint64_t seed = 1234;
  ThreadPool one(1), two(2);
  Buf a({n}, DType::F32), b({n}, DType::F32), c({n}, DType::F32);
  randn_cpu(a.view(), seed, 0.0f, 1.0f, one);
  randn_cpu(b.view(), seed, 0.0f, 1.0f, two);
  randn_cpu(c.view(), seed, 0.0f, 1.0f, ctx.pool);
  ctx.check(std::memcmp(a.mem->data(), b.mem->data(), size_t(n) * 4) == 0 &&
                std::memcmp(a.mem->data(), c.mem->data(), size_t(n) * 4) == 0,
            "randn identical for 1, 2 and " + std::to_string(ctx.pool.size()) + " threads");
  ctx.check(a.intact() && b.intact() && c.intact(), "randn guard bytes");
  std::vector<double> z = a.values();
  ctx.check_nmse("randn vs double Box-Muller", z, ref::randn(n, seed, 0.0, 1.0), 1e-12);

  double mean = 0, var = 0;
  for (double v : z) mean += v;
  mean /= double(n);
  for (double v : z) var += (v - mean) * (v - mean);
  var /= double(n - 1);
  const double sd_mean = 1.0 / std::sqrt(double(n)), sd_var = std::sqrt(2.0 / double(n));
  char buf[128];
  std::snprintf(buf, sizeof buf, "randn mean %.5f within 5 sigma (%.5f) of 0", mean, 5 * sd_mean);
  ctx.check(std::fabs(mean) < 5 * sd_mean, buf);
  std::snprintf(buf, sizeof buf, "randn variance %.5f within 5 sigma (%.5f) of 1", var, 5 * sd_var);
  ctx.check(std::fabs(var - 1) < 5 * sd_var, buf);

  // Other seeds (low and high key words) give other streams.
  for (uint64_t other : {seed + 1, seed + (uint64_t(1) << 32)}) {
    Buf d({n}, DType::F32);
    randn_cpu(d.view(), other, 0.0f, 1.0f, ctx.pool);
    int64_t equal = 0;
    for (int64_t i = 0; i < n; ++i) equal += a.view().ptr<float>()[i] == d.view().ptr<float>()[i];
    ctx.check(equal < n / 1000, "randn seed " + std::to_string(other) + " differs from seed " + std::to_string(seed));
  }
  // A shorter tensor is a prefix of the longer one (element i depends on (seed, i) only).
  Buf p({1003}, DType::F32);
  randn_cpu(p.view(), seed, 0.0f, 1.0f, ctx.pool);
  ctx.check(std::memcmp(p.mem->data(), a.mem->data(), 1003 * 4) == 0, "randn prefix stable");
  // mean/std and 16-bit outputs: fp32 values rounded once.
  for_each_isa([&](const std::string& isa) {
    for (DType t : kFloatTypes) {
      Buf o({3, 97, 257}, t);
      randn_cpu(o.view(), 7, 3.0f, 0.5f, ctx.pool);
      std::string what = std::string("randn mean 3 std 0.5 ") + dtype_name(t) + " " + isa;
      std::vector<double> want = ref::randn(o.n(), 7, 3.0, 0.5);
      ctx.check_nmse(what, o.values(), t == DType::F32 ? want : ref::store_as(t, want), t == DType::F32 ? 1e-12 : 1e-5);
      ctx.check(o.intact(), what + ": guard bytes");
    }
  });
}

TK_TEST(ew_zero_size_and_scalars) {
  if (!correctness_mode(ctx)) return;
  // Zero-size tensors: nothing is written (the guarded buffers have no payload at all).
  for (const Shape& s : {Shape{0}, Shape{3, 0, 5}}) {
    for (DType t : kBinaryTypes) {
      Buf a(s, t), b(s, t), o(s, t);
      binary_cpu(BinaryOp::Add, a.view(), b.view(), o.view(), ctx.pool);
      ctx.check(o.intact(), "binary zero-size " + shape_str(s));
      copy_cpu(a.view(), o.view(), ctx.pool);
      fill_cpu(o.view(), 1.0, ctx.pool);
      if (is_floating(t)) {
        scale_cpu(a.view(), 2.0f, o.view(), ctx.pool);
        randn_cpu(o.view(), 1, 0.0f, 1.0f, ctx.pool);
      }
      ctx.check(o.intact(), "copy/fill/scale/randn zero-size " + shape_str(s) + " " + dtype_name(t));
    }
  }
  // Summing over an empty axis gives zeros; summing a non-empty axis of an empty tensor is empty.
  Buf e({3, 0, 5}, DType::F32), z({3, 1, 5}, DType::F32), z2({1, 0, 5}, DType::F32);
  z.set(std::vector<double>(15, 7.0));
  sum_cpu(e.view(), 2, z.view(), ctx.pool);
  check_exact(ctx, "sum over an empty axis is 0", z.values(), std::vector<double>(15, 0.0));
  sum_cpu(e.view(), 1, z2.view(), ctx.pool);
  ctx.check(z.intact() && z2.intact(), "sum zero-size guard bytes");

  // Rank 0.
  for (DType t : kBinaryTypes) {
    Buf a({}, t), b({}, t), o({}, t);
    a.set({5.0});
    b.set({3.0});
    binary_cpu(BinaryOp::Mul, a.view(), b.view(), o.view(), ctx.pool);
    check_exact(ctx, std::string("rank-0 mul ") + dtype_name(t), o.values(), {15.0});
    sum_cpu(a.view(), 0, o.view(), ctx.pool);
    check_exact(ctx, std::string("rank-0 sum ") + dtype_name(t), o.values(), {5.0});
    ctx.check(o.intact(), std::string("rank-0 guard bytes ") + dtype_name(t));
  }
  Buf s({}, DType::F32), d({}, DType::U8), r({}, DType::F32);
  s.set({-2.5});
  copy_cpu(s.view(), d.view(), ctx.pool);
  check_exact(ctx, "rank-0 cast -2.5 -> u8", d.values(), {0.0});
  fill_cpu(r.view(), 4.25, ctx.pool);
  check_exact(ctx, "rank-0 fill", r.values(), {4.25});
  randn_cpu(r.view(), 99, 0.0f, 1.0f, ctx.pool);
  check_exact(ctx, "rank-0 randn is sample 0", r.values(), {double(normal_sample(99, 0))});
  // Size-1 dims everywhere (the all-ones shape coalesces to a single element).
  Buf o1({1, 1, 1}, DType::F32), x1({1, 1, 1}, DType::F32);
  x1.set({2.0});
  sum_cpu(x1.view(), 7, o1.view(), ctx.pool);
  check_exact(ctx, "sum [1, 1, 1] over all axes", o1.values(), {2.0});
}

TK_TEST(ew_rejects_bad_arguments) {
  if (!correctness_mode(ctx)) return;
  auto throws = [&](const char* what, auto fn) {
    bool threw = false;
    try {
      fn();
    } catch (const tk::Error&) {
      threw = true;
    }
    ctx.check(threw, what);
  };
  Buf a({3, 4}, DType::F32), b({3, 4}, DType::BF16), o({3, 4}, DType::F32), s({3, 1}, DType::F32);
  Buf u({3, 4}, DType::U8), t({4, 3}, DType::F32);
  throws("binary with mixed dtypes", [&] { binary_cpu(BinaryOp::Add, a.view(), b.view(), o.view(), ctx.pool); });
  throws("binary on u8", [&] { binary_cpu(BinaryOp::Add, u.view(), u.view(), u.view(), ctx.pool); });
  throws("binary with a shape mismatch", [&] { binary_cpu(BinaryOp::Add, a.view(), t.view(), o.view(), ctx.pool); });
  throws("binary into a strided out", [&] { binary_cpu(BinaryOp::Add, t.view(), t.view(), permuted(o.view(), {1, 0}), ctx.pool); });
  throws("sum with a wrong out shape", [&] { sum_cpu(a.view(), 1, s.view(), ctx.pool); });
  throws("sum with a mask beyond the rank", [&] { sum_cpu(a.view(), 4, o.view(), ctx.pool); });
  throws("sum on u8", [&] { sum_cpu(u.view(), 0, u.view(), ctx.pool); });
  throws("scale on i32", [&] {
    Buf i({3}, DType::I32);
    scale_cpu(i.view(), 2.0f, i.view(), ctx.pool);
  });
  throws("randn into u8", [&] { randn_cpu(u.view(), 1, 0, 1, ctx.pool); });
  throws("copy with a shape mismatch", [&] { copy_cpu(a.view(), t.view(), ctx.pool); });
}

// ==== --grad: backward rules of mul and sum against central differences ===============================

namespace {

// L(out) = sum(g * out) in double, for f32 out.
double weighted_sum(const Buf& g, const Buf& out) {
  const float* pg = g.view().ptr<float>();
  const float* po = out.view().ptr<float>();
  double s = 0;
  for (int64_t i = 0; i < out.n(); ++i) s += double(pg[i]) * double(po[i]);
  return s;
}

// Central differences of L with respect to every element of x (f32), step h.
std::vector<double> numeric_grad(Buf& x, float h, const std::function<double()>& loss) {
  std::vector<double> grad(size_t(x.n()));
  float* p = x.view().ptr<float>();
  for (int64_t i = 0; i < x.n(); ++i) {
    float keep = p[i];
    p[i] = keep + h;
    double up = loss();
    p[i] = keep - h;
    double down = loss();
    p[i] = keep;
    grad[size_t(i)] = (up - down) / (double(keep + h) - double(keep - h));
  }
  return grad;
}

}  // namespace

TK_TEST(ew_grad_mul_broadcast) {
  if (!ctx.opt.grad) return;
  // out = a * b with a [97, 1], b [1, 257] broadcast to [97, 257]; L = sum(g * out).
  // dL/da = sum over axis 1 of g * b, dL/db = sum over axis 0 of g * a.
  const Shape os = {97, 257};
  Buf a({97, 1}, DType::F32), b({1, 257}, DType::F32), g(os, DType::F32), out(os, DType::F32), tmp(os, DType::F32);
  randomize(a, 31);
  randomize(b, 32);
  randomize(g, 33);
  auto loss = [&] {
    binary_cpu(BinaryOp::Mul, expanded(a.view(), os), expanded(b.view(), os), out.view(), ctx.pool);
    return weighted_sum(g, out);
  };
  Buf da({97, 1}, DType::F32), db({1, 257}, DType::F32);
  binary_cpu(BinaryOp::Mul, g.view(), expanded(b.view(), os), tmp.view(), ctx.pool);
  sum_cpu(tmp.view(), 0b10, da.view(), ctx.pool);
  binary_cpu(BinaryOp::Mul, g.view(), expanded(a.view(), os), tmp.view(), ctx.pool);
  sum_cpu(tmp.view(), 0b01, db.view(), ctx.pool);
  ctx.check_nmse("d(a*b)/da [97, 1] vs central differences", da.values(), numeric_grad(a, 1e-2f, loss), 1e-6);
  ctx.check_nmse("d(a*b)/db [1, 257] vs central differences", db.values(), numeric_grad(b, 1e-2f, loss), 1e-6);
}

TK_TEST(ew_grad_sum) {
  if (!ctx.opt.grad) return;
  // y = sum(x, axes {0, 2}) for x [3, 17, 29]; L = sum(g * y); dL/dx = g broadcast to x's shape.
  const Shape xs = {3, 17, 29};
  for (uint32_t mask : {0b101u, 0b010u, 0b111u}) {
    Shape ys2 = reduced_shape(xs, mask);
    Buf x(xs, DType::F32), g(ys2, DType::F32), y(ys2, DType::F32), dx(xs, DType::F32);
    randomize(x, 41);
    randomize(g, 42);
    copy_cpu(expanded(g.view(), xs), dx.view(), ctx.pool);  // the backward rule: broadcast g
    auto loss = [&] {
      sum_cpu(x.view(), mask, y.view(), ctx.pool);
      return weighted_sum(g, y);
    };
    char what[64];
    std::snprintf(what, sizeof what, "d sum(x, mask 0x%x)/dx [3, 17, 29] vs central differences", mask);
    ctx.check_nmse(what, dx.values(), numeric_grad(x, 1e-2f, loss), 1e-6);
  }
}

// ==== --perf ==========================================================================================

TK_TEST(ew_perf) {
  if (!ctx.opt.perf) return;
  const int64_t n = int64_t(1) << 24;  // 16M f32 = 64 MB per tensor
  auto report = [&](const char* what, double seconds, double bytes) {
    std::printf("  perf %-44s %8.2f ms %8.1f GB/s\n", what, seconds * 1e3, bytes / seconds / 1e9);
  };
  std::printf("  perf threads %d, isa %s\n", ctx.pool.size(), isa_name(active_isa()));
  Buf a({n}, DType::F32), b({n}, DType::F32), o({n}, DType::F32);
  randomize(a, 51);
  randomize(b, 52);
  double t = time_median([&] { binary_cpu(BinaryOp::Add, a.view(), b.view(), o.view(), ctx.pool); });
  report("add f32 [16777216]", t, 3.0 * double(n) * 4);

  const Shape m = {16384, 1024};
  Buf x(m, DType::F32), rows({16384, 1}, DType::F32), cols({1, 1024}, DType::F32);
  randomize(x, 53);
  t = time_median([&] { sum_cpu(x.view(), 0b10, rows.view(), ctx.pool); });
  report("sum f32 [16384, 1024] over axis 1", t, double(n) * 4);
  t = time_median([&] { sum_cpu(x.view(), 0b01, cols.view(), ctx.pool); });
  report("sum f32 [16384, 1024] over axis 0", t, double(n) * 4);

  Buf sq({4096, 4096}, DType::F32), sqt({4096, 4096}, DType::F32);
  randomize(sq, 54);
  t = time_median([&] { copy_cpu(permuted(sq.view(), {1, 0}), sqt.view(), ctx.pool); });
  report("transpose copy f32 [4096, 4096]", t, 2.0 * double(n) * 4);

  Buf h({n}, DType::BF16);
  t = time_median([&] { copy_cpu(a.view(), h.view(), ctx.pool); });
  report("cast f32 -> bf16 [16777216]", t, double(n) * 6);
  t = time_median([&] { copy_cpu(h.view(), o.view(), ctx.pool); });
  report("cast bf16 -> f32 [16777216]", t, double(n) * 6);
}
