// Fused elementwise passes of the backward: each reads its inputs once and writes once, where
// torch would run two or three passes over (tokens, width) tensors (memory bound on CPU).
#include <cstdint>
#include <cstring>

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
