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
#include "simd.h"
#include "vmath.h"

namespace {

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

// K transposed to (D, Tp) with the keys padded to Tp (a multiple of 8) by zeros, for the
// sparse-query scores; returns whether every key entry is finite (skipping a query's zero
// channels is then exact: 0 * k would only matter for an infinite or NaN k).
template <int D>
bool transpose_keys(int64_t T, Head k, float* kt, int64_t Tp) {
  alignas(32) float blk[8 * 8];
  v8f bad = {};  // 0 * x is NaN exactly for infinite and NaN x
  for (int64_t j0 = 0; j0 < Tp; j0 += 8)
    for (int d0 = 0; d0 < D; d0 += 8) {
      const float* src = k.row(j0) + d0;
      int64_t ss = k.st;
      if (j0 + 8 > T) {  // the last, partial block of keys: through a zero-padded copy
        for (int r = 0; r < 8; ++r)
          for (int c = 0; c < 8; ++c) blk[r * 8 + c] = j0 + r < T ? k.row(j0 + r)[d0 + c] : 0.0f;
        src = blk;
        ss = 8;
      }
      for (int r = 0; r < 8; ++r) bad += load8(src + r * ss) * 0.0f;
      sc_simd::transpose8x8(src, ss, kt + d0 * Tp + j0, Tp);
    }
  for (int l = 0; l < 8; ++l)
    if (bad[l] != 0.0f || bad[l] != bad[l]) return false;
  return true;
}

// K transposed on first use (a head whose query tiles all take the dense path never needs it),
// and whether the sparse scores may be used with it (every key finite).
template <int D>
struct LazyKeys {
  int state = -1;  // -1: not built yet; 0: some key is not finite; 1: built and finite
  bool usable(int64_t T, Head k, float* kt, int64_t Tp) {
    if (state < 0) state = transpose_keys<D>(T, k, kt, Tp) ? 1 : 0;
    return state == 1;
  }
};

// The nonzero channels of the tile's queries (scaled), per query: the queries are AbsTopK
// outputs, so a quarter of a head's channels or fewer are usually nonzero. Returns the total.
template <int D>
struct SparseTile {
  int m[8];
  int idx[8][D];
  float val[8][D];

  int gather(Head q, int64_t i0, int64_t nq, float scale2) {
    int total = 0;
    for (int64_t l = 0; l < 8; ++l) {
      m[l] = l < nq ? sc_simd::compress_nonzero(q.row(i0 + l), D, scale2, val[l], idx[l]) : 0;
      total += m[l];
    }
    return total;
  }

  // Whether sparse scores pay: at most a quarter of the channels nonzero (the dense loop is
  // load-bound at ~1.25 loads per FMA, the sparse one at ~1.25 per nonzero, plus transposes).
  static bool pays(int total, int64_t nq) { return 4 * total <= static_cast<int>(nq) * D; }

  // Scores against keys 0..nk (rounded up to 8) in the tile layout st[j * 8 + l], with 8
  // keys in the lanes and one FMA per nonzero query channel (kt: K transposed, (D, Tp), Tp a
  // multiple of 64); rows: an (8, Tp) scratch for the per-query rows before the 8 x 8
  // transposes into st.
  void scores(int64_t nk, const float* kt, int64_t Tp, float* rows, float* st) const {
    const int64_t nk8 = (nk + 7) & ~int64_t{7};
    for (int l = 0; l < 8; ++l) {
      float* sr = rows + l * Tp;
      const int* ix = idx[l];
      const float* vv = val[l];
      // blocks of 64 keys (Tp is a multiple of 64, kt zero-padded): eight independent
      // accumulators hide the FMA latency; a tail of 8-key blocks would not
      for (int64_t j = 0; j < nk8; j += 64) {
        v8f a[8] = {};
        for (int t = 0; t < m[l]; ++t) {
          const float* kr = kt + ix[t] * Tp + j;
          for (int c = 0; c < 8; ++c) a[c] += vv[t] * load8(kr + 8 * c);
        }
        for (int c = 0; c < 8; ++c) store8(sr + j + 8 * c, a[c]);
      }
    }
    for (int64_t j = 0; j < nk8; j += 8) sc_simd::transpose8x8(rows + j, Tp, st + j * 8, 8);
  }
};

// Forward of one (batch, head), 8 queries at a time with the queries in the vector lanes:
// scores of 4 keys share each load of the (D, 8) query tile, the max and sum are per-lane,
// and P V runs over query groups whose accumulators fill 8 registers.
template <int D>
void fwd_head(int64_t T, Head q, Head k, Head v, float sink, bool has_sink, float scale,
              OutHead y, float* lse, float* kl, float* vl, float* st, float* kt, float* rows) {
  constexpr int QG = D >= 64 ? 1 : 64 / D;  // queries per P V group: QG * D / 8 = 8 vectors
  const int64_t T4 = (T + 3) & ~int64_t{3};
  for (int64_t j = 0; j < T; ++j) {
    std::memcpy(kl + j * D, k.row(j), sizeof(float) * D);
    std::memcpy(vl + j * D, v.row(j), sizeof(float) * D);
  }
  std::memset(kl + T * D, 0, sizeof(float) * (T4 - T) * D);
  const int64_t Tp = (T + 63) & ~int64_t{63};
  LazyKeys<D> keys;
  const v8f ninf = splat(-INFINITY);
  const float scale2 = scale * LOG2E, sink2 = sink * LOG2E;  // scores in log2 units: 2^x
  alignas(32) float qt[D * 8];
  SparseTile<D> sparse;
  for (int64_t i0 = 0; i0 < T; i0 += 8) {
    const int64_t nq = T - i0 < 8 ? T - i0 : 8;
    const int64_t nk = i0 + nq;  // keys 0..nk-1 are visible to some query of the tile
    if (SparseTile<D>::pays(sparse.gather(q, i0, nq, scale2), nq) &&
        keys.usable(T, k, kt, Tp)) {
      sparse.scores(nk, kt, Tp, rows, st);
    } else {
      for (int d = 0; d < D; ++d)
        for (int l = 0; l < 8; ++l) qt[d * 8 + l] = l < nq ? q.row(i0 + l)[d] * scale2 : 0.0f;
      for (int64_t j = 0; j < nk; j += 4) {
        v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const float* kr = kl + j * D;
        for (int d = 0; d < D; ++d) {
          const v8f qd = load8(qt + d * 8);
          a0 += qd * kr[d];
          a1 += qd * kr[D + d];
          a2 += qd * kr[2 * D + d];
          a3 += qd * kr[3 * D + d];
        }
        store8(st + j * 8, a0);
        store8(st + j * 8 + 8, a1);
        store8(st + j * 8 + 16, a2);
        store8(st + j * 8 + 24, a3);
      }
    }
    // causal mask on the diagonal keys: query i0 + l sees key j iff j <= i0 + l
    for (int64_t j = i0; j < nk; ++j) {
      const v8f s = load8(st + j * 8);
      store8(st + j * 8, LANE >= splat(static_cast<float>(j - i0)) ? s : ninf);
    }
    v8f m = has_sink ? splat(sink2) : ninf;
    for (int64_t j = 0; j < nk; ++j) {
      const v8f s = load8(st + j * 8);
      m = s > m ? s : m;
    }
    v8f l = has_sink ? exp2_neg8(splat(sink2) - m) : v8f{};
    for (int64_t j = 0; j < nk; ++j) {
      v8f p = exp2_neg8(load8(st + j * 8) - m);
      if (j >= i0) p = LANE >= splat(static_cast<float>(j - i0)) ? p : v8f{};
      l += p;
      store8(st + j * 8, p);
    }
    const v8f inv = splat(1.0f) / l;
    for (int g = 0; g < nq; g += QG) {
      v8f acc[QG][D / 8] = {};
      for (int64_t j = 0; j < nk; ++j) {
        const float* pj = st + j * 8 + g;
        const float* vr = vl + j * D;
        for (int c = 0; c < D / 8; ++c) {
          const v8f vc = load8(vr + 8 * c);
          for (int u = 0; u < QG; ++u) acc[u][c] += pj[u] * vc;
        }
      }
      for (int u = 0; u < QG && g + u < nq; ++u)
        for (int c = 0; c < D / 8; ++c) store8(y.row(i0 + g + u) + 8 * c, acc[u][c] * inv[g + u]);
    }
    for (int64_t u = 0; u < nq; ++u) lse[i0 + u] = (m[u] + std::log2(l[u])) * LN2;
  }
}

// Backward of one (batch, head), in the forward's layout (8 queries in the lanes): per tile,
// P and dS for all visible keys (4 keys per pass over the tile's q and dy), then dQ by query
// groups, and dK, dV by key rows with the group's q and dy rows held in registers.
template <int D>
float bwd_head(int64_t T, Head q, Head k, Head v, Head y, Head dy, const float* lse, float sink,
               bool has_sink, float scale, OutHead dq, OutHead dk, OutHead dv, float* kl,
               float* vl, float* dkl, float* dvl, float* pb, float* dsb, float* kt,
               float* rows) {
  constexpr int QG = D >= 64 ? 1 : 64 / D;
  const int64_t T4 = (T + 3) & ~int64_t{3};
  for (int64_t j = 0; j < T; ++j) {
    std::memcpy(kl + j * D, k.row(j), sizeof(float) * D);
    std::memcpy(vl + j * D, v.row(j), sizeof(float) * D);
  }
  std::memset(kl + T * D, 0, sizeof(float) * (T4 - T) * D);
  std::memset(vl + T * D, 0, sizeof(float) * (T4 - T) * D);
  std::memset(dkl, 0, sizeof(float) * T4 * D);
  std::memset(dvl, 0, sizeof(float) * T4 * D);
  const int64_t Tp = (T + 63) & ~int64_t{63};
  LazyKeys<D> keys;
  alignas(32) float qt[D * 8], gt[D * 8], qr[8 * D], gr[8 * D];
  SparseTile<D> sparse;
  float dsink = 0.0f;
  for (int64_t i0 = 0; i0 < T; i0 += 8) {
    const int64_t nq = T - i0 < 8 ? T - i0 : 8;
    const int64_t nk = i0 + nq;
    v8f delta = {}, lsev = {};
    for (int64_t l = 0; l < 8; ++l) {  // the tile's rows of q (scaled) and dy, and dy . y
      if (l >= nq) {
        std::memset(qr + l * D, 0, sizeof(float) * D);
        std::memset(gr + l * D, 0, sizeof(float) * D);
        continue;
      }
      const float *qs = q.row(i0 + l), *gs = dy.row(i0 + l), *ys = y.row(i0 + l);
      v8f dl = {};
      for (int d = 0; d < D; d += 8) {
        const v8f gd = load8(gs + d);
        store8(qr + l * D + d, load8(qs + d) * scale);
        store8(gr + l * D + d, gd);
        dl += gd * load8(ys + d);
      }
      delta[l] = hsum8(dl);
      lsev[l] = lse[i0 + l] * LOG2E;
    }
    for (int d = 0; d < D; d += 8) {  // and in the lanes layout (scores in log2 units)
      sc_simd::transpose8x8(qr + d, D, qt + d * 8, 8);
      sc_simd::transpose8x8(gr + d, D, gt + d * 8, 8);
    }
    for (int d = 0; d < D * 8; d += 8) store8(qt + d, load8(qt + d) * LOG2E);
    // S from the queries' nonzero channels when they are sparse (see SparseTile), into pb
    // (from the rows just copied to qr, already scaled: q is read once per tile)
    const bool sparse_s = SparseTile<D>::pays(sparse.gather(Head{qr, D}, 0, nq, LOG2E), nq) &&
                          keys.usable(T, k, kt, Tp);
    if (sparse_s) sparse.scores(nk, kt, Tp, rows, pb);
    for (int64_t j = 0; j < nk; j += 4) {
      v8f a[4] = {}, b[4] = {};
      const float* kr = kl + j * D;
      const float* vr = vl + j * D;
      if (sparse_s) {
        for (int d = 0; d < D; ++d) {
          const v8f gd = load8(gt + d * 8);
          for (int c = 0; c < 4; ++c) b[c] += gd * vr[c * D + d];
        }
        for (int c = 0; c < 4; ++c) a[c] = load8(pb + (j + c) * 8);
      } else {
        for (int d = 0; d < D; ++d) {
          const v8f qd = load8(qt + d * 8), gd = load8(gt + d * 8);
          for (int c = 0; c < 4; ++c) {
            a[c] += qd * kr[c * D + d];
            b[c] += gd * vr[c * D + d];
          }
        }
      }
      for (int c = 0; c < 4; ++c) {
        // lanes that are a query of the tile seeing key j + c; the others are zeroed by a
        // select, not a product, so that a NaN score there (0 * inf) reaches no gradient
        v8u seen = (v8u)(LANE < splat(static_cast<float>(nq)));
        if (j + c >= i0) seen &= (v8u)(LANE >= splat(static_cast<float>(j + c - i0)));
        const v8f p = exp2_neg8(a[c] - lsev);
        store8(pb + (j + c) * 8, (v8f)((v8u)p & seen));
        store8(dsb + (j + c) * 8, (v8f)((v8u)(p * (b[c] - delta)) & seen));
      }
    }
    for (int g = 0; g < nq; g += QG) {
      v8f acc[QG][D / 8] = {}, qv[QG][D / 8], gv[QG][D / 8];
      for (int64_t j = 0; j < nk; ++j) {
        const float* dsj = dsb + j * 8 + g;
        for (int c = 0; c < D / 8; ++c) {
          const v8f kc = load8(kl + j * D + 8 * c);
          for (int u = 0; u < QG; ++u) acc[u][c] += dsj[u] * kc;
        }
      }
      for (int u = 0; u < QG && g + u < nq; ++u)
        for (int c = 0; c < D / 8; ++c) store8(dq.row(i0 + g + u) + 8 * c, acc[u][c] * scale);
      for (int u = 0; u < QG; ++u)
        for (int c = 0; c < D / 8; ++c) qv[u][c] = load8(qr + (g + u) * D + 8 * c);
      for (int64_t j = 0; j < nk; ++j) {
        const float* dsj = dsb + j * 8 + g;
        for (int c = 0; c < D / 8; ++c) {
          v8f t = load8(dkl + j * D + 8 * c);
          for (int u = 0; u < QG; ++u) t += dsj[u] * qv[u][c];
          store8(dkl + j * D + 8 * c, t);
        }
      }
      for (int u = 0; u < QG; ++u)
        for (int c = 0; c < D / 8; ++c) gv[u][c] = load8(gr + (g + u) * D + 8 * c);
      for (int64_t j = 0; j < nk; ++j) {
        const float* pj = pb + j * 8 + g;
        for (int c = 0; c < D / 8; ++c) {
          v8f t = load8(dvl + j * D + 8 * c);
          for (int u = 0; u < QG; ++u) t += pj[u] * gv[u][c];
          store8(dvl + j * D + 8 * c, t);
        }
      }
    }
    if (has_sink)
      for (int64_t l = 0; l < nq; ++l) dsink += std::exp2(sink * LOG2E - lsev[l]) * delta[l];
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
    const int64_t T64 = (T + 63) & ~int64_t{63};
    std::vector<float> kl((T + 3) * D), vl(T * D), sc(Tp * 8 + 32), kt(D * T64), rows(8 * T64);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Head hq{q + b * st[0] + h * st[1], st[2]};
      const Head hk{k + b * st[3] + h * st[4], st[5]};
      const Head hv{v + b * st[6] + h * st[7], st[8]};
      const OutHead hy{y + b * st[9] + h * st[10], st[11]};
      fwd_head<D>(T, hq, hk, hv, sink ? sink[h] : 0.0f, sink != nullptr, scale, hy,
                  lse + bh * T, kl.data(), vl.data(), sc.data(), kt.data(), rows.data());
    }
  }
}

template <int D>
void bwd_all(int64_t B, int64_t H, int64_t T, const float* q, const float* k, const float* v,
             const float* y, const float* dy, const int64_t* st, const float* lse,
             const float* sink, float scale, float* dq, float* dk, float* dv, float* dsink,
             int threads) {
  const int64_t T4 = (T + 3) & ~int64_t{3};
#pragma omp parallel num_threads(threads)
  {
    const int64_t T64 = (T + 63) & ~int64_t{63};  // pb holds sparse scores up to 8-key blocks
    std::vector<float> kl(T4 * D), vl(T4 * D), dkl(T4 * D), dvl(T4 * D), pb(T64 * 8),
        dsb(T4 * 8), kt(D * T64), rows(8 * T64);
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
                                  out(dq, 5), out(dk, 6), out(dv, 7), kl.data(), vl.data(),
                                  dkl.data(), dvl.data(), pb.data(), dsb.data(), kt.data(),
                                  rows.data());
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
