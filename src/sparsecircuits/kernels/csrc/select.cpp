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
  cand.resize(n + 1);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {  // branchless gather of the bin's keys
    cand[m] = keys[i];
    m += static_cast<int64_t>(keys[i] >> SHIFT) == b;
  }
  std::nth_element(cand.begin(), cand.begin() + (kk - 1), cand.begin() + m,
                   std::greater<uint32_t>());
  const uint32_t T = cand[kk - 1];
  int64_t gt = 0;
  for (int64_t i = 0; i < m; ++i) gt += cand[i] > T;
  return Cut{static_cast<int64_t>(T), kk - gt};
}

// Cut for the k largest of keys[0..n), 0 < k < n; `hist` (BINS) is zero on entry and exit.
Cut select_cut(const uint32_t* keys, int64_t n, int64_t k, uint32_t* hist,
               std::vector<uint32_t>& cand) {
  int64_t lo = BINS - 1, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = keys[i] >> SHIFT;
    hist[b]++;
    lo = std::min(lo, b);
    hi = std::max(hi, b);
  }
  int64_t above;
  const int64_t b = boundary_bin(hist, lo, hi, k, &above);
  const int64_t in_bin = hist[b];
  std::memset(hist + lo, 0, sizeof(uint32_t) * (hi - lo + 1));
  return cut_in_bin(keys, n, b, k - above, in_bin, cand);
}

// mask[i] = 1 for the kept entries of keys[0..n) under `cut` (ties: lowest index first).
inline void apply_cut(const uint32_t* keys, int64_t n, Cut cut, uint8_t* mask) {
  const int64_t T = cut.T;
  for (int64_t i = 0; i < n; ++i) mask[i] = static_cast<int64_t>(keys[i]) > T;
  int64_t need = cut.need;
  for (int64_t i = 0; i < n && need > 0; ++i) {
    if (static_cast<int64_t>(keys[i]) == T) {
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
      for (int64_t i = 0; i < n; ++i) keys[i] = abs_key(xr[i]);
      const Cut cut = k >= n ? Cut{-1, 0} : select_cut(keys.data(), n, k, hist.data(), cand);
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
      for (int64_t c = 0; c < cols; ++c) kr[c] = abs_key(w[r * cols + c]);
      if (floor > 0) {
        // Protected entries get a key above every real |w| (real keys are < 2^31).
        const Cut cut =
            floor >= cols ? Cut{-1, 0} : select_cut(kr, cols, floor, rhist.data(), cand);
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
