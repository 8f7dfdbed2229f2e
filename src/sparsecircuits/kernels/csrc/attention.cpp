// Causal self-attention for narrow heads (d_head 8, 16, 32 or 64) with an optional per-head
// sink logit, forward and backward.
//
// The paper's models use many 16-wide heads; a general flash kernel tiles for wide heads and
// spends most of its time on bookkeeping there. Here one (batch, head) is one task: its K
// (transposed), V and gradient accumulators for the whole context fit in L1/L2, each query
// row's scores are computed 8 keys at a time (one FMA per head channel), and the softmax is
// exact (one max, one sum; no running rescale). The sink is an always-visible extra key with
// logit b_h and value 0: it adds exp(b_h) to each softmax denominator.
//
// Layouts: q, k, v, y, dy, dq, dk, dv are (B, H, T, D) with any batch/head/token strides
// (given in `strides`, in floats) and unit channel stride; lse is (B, H, T) contiguous, the
// natural-log normaliser of each row including the sink.
#include <cmath>
#include <vector>

#include "common.h"

namespace {

typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f splat(float a) { return v8f{} + a; }

inline float hmax8(v8f v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp on 8 lanes (Cephes' single-precision polynomial, ~1 ulp over the clamped range);
// inputs below -87 give exp(-87) ~ 1.6e-38, so callers zero masked lanes explicitly.
inline v8f exp8(v8f x) {
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

const v8f LANE = {0, 1, 2, 3, 4, 5, 6, 7};

struct Head {  // one (batch, head) slice: base pointer and token stride
  const float* p;
  int64_t st;
  const float* row(int64_t t) const { return p + t * st; }
};

struct OutHead {
  float* p;
  int64_t st;
  float* row(int64_t t) const { return p + t * st; }
};

// kt (D, Tp) = x^T zero-padded to Tp keys; rows (T, D) = x contiguous (may be null).
template <int D>
void load_head(Head x, int64_t T, int64_t Tp, float* kt, float* rows) {
  for (int64_t j = 0; j < T; ++j) {
    const float* r = x.row(j);
    for (int d = 0; d < D; ++d) kt[d * Tp + j] = r[d];
    if (rows) std::memcpy(rows + j * D, r, sizeof(float) * D);
  }
  for (int d = 0; d < D; ++d)
    for (int64_t j = T; j < Tp; ++j) kt[d * Tp + j] = 0.0f;
}

// s[8b..8b+8) = sum_d a[d] * kt[d, 8b..8b+8), for the blocks b < nb.
template <int D>
inline v8f block_dot(const float* a, const float* kt, int64_t Tp, int64_t j0) {
  v8f acc = {};
  for (int d = 0; d < D; ++d) acc += a[d] * load8(kt + d * Tp + j0);
  return acc;
}

template <int D>
void fwd_head(int64_t T, Head q, Head k, Head v, float sink, bool has_sink, float scale,
              OutHead y, float* lse, float* kt, float* vl, float* s) {
  const int64_t Tp = (T + 7) & ~int64_t{7};
  load_head<D>(k, T, Tp, kt, nullptr);
  for (int64_t j = 0; j < T; ++j) std::memcpy(vl + j * D, v.row(j), sizeof(float) * D);
  const v8f ninf = splat(-INFINITY);
  for (int64_t i = 0; i < T; ++i) {
    float qs[D];
    for (int d = 0; d < D; ++d) qs[d] = q.row(i)[d] * scale;
    const int64_t nb = i / 8 + 1;  // blocks holding keys 0..i
    const v8f last = splat(static_cast<float>(i - 8 * (nb - 1)));
    v8f vmax = ninf;
    for (int64_t b = 0; b < nb; ++b) {
      v8f a = block_dot<D>(qs, kt, Tp, 8 * b);
      if (b == nb - 1) a = LANE <= last ? a : ninf;
      store8(s + 8 * b, a);
      vmax = a > vmax ? a : vmax;
    }
    float m = hmax8(vmax);
    if (has_sink && sink > m) m = sink;
    v8f lsum = {};
    for (int64_t b = 0; b < nb; ++b) {
      v8f p = exp8(load8(s + 8 * b) - m);
      if (b == nb - 1) p = LANE <= last ? p : v8f{};
      lsum += p;
      store8(s + 8 * b, p);
    }
    v8f acc[D / 8] = {};
    for (int64_t j = 0; j <= i; ++j) {
      const float pj = s[j];
      for (int c = 0; c < D / 8; ++c) acc[c] += pj * load8(vl + j * D + 8 * c);
    }
    float l = hsum8(lsum);
    if (has_sink) l += std::exp(sink - m);
    const float inv = 1.0f / l;
    for (int c = 0; c < D / 8; ++c) store8(y.row(i) + 8 * c, acc[c] * inv);
    lse[i] = m + std::log(l);
  }
}

template <int D>
float bwd_head(int64_t T, Head q, Head k, Head v, Head y, Head dy, const float* lse, float sink,
               bool has_sink, float scale, OutHead dq, OutHead dk, OutHead dv, float* kt,
               float* vt, float* kl, float* dkl, float* dvl, float* p, float* ds) {
  const int64_t Tp = (T + 7) & ~int64_t{7};
  load_head<D>(k, T, Tp, kt, kl);
  load_head<D>(v, T, Tp, vt, nullptr);
  std::memset(dkl, 0, sizeof(float) * T * D);
  std::memset(dvl, 0, sizeof(float) * T * D);
  float dsink = 0.0f;
  for (int64_t i = 0; i < T; ++i) {
    float qs[D], g[D];
    float delta = 0.0f;
    for (int d = 0; d < D; ++d) {
      qs[d] = q.row(i)[d] * scale;
      g[d] = dy.row(i)[d];
      delta += g[d] * y.row(i)[d];
    }
    const int64_t nb = i / 8 + 1;
    const v8f last = splat(static_cast<float>(i - 8 * (nb - 1)));
    const float li = lse[i];
    for (int64_t b = 0; b < nb; ++b) {
      v8f pb = exp8(block_dot<D>(qs, kt, Tp, 8 * b) - li);
      if (b == nb - 1) pb = LANE <= last ? pb : v8f{};
      const v8f dp = block_dot<D>(g, vt, Tp, 8 * b);
      store8(p + 8 * b, pb);
      store8(ds + 8 * b, pb * (dp - delta));
    }
    v8f dqa[D / 8] = {}, qv[D / 8], gv[D / 8];
    for (int c = 0; c < D / 8; ++c) {
      qv[c] = load8(qs + 8 * c);  // scale * q_i: d s_ij / d k_j
      gv[c] = load8(g + 8 * c);
    }
    for (int64_t j = 0; j <= i; ++j) {
      const float dsj = ds[j], pj = p[j];
      for (int c = 0; c < D / 8; ++c) {
        dqa[c] += dsj * load8(kl + j * D + 8 * c);
        store8(dkl + j * D + 8 * c, load8(dkl + j * D + 8 * c) + dsj * qv[c]);
        store8(dvl + j * D + 8 * c, load8(dvl + j * D + 8 * c) + pj * gv[c]);
      }
    }
    for (int c = 0; c < D / 8; ++c) store8(dq.row(i) + 8 * c, dqa[c] * scale);
    if (has_sink) dsink += std::exp(sink - li) * delta;
  }
  for (int64_t j = 0; j < T; ++j) {
    std::memcpy(dk.row(j), dkl + j * D, sizeof(float) * D);
    std::memcpy(dv.row(j), dvl + j * D, sizeof(float) * D);
  }
  return -dsink;
}

template <int D>
void fwd_all(int64_t B, int64_t H, int64_t T, const float* q, const float* k, const float* v,
             const int64_t* st, const float* sink, float scale, float* y, float* lse,
             int threads) {
  const int64_t Tp = (T + 7) & ~int64_t{7};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt(D * Tp), vl(T * D), s(Tp);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Head hq{q + b * st[0] + h * st[1], st[2]};
      const Head hk{k + b * st[3] + h * st[4], st[5]};
      const Head hv{v + b * st[6] + h * st[7], st[8]};
      const OutHead hy{y + b * st[9] + h * st[10], st[11]};
      fwd_head<D>(T, hq, hk, hv, sink ? sink[h] : 0.0f, sink != nullptr, scale, hy,
                  lse + bh * T, kt.data(), vl.data(), s.data());
    }
  }
}

template <int D>
void bwd_all(int64_t B, int64_t H, int64_t T, const float* q, const float* k, const float* v,
             const float* y, const float* dy, const int64_t* st, const float* lse,
             const float* sink, float scale, float* dq, float* dk, float* dv, float* dsink,
             int threads) {
  const int64_t Tp = (T + 7) & ~int64_t{7};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt(D * Tp), vt(D * Tp), kl(T * D), dkl(T * D), dvl(T * D), p(Tp),
        ds(Tp);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      auto in = [&](const float* base, int i) {
        return Head{base + b * st[3 * i] + h * st[3 * i + 1], st[3 * i + 2]};
      };
      auto out = [&](float* base, int i) {
        return OutHead{base + b * st[3 * i] + h * st[3 * i + 1], st[3 * i + 2]};
      };
      const float g = bwd_head<D>(T, in(q, 0), in(k, 1), in(v, 2), in(y, 3), in(dy, 4),
                                  lse + bh * T, sink ? sink[h] : 0.0f, sink != nullptr, scale,
                                  out(dq, 5), out(dk, 6), out(dv, 7), kt.data(), vt.data(),
                                  kl.data(), dkl.data(), dvl.data(), p.data(), ds.data());
      if (dsink) dsink[bh] = g;
    }
  }
}

}  // namespace

// Forward. strides: 12 int64 (batch, head, token) for q, k, v, y. sink: H logits or null.
// Returns 0, or -1 when D is not 8, 16, 32 or 64 (the caller falls back).
SC_EXPORT int sc_attn_fwd(int64_t B, int64_t H, int64_t T, int64_t D, const float* q,
                          const float* k, const float* v, const int64_t* strides,
                          const float* sink, float scale, float* y, float* lse, int threads) {
  switch (D) {
    case 8: fwd_all<8>(B, H, T, q, k, v, strides, sink, scale, y, lse, threads); return 0;
    case 16: fwd_all<16>(B, H, T, q, k, v, strides, sink, scale, y, lse, threads); return 0;
    case 32: fwd_all<32>(B, H, T, q, k, v, strides, sink, scale, y, lse, threads); return 0;
    case 64: fwd_all<64>(B, H, T, q, k, v, strides, sink, scale, y, lse, threads); return 0;
    default: return -1;
  }
}

// Backward. strides: 24 int64 for q, k, v, y, dy, dq, dk, dv; lse from the forward;
// dsink: B*H per-(batch, head) sink-logit gradients (summed by the caller) or null.
SC_EXPORT int sc_attn_bwd(int64_t B, int64_t H, int64_t T, int64_t D, const float* q,
                          const float* k, const float* v, const float* y, const float* dy,
                          const int64_t* strides, const float* lse, const float* sink,
                          float scale, float* dq, float* dk, float* dv, float* dsink,
                          int threads) {
#define SC_BWD(N)                                                                         \
  bwd_all<N>(B, H, T, q, k, v, y, dy, strides, lse, sink, scale, dq, dk, dv, dsink, threads); \
  return 0
  switch (D) {
    case 8: SC_BWD(8);
    case 16: SC_BWD(16);
    case 32: SC_BWD(32);
    case 64: SC_BWD(64);
    default: return -1;
  }
#undef SC_BWD
}
