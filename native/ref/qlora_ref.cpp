// Naive QLoRA linear reference (see qlora_ref.h).
#include "qlora_ref.h"

#include "../core/rng.h"
#include "nf4_ref.h"

namespace tk::ref {

std::vector<double> qlora_weight_ref(const Nf4In& q, const Nf4Layout& l) {
  std::vector<uint8_t> packed(q.packed, q.packed + l.packed_bytes);
  std::vector<double> absmax;
  if (l.double_quant) {
    absmax = nf4_absmax_dq_ref(std::vector<uint8_t>(q.qabsmax, q.qabsmax + l.nblocks),
                               std::vector<float>(q.scale2, q.scale2 + l.nblocks2), *q.offset);
  } else {
    absmax.assign(q.absmax, q.absmax + l.nblocks);
  }
  return nf4_dequantize_ref(packed, absmax, l.numel, l.block_size);
}

bool qlora_keep_ref(uint64_t seed, uint64_t e, double p) {
  const uint64_t ctr = e / 4;
  const Philox4x32 r = philox4x32_10(uint32_t(ctr & 0xffffffffu), uint32_t(ctr >> 32), 0u, 0u,
                                     uint32_t(seed & 0xffffffffu), uint32_t(seed >> 32));
  const uint32_t word = r.v[e % 4];
  const double u = (double(word >> 8) + 1.0) / 16777216.0;
  return u > p;
}

namespace {

// drop(x) [N, in] in double.
std::vector<double> dropped(const QloraRefProblem& p) {
  std::vector<double> d(p.x.size());
  for (size_t e = 0; e < d.size(); ++e)
    d[e] = qlora_keep_ref(p.seed, e, p.dropout) ? p.x[e] / (1.0 - p.dropout) : 0.0;
  return d;
}

}  // namespace

QloraRefForward qlora_forward_ref(const QloraRefProblem& p) {
  const int64_t N = p.N, in = p.in, out = p.out, r = p.r;
  const std::vector<double> xd = dropped(p);
  QloraRefForward f;
  f.base.assign(size_t(N * out), 0.0);
  f.lora.assign(size_t(N * out), 0.0);
  f.y.assign(size_t(N * out), 0.0);
  f.xa.assign(size_t(N * r), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t q = 0; q < r; ++q) {
      double s = 0;
      for (int64_t k = 0; k < in; ++k) s += xd[size_t(n * in + k)] * p.A[size_t(q * in + k)];
      f.xa[size_t(n * r + q)] = s;
    }
    for (int64_t o = 0; o < out; ++o) {
      double b = 0, l = 0;
      for (int64_t k = 0; k < in; ++k) b += p.x[size_t(n * in + k)] * p.w[size_t(o * in + k)];
      for (int64_t q = 0; q < r; ++q) l += f.xa[size_t(n * r + q)] * p.B[size_t(o * r + q)];
      const size_t i = size_t(n * out + o);
      f.base[i] = b;
      f.lora[i] = p.scale * l;
      f.y[i] = f.base[i] + f.lora[i];
    }
  }
  return f;
}

QloraRefGrads qlora_backward_ref(const QloraRefProblem& p, const std::vector<double>& dy) {
  const int64_t N = p.N, in = p.in, out = p.out, r = p.r;
  const std::vector<double> xd = dropped(p);
  const QloraRefForward f = qlora_forward_ref(p);
  // g = dy B [N, r].
  std::vector<double> g(size_t(N * r), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < r; ++q) {
      double s = 0;
      for (int64_t o = 0; o < out; ++o) s += dy[size_t(n * out + o)] * p.B[size_t(o * r + q)];
      g[size_t(n * r + q)] = s;
    }
  QloraRefGrads gr;
  gr.dx_base.assign(size_t(N * in), 0.0);
  gr.dx_lora.assign(size_t(N * in), 0.0);
  gr.dx.assign(size_t(N * in), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < in; ++k) {
      double b = 0, l = 0;
      for (int64_t o = 0; o < out; ++o) b += dy[size_t(n * out + o)] * p.w[size_t(o * in + k)];
      for (int64_t q = 0; q < r; ++q) l += g[size_t(n * r + q)] * p.A[size_t(q * in + k)];
      const size_t e = size_t(n * in + k);
      // Dropout's backward: the kept elements' gradient times 1 / (1 - p), zero elsewhere.
      l = qlora_keep_ref(p.seed, e, p.dropout) ? p.scale * l / (1.0 - p.dropout) : 0.0;
      gr.dx_base[e] = b;
      gr.dx_lora[e] = l;
      gr.dx[e] = b + l;
    }
  gr.dA.assign(size_t(r * in), 0.0);
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < in; ++k) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += g[size_t(n * r + q)] * xd[size_t(n * in + k)];
      gr.dA[size_t(q * in + k)] = p.scale * s;
    }
  gr.dB.assign(size_t(out * r), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t q = 0; q < r; ++q) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += dy[size_t(n * out + o)] * f.xa[size_t(n * r + q)];
      gr.dB[size_t(o * r + q)] = p.scale * s;
    }
  return gr;
}

}  // namespace tk::ref
