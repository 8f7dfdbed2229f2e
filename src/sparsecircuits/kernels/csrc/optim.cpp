// Optimizer arithmetic on a weight's support (a list of flat indices), for the fast training
// mode's steps between regrowths. At L0 1/64 the support is 1.6% of the matrix; torch's
// indexing (gather, update, scatter back) cost ~40x the arithmetic itself at d_model 1024.
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

// sum of g[idx[j]]^2 over j < n (every g[j] when idx is null), accumulated in double, one
// partial per thread added in thread order (the result does not depend on timing).
SC_EXPORT double sc_sumsq(int64_t n, const int64_t* idx, const float* g, int threads) {
  if (n <= 0) return 0.0;
  if (n < 65536) threads = 1;
  std::vector<double> part(threads > 0 ? threads : 1, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads_safe(), me = omp_get_thread_num_safe();
    const int64_t lo = n * me / nt, hi = n * (me + 1) / nt;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t j = lo;
    for (; j + 4 <= hi; j += 4) {
      if (idx && j + 36 < hi)  // scattered entries: fetch ahead (as in sc_adamw_at)
        for (int u = 0; u < 4; ++u) __builtin_prefetch(g + idx[j + 32 + u]);
      for (int u = 0; u < 4; ++u) {
        const double v = idx ? g[idx[j + u]] : g[j + u];
        acc[u] += v * v;
      }
    }
    for (; j < hi; ++j) {
      const double v = idx ? g[idx[j]] : g[j];
      acc[0] += v * v;
    }
    part[me] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

// One AdamW step on the entries idx[0..n) of w, with exp_avg m and exp_avg_sq v, in torch's
// single-tensor order of operations (float arithmetic):
//   g <- g * gscale; w <- w * decay; m <- m + (1 - beta1) (g - m);
//   v <- v * beta2 + (1 - beta2) g g; w <- w - step_size * m / (sqrt(v) / bc2_sqrt + eps)
// hp: {gscale, decay, 1 - beta1, beta2, 1 - beta2, step_size, bc2_sqrt, eps}.
// compact & 1: m and v hold the support's entries only, m[j] for w[idx[j]]; compact & 2: g
// too (a sparse gradient's values). Each entry then costs fewer scattered cache lines (w and
// g, or w alone) than the four of dense-indexed g, w, m, v.
SC_EXPORT void sc_adamw_at(int64_t n, const int64_t* idx, const float* g, float* w, float* m,
                           float* v, const float* hp, int compact, int threads) {
  const bool cm = compact & 1, cg = compact & 2;
  const float gscale = hp[0], decay = hp[1], omb1 = hp[2], beta2 = hp[3], omb2 = hp[4];
  const float step_size = hp[5], bc2_sqrt = hp[6], eps = hp[7];
  if (n < 65536) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    if (j + 32 < n) {  // the entries are scattered: fetch ahead what no prefetcher predicts
      if (!cg) __builtin_prefetch(g + idx[j + 32]);
      __builtin_prefetch(w + idx[j + 32], 1);
    }
    const int64_t i = idx[j], k = cm ? j : i;
    const float gi = g[cg ? j : i] * gscale;
    const float mi = m[k] + omb1 * (gi - m[k]);  // torch's lerp for a weight below 0.5
    const float vi = v[k] * beta2 + omb2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    w[i] = w[i] * decay - step_size * (mi / denom);
    m[k] = mi;
    v[k] = vi;
  }
}
