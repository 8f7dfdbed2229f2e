// Fused elementwise passes of the backward: each reads its inputs once and writes once, where
// torch would run two or three passes over (tokens, width) tensors (memory bound on CPU).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "vmath.h"

typedef uint8_t v8b __attribute__((vector_size(8)));

// The backward of AbsTopK(GELU(x)): gx = gy * GELU'(x) where mask is set, 0 elsewhere.
// x: (rows, n) contiguous; gy: (rows, n) with row stride ld; mask: (rows, n) uint8;
// gx: (rows, n) contiguous.
SC_EXPORT void sc_gelu_topk_grad(const float* x, const float* gy, int64_t ld,
                                 const uint8_t* mask, float* gx, int64_t rows, int64_t n,
                                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    const float* g = gy + r * ld;
    const uint8_t* m = mask + r * n;
    float* o = gx + r * n;
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 64 <= n; i += 64) {  // GELU' on the kept entries only, 64 at a time
      const float *h[8], *gk[8];
      const uint8_t* mk[8];
      for (int k = 0; k < 8; ++k) {
        h[k] = xr + i + 8 * k;
        gk[k] = g + i + 8 * k;
        mk[k] = m + i + 8 * k;
      }
      v8f d[8];
      gelu_grad_kept8x8(h, gk, mk, d);
      for (int k = 0; k < 8; ++k) store8(o + i + 8 * k, d[k]);
    }
#endif
    for (; i + 8 <= n; i += 8) {
      uint64_t bits;
      std::memcpy(&bits, m + i, 8);
      if (!bits) {  // no kept entry among these 8: skip GELU'
        store8(o + i, v8f{});
        continue;
      }
      v8b mb;
      std::memcpy(&mb, &bits, 8);
      const v8i keep = __builtin_convertvector(mb, v8i) != 0;
      const v8f d = gelu_grad8(load8(xr + i)) * load8(g + i);
      store8(o + i, (v8f)((v8i)d & keep));
    }
    if (i < n) {  // tail: through a padded vector, so the tail rounds like the body
      float xt[8] = {0}, gt[8] = {0};
      for (int64_t j = i; j < n; ++j) {
        xt[j - i] = xr[j];
        gt[j - i] = g[j];
      }
      const v8f d = gelu_grad8(load8(xt)) * load8(gt);
      for (int64_t j = i; j < n; ++j) o[j] = m[j] ? d[j - i] : 0.0f;
    }
  }
}

namespace {

inline float row_max(const float* x, int64_t n) {
  v8f m = splat(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    m = v > m ? v : m;
  }
  float r = -INFINITY;
  for (int l = 0; l < 8; ++l) r = m[l] > r ? m[l] : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

// sum exp(x - m) over a row; with out, also writes exp(x - m) * scale there.
inline float row_exp(const float* x, int64_t n, float m, float* out, float scale) {
  v8f s = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f e = exp8(load8(x + i) - m);
    s += e;
    if (out) store8(out + i, e * scale);
  }
  float r = hsum8(s);
  if (i < n) {
    float t[8];
    for (int l = 0; l < 8; ++l) t[l] = i + l < n ? x[i + l] - m : -INFINITY;
    const v8f e = exp8(load8(t));
    for (int64_t j = i; j < n; ++j) {
      r += e[j - i];
      if (out) out[j] = e[j - i] * scale;
    }
  }
  return r;
}

}  // namespace

// Cross-entropy forward: lse[r] = log sum_j exp(x[r, j]); loss[r] = lse[r] - x[r, t[r]], 0
// where t[r] < 0 (ignored). x: (rows, n) contiguous logits; t: (rows,) int64 in [-1, n).
// With g non-null (training) it also writes the gradient sc_ce_bwd would, for an upstream
// gradient of 1: the row's exponentials are stored on the sum pass and rescaled while still
// in cache, so the logits are read from memory once in all instead of twice.
SC_EXPORT void sc_ce_fwd(const float* x, const int64_t* t, int64_t rows, int64_t n, float* lse,
                         float* loss, float* g, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    const float m = row_max(xr, n);
    float* gr = g ? g + r * n : nullptr;
    const float sum = row_exp(xr, n, m, gr, 1.0f);
    lse[r] = m + std::log(sum);
    loss[r] = t[r] < 0 ? 0.0f : lse[r] - xr[t[r]];
    if (!gr) continue;
    if (t[r] < 0) {
      std::memset(gr, 0, sizeof(float) * n);
      continue;
    }
    const float f = scale / sum;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) store8(gr + j, load8(gr + j) * f);
    for (; j < n; ++j) gr[j] *= f;
    gr[t[r]] -= scale;
  }
}

// Cross-entropy backward: g[r, j] = scale * (softmax(x[r])_j - [j == t[r]]), 0 for ignored
// rows. scale: the upstream gradient over the number of counted rows.
SC_EXPORT void sc_ce_bwd(const float* x, const int64_t* t, const float* lse, int64_t rows,
                         int64_t n, float scale, float* g, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* gr = g + r * n;
    if (t[r] < 0) {
      std::memset(gr, 0, sizeof(float) * n);
      continue;
    }
    row_exp(x + r * n, n, lse[r], gr, scale);
    gr[t[r]] -= scale;
  }
}

// out[r, :] = logits[r, :] + bias + table[idx[r], :] (bias, table may be null; out may be
// logits). logits, out: (rows, n) contiguous; bias: (n,); table: (V, n) contiguous;
// idx: (rows,) int64.
SC_EXPORT void sc_add_logit_tables(const float* logits, float* out, const float* bias,
                                   const float* table, const int64_t* idx, int64_t rows,
                                   int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * n;
    float* o = out + r * n;
    const float* t = table ? table + idx[r] * n : nullptr;
    if (bias && t) {
      for (int64_t j = 0; j < n; ++j) o[j] = l[j] + bias[j] + t[j];
    } else if (t) {
      for (int64_t j = 0; j < n; ++j) o[j] = l[j] + t[j];
    } else if (bias) {
      for (int64_t j = 0; j < n; ++j) o[j] = l[j] + bias[j];
    } else {
      std::memcpy(o, l, sizeof(float) * n);
    }
  }
}

// RMSNorm forward: rstd[r] = 1 / sqrt(mean(x[r]^2) + eps); y[r] = x[r] * rstd[r] * w.
// x, y: (rows, n) contiguous; w: (n,).
SC_EXPORT void sc_rmsnorm_fwd(const float* x, const float* w, int64_t rows, int64_t n, float eps,
                              float* y, float* rstd, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    v8f acc = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const v8f v = load8(xr + i);
      acc += v * v;
    }
    float ss = hsum8(acc);
    for (; i < n; ++i) ss += xr[i] * xr[i];
    const float s = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    rstd[r] = s;
    i = 0;
    for (; i + 8 <= n; i += 8) store8(yr + i, load8(xr + i) * s * load8(w + i));
    for (; i < n; ++i) yr[i] = xr[i] * s * w[i];
  }
}

// RMSNorm backward: with g = dy * w, dx = rstd * g - x * rstd^3 * sum(g * x) / n, and
// dw = sum over rows of dy * x * rstd (per-thread partial sums, added in thread order).
// dy: (rows, n) with row stride ld; x, dx: (rows, n) contiguous; dw: (n,).
SC_EXPORT void sc_rmsnorm_bwd(const float* x, const float* w, const float* rstd,
                              const float* dy, int64_t ld, int64_t rows, int64_t n, float* dx,
                              float* dw, int threads) {
  std::vector<float> part(static_cast<size_t>(threads) * n, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* mine = part.data() + static_cast<int64_t>(omp_get_thread_num_safe()) * n;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * n;
      const float* gr = dy + r * ld;
      float* dr = dx + r * n;
      const float s = rstd[r];
      v8f acc = {};
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) acc += load8(gr + i) * load8(w + i) * load8(xr + i);
      float dot = hsum8(acc);
      for (; i < n; ++i) dot += gr[i] * w[i] * xr[i];
      const float c = s * s * s * dot / static_cast<float>(n);
      i = 0;
      for (; i + 8 <= n; i += 8) {
        const v8f xv = load8(xr + i), gv = load8(gr + i);
        store8(dr + i, s * gv * load8(w + i) - c * xv);
        store8(mine + i, load8(mine + i) + gv * xv * s);
      }
      for (; i < n; ++i) {
        dr[i] = s * gr[i] * w[i] - c * xr[i];
        mine[i] += gr[i] * xr[i] * s;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    float t = 0.0f;
    for (int th = 0; th < threads; ++th) t += part[static_cast<int64_t>(th) * n + i];
    dw[i] = t;
  }
}
