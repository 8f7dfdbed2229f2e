// Vector helpers of the selection, product and attention kernels: an AVX2 path and a portable
// scalar one.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sc_simd {

inline uint32_t key_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;
}

#if defined(__AVX2__)
// r[0..8) rows -> columns (the usual unpack / shuffle / lane-permute sequence).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Shuffle indices that move the set lanes of an 8-bit mask to the front (stream compaction),
// and byte masks that spread 8 bits over 8 bytes.
struct Tables {
  alignas(32) uint32_t perm[256][8];
  uint64_t bytes[256];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      uint64_t b = 0;
      for (int l = 0; l < 8; ++l) {
        perm[m][l] = 0;
        if (m & (1 << l)) {
          perm[m][j++] = static_cast<uint32_t>(l);
          b |= uint64_t{1} << (8 * l);
        }
      }
      bytes[m] = b;
    }
  }
};
inline const Tables& tables() {
  static const Tables t;
  return t;
}
#endif

// dst[c * ds + r] = src[r * ss + c] for an 8 x 8 block (row strides ss, ds in floats).
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
#if defined(__AVX2__)
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ds, r[i]);
#else
  for (int i = 0; i < 8; ++i)
    for (int c = 0; c < 8; ++c) dst[c * ds + i] = src[i * ss + c];
#endif
}

// The nonzero entries of x[0..n) (n a multiple of 8), scaled: val[m] = x[i] * scale and
// idx[m] = i in index order; returns m. val and idx must hold n entries.
inline int compress_nonzero(const float* x, int n, float scale, float* val, int* idx) {
  int m = 0;
#if defined(__AVX2__)
  const Tables& t = tables();
  for (int i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
    const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[bits]));
    const __m256i lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(i));
    const __m256 vs = _mm256_mul_ps(v, _mm256_set1_ps(scale));
    // m + 8 <= n holds at every store: m counts the nonzeros before i, at most i
    _mm256_storeu_ps(val + m, _mm256_permutevar8x32_ps(vs, p));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m),
                        _mm256_permutevar8x32_epi32(lanes, p));
    m += __builtin_popcount(static_cast<unsigned>(bits));
  }
#else
  for (int i = 0; i < n; ++i) {
    idx[m] = i;
    val[m] = x[i] * scale;
    m += x[i] != 0.0f;
  }
#endif
  return m;
}

// keys[i] = |x[i]| as uint32 (ordered like |x|); returns (min key, max key).
inline std::pair<uint32_t, uint32_t> make_keys(const float* x, int64_t n, uint32_t* keys) {
  uint32_t mn = 0xffffffffu, mx = 0;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i vmin = _mm256_set1_epi32(-1), vmax = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), absmask);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i), k);
    vmin = _mm256_min_epu32(vmin, k);
    vmax = _mm256_max_epu32(vmax, k);
  }
  alignas(32) uint32_t a[8], b[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), vmin);
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), vmax);
  for (int l = 0; l < 8; ++l) {
    mn = a[l] < mn ? a[l] : mn;
    mx = b[l] > mx ? b[l] : mx;
  }
#endif
  for (; i < n; ++i) {
    keys[i] = key_of(x[i]);
    mn = keys[i] < mn ? keys[i] : mn;
    mx = keys[i] > mx ? keys[i] : mx;
  }
  return {mn, mx};
}

// out[0..m) = the keys with (key >> shift) == value, in index order; returns m.
// `out` must hold n + 8 entries.
inline int64_t gather_bin(const uint32_t* keys, int64_t n, int shift, uint32_t value,
                          uint32_t* out) {
  int64_t m = 0, i = 0;
#if defined(__AVX2__)
  const Tables& t = tables();
  const __m256i want = _mm256_set1_epi32(static_cast<int>(value));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i eq = _mm256_cmpeq_epi32(_mm256_srl_epi32(k, sh), want);
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(eq));
    // no `if (!bits) continue`: which vectors hold bin keys is random, and a mispredicted
    // branch costs more than the store
    const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m), _mm256_permutevar8x32_epi32(k, p));
    m += __builtin_popcount(static_cast<unsigned>(bits));
  }
#endif
  for (; i < n; ++i) {
    out[m] = keys[i];
    m += (keys[i] >> shift) == value;
  }
  return m;
}

// One pass over a row of x (keys computed on the fly) for a guessed bracket lo < hi of the
// threshold key: *above = #(key > hi), *nz = #(key > 0), and band[0..m) = the keys with
// lo < key <= hi in index order; returns m. `band` must hold n + 8 entries.
inline int64_t bracket(const float* x, int64_t n, uint32_t lo, uint32_t hi, uint32_t* band,
                       int64_t* above, int64_t* nz) {
  int64_t m = 0, i = 0, a = 0, z = 0;
#if defined(__AVX2__)
  const Tables& t = tables();
  // keys are < 2^31, so signed compares order them
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff), zero = _mm256_setzero_si256();
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo));
  const __m256i vhi = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i ca = zero, cz = zero;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), absmask);
    const __m256i gh = _mm256_cmpgt_epi32(k, vhi);
    const __m256i in = _mm256_andnot_si256(gh, _mm256_cmpgt_epi32(k, vlo));
    ca = _mm256_sub_epi32(ca, gh);
    cz = _mm256_sub_epi32(cz, _mm256_cmpgt_epi32(k, zero));
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(in));
    const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(band + m), _mm256_permutevar8x32_epi32(k, p));
    m += __builtin_popcount(static_cast<unsigned>(bits));
  }
  alignas(32) int32_t va[8], vz[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(va), ca);
  _mm256_store_si256(reinterpret_cast<__m256i*>(vz), cz);
  for (int l = 0; l < 8; ++l) {
    a += va[l];
    z += vz[l];
  }
#endif
  for (; i < n; ++i) {
    const uint32_t k = key_of(x[i]);
    a += k > hi;
    z += k > 0;
    band[m] = k;
    m += k > lo && k <= hi;
  }
  *above = a;
  *nz = z;
  return m;
}

// mask[i] = keys[i] > t; y[i] = mask[i] ? x[i] : 0 (mask or y may be null; keys null: taken
// from x on the fly).
inline void keep_above(const float* x, const uint32_t* keys, int64_t n, uint32_t t,
                       uint8_t* mask, float* y) {
  int64_t i = 0;
#if defined(__AVX2__)
  const Tables& tb = tables();
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i tt = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(t)), bias);
  for (; i + 8 <= n; i += 8) {
    const __m256i k =
        keys ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i))
             : _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)),
                                _mm256_set1_epi32(0x7fffffff));
    // unsigned k > t via signed compare of both with the sign bit flipped
    const __m256i gt = _mm256_cmpgt_epi32(_mm256_xor_si256(k, bias), tt);
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(gt));
    if (mask) std::memcpy(mask + i, &tb.bytes[bits], 8);
    if (y) {
      const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), _mm256_castsi256_ps(gt));
      _mm256_storeu_ps(y + i, v);
    }
  }
#endif
  for (; i < n; ++i) {
    const bool keep = (keys ? keys[i] : key_of(x[i])) > t;
    if (mask) mask[i] = keep;
    if (y) y[i] = keep ? x[i] : 0.0f;
  }
}

}  // namespace sc_simd
