// Selection kernels: AbsTopK on activations and the top-k magnitude projection of weights.
//
// Both find the k largest |x| exactly without sorting: |x| as a uint32 ("key") orders like
// the float for non-negative values, so one 4096-bin histogram of the key's top 12 bits
// (sign 0, 8 exponent bits, 3 mantissa bits) brackets the threshold, and an nth_element over
// the few keys in the boundary bin pins it down. Ties at the threshold go to the lowest
// index, so results are deterministic and equal to a stable top-k.
//
// Plain C ABI (called through ctypes with tensor data pointers): no torch headers, so the
// library builds in seconds with any C++ compiler and needs no torch at build time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "common.h"

namespace {

constexpr int SHIFT = 20;
constexpr int64_t BINS = int64_t{1} << (32 - SHIFT);

inline uint32_t abs_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;
}

// Keep key > T, plus the first `need` keys equal to T (T == -1, need == 0: keep all).
struct Cut {
  int64_t T;
  int64_t need;
};

// The boundary bin b of the k-th largest key given a histogram over bins lo..hi:
// returns b and sets `above` to the number of keys in bins above it.
inline int64_t boundary_bin(const uint32_t* hist, int64_t lo, int64_t hi, int64_t k,
                            int64_t* above) {
  int64_t acc = 0, b = hi;
  for (; b > lo; --b) {
    if (acc + hist[b] >= k) break;
    acc += hist[b];
  }
  *above = acc;
  return b;
}

// The cut for the kk-th largest key among the keys of bin b (kk <= keys in the bin).
Cut cut_in_bin(const uint32_t* keys, int64_t n, int64_t b, int64_t kk, int64_t in_bin,
               std::vector<uint32_t>& cand) {
  if (in_bin == kk) return Cut{(b << SHIFT) - 1, 0};  // the whole bin is kept
  cand.resize(n + 8);
  int64_t m = 0, i = 0;
  const uint32_t bin = static_cast<uint32_t>(b);
  for (; i + 8 <= n; i += 8) {  // test 8 keys at once; most groups hold none of the bin
    v8u kv;
    std::memcpy(&kv, keys + i, sizeof(kv));
    const v8u hit = (kv >> SHIFT) == bin;
    if (!any8(hit)) continue;
    for (int l = 0; l < 8; ++l) {
      cand[m] = keys[i + l];
      m += hit[l] != 0;
    }
  }
  for (; i < n; ++i) {
    cand[m] = keys[i];
    m += (keys[i] >> SHIFT) == bin;
  }
  std::nth_element(cand.begin(), cand.begin() + (kk - 1), cand.begin() + m,
                   std::greater<uint32_t>());
  const uint32_t T = cand[kk - 1];
  int64_t gt = 0;
  for (int64_t j = 0; j < m; ++j) gt += cand[j] > T;
  return Cut{static_cast<int64_t>(T), kk - gt};
}

// Cut for the k largest of keys[0..n), 0 < k < n, whose bins (key >> SHIFT) lie in lo..hi;
// `hist` (BINS) is zero on entry and exit.
Cut select_cut(const uint32_t* keys, int64_t n, int64_t k, int64_t lo, int64_t hi,
               uint32_t* hist, std::vector<uint32_t>& cand) {
  for (int64_t i = 0; i < n; ++i) hist[keys[i] >> SHIFT]++;
  int64_t above;
  const int64_t b = boundary_bin(hist, lo, hi, k, &above);
  const int64_t in_bin = hist[b];
  std::memset(hist + lo, 0, sizeof(uint32_t) * (hi - lo + 1));
  return cut_in_bin(keys, n, b, k - above, in_bin, cand);
}

// keys[i] = |x[i]| as uint32; returns the (lowest, highest) bin.
inline std::pair<int64_t, int64_t> make_keys(const float* x, int64_t n, uint32_t* keys) {
  v8u vmin = {}, vmax = {};
  vmin = ~vmin;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8u kv;
    std::memcpy(&kv, x + i, sizeof(kv));
    kv &= 0x7fffffffu;
    std::memcpy(keys + i, &kv, sizeof(kv));
    vmin = kv < vmin ? kv : vmin;
    vmax = kv > vmax ? kv : vmax;
  }
  uint32_t mn = 0xffffffffu, mx = 0;
  for (int l = 0; l < 8; ++l) {
    mn = std::min(mn, static_cast<uint32_t>(vmin[l]));
    mx = std::max(mx, static_cast<uint32_t>(vmax[l]));
  }
  for (; i < n; ++i) {
    keys[i] = abs_key(x[i]);
    mn = std::min(mn, keys[i]);
    mx = std::max(mx, keys[i]);
  }
  return {mn >> SHIFT, mx >> SHIFT};
}

// mask[i] = 1 for the kept entries of keys[0..n) under `cut` (ties: lowest index first).
inline void apply_cut(const uint32_t* keys, int64_t n, Cut cut, uint8_t* mask) {
  if (cut.T < 0) {
    std::memset(mask, 1, n);
    return;
  }
  const uint32_t t = static_cast<uint32_t>(cut.T);
  for (int64_t i = 0; i < n; ++i) mask[i] = keys[i] > t;
  int64_t need = cut.need;
  for (int64_t i = 0; i < n && need > 0; ++i) {
    if (keys[i] == t) {
      mask[i] = 1;
      --need;
    }
  }
}

}  // namespace

// AbsTopK along rows: y = x where |x| is among the k largest of its row, else 0; mask marks
// the kept entries. x: (rows, n) float32 with row stride ld (>= n, unit column stride);
// y: (rows, n) float32 contiguous; mask: (rows, n) uint8. 0 <= k <= n.
SC_EXPORT void sc_abstopk(const float* x, int64_t ld, float* y, uint8_t* mask, int64_t rows,
                          int64_t n, int64_t k, int threads) {
  if (k <= 0) {
    std::memset(y, 0, sizeof(float) * rows * n);
    std::memset(mask, 0, rows * n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t> keys(n), hist(BINS, 0), cand;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ld;
      float* yr = y + r * n;
      uint8_t* mr = mask + r * n;
      const auto [lo, hi] = make_keys(xr, n, keys.data());
      const Cut cut =
          k >= n ? Cut{-1, 0} : select_cut(keys.data(), n, k, lo, hi, hist.data(), cand);
      apply_cut(keys.data(), n, cut, mr);
      for (int64_t i = 0; i < n; ++i) yr[i] = mr[i] ? xr[i] : 0.0f;
    }
  }
}

// Top-k magnitude projection of a (rows, cols) matrix, in place: each row's `floor` largest
// |w| are kept first, then the largest remaining |w| overall until exactly k slots are kept
// (ties: lowest flat index first). Writes the kept mask (rows*cols uint8). floor*rows <= k.
SC_EXPORT void sc_project_topk(float* w, uint8_t* mask, int64_t rows, int64_t cols, int64_t k,
                               int64_t floor, int threads) {
  const int64_t n = rows * cols;
  if (k >= n) {
    std::memset(mask, 1, n);
    return;
  }
  std::vector<uint32_t> keys(n), hist(BINS, 0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t> rhist(BINS, 0), local(BINS, 0), cand;
    std::vector<uint8_t> rmask(floor > 0 ? cols : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t* kr = keys.data() + r * cols;
      const auto [lo, hi] = make_keys(w + r * cols, cols, kr);
      if (floor > 0) {
        // Protected entries get a key above every real |w| (real keys are < 2^31).
        const Cut cut = floor >= cols ? Cut{-1, 0}
                                      : select_cut(kr, cols, floor, lo, hi, rhist.data(), cand);
        apply_cut(kr, cols, cut, rmask.data());
        for (int64_t c = 0; c < cols; ++c)
          if (rmask[c]) kr[c] = 0xffffffffu;
      }
      for (int64_t c = 0; c < cols; ++c) local[kr[c] >> SHIFT]++;
    }
#pragma omp critical
    for (int64_t b = 0; b < BINS; ++b) hist[b] += local[b];
  }
  int64_t above;
  const int64_t b = boundary_bin(hist.data(), 0, BINS - 1, k, &above);
  std::vector<uint32_t> cand;
  const Cut cut = cut_in_bin(keys.data(), n, b, k - above, hist[b], cand);
  apply_cut(keys.data(), n, cut, mask);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    if (!mask[i]) w[i] = 0.0f;
}
