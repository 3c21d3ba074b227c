#include "harness.h"

#include <algorithm>
#include <cstdlib>
#include <random>

namespace tk::test {

struct Entry {
  const char* name;
  TestFn fn;
};
static std::vector<Entry>& registry() {
  static std::vector<Entry> r;
  return r;
}

Registrar::Registrar(const char* name, TestFn fn) { registry().push_back({name, fn}); }

double nmse(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = got[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return num / den;
}

bool Context::check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("  FAIL %s\n", what.c_str());
  }
  return ok;
}

bool Context::check_nmse(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                         double tol) {
  if (got.size() != ref.size()) return check(false, what + ": size mismatch");
  double e = nmse(got, ref);
  bool ok = e <= tol && !std::isnan(e);
  char buf[96];
  std::snprintf(buf, sizeof buf, ": nmse %.3e (tol %.1e)", e, tol);
  return check(ok, what + buf);
}

std::vector<double> to_double(const void* data, DType dtype, size_t n) {
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F32: out[i] = static_cast<const float*>(data)[i]; break;
      case DType::BF16: out[i] = bf16_to_f32(static_cast<const uint16_t*>(data)[i]); break;
      case DType::F16: out[i] = f16_to_f32(static_cast<const uint16_t*>(data)[i]); break;
      case DType::I32: out[i] = static_cast<const int32_t*>(data)[i]; break;
      case DType::U8: out[i] = static_cast<const uint8_t*>(data)[i]; break;
    }
  }
  return out;
}

void from_double(const std::vector<double>& src, void* dst, DType dtype) {
  for (size_t i = 0; i < src.size(); ++i) {
    switch (dtype) {
      case DType::F32: static_cast<float*>(dst)[i] = float(src[i]); break;
      case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(float(src[i])); break;
      case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(float(src[i])); break;
      case DType::I32: static_cast<int32_t*>(dst)[i] = int32_t(std::lrint(src[i])); break;
      case DType::U8: static_cast<uint8_t*>(dst)[i] = uint8_t(std::lrint(src[i])); break;
    }
  }
}

std::vector<double> randn(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<double> uniform(size_t n, uint64_t seed, double lo, double hi) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

Guarded::Guarded(size_t bytes, size_t align) : bytes_(bytes) {
  size_t total = kGuard + bytes + kGuard + align;
  raw_ = static_cast<unsigned char*>(std::malloc(total));
  // Align the payload, keeping at least kGuard bytes in front of it.
  uintptr_t p = reinterpret_cast<uintptr_t>(raw_) + kGuard;
  p = (p + align - 1) / align * align;
  data_ = reinterpret_cast<unsigned char*>(p);
  std::memset(raw_, kPattern, total);
}

Guarded::~Guarded() { std::free(raw_); }

bool Guarded::intact() const {
  for (unsigned char* q = data_ - kGuard; q < data_; ++q)
    if (*q != kPattern) return false;
  for (unsigned char* q = data_ + bytes_; q < data_ + bytes_ + kGuard; ++q)
    if (*q != kPattern) return false;
  return true;
}

double time_median(const std::function<void()>& fn, int reps) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace tk::test

int main(int argc, char** argv) {
  using namespace tk::test;
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--perf") opt.perf = true;
    else if (a == "--grad") opt.grad = true;
    else if (a.rfind("--filter=", 0) == 0) opt.filter = a.substr(9);
    else if (a == "--list") {
      for (auto& e : registry()) std::printf("%s\n", e.name);
      return 0;
    } else {
      std::fprintf(stderr, "usage: %s [--perf] [--grad] [--filter=SUBSTR] [--list]\n", argv[0]);
      return 2;
    }
  }
  tk::ThreadPool pool(tk::ThreadPool::default_threads());
  Context ctx(opt, pool);
  int ran = 0;
  // Modes pick tests by name: "perf" tests run only with --perf, "grad" tests only with --grad,
  // and the default run takes the rest.
  auto in_mode = [&](const std::string& name) {
    bool perf = name.find("perf") != std::string::npos, grad = name.find("grad") != std::string::npos;
    return opt.perf ? perf : opt.grad ? grad : !perf && !grad;
  };
  for (auto& e : registry()) {
    if (!in_mode(e.name)) continue;
    if (!opt.filter.empty() && std::string(e.name).find(opt.filter) == std::string::npos) continue;
    int before = ctx.failed;
    auto t0 = std::chrono::steady_clock::now();
    e.fn(ctx);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s %s (%.2fs)\n", ctx.failed == before ? "ok  " : "FAIL", e.name, s);
    ++ran;
  }
  if (ran == 0) {
    std::printf("no test matches '%s'\n", opt.filter.c_str());
    return 2;
  }
  std::printf("%d passed, %d failed\n", ctx.passed, ctx.failed);
  return ctx.failed ? 1 : 0;
}
