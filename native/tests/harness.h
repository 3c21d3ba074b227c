// The native test harness (after ggml's test-backend-ops): one binary, no Node. Each test runs an
// op on every present device/ISA path and compares against native/ref (double accumulation) by
// normalized MSE:  nmse = sum((got - ref)^2) / sum(ref^2).  Outputs live in guarded buffers (a
// known byte pattern on both sides) so an overrun fails the test instead of corrupting the heap.
//
// Modes: default (correctness), --grad (finite-difference checks of backward rules),
// --perf (timings, GFLOP/s and GB/s; no assertions). A test belongs to a mode by its name: names
// containing "grad" run under --grad, names containing "perf" under --perf, all others by
// default. --filter=SUBSTR picks tests within the mode.
// The binary ends with the line "N passed, N failed" and exits non-zero on any failure.
#pragma once
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/thread_pool.h"

namespace tk::test {

struct Options {
  bool perf = false;
  bool grad = false;
  std::string filter;
};

class Context {
 public:
  Context(const Options& opt, ThreadPool& pool) : opt(opt), pool(pool) {}
  const Options& opt;
  ThreadPool& pool;

  // Records one assertion. `what` names the case (op, shape, dtype, path) for the failure line.
  bool check(bool ok, const std::string& what);
  // Asserts nmse(got, ref) <= tol and reports the figure on failure.
  bool check_nmse(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref, double tol);
  int passed = 0, failed = 0;
};

double nmse(const std::vector<double>& got, const std::vector<double>& ref);

// Widen n elements of any dtype to double.
std::vector<double> to_double(const void* data, DType dtype, size_t n);
// Narrow doubles into a buffer of `dtype` (rounding to nearest even for bf16/f16).
void from_double(const std::vector<double>& src, void* dst, DType dtype);

// Deterministic values for tests: normal(0, 1) or uniform in [lo, hi).
std::vector<double> randn(size_t n, uint64_t seed);
std::vector<double> uniform(size_t n, uint64_t seed, double lo, double hi);

// A heap buffer of `bytes` with kGuard pattern bytes on both sides.
class Guarded {
 public:
  static constexpr size_t kGuard = 64;
  static constexpr unsigned char kPattern = 0xA5;
  explicit Guarded(size_t bytes, size_t align = 64);
  ~Guarded();
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  bool intact() const;  // both guards untouched
  void fill(unsigned char byte) { std::memset(data_, byte, bytes_); }

 private:
  unsigned char* raw_ = nullptr;
  unsigned char* data_ = nullptr;
  size_t bytes_ = 0;
};

// Median wall time of fn over `reps` runs after one warm-up, in seconds.
double time_median(const std::function<void()>& fn, int reps = 5);

using TestFn = void (*)(Context&);
struct Registrar {
  Registrar(const char* name, TestFn fn);
};

}  // namespace tk::test

#define TK_TEST(name)                                                         \
  static void name(::tk::test::Context& ctx);                                 \
  static ::tk::test::Registrar name##_registrar(#name, name);                 \
  static void name(::tk::test::Context& ctx)
