// Selection kernels: AbsTopK on activations and the top-k magnitude projection of weights.
//
// Both find the k largest |x| exactly without sorting: |x| as a uint32 ("key") orders like
// the float for non-negative values, so one 4096-bin histogram of the key's top 12 bits
// (sign 0, 8 exponent bits, 3 mantissa bits) brackets the threshold, and an nth_element over
// the few keys in the boundary bin pins it down. AbsTopK rows first try a cheaper route: the
// previous row's threshold brackets this row's, one vector pass counts the keys above the
// bracket and gathers those inside it, and the count proves (or refutes) the bracket. Ties
// at the threshold go to the lowest index, so results are deterministic and equal to a
// stable top-k, whichever route a row takes.
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
#include "simd.h"
#include "topk_rows.h"

namespace {

using sc_simd::gather_bin;
using sc_simd::keep_above;
using sc_simd::make_keys;

constexpr int SHIFT = 20;
constexpr int64_t BINS = int64_t{1} << (32 - SHIFT);
constexpr int64_t REFINE_ABOVE = 48;  // candidates beyond which a second radix pass pays
constexpr int64_t RANK_BELOW = 48;    // candidates up to which counting ranks beats a select

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

// The kk-th largest of a[0..m) (1 <= kk <= m) by counting, for each a[i], the keys above
// it and the keys at or above it: branch-free vector compares, where nth_element on a few
// dozen random keys spends most of its time in mispredicted branches. Keys are < 2^31.
uint32_t kth_by_rank(const uint32_t* a, int64_t m, int64_t kk) {
  typedef int32_t v8s __attribute__((vector_size(32)));
  alignas(32) int32_t buf[RANK_BELOW + 8];
  const int64_t mp = (m + 7) & ~int64_t{7};
  for (int64_t j = 0; j < mp; ++j) buf[j] = j < m ? static_cast<int32_t>(a[j]) : -1;
  for (int64_t i = 0; i < m; ++i) {
    const v8s ai = v8s{} + static_cast<int32_t>(a[i]);
    v8s gt = {}, ge = {};
    for (int64_t j = 0; j < mp; j += 8) {
      v8s v;
      std::memcpy(&v, buf + j, sizeof(v));
      gt += v > ai;  // -1 where true
      ge += v >= ai;
    }
    int64_t ngt = 0, nge = 0;
    for (int l = 0; l < 8; ++l) {
      ngt -= gt[l];
      nge -= ge[l];
    }
    if (ngt < kk && kk <= nge) return a[i];
  }
  return a[0];  // unreachable: some key holds rank kk
}

// The kk-th largest of cand[0..m) (1 <= kk <= m), keys that share their top 12 bits.
// Reorders cand; `tmp` holds m + 8 keys.
uint32_t kth_largest(uint32_t* cand, int64_t m, int64_t kk, uint32_t* tmp) {
  if (m > REFINE_ABOVE) {  // one more radix digit (bits 19..12) instead of a long nth_element
    uint32_t h[256] = {0};
    for (int64_t j = 0; j < m; ++j) h[(cand[j] >> 12) & 255u]++;
    int64_t acc = 0, b = 255;
    for (; b > 0; --b) {
      if (acc + h[b] >= kk) break;
      acc += h[b];
    }
    kk -= acc;
    const uint32_t top = (cand[0] >> SHIFT << 8) | static_cast<uint32_t>(b);
    m = gather_bin(cand, m, 12, top, tmp);
    cand = tmp;
  }
  if (m <= RANK_BELOW) return kth_by_rank(cand, m, kk);
  std::nth_element(cand, cand + (kk - 1), cand + m, std::greater<uint32_t>());
  return cand[kk - 1];
}

// The cut for the kk-th largest key among the `in_bin` keys of bin b (kk <= in_bin).
Cut cut_in_bin(const uint32_t* keys, int64_t n, int64_t b, int64_t kk, int64_t in_bin,
               std::vector<uint32_t>& cand, std::vector<uint32_t>& tmp) {
  if (in_bin == kk) return Cut{(b << SHIFT) - 1, 0};  // the whole bin is kept
  cand.resize(in_bin + 8);
  tmp.resize(in_bin + 8);
  const int64_t m = gather_bin(keys, n, SHIFT, static_cast<uint32_t>(b), cand.data());
  const uint32_t T = kth_largest(cand.data(), m, kk, tmp.data());
  int64_t gt = 0, eq = 0;
  for (int64_t j = 0; j < m; ++j) {
    gt += cand[j] > T;
    eq += cand[j] == T;
  }
  // Every key equal to T is kept (the usual case: T is unique): "key > T - 1" says so
  // without apply_cut's scalar scan for the first `need` ties.
  if (eq == kk - gt) return Cut{static_cast<int64_t>(T) - 1, 0};
  return Cut{static_cast<int64_t>(T), kk - gt};
}

// Cut for the k largest of keys[0..n), 0 < k < n, with keys in [mn, mx];
// `hist` (4 * BINS: four interleaved counters per bin, so that equal bins in nearby keys do
// not serialise on one counter) is zero on entry and exit.
Cut select_cut(const uint32_t* keys, int64_t n, int64_t k, uint32_t mn, uint32_t mx,
               uint32_t* hist, std::vector<uint32_t>& cand, std::vector<uint32_t>& tmp) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    hist[(keys[i] >> SHIFT) * 4]++;
    hist[(keys[i + 1] >> SHIFT) * 4 + 1]++;
    hist[(keys[i + 2] >> SHIFT) * 4 + 2]++;
    hist[(keys[i + 3] >> SHIFT) * 4 + 3]++;
  }
  for (; i < n; ++i) hist[(keys[i] >> SHIFT) * 4]++;
  const int64_t lo = mn >> SHIFT, hi = mx >> SHIFT;
  int64_t acc = 0, b = hi, in_bin = 0;
  for (; b >= lo; --b) {
    const uint32_t* h = hist + 4 * b;
    in_bin = h[0] + h[1] + h[2] + h[3];
    if (acc + in_bin >= k || b == lo) break;
    acc += in_bin;
  }
  std::memset(hist + 4 * lo, 0, sizeof(uint32_t) * 4 * (hi - lo + 1));
  return cut_in_bin(keys, n, b, k - acc, in_bin, cand, tmp);
}

int64_t count_nonzero(const uint32_t* keys, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] != 0;
  return c;
}

// mask[i] = 1 for the kept entries under `cut` (ties: lowest index first), and
// y[i] = x[i] there, 0 elsewhere (mask, or x and y, may be null; keys null: from x).
inline void apply_cut(const float* x, const uint32_t* keys, int64_t n, Cut cut, uint8_t* mask,
                      float* y) {
  auto key = [&](int64_t i) { return keys ? keys[i] : sc_simd::key_of(x[i]); };
  if (cut.T < 0) {
    if (mask) std::memset(mask, 1, n);
    if (y) std::memcpy(y, x, sizeof(float) * n);
    return;
  }
  const uint32_t t = static_cast<uint32_t>(cut.T);
  if (y && y == x && cut.need > 0 && t != 0) {  // in place: keep_above zeroes the ties
    std::vector<std::pair<int64_t, float>> ties;
    int64_t need = cut.need;
    for (int64_t i = 0; i < n && need > 0; ++i)
      if (key(i) == t) {
        ties.emplace_back(i, x[i]);
        --need;
      }
    keep_above(x, keys, n, t, mask, y);
    for (const auto& [i, v] : ties) {
      if (mask) mask[i] = 1;
      y[i] = v;
    }
    return;
  }
  keep_above(x, keys, n, t, mask, y);
  int64_t need = cut.need;
  for (int64_t i = 0; i < n && need > 0; ++i) {
    if (key(i) == t) {
      if (mask) mask[i] = 1;
      if (y) y[i] = x[i];  // in place with t == 0: the kept ties are zeros, y[i] is already 0
      --need;
    }
  }
}

// The previous row's threshold as a guess for the next (rows of one activation tensor have
// similar magnitude distributions): a bracket of relative half-width `rel` around it, widened
// after a miss and narrowed slowly after each hit.
struct Guess {
  uint32_t T = 0;  // 0: no guess yet
  float rel = 0.05f;
};

inline uint32_t scaled_key(uint32_t key, float f) {
  float v;
  std::memcpy(&v, &key, 4);
  return sc_simd::key_of(v * f);
}

// The kk-th largest of band[0..m) (1 <= kk <= m), keys in (lo, hi]: a histogram of at most
// 64 bins linear in the key over (lo, hi], then a rank among the boundary bin's keys.
uint32_t kth_in_band(const uint32_t* band, int64_t m, int64_t kk, uint32_t lo, uint32_t hi,
                     std::vector<uint32_t>& tmp) {
  if (m <= 16) return kth_by_rank(band, m, kk);
  int sh = 0;  // keys lo+1..hi -> bins 0..63 by a shift (a division per key costs more)
  while (((hi - lo - 1) >> sh) >= 64) ++sh;
  auto bin = [&](uint32_t key) { return static_cast<int64_t>((key - lo - 1) >> sh); };
  uint32_t h[64] = {0};
  for (int64_t j = 0; j < m; ++j) h[bin(band[j])]++;
  int64_t acc = 0, b = 63;
  for (; b > 0; --b) {
    if (acc + h[b] >= kk) break;
    acc += h[b];
  }
  tmp.resize(m + 8);
  int64_t c = 0;
  for (int64_t j = 0; j < m; ++j) {
    tmp[c] = band[j];
    c += bin(band[j]) == b;
  }
  kk -= acc;
  if (c <= RANK_BELOW) return kth_by_rank(tmp.data(), c, kk);
  std::nth_element(tmp.begin(), tmp.begin() + (kk - 1), tmp.begin() + c,
                   std::greater<uint32_t>());
  return tmp[kk - 1];
}

// The cut for the k largest |x| of a row (0 < k < n) from a bracket around g.T: one counting
// pass and a selection among the band's keys, instead of keys, a histogram and a bin. Returns
// false (the caller selects the usual way) when the k-th largest key is not in the bracket.
// Exact either way: the counts prove the bracket.
bool bracket_cut(const float* x, int64_t n, int64_t k, Guess& g, std::vector<uint32_t>& band,
                 std::vector<uint32_t>& tmp, Cut* cut) {
  if (g.T == 0 || !(g.rel > 0.0f)) return false;
  const uint32_t lo = scaled_key(g.T, 1.0f - g.rel), hi = scaled_key(g.T, 1.0f + g.rel);
  if (hi >= 0x7f800000u) return false;  // near inf/NaN: no bracket
  if (!(lo < g.T && g.T < hi)) {        // narrower than an ulp (denormals): widen it
    g.rel = std::min(0.5f, g.rel * 2.0f);
    return false;
  }
  band.resize(n + 8);
  int64_t above, nz;
  const int64_t m = sc_simd::bracket(x, n, lo, hi, band.data(), &above, &nz);
  if (nz <= k) {  // at most k nonzeros: all of them and the first zeros
    *cut = Cut{0, k - nz};
    return true;
  }
  if (above >= k || above + m < k) {  // the threshold lies outside: widen the next bracket
    g.rel = std::min(0.5f, g.rel * 1.5f);
    return false;
  }
  // Misses cost a pass; wide bands cost little (a histogram over the band), so the bracket
  // shrinks slowly after each hit: about one row in fifteen misses.
  g.rel = std::max(1e-6f, g.rel * 0.97f);  // identical rows would shrink it below an ulp
  const int64_t kk = k - above;
  const uint32_t T = kth_in_band(band.data(), m, kk, lo, hi, tmp);
  int64_t gt = 0, eq = 0;
  for (int64_t j = 0; j < m; ++j) {
    gt += band[j] > T;
    eq += band[j] == T;
  }
  *cut = eq == kk - gt ? Cut{static_cast<int64_t>(T) - 1, 0}
                       : Cut{static_cast<int64_t>(T), kk - gt};
  g.T = T;
  return true;
}

// The k-th largest key under a cut (what the next row's bracket is centred on).
inline uint32_t cut_key(Cut c) {
  return static_cast<uint32_t>(c.need > 0 ? c.T : c.T + 1);
}

}  // namespace

struct AbsTopKRows::Impl {
  int64_t n;
  std::vector<uint32_t> keys, hist, cand, tmp;
  Guess guess;
  explicit Impl(int64_t n_) : n(n_), keys(n_), hist(4 * BINS, 0) {}
};

AbsTopKRows::AbsTopKRows(int64_t n) : impl_(new Impl(n)) {}
AbsTopKRows::~AbsTopKRows() { delete impl_; }

void AbsTopKRows::row(const float* xr, int64_t k, float* y, uint8_t* mask) {
  Impl& s = *impl_;
  const int64_t n = s.n;
  Cut cut{-1, 0};
  if (k < n && bracket_cut(xr, n, k, s.guess, s.cand, s.tmp, &cut)) {
    apply_cut(xr, nullptr, n, cut, mask, y);
    return;
  }
  const auto [mn, mx] = make_keys(xr, n, s.keys.data());
  if (k < n) {
    // Rows with at most k nonzeros (q, k, v of a weight-sparse model are mostly exact
    // zeros): keep every nonzero and the first zeros, without a selection.
    const int64_t nz = mn == 0 ? count_nonzero(s.keys.data(), n) : n;
    cut = nz <= k ? Cut{0, k - nz}
                  : select_cut(s.keys.data(), n, k, mn, mx, s.hist.data(), s.cand, s.tmp);
    if (nz > k) s.guess.T = cut_key(cut);
  }
  apply_cut(xr, s.keys.data(), n, cut, mask, y);
}

// AbsTopK along rows: y = x where |x| is among the k largest of its row, else 0; mask marks
// the kept entries. x: (rows, n) float32 with row stride ld (>= n, unit column stride);
// y: (rows, n) float32 with row stride ldy, or x itself (in place, ldy == ld); mask:
// (rows, n) uint8, or null when no gradient will be taken (inference). 0 <= k <= n.
SC_EXPORT void sc_abstopk(const float* x, int64_t ld, float* y, int64_t ldy, uint8_t* mask,
                          int64_t rows, int64_t n, int64_t k, int threads) {
  if (k <= 0) {
    for (int64_t r = 0; r < rows; ++r) std::memset(y + r * ldy, 0, sizeof(float) * n);
    if (mask) std::memset(mask, 0, rows * n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    AbsTopKRows topk(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      topk.row(x + r * ld, k, y + r * ldy, mask ? mask + r * n : nullptr);
  }
}

// The AbsTopK backward: gx = gy where mask is set, 0 elsewhere. gy: (rows, n) with row
// stride ld (unit column stride); mask: (rows, n) uint8; gx: (rows, n) contiguous.
SC_EXPORT void sc_mask_grad(const float* gy, int64_t ld, const uint8_t* mask, float* gx,
                            int64_t rows, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gy + r * ld;
    const uint8_t* m = mask + r * n;
    float* o = gx + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = m[i] ? g[i] : 0.0f;
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
    std::vector<uint32_t> rhist(4 * BINS, 0), local(BINS, 0), cand, tmp;
    std::vector<uint8_t> rmask(floor > 0 ? cols : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t* kr = keys.data() + r * cols;
      const auto [mn, mx] = make_keys(w + r * cols, cols, kr);
      if (floor > 0) {
        // Protected entries get a key above every real |w| (real keys are < 2^31).
        const Cut cut = floor >= cols
                            ? Cut{-1, 0}
                            : select_cut(kr, cols, floor, mn, mx, rhist.data(), cand, tmp);
        apply_cut(nullptr, kr, cols, cut, rmask.data(), nullptr);
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
  std::vector<uint32_t> cand, tmp;
  const Cut cut = cut_in_bin(keys.data(), n, b, k - above, hist[b], cand, tmp);
  apply_cut(nullptr, keys.data(), n, cut, mask, nullptr);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    if (!mask[i]) w[i] = 0.0f;
}
