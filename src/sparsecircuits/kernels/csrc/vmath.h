// Vector math on 8 float lanes (GCC/Clang vector extensions): exp and erf, to float32
// accuracy, for the attention softmax and the GELU derivative.
#pragma once
#include <cmath>

#include "common.h"

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f splat(float a) { return v8f{} + a; }

// exp (Cephes' single-precision polynomial, ~1 ulp over the clamped range); inputs below -87
// give exp(-87) ~ 1.6e-38, so callers zero masked lanes explicitly.
static inline v8f exp8(v8f x) {
  x = x < splat(88.0f) ? x : splat(88.0f);
  x = x > splat(-87.0f) ? x : splat(-87.0f);
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f t = x * splat(1.44269504088896341f) + magic;
  const v8f n = t - magic;
  const v8f r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const v8i ni = (v8i)t - (v8i)magic;  // the rounded n, from the low mantissa bits
  return p * (v8f)((ni + 127) << 23);
}

// 2^x for x <= 0 (the softmax's scores minus their max, in log2 units): round to the nearest
// integer n, then 2^f for f = x - n in [-1/2, 1/2] by its degree-6 Taylor polynomial
// (relative error < 2e-8) and 2^n from the exponent bits. Cheaper than exp8: no Cody-Waite
// split and one clamp. Below -126 it returns ~2^-126; callers zero masked lanes explicitly.
// NaN stays NaN (a score from an infinite or NaN input poisons its row, as in torch).
static inline v8f exp2_neg8(v8f x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f t = x + magic;
  const v8f f = x - (t - magic);
  v8f p = splat(1.5403530393e-4f);
  p = p * f + splat(1.3333558146e-3f);
  p = p * f + splat(9.6181291076e-3f);
  p = p * f + splat(5.5504108665e-2f);
  p = p * f + splat(2.4022650696e-1f);
  p = p * f + splat(6.9314718056e-1f);
  p = p * f + splat(1.0f);
  const v8i ni = (v8i)t - (v8i)magic;
  return p * (v8f)((ni + 127) << 23);
}

constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2 = 0.69314718055994531f;

// d/dx GELU(x) = Phi(x) + x phi(x), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
// sharing exp(-x^2 / 2) with phi.
static inline v8f gelu_grad8(v8f x) {
  const v8f e = exp8(splat(-0.5f) * x * x);
  const v8f ax = (v8f)((v8i)x & 0x7fffffff) * splat(0.70710678118654752f);  // |x| / sqrt(2)
  const v8f t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f) * ax);
  v8f poly = splat(1.061405429f);
  poly = poly * t + splat(-1.453152027f);
  poly = poly * t + splat(1.421413741f);
  poly = poly * t + splat(-0.284496736f);
  poly = poly * t + splat(0.254829592f);
  const v8f erf_abs = splat(1.0f) - poly * t * e;            // erf(|x| / sqrt(2))
  const v8f cdf = splat(0.5f) + splat(0.5f) * (x < splat(0.0f) ? -erf_abs : erf_abs);
  return cdf + x * e * splat(0.39894228040143268f);
}

#if defined(__AVX2__)
#include <immintrin.h>

// Lane permutations that pack the lanes set in an 8-bit mask to the front, in order
// (pack[b]), and send packed values back to their lanes (unpack[b]).
struct LaneTables {
  int32_t pack[256][8];
  int32_t unpack[256][8];
  constexpr LaneTables() : pack{}, unpack{} {
    for (int b = 0; b < 256; ++b)
      for (int l = 0, n = 0; l < 8; ++l)
        if (b >> l & 1) {
          pack[b][n] = l;
          unpack[b][l] = n++;
        }
  }
};
inline constexpr LaneTables LANES{};

// out[k] = g[k][0..8) * GELU'(h[k][0..8)) where m[k][0..8) (uint8) is nonzero, 0 elsewhere,
// for 8 groups k of 8 entries. AbsTopK after a GELU keeps a quarter of the entries, so GELU'
// runs on the kept ones only, packed 8 to a vector: about a third of the work of 8 full
// vectors. gelu_grad8 works lane by lane, so every entry rounds exactly as in
// `gelu_grad8(h) * g`, masked.
static inline void gelu_grad_kept8x8(const float* const h[8], const float* const g[8],
                                     const uint8_t* const m[8], v8f out[8]) {
  alignas(32) float packed[72];
  int bits[8], n = 0;
  for (int k = 0; k < 8; ++k) {
    const __m128i mb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m[k]));
    bits[k] = ~_mm_movemask_epi8(_mm_cmpeq_epi8(mb, _mm_setzero_si128())) & 0xff;
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LANES.pack[bits[k]]));
    _mm256_storeu_ps(packed + n, _mm256_permutevar8x32_ps(_mm256_loadu_ps(h[k]), p));
    n += __builtin_popcount(bits[k]);
  }
  _mm256_storeu_ps(packed + n, _mm256_setzero_ps());  // the last vector's spare lanes
  for (int j = 0; j < n; j += 8) store8(packed + j, gelu_grad8(load8(packed + j)));
  const v8i lane_bit = {1, 2, 4, 8, 16, 32, 64, 128};
  n = 0;
  for (int k = 0; k < 8; ++k) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LANES.unpack[bits[k]]));
    const v8f e = (v8f)_mm256_permutevar8x32_ps(_mm256_loadu_ps(packed + n), u);
    const v8f d = e * load8(g[k]);
    out[k] = (v8f)((v8i)d & ((lane_bit & bits[k]) != 0));
    n += __builtin_popcount(bits[k]);
  }
}
#endif
