// Sparse-weight matrix products in the token-major layout the model uses (x is (N, in)).
//
// W is CSR over its output rows: crow (out+1, int64), col (nnz, int32), val (nnz, float32).
//   sc_spmm:  y (N, out) = x (N, in) @ W^T (+ bias)      forward, and dx = dy @ W via W^T's CSR
//   sc_sddmm: dval[j] = sum_n dy[n, row(j)] * x[n, col(j)] the weight gradient on W's support
// Tokens are processed in tiles of 32: a tile of x is transposed into a (in, 32) buffer that
// stays in cache, so each nonzero costs four 8-wide FMAs over contiguous memory (PERF.md §1).
#include <algorithm>
#include <vector>

#include "common.h"
#include "simd.h"
#include "topk_rows.h"
#include "vmath.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TW = 32;  // tokens per tile

#if defined(__AVX2__)
using sc_simd::transpose8;
constexpr int64_t V = 8;  // the vector transposes' block
#else
constexpr int64_t V = 1 << 30;  // no vector blocks: the scalar loops do everything
#endif

// Rows t0..t0+nt of a (N, d) matrix -> tile (d, TW), zero-padding tokens nt..TW. Full 8 x 8
// blocks go through register transposes (the tiles' transposes cost more than the sparse
// products themselves at 1/64 density when done element by element); the edges are scalar.
void load_tile(const float* a, int64_t d, int64_t t0, int64_t nt, float* tile) {
  if (nt < TW) std::memset(tile, 0, sizeof(float) * d * TW);
  const int64_t n8 = nt / V * V, d8 = d / V * V;
#if defined(__AVX2__)
  for (int64_t r0 = 0; r0 < n8; r0 += 8)
    for (int64_t i0 = 0; i0 < d8; i0 += 8) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(a + (t0 + r0 + k) * d + i0);
      transpose8(r);
      for (int m = 0; m < 8; ++m) _mm256_storeu_ps(tile + (i0 + m) * TW + r0, r[m]);
    }
#endif
  for (int64_t r = 0; r < nt; ++r) {
    const float* ar = a + (t0 + r) * d;
    for (int64_t i = r < n8 ? d8 : 0; i < d; ++i) tile[i * TW + r] = ar[i];
  }
}

// tile (d, TW) -> rows t0..t0+nt of a (N, d) matrix.
void store_tile(const float* tile, int64_t d, int64_t t0, int64_t nt, float* a) {
  const int64_t n8 = nt / V * V, d8 = d / V * V;
#if defined(__AVX2__)
  for (int64_t r0 = 0; r0 < n8; r0 += 8)
    for (int64_t i0 = 0; i0 < d8; i0 += 8) {
      __m256 r[8];
      for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps(tile + (i0 + m) * TW + r0);
      transpose8(r);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(a + (t0 + r0 + k) * d + i0, r[k]);
    }
#endif
  for (int64_t r = 0; r < nt; ++r) {
    float* ar = a + (t0 + r) * d;
    for (int64_t i = r < n8 ? d8 : 0; i < d; ++i) ar[i] = tile[i * TW + r];
  }
}

// dy of a layer whose output went through AbsTopK in column segments (q, k, v of c_attn; one
// segment elsewhere): dy[:, seg] = g where mask is set (times GELU'(h) after a GELU), else 0,
// from the upstream gradient g (row stride ld), the kept mask (rows x width uint8) and the
// GELU's input h (rows x width), each null when absent. The AbsTopK backward's pass over
// memory (read g and the mask, write dy, read dy again here) becomes part of the tile load.
struct DySeg {
  int64_t width;
  const float* g;
  int64_t ld;
  const uint8_t* mask;
  const float* h;

  // 8 entries of row r from column i: the same expression as sc_mask_grad and
  // sc_gelu_topk_grad, so that dy rounds exactly as theirs.
  v8f load(int64_t r, int64_t i) const {
    v8f d = load8(g + r * ld + i);
    if (h) d = gelu_grad8(load8(h + r * width + i)) * d;
    if (!mask) return d;
    uint64_t bits;
    std::memcpy(&bits, mask + r * width + i, 8);
    typedef uint8_t v8b __attribute__((vector_size(8)));
    v8b mb;
    std::memcpy(&mb, &bits, 8);
    return (v8f)((v8i)d & (__builtin_convertvector(mb, v8i) != 0));
  }
  // Row r's entries i..width (fewer than 8) through a zero-padded vector, rounding as the body.
  void load_tail(int64_t r, int64_t i, float* out) const {
    float gt[8] = {0}, ht[8] = {0};
    uint8_t mt[8] = {0};
    for (int64_t j = i; j < width; ++j) {
      gt[j - i] = g[r * ld + j];
      if (h) ht[j - i] = h[r * width + j];
      mt[j - i] = mask ? mask[r * width + j] : 1;
    }
    const DySeg pad{8, gt, 0, mask ? mt : nullptr, h ? ht : nullptr};
    store8(out, pad.load(0, 0));
  }
};

// Rows t0..t0+nt of dy (the segments side by side) -> tile (out, TW), as load_tile does for a
// materialised dy.
void load_dy_tile(const DySeg* segs, int nseg, int64_t out, int64_t t0, int64_t nt, float* tile) {
  if (nt < TW) std::memset(tile, 0, sizeof(float) * out * TW);
  int64_t c0 = 0;
  for (int s = 0; s < nseg; ++s) {
    const DySeg& sg = segs[s];
    const int64_t n8 = nt / V * V, w8 = sg.width / V * V;
#if defined(__AVX2__)
    for (int64_t r0 = 0; r0 < n8; r0 += 8)
      for (int64_t i0 = 0; i0 < w8; i0 += 8) {
        __m256 r[8];
        if (sg.h && sg.mask) {  // GELU' on the kept entries only
          const float *h[8], *g[8];
          const uint8_t* m[8];
          for (int k = 0; k < 8; ++k) {
            const int64_t row = t0 + r0 + k;
            h[k] = sg.h + row * sg.width + i0;
            g[k] = sg.g + row * sg.ld + i0;
            m[k] = sg.mask + row * sg.width + i0;
          }
          gelu_grad_kept8x8(h, g, m, reinterpret_cast<v8f*>(r));
        } else {
          for (int k = 0; k < 8; ++k) r[k] = (__m256)sg.load(t0 + r0 + k, i0);
        }
        transpose8(r);
        for (int m = 0; m < 8; ++m) _mm256_storeu_ps(tile + (c0 + i0 + m) * TW + r0, r[m]);
      }
#endif
    for (int64_t r = 0; r < nt; ++r) {
      alignas(32) float v[8];
      for (int64_t i = r < n8 ? w8 : 0; i < sg.width; i += 8) {
        if (i + 8 <= sg.width)
          store8(v, sg.load(t0 + r, i));
        else
          sg.load_tail(t0 + r, i, v);
        for (int64_t j = i; j < std::min(i + 8, sg.width); ++j) tile[(c0 + j) * TW + r] = v[j - i];
      }
    }
    c0 += sg.width;
  }
}

#if defined(__AVX2__)
// {hsum(s[0]), ..., hsum(s[7])} in one vector.
inline v8f hsum8x8(const v8f s[8]) {
  const __m256 a = _mm256_hadd_ps((__m256)s[0], (__m256)s[1]);
  const __m256 b = _mm256_hadd_ps((__m256)s[2], (__m256)s[3]);
  const __m256 c = _mm256_hadd_ps((__m256)s[4], (__m256)s[5]);
  const __m256 d = _mm256_hadd_ps((__m256)s[6], (__m256)s[7]);
  const __m256 u = _mm256_hadd_ps(a, b);  // s0..s3 sums of the low lanes, then of the high
  const __m256 w = _mm256_hadd_ps(c, d);
  return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u, w, 0x20),
                            _mm256_permute2f128_ps(u, w, 0x31));
}
#endif

// Output rows o0..o1 of one tile: yt[o] = sum_j val[j] * xt[col[j]] (+ bias[o]).
void spmm_rows(const int64_t* crow, const int32_t* col, const float* val, const float* bias,
               const float* xt, float* yt, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float b = bias ? bias[o] : 0.0f;
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    a0 += b;
    a1 += b;
    a2 += b;
    a3 += b;
    for (int64_t j = crow[o]; j < crow[o + 1]; ++j) {
      const float v = val[j];
      const float* xr = xt + static_cast<int64_t>(col[j]) * TW;
      a0 += v * load8(xr);
      a1 += v * load8(xr + 8);
      a2 += v * load8(xr + 16);
      a3 += v * load8(xr + 24);
    }
    float* yr = yt + o * TW;
    store8(yr, a0);
    store8(yr + 8, a1);
    store8(yr + 16, a2);
    store8(yr + 24, a3);
  }
}

// Adds sum over the tile's tokens of xt[i] to colsum[i] for i < in (padding tokens are 0).
void add_col_sums(const float* xt, int64_t in, float* colsum) {
  for (int64_t i = 0; i < in; ++i) {
    const float* r = xt + i * TW;
    colsum[i] += hsum8((load8(r) + load8(r + 8)) + (load8(r + 16) + load8(r + 24)));
  }
}

// The support weight gradient's contribution of one tile: mine[j] += sum over the tile's
// tokens of dyt[row(j)] * xt[col(j)] (padding tokens are 0 in both).
void sddmm_tile(const int64_t* crow, const int32_t* col, int64_t out, const float* dyt,
                const float* xt, float* mine) {
  for (int64_t o = 0; o < out; ++o) {
    if (crow[o] == crow[o + 1]) continue;
    const float* dr = dyt + o * TW;
    const v8f d0 = load8(dr), d1 = load8(dr + 8), d2 = load8(dr + 16), d3 = load8(dr + 24);
    auto dot = [&](int64_t j) {
      const float* xr = xt + static_cast<int64_t>(col[j]) * TW;
      return d0 * load8(xr) + d1 * load8(xr + 8) + d2 * load8(xr + 16) + d3 * load8(xr + 24);
    };
    int64_t j = crow[o];
#if defined(__AVX2__)
    for (; j + 8 <= crow[o + 1]; j += 8) {  // 8 horizontal sums at once
      v8f sv[8];
      for (int q = 0; q < 8; ++q) sv[q] = dot(j + q);
      store8(mine + j, load8(mine + j) + hsum8x8(sv));
    }
#endif
    for (; j < crow[o + 1]; ++j) mine[j] += hsum8(dot(j));
  }
}

// The support backward's sparse work on one tile, by W^T's rows i: dxt[i] = sum over the row
// of val_t * dyt[row] (spmm_rows on W^T), and, from the same load of each dyt[row], the
// weight gradient's dot products dyt[row] . xt[i] added to mine_t (W^T's order), 8 of them
// per horizontal sum. The expressions and the per-tile order of the additions are
// spmm_rows' and sddmm_tile's, so the results are bitwise theirs; sharing the loads of dy's
// tile saves about a third of the two loops' work.
void bwd_rows(const int64_t* crow_t, const int32_t* col_t, const float* val_t, int64_t in,
              const float* dyt, const float* xt, float* dxt, float* mine_t) {
  for (int64_t i = 0; i < in; ++i) {
    const float* xr = xt + i * TW;
    const v8f x0 = load8(xr), x1 = load8(xr + 8), x2 = load8(xr + 16), x3 = load8(xr + 24);
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    auto one = [&](int64_t j) {
      const float v = val_t[j];
      const float* dr = dyt + static_cast<int64_t>(col_t[j]) * TW;
      const v8f d0 = load8(dr), d1 = load8(dr + 8), d2 = load8(dr + 16), d3 = load8(dr + 24);
      a0 += v * d0;
      a1 += v * d1;
      a2 += v * d2;
      a3 += v * d3;
      return d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3;
    };
    int64_t j = crow_t[i];
    const int64_t end = crow_t[i + 1];
#if defined(__AVX2__)
    for (; j + 8 <= end; j += 8) {
      v8f sv[8];
      for (int q = 0; q < 8; ++q) sv[q] = one(j + q);
      store8(mine_t + j, load8(mine_t + j) + hsum8x8(sv));
    }
#endif
    for (; j < end; ++j) mine_t[j] += hsum8(one(j));
    float* yr = dxt + i * TW;
    store8(yr, a0);
    store8(yr + 8, a1);
    store8(yr + 16, a2);
    store8(yr + 24, a3);
  }
}

// Per-thread partial sums of n floats, added in thread order at the end: the result does not
// depend on which thread finishes first. n = 0: nothing is kept (mine() is null).
class PerThread {
 public:
  PerThread(int64_t n, int threads) : n_(n), threads_(threads), acc_(n * threads, 0.0f) {}
  float* mine() { return n_ ? acc_.data() + omp_get_thread_num_safe() * n_ : nullptr; }
  float total(int64_t i) const {
    float s = 0.0f;
    for (int t = 0; t < threads_; ++t) s += acc_[t * n_ + i];
    return s;
  }

 protected:
  int64_t n_;
  int threads_;
  std::vector<float> acc_;
};

// Column sums (the bias gradient): out[i] = the sum of the threads' partials.
struct ColumnSums : PerThread {
  using PerThread::PerThread;
  void write(float* out) const {
    if (out)
      for (int64_t i = 0; i < n_; ++i) out[i] = total(i);
  }
};

// The support weight gradient: dval[j], or dval[flat[j]] with `flat` non-null; with `perm`
// non-null the sums are in W^T's order (entry jt is W's entry perm[jt]).
struct SupportGrad : PerThread {
  using PerThread::PerThread;
  void write(float* dval, const int64_t* flat, const int64_t* perm = nullptr) const {
#pragma omp parallel for num_threads(threads_) schedule(static)
    for (int64_t jt = 0; jt < n_; ++jt) {
      if (flat && jt + 32 < n_)  // scattered writes into a dense gradient: fetch ahead
        __builtin_prefetch(dval + flat[perm ? perm[jt + 32] : jt + 32], 1);
      const int64_t j = perm ? perm[jt] : jt;
      dval[flat ? flat[j] : j] = total(jt);
    }
  }
};

}  // namespace

// y = x W^T (+ bias); with xsum non-null also xsum[i] = sum over tokens of x[n, i] (the bias
// gradient when x is dy: it costs a few adds per tile row here, a pass over x in torch).
SC_EXPORT void sc_spmm(int64_t N, int64_t in, int64_t out, const int64_t* crow,
                       const int32_t* col, const float* val, const float* x, const float* bias,
                       float* y, float* xsum, int threads) {
  const int64_t ntiles = (N + TW - 1) / TW;
  if (ntiles >= threads || threads <= 1) {
    ColumnSums sums(xsum ? in : 0, threads);
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> xt(in * TW), yt(out * TW);
      float* mine = sums.mine();
#pragma omp for schedule(static)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t t0 = t * TW, nt = std::min(TW, N - t0);
        load_tile(x, in, t0, nt, xt.data());
        if (mine) add_col_sums(xt.data(), in, mine);
        spmm_rows(crow, col, val, bias, xt.data(), yt.data(), 0, out);
        store_tile(yt.data(), out, t0, nt, y);
      }
    }
    sums.write(xsum);
    return;
  }
  // Few tokens (decoding): one tile at a time, output rows split over the threads.
  std::vector<float> xt(in * TW), yt(out * TW);
  if (xsum) std::memset(xsum, 0, sizeof(float) * in);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t t0 = t * TW, nt = std::min(TW, N - t0);
    load_tile(x, in, t0, nt, xt.data());
    if (xsum) add_col_sums(xt.data(), in, xsum);
#pragma omp parallel num_threads(threads)
    {
      const int nth = omp_get_num_threads_safe(), me = omp_get_thread_num_safe();
      const int64_t per = (out + nth - 1) / nth;
      spmm_rows(crow, col, val, bias, xt.data(), yt.data(), std::min(out, me * per),
                std::min(out, (me + 1) * per));
    }
    store_tile(yt.data(), out, t0, nt, y);
  }
}

// y = x W^T (+ bias) cut into nseg column segments, each through AbsTopK (k_s of width_s
// per row): y_s[n] = the kept entries of segment s of row n, mask_s[n] marks them (mask
// pointers may be 0: no gradient). Arrays of nseg (pointers as int64). Each tile's output
// rows go through the selection while they are in cache, from a per-thread buffer: the
// product's output never reaches memory. Bitwise sc_spmm, then sc_abstopk per segment.
SC_EXPORT void sc_spmm_topk(int64_t N, int64_t in, int64_t out, const int64_t* crow,
                            const int32_t* col, const float* val, const float* x,
                            const float* bias, int64_t nseg, const int64_t* seg_width,
                            const int64_t* seg_k, const int64_t* seg_y,
                            const int64_t* seg_mask, int threads) {
  const int64_t ntiles = (N + TW - 1) / TW;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, ntiles)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xt(in * TW), yt(out * TW), rows(TW * out);
    std::vector<AbsTopKRows*> topk(nseg);
    for (int64_t s = 0; s < nseg; ++s) topk[s] = new AbsTopKRows(seg_width[s]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t t0 = t * TW, nt = std::min(TW, N - t0);
      load_tile(x, in, t0, nt, xt.data());
      spmm_rows(crow, col, val, bias, xt.data(), yt.data(), 0, out);
      store_tile(yt.data(), out, 0, nt, rows.data());
      for (int64_t r = 0; r < nt; ++r) {
        int64_t c0 = 0;
        for (int64_t s = 0; s < nseg; ++s) {
          const int64_t w = seg_width[s], at = (t0 + r) * w;
          float* y = reinterpret_cast<float*>(seg_y[s]) + at;
          uint8_t* m = seg_mask[s] ? reinterpret_cast<uint8_t*>(seg_mask[s]) + at : nullptr;
          if (seg_k[s] <= 0) {
            std::memset(y, 0, sizeof(float) * w);
            if (m) std::memset(m, 0, w);
          } else {
            topk[s]->row(rows.data() + r * out + c0, seg_k[s], y, m);
          }
          c0 += w;
        }
      }
    }
    for (AbsTopKRows* p : topk) delete p;
  }
}

// The weight gradient on W's support: dval[j] for j < nnz, or, with `flat` non-null, written
// at dval[flat[j]] (straight into a dense gradient, flat[j] the nonzero's flat index in W).
SC_EXPORT void sc_sddmm(int64_t N, int64_t in, int64_t out, const int64_t* crow,
                        const int32_t* col, const float* dy, const float* x, float* dval,
                        const int64_t* flat, int threads) {
  const int64_t ntiles = (N + TW - 1) / TW;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, ntiles)));
  SupportGrad g(crow[out], threads);
#pragma omp parallel num_threads(threads)
  {
    float* mine = g.mine();
    std::vector<float> xt(in * TW), dyt(out * TW);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t t0 = t * TW, nt = std::min(TW, N - t0);
      load_tile(x, in, t0, nt, xt.data());
      load_tile(dy, out, t0, nt, dyt.data());
      sddmm_tile(crow, col, out, dyt.data(), xt.data(), mine);
    }
  }
  g.write(dval, flat);
}

// The backward of y = x W^T + b on W's support in one pass over dy's tiles: dx = dy W (W^T's
// CSR: crow_t, col_t, val_t), dbias = dy.sum(0) if non-null, and the support weight gradient as
// sc_sddmm writes it (W's crow gives its size; it is summed in W^T's order by bwd_rows and
// written to W's entries through perm, and flat when non-null). dy comes as nseg column segments (DySeg: widths, upstream gradients, row
// strides, AbsTopK masks, GELU inputs; arrays of nseg, pointers as int64), so an AbsTopK (or
// GELU + AbsTopK) backward is applied on the way in. Each tile of dy is read once; results
// are bitwise those of the AbsTopK backward, then sc_spmm + sc_sddmm (same tiles, same
// threads, same summation order).
SC_EXPORT void sc_linear_bwd(int64_t N, int64_t in, int64_t out, const int64_t* crow,
                             const int64_t* crow_t, const int32_t* col_t,
                             const float* val_t, int64_t nseg, const int64_t* seg_width,
                             const int64_t* seg_g, const int64_t* seg_ld, const int64_t* seg_mask,
                             const int64_t* seg_h, const float* x, float* dx, float* dbias,
                             float* dval, const int64_t* flat, const int64_t* perm,
                             int threads) {
  std::vector<DySeg> segs(nseg);
  for (int64_t s = 0; s < nseg; ++s)
    segs[s] = DySeg{seg_width[s], reinterpret_cast<const float*>(seg_g[s]), seg_ld[s],
                    reinterpret_cast<const uint8_t*>(seg_mask[s]),
                    reinterpret_cast<const float*>(seg_h[s])};
  const int64_t ntiles = (N + TW - 1) / TW;
  // as sc_sddmm; with fewer tiles than threads each thread has one tile, so the bias sums are
  // added in sc_spmm's order too
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, ntiles)));
  SupportGrad g(crow[out], threads);
  ColumnSums sums(dbias ? out : 0, threads);
#pragma omp parallel num_threads(threads)
  {
    float* mine_t = g.mine();  // in W^T's order
    float* my_sums = sums.mine();
    std::vector<float> dyt(out * TW), xt(in * TW), dxt(in * TW);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t t0 = t * TW, nt = std::min(TW, N - t0);
      load_dy_tile(segs.data(), static_cast<int>(nseg), out, t0, nt, dyt.data());
      if (my_sums) add_col_sums(dyt.data(), out, my_sums);
      load_tile(x, in, t0, nt, xt.data());
      bwd_rows(crow_t, col_t, val_t, in, dyt.data(), xt.data(), dxt.data(), mine_t);
      store_tile(dxt.data(), in, t0, nt, dx);
    }
  }
  sums.write(dbias);
  g.write(dval, flat, perm);
}

// out[j] = src[idx[j]] for j < n: a CSR's values from the dense weight (idx: the nonzeros' flat
// indices) or W^T's values from W's (idx: the permutation). torch's index_select runs these
// 16-65K-element gathers on one thread with per-call overheads several times the work.
SC_EXPORT void sc_gather(const float* src, const int64_t* idx, int64_t n, float* out,
                         int threads) {
  threads = n < 16384 ? 1 : threads;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    if (j + 32 < n) __builtin_prefetch(src + idx[j + 32]);  // scattered reads: fetch ahead
    out[j] = src[idx[j]];
  }
}

// CSR of a dense (rows, cols) matrix's nonzeros, in two calls: count (fills crow, returns nnz),
// then fill col, and optionally val and the flat index r * cols + c of each nonzero.
SC_EXPORT int64_t sc_csr_count(const float* w, int64_t rows, int64_t cols, int64_t* crow,
                               int threads) {
  crow[0] = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    int64_t c = 0;
    for (int64_t i = 0; i < cols; ++i) c += wr[i] != 0.0f;
    crow[r + 1] = c;
  }
  for (int64_t r = 0; r < rows; ++r) crow[r + 1] += crow[r];
  return crow[rows];
}

SC_EXPORT void sc_csr_fill(const float* w, int64_t rows, int64_t cols, const int64_t* crow,
                           int32_t* col, float* val, int64_t* flat, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    int64_t j = crow[r];
    for (int64_t i = 0; i < cols; ++i) {
      if (wr[i] == 0.0f) continue;
      col[j] = static_cast<int32_t>(i);
      if (val) val[j] = wr[i];
      if (flat) flat[j] = r * cols + i;
      ++j;
    }
  }
}

// CSR of W^T from W's CSR (a counting sort on the columns): crow_t (cols+1), col_t (nnz),
// perm (nnz) with val_t = val[perm]. Within each row of W^T entries stay in W's row order.
SC_EXPORT void sc_csr_transpose(int64_t rows, int64_t cols, const int64_t* crow,
                                const int32_t* col, int64_t* crow_t, int32_t* col_t,
                                int64_t* perm) {
  const int64_t nnz = crow[rows];
  std::vector<int64_t> next(cols + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) next[col[j] + 1]++;
  for (int64_t c = 0; c < cols; ++c) next[c + 1] += next[c];
  std::memcpy(crow_t, next.data(), sizeof(int64_t) * (cols + 1));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
      const int64_t dst = next[col[j]]++;
      col_t[dst] = static_cast<int32_t>(r);
      perm[dst] = j;
    }
  }
}
