// Counter-based random numbers shared by the CPU kernels, the CUDA kernels and the references.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to 128 random bits with no state, so any element of a stream
// can be produced on its own: a kernel that splits a tensor across threads or CUDA blocks gets the
// same values as a serial loop, and element i depends only on (seed, i). The key is the seed; the
// counter is the element index divided by 4, because one Philox call yields four 32-bit words, i.e.
// two uniform pairs, i.e. (with Box-Muller's cosine and sine) four normal samples.
//
// Uniforms use the top 24 bits of a word, u = (w >> 8 + 1) * 2^-24, in (0, 1]: every value is a
// float exactly (so the double-precision reference sees the very same u), log(u) is never log(0),
// and the largest |z| is sqrt(-2 ln 2^-24) ~ 5.77.
//
// Stream layout for normal sample i (seed s):
//   (w0, w1, w2, w3) = philox4x32_10(ctr = {i/4 low, i/4 high, 0, 0}, key = {s low, s high})
//   lane = i % 4; pair = lane / 2 uses words (w[2*pair], w[2*pair+1]) as (u1, u2)
//   z = sqrt(-2 ln u1) * (lane even ? cos(2 pi u2) : sin(2 pi u2))
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define TK_HOST_DEVICE __host__ __device__
#else
#define TK_HOST_DEVICE
#endif

namespace tk {

struct Philox4x32 {
  uint32_t v[4];
};

TK_HOST_DEVICE inline Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                               uint32_t k1) {
  const uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  const uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments (golden ratio, sqrt(3)-1)
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kW0;
      k1 += kW1;
    }
    uint64_t p0 = uint64_t(kM0) * c0;
    uint64_t p1 = uint64_t(kM1) * c2;
    uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4x32 r;
  r.v[0] = c0;
  r.v[1] = c1;
  r.v[2] = c2;
  r.v[3] = c3;
  return r;
}

// The Philox block that holds normal sample i of stream `seed`.
TK_HOST_DEVICE inline Philox4x32 philox_block(uint64_t seed, uint64_t i) {
  uint64_t block = i >> 2;
  return philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
}

// A 32-bit word to a uniform in (0, 1] with 24 significant bits; exact in float.
TK_HOST_DEVICE inline float uniform24(uint32_t w) { return float((w >> 8) + 1u) * (1.0f / 16777216.0f); }

// Standard-normal sample i of stream `seed` (fp32 Box-Muller). See the layout above.
TK_HOST_DEVICE inline float normal_sample(uint64_t seed, uint64_t i) {
  Philox4x32 r = philox_block(seed, i);
  unsigned lane = unsigned(i & 3u);
  unsigned pair = lane >> 1;
  float u1 = uniform24(r.v[2 * pair]);
  float u2 = uniform24(r.v[2 * pair + 1]);
  float radius = sqrtf(-2.0f * logf(u1));
  float theta = 6.28318530717958647692f * u2;
  return radius * ((lane & 1u) ? sinf(theta) : cosf(theta));
}

// All four samples of block `block` (samples 4*block .. 4*block+3): one Philox call, two
// logarithms, for kernels that fill whole blocks.
TK_HOST_DEVICE inline void normal_block4(uint64_t seed, uint64_t block, float z[4]) {
  Philox4x32 r = philox4x32_10(uint32_t(block), uint32_t(block >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
  for (int pair = 0; pair < 2; ++pair) {
    float radius = sqrtf(-2.0f * logf(uniform24(r.v[2 * pair])));
    float theta = 6.28318530717958647692f * uniform24(r.v[2 * pair + 1]);
    z[2 * pair] = radius * cosf(theta);
    z[2 * pair + 1] = radius * sinf(theta);
  }
}

// Dropout's keep decision for element i of stream `seed` at drop probability p in [0, 1): word
// i % 4 of Philox block i / 4 as a uniform u in (0, 1], kept when u > p. Element i depends only on
// (seed, i), so a backward pass regenerates the forward's mask from the seed alone.
TK_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t i, float p) {
  return uniform24(philox_block(seed, i).v[i & 3u]) > p;
}

}  // namespace tk
