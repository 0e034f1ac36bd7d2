// Fused CPU kernels for one MoV site: router, softmax, mixture and scaling in
// one pass over the site's activations (forward), and their gradients in one
// more (backward). XLA's CPU backend runs the same computation as about thirty
// operations per site, most of them passes over the activations or thin,
// memory-bound matmuls; see mov_jax/kernels/__init__.py for when these are
// used and README "Performance" for what they save.
//
// Layout: x, y, dx, dy are [rows, heads, K] (an FFN site has heads = 1 and K
// = mlp; an attention site has K = kv and routes every head separately with a
// router kernel shared by the heads); router kernel w [K, E]; expert vectors
// v [heads, E, K]; logits and probabilities [rows, heads, E], E <= 32. The
// mixture is `1 + sum_e p_e (v_e - 1)`, as the JAX path computes it (exactly
// 1 where every v_e is 1, so an adapter at initialisation changes nothing).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace mov_jax_kernels {
namespace {

// ------------------------------------------------------------------ shapes

constexpr int64_t kMaxExperts = 32;
// Vectors per padded expert row, at most.
constexpr int kMaxRowVectors = kMaxExperts / kLanes;

struct Shape {
  int64_t rows, heads, k, experts;
  int64_t padded;  // experts rounded up to whole vectors
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x,
                       const ffi::Buffer<ffi::F32>& w,
                       const ffi::Buffer<ffi::F32>& v, Shape* shape) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto vd = v.dimensions();
  if (xd.size() != 3 || wd.size() != 2 || vd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "mov_cpu: expected x [rows, heads, K], w [K, E], v [heads, E, K]");
  }
  *shape = Shape{xd[0], xd[1], xd[2], wd[1], 0};
  if (wd[0] != shape->k || vd[0] != shape->heads || vd[1] != shape->experts ||
      vd[2] != shape->k) {
    return ffi::Error::InvalidArgument("mov_cpu: inconsistent shapes");
  }
  if (shape->experts < 1 || shape->experts > kMaxExperts) {
    return ffi::Error::InvalidArgument("mov_cpu: needs 1 to 32 experts");
  }
  shape->padded = (shape->experts + kLanes - 1) / kLanes * kLanes;
  return ffi::Error::Success();
}

// Chunks of rows for the threads: a few per thread (for balance), but none
// so small that scheduling it costs more than it saves.
int64_t NumChunks(ffi::ThreadPool& pool, const Shape& s) {
  constexpr int64_t kMinChunkFloats = 16384;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t by_size = s.rows * s.heads * s.k / kMinChunkFloats;
  return std::max<int64_t>(1, std::min({s.rows, 4 * threads, by_size}));
}

// Lane indices 0..15 of vector n of a padded expert row.
inline IVec LaneIndex(int64_t n) {
  IVec iota;
  for (int64_t i = 0; i < kLanes; ++i) iota[i] = static_cast<int32_t>(n * kLanes + i);
  return iota;
}

// --------------------------------------------------------------- weights

// Rows are processed in tiles of kTile (row, head) pairs of one head, so that
// each load of a weight vector (router kernel, expert vectors) and each
// update of a weight-gradient accumulator serves kTile rows: done row by
// row, those [E, K] arrays stream through the cache once per row, and that
// traffic, not arithmetic, bounds the kernel.
constexpr int kTile = 8;

// The loops below keep a few vectors per row of a tile in registers. They
// take the tile's rows in passes of PassRows(per_row, reserved) rows: the
// most (a power of two, up to kTile) whose `per_row` vectors each, plus
// `reserved` vectors of weights and temporaries, fit in the vector registers
// (spilled accumulators cost a store and a load per multiply-add).
constexpr int PassRows(int per_row, int reserved) {
  int rows = kTile;
  while (rows > 1 && rows * per_row + reserved > kVecRegisters) rows /= 2;
  return rows;
}

// Calls fn(std::integral_constant<int, NV>()) for NV = vectors per padded
// expert row, so that the loops over a row's vectors are unrolled.
template <typename F>
void WithRowVectors(const Shape& s, const F& fn) {
  switch (s.padded / kLanes) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
  }
  if constexpr (kMaxRowVectors > 2) {
    if (s.padded / kLanes == 3) return fn(std::integral_constant<int, 3>());
    return fn(std::integral_constant<int, 4>());
  }
}

// Dot products of a row with every expert come out one of two ways. Wide
// sites (K > kNarrow) take the K axis in vectors against a few experts at a
// time and sum each accumulator's lanes at the end; narrow sites (attention
// heads) have too few vectors per row for those horizontal sums to pay off
// and take the experts as lanes instead (weights stored [K, padded]).
constexpr int64_t kNarrow = 256;

// The call's weights in the layouts the loops read.
struct Weights {
  Weights(const Shape& s, const float* w, const float* v)
      : narrow(s.k <= kNarrow) {
    vm1.resize(s.heads * s.experts * s.k);
    for (size_t i = 0; i < vm1.size(); ++i) vm1[i] = v[i] - 1.0f;
    wt.resize(s.experts * s.k);  // the router kernel transposed: [E, K]
    for (int64_t kk = 0; kk < s.k; ++kk)
      for (int64_t e = 0; e < s.experts; ++e)
        wt[e * s.k + kk] = w[kk * s.experts + e];
    if (!narrow) return;
    w_pad.assign(s.k * s.padded, 0.0f);
    vm1_pad.assign(s.heads * s.k * s.padded, 0.0f);
    for (int64_t kk = 0; kk < s.k; ++kk)
      for (int64_t e = 0; e < s.experts; ++e)
        w_pad[kk * s.padded + e] = w[kk * s.experts + e];
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t e = 0; e < s.experts; ++e)
        for (int64_t kk = 0; kk < s.k; ++kk)
          vm1_pad[(h * s.k + kk) * s.padded + e] =
              vm1[(h * s.experts + e) * s.k + kk];
  }
  bool narrow;
  std::vector<float> vm1;      // [heads, E, K]: v - 1
  std::vector<float> wt;       // [E, K]
  std::vector<float> w_pad;    // narrow: [K, padded]
  std::vector<float> vm1_pad;  // narrow: [heads, K, padded]
};

// ------------------------------------------------------------ tile kernels

// Dot products take kDotRows rows at a time against at most kDotExperts
// experts, in kDotRows * kDotExperts independent accumulators: enough to hide
// the latency of the multiply-adds, few enough to stay in registers (with
// the rows' vectors and one of weights).
constexpr int kDotRows = kVecRegisters >= 16 ? 4 : 2;
constexpr int kDotExperts = kVecRegisters >= 32 ? 5 : 2;
static_assert(kDotRows * kDotExperts + kDotRows + 1 <= kVecRegisters);

// out[t * ld + e] = a_t . w_e for t < kDotRows, e < G; w is [G, k].
template <int G>
void DotTileWide(const float* const* a, const float* __restrict w, int64_t k,
                 float* __restrict out, int64_t ld) {
  Vec acc[kDotRows][G] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    Vec av[kDotRows];
    for (int t = 0; t < kDotRows; ++t) av[t] = Load(a[t] + i);
    for (int e = 0; e < G; ++e) {
      const Vec we = Load(w + e * k + i);
      for (int t = 0; t < kDotRows; ++t) acc[t][e] += av[t] * we;
    }
  }
  for (int t = 0; t < kDotRows; ++t) {
    for (int e = 0; e < G; ++e) {
      float total = HorizontalSum(acc[t][e]);
      for (int64_t j = i; j < k; ++j) total += a[t][j] * w[e * k + j];
      out[t * ld + e] = total;
    }
  }
}

// out[t * padded + e] = a_t . w_e for the rows of a tile; w is [E, k].
void DotsWide(const Shape& s, const float* const* a, const float* w,
              float* out) {
  const int64_t groups = (s.experts + kDotExperts - 1) / kDotExperts;
  for (int t0 = 0; t0 < kTile; t0 += kDotRows) {
    int64_t e = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t size = (s.experts - e + (groups - g) - 1) / (groups - g);
      const float* we = w + e * s.k;
      float* o = out + t0 * s.padded + e;
      switch (size) {
        case 1: DotTileWide<1>(a + t0, we, s.k, o, s.padded); break;
        case 2: DotTileWide<2>(a + t0, we, s.k, o, s.padded); break;
        case 3: DotTileWide<3>(a + t0, we, s.k, o, s.padded); break;
        case 4: DotTileWide<4>(a + t0, we, s.k, o, s.padded); break;
        default: DotTileWide<5>(a + t0, we, s.k, o, s.padded); break;
      }
      e += size;
    }
  }
}

// out[t * NV * kLanes + e] = a_t . w_e for the rows of a tile, with w_pad
// [k, NV * kLanes]: the experts are lanes, K the loop.
template <int NV>
void DotsNarrow(const float* const* a, const float* __restrict w_pad,
                int64_t k, float* __restrict out) {
  constexpr int R = PassRows(NV, NV + 1);
  for (int t0 = 0; t0 < kTile; t0 += R) {
    Vec acc[R][NV] = {};
    for (int64_t i = 0; i < k; ++i) {
      Vec w[NV];
      for (int n = 0; n < NV; ++n) w[n] = Load(w_pad + (i * NV + n) * kLanes);
      for (int t = 0; t < R; ++t) {
        const float at = a[t0 + t][i];
        for (int n = 0; n < NV; ++n) acc[t][n] += at * w[n];
      }
    }
    for (int t = 0; t < R; ++t)
      for (int n = 0; n < NV; ++n)
        Store(out + ((t0 + t) * NV + n) * kLanes, acc[t][n]);
  }
}

// out [kTile, padded] = a_t . w_e, w being the router kernel (head < 0) or
// head h's expert vectors minus one. Padding lanes come out 0.
void Dots(const Shape& s, const Weights& wts, int64_t head,
          const float* const* a, float* out) {
  if (wts.narrow) {
    const float* w_pad = head < 0 ? wts.w_pad.data()
                                  : wts.vm1_pad.data() + head * s.k * s.padded;
    WithRowVectors(s, [&](auto nv) { DotsNarrow<nv()>(a, w_pad, s.k, out); });
    return;
  }
  DotsWide(s, a, head < 0 ? wts.wt.data() : wts.vm1.data() + head * s.experts * s.k,
           out);
}

// acc_e += sum_t coef[t * ld + e] * a_t for e < G and the rows of a tile,
// G experts side by side (G independent chains of multiply-adds).
template <int G>
void AccumulateGroup(const float* const* a, const float* __restrict coef,
                     int64_t ld, int64_t k, float* __restrict acc) {
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    Vec sum[G];
    for (int e = 0; e < G; ++e) sum[e] = Load(acc + e * k + i);
    for (int t = 0; t < kTile; ++t) {
      const Vec at = Load(a[t] + i);
      for (int e = 0; e < G; ++e) sum[e] += coef[t * ld + e] * at;
    }
    for (int e = 0; e < G; ++e) Store(acc + e * k + i, sum[e]);
  }
  for (; i < k; ++i)
    for (int e = 0; e < G; ++e)
      for (int t = 0; t < kTile; ++t) acc[e * k + i] += coef[t * ld + e] * a[t][i];
}

// acc_e += sum_t coef[t, e] * a_t over the rows of a tile; acc is [E, k],
// coef [kTile, padded]. Groups of up to kAccumulateExperts experts: their
// accumulators, a row's vector and a broadcast coefficient in registers.
constexpr int kAccumulateExperts = std::min(8, kVecRegisters - 2);

void Accumulate(const Shape& s, const float* const* a, const float* coef,
                float* acc) {
  const int64_t groups =
      (s.experts + kAccumulateExperts - 1) / kAccumulateExperts;
  int64_t e = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = (s.experts - e + (groups - g) - 1) / (groups - g);
    const float* c = coef + e;
    float* dst = acc + e * s.k;
    switch (size) {
      case 1: AccumulateGroup<1>(a, c, s.padded, s.k, dst); break;
      case 2: AccumulateGroup<2>(a, c, s.padded, s.k, dst); break;
      case 3: AccumulateGroup<3>(a, c, s.padded, s.k, dst); break;
      case 4: AccumulateGroup<4>(a, c, s.padded, s.k, dst); break;
      case 5: AccumulateGroup<5>(a, c, s.padded, s.k, dst); break;
      case 6: AccumulateGroup<6>(a, c, s.padded, s.k, dst); break;
      case 7: AccumulateGroup<7>(a, c, s.padded, s.k, dst); break;
      default: AccumulateGroup<8>(a, c, s.padded, s.k, dst); break;
    }
    e += size;
  }
}

// out_t = a_t * (1 + sum_e p[t, e] vm1_e) [+ sum_e q[t, e] wt_e] for the rows
// of a tile (kSecondTerm: with the second term); p and q are [kTile, padded].
template <bool kSecondTerm>
void ScaleTile(const Shape& s, const float* const* a, const float* __restrict p,
               const float* __restrict vm1, const float* __restrict q,
               const float* __restrict wt, float* const* out) {
  constexpr int R = PassRows(kSecondTerm ? 2 : 1, kSecondTerm ? 4 : 3);
  const int64_t k = s.k, experts = s.experts, ld = s.padded;
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int t0 = 0; t0 < kTile; t0 += R) {
      Vec m[R], u[R];
      for (int t = 0; t < R; ++t) {
        m[t] = Vec{} + 1.0f;
        u[t] = Vec{};
      }
      for (int64_t e = 0; e < experts; ++e) {
        const Vec ve = Load(vm1 + e * k + i);
        for (int t = 0; t < R; ++t) m[t] += p[(t0 + t) * ld + e] * ve;
        if constexpr (kSecondTerm) {
          const Vec we = Load(wt + e * k + i);
          for (int t = 0; t < R; ++t) u[t] += q[(t0 + t) * ld + e] * we;
        }
      }
      for (int t = 0; t < R; ++t)
        Store(out[t0 + t] + i, Load(a[t0 + t] + i) * m[t] + u[t]);
    }
  }
  for (; i < k; ++i) {
    for (int t = 0; t < kTile; ++t) {
      float m = 1.0f, u = 0.0f;
      for (int64_t e = 0; e < experts; ++e) {
        m += p[t * ld + e] * vm1[e * k + i];
        if constexpr (kSecondTerm) u += q[t * ld + e] * wt[e * k + i];
      }
      out[t][i] = a[t][i] * m + u;
    }
  }
}

// ScaleTile; q = nullptr: no second term.
void Scale(const Shape& s, const float* const* a, const float* p,
           const float* vm1, const float* q, const float* wt,
           float* const* out) {
  if (q)
    ScaleTile<true>(s, a, p, vm1, q, wt, out);
  else
    ScaleTile<false>(s, a, p, vm1, q, wt, out);
}

// The rows of a tile ([kTile, padded]) become softmax over their first
// `experts` lanes (0 in the others), stage by stage across the rows: each
// row's chain of max, exp and sum is mostly latency, and the rows' chains
// then overlap instead of running one after another (on attention sites
// with short rows, a softmax row by row took half of the forward pass).
// NV: vectors per row (padded / kLanes); rows in passes of R (the row's
// vectors plus those Exp works in must stay in registers).
template <int NV>
void SoftmaxTileOf(const Shape& s, float* tile) {
  constexpr int R = PassRows(NV, 6);
  for (int t0 = 0; t0 < kTile; t0 += R) {
    float* rows = tile + t0 * NV * kLanes;
    Vec v[R][NV];
    float top[R], inv[R];
    for (int t = 0; t < R; ++t)
      for (int n = 0; n < NV; ++n) {
        v[t][n] = Load(rows + (t * NV + n) * kLanes);
        v[t][n] = LaneIndex(n) < static_cast<int32_t>(s.experts)
                      ? v[t][n] : Vec{} - INFINITY;
      }
    for (int t = 0; t < R; ++t) {
      Vec m = v[t][0];
      for (int n = 1; n < NV; ++n) m = Max(m, v[t][n]);
      top[t] = HorizontalMax(m);
    }
    for (int t = 0; t < R; ++t)
      for (int n = 0; n < NV; ++n) {
        v[t][n] = Exp(v[t][n] - top[t]);
        v[t][n] = LaneIndex(n) < static_cast<int32_t>(s.experts) ? v[t][n] : Vec{};
      }
    for (int t = 0; t < R; ++t) {
      Vec total = v[t][0];
      for (int n = 1; n < NV; ++n) total += v[t][n];
      inv[t] = 1.0f / HorizontalSum(total);
    }
    for (int t = 0; t < R; ++t)
      for (int n = 0; n < NV; ++n)
        Store(rows + (t * NV + n) * kLanes, v[t][n] * inv[t]);
  }
}

void SoftmaxTile(const Shape& s, float* tile) {
  WithRowVectors(s, [&](auto nv) { SoftmaxTileOf<nv()>(s, tile); });
}

// dl_t <- p_t * (dl_t + dprobs_t - (p_t . (dl_t + dprobs_t))) + dlogits_t:
// the softmax's gradient, plus what the statistics send back, for the rows
// of a tile ([kTile, padded]), stage by stage across the rows (in passes) as
// in SoftmaxTile. p is the tile's probabilities (zero rows past `count`,
// whose gradient then comes out zero); dps and dls (the statistics'
// cotangents, [rows, heads, E]) may be null.
template <int NV>
void SoftmaxGradientTileOf(const Shape& s, const float* __restrict p,
                           const float* dls, const float* dps, int64_t r0,
                           int64_t h, int64_t count, float* dl) {
  constexpr int R = PassRows(2 * NV, 2);
  for (int t0 = 0; t0 < kTile; t0 += R) {
    Vec pv[R][NV], d[R][NV];
    float weighted[R];
    for (int t = 0; t < R; ++t) {
      const int64_t row = (r0 + t0 + t) * s.heads + h;
      const float* dp = dps ? dps + row * s.experts : nullptr;
      for (int n = 0; n < NV; ++n) {
        pv[t][n] = Load(p + ((t0 + t) * NV + n) * kLanes);
        d[t][n] = Load(dl + ((t0 + t) * NV + n) * kLanes);
        if (dp)
          d[t][n] += LoadFirst(dp + n * kLanes,
                               t0 + t < count ? LanesOf(s.experts, n) : 0);
      }
    }
    for (int t = 0; t < R; ++t) {
      Vec pd = pv[t][0] * d[t][0];
      for (int n = 1; n < NV; ++n) pd += pv[t][n] * d[t][n];
      weighted[t] = HorizontalSum(pd);
    }
    for (int t = 0; t < R; ++t) {
      const int64_t row = (r0 + t0 + t) * s.heads + h;
      const float* dg = dls ? dls + row * s.experts : nullptr;
      for (int n = 0; n < NV; ++n) {
        Vec out = pv[t][n] * (d[t][n] - weighted[t]);
        if (dg)
          out += LoadFirst(dg + n * kLanes,
                           t0 + t < count ? LanesOf(s.experts, n) : 0);
        Store(dl + ((t0 + t) * NV + n) * kLanes, out);
      }
    }
  }
}

void SoftmaxGradientTile(const Shape& s, const float* p, const float* dls,
                         const float* dps, int64_t r0, int64_t h,
                         int64_t count, float* dl) {
  WithRowVectors(s, [&](auto nv) {
    SoftmaxGradientTileOf<nv()>(s, p, dls, dps, r0, h, count, dl);
  });
}

// Calls fn(h, first_row, count) for the tiles of one head over rows [begin,
// end): at most kTile rows each.
template <typename F>
void ForEachTile(const Shape& s, int64_t begin, int64_t end, const F& fn) {
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t r = begin; r < end; r += kTile)
      fn(h, r, std::min<int64_t>(kTile, end - r));
}

// Per-chunk buffers. Rows of a tile past its real ones (a partial tile at the
// end of a chunk) read zeros and write to a discarded buffer.
struct TileBuffers {
  TileBuffers(const Shape& s, int64_t rows_k)
      : zeros(s.k, 0.0f), discard(s.k), rows(rows_k),
        a(kTile * s.padded, 0.0f), b(kTile * s.padded, 0.0f) {}
  std::vector<float> zeros, discard, rows, a, b;
};

// ----------------------------------------------------------------- forward

ffi::Error MovForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> v,
                          ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> logits,
                          ffi::ResultBuffer<ffi::F32> probs) {
  Shape s;
  if (ffi::Error err = CheckShapes(x, w, v, &s); err.failure()) return err;
  const Weights wts(s, w.typed_data(), v.typed_data());
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  float* ls = logits->typed_data();
  float* ps = probs->typed_data();
  const int64_t n_chunks = NumChunks(pool, s);
  auto chunk = [&](int64_t c) {
    TileBuffers buf(s, 0);
    float* tile_p = buf.a.data();  // logits, then probabilities
    const float* xr[kTile];
    float* yr[kTile];
    ForEachTile(s, s.rows * c / n_chunks, s.rows * (c + 1) / n_chunks,
                [&](int64_t h, int64_t r0, int64_t count) {
      for (int t = 0; t < kTile; ++t) {
        const int64_t row = (r0 + t) * s.heads + h;
        xr[t] = t < count ? xs + row * s.k : buf.zeros.data();
        yr[t] = t < count ? ys + row * s.k : buf.discard.data();
      }
      Dots(s, wts, -1, xr, tile_p);
      // Logits out, then softmax in place (the padding rows' zero logits
      // give harmless uniform rows), then probabilities out.
      for (int t = 0; t < count; ++t) {
        const int64_t row = (r0 + t) * s.heads + h;
        for (int64_t n = 0; n * kLanes < s.padded; ++n)
          StoreFirst(ls + row * s.experts + n * kLanes,
                     Load(tile_p + t * s.padded + n * kLanes),
                     LanesOf(s.experts, n));
      }
      SoftmaxTile(s, tile_p);
      for (int t = 0; t < count; ++t) {
        const int64_t row = (r0 + t) * s.heads + h;
        for (int64_t n = 0; n * kLanes < s.padded; ++n)
          StoreFirst(ps + row * s.experts + n * kLanes,
                     Load(tile_p + t * s.padded + n * kLanes),
                     LanesOf(s.experts, n));
      }
      Scale(s, xr, tile_p, wts.vm1.data() + h * s.experts * s.k, nullptr,
            nullptr, yr);
    });
  };
  ParallelFor(pool, n_chunks, chunk);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- backward

// Gradients of (y, logits, probs) = forward(x, w, v) for cotangents dy,
// dlogits and dprobs (the latter two from the router's statistics and
// auxiliary losses; zeros when those are not part of the loss).
ffi::Error MovBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> probs,
                           ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> dlogits,
                           ffi::Buffer<ffi::F32> dprobs,
                           ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32> dw,
                           ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (ffi::Error err = CheckShapes(x, w, v, &s); err.failure()) return err;
  const Weights wts(s, w.typed_data(), v.typed_data());
  const float* xs = x.typed_data();
  const float* ps = probs.typed_data();
  const float* dys = dy.typed_data();
  // An empty dlogits or dprobs stands for zeros (nothing differentiates the
  // router's logits or probabilities directly).
  const float* dls = dlogits.element_count() ? dlogits.typed_data() : nullptr;
  const float* dps = dprobs.element_count() ? dprobs.typed_data() : nullptr;
  if ((dls && dlogits.element_count() != s.rows * s.heads * s.experts) ||
      (dps && dprobs.element_count() != s.rows * s.heads * s.experts)) {
    return ffi::Error::InvalidArgument(
        "mov_cpu: dlogits and dprobs must be [rows, heads, E] or empty");
  }
  // An empty dx: the input gradient is not needed (a frozen path).
  float* dxs = dx->element_count() ? dx->typed_data() : nullptr;
  if (dxs && dx->element_count() != s.rows * s.heads * s.k) {
    return ffi::Error::InvalidArgument("mov_cpu: dx must be like x or empty");
  }
  const int64_t n_chunks = NumChunks(pool, s);
  const int64_t wsize = s.experts * s.k;            // dw, transposed
  const int64_t vsize = s.heads * s.experts * s.k;  // dv
  // Every chunk accumulates its own weight gradients; summed below in a fixed
  // order, so results do not depend on which thread ran which chunk.
  std::vector<float> partial(n_chunks * (wsize + vsize), 0.0f);
  auto chunk = [&](int64_t c) {
    TileBuffers buf(s, kTile * s.k);
    float* tile_p = buf.a.data();
    float* tile_dl = buf.b.data();
    float* dwt = partial.data() + c * (wsize + vsize);
    float* dvc = dwt + wsize;
    const float* xr[kTile];
    const float* dyr[kTile];
    const float* gr[kTile];
    float* dxr[kTile];
    ForEachTile(s, s.rows * c / n_chunks, s.rows * (c + 1) / n_chunks,
                [&](int64_t h, int64_t r0, int64_t count) {
      for (int t = 0; t < kTile; ++t) {
        const int64_t row = (r0 + t) * s.heads + h;
        const bool real = t < count;
        xr[t] = real ? xs + row * s.k : buf.zeros.data();
        dyr[t] = real ? dys + row * s.k : buf.zeros.data();
        dxr[t] = real && dxs ? dxs + row * s.k : buf.discard.data();
        float* gt = buf.rows.data() + t * s.k;
        gr[t] = gt;
        const float* __restrict xt = xr[t];
        const float* __restrict dyt = dyr[t];
#pragma omp simd
        for (int64_t i = 0; i < s.k; ++i) gt[i] = dyt[i] * xt[i];
        // Padding lanes of tile_p stay 0 (only the first E are written);
        // the padding rows get zeros.
        for (int64_t n = 0; n * kLanes < s.padded; ++n)
          Store(tile_p + t * s.padded + n * kLanes,
                LoadFirst(ps + row * s.experts + n * kLanes,
                          real ? LanesOf(s.experts, n) : 0));
      }
      // d(mixture)/d(probabilities)_e = (dy * x) . (v_e - 1); then the
      // softmax's gradient, plus what the statistics send back.
      Dots(s, wts, h, gr, tile_dl);
      SoftmaxGradientTile(s, tile_p, dls, dps, r0, h, count, tile_dl);
      // dv_e += sum_t p_te (dy_t * x_t); dw^T_e += sum_t dlogits_te x_t.
      Accumulate(s, gr, tile_p, dvc + h * s.experts * s.k);
      Accumulate(s, xr, tile_dl, dwt);
      // dx = dy * mixture + dlogits @ w^T.
      if (dxs)
        Scale(s, dyr, tile_p, wts.vm1.data() + h * s.experts * s.k, tile_dl,
              wts.wt.data(), dxr);
    });
  };
  ParallelFor(pool, n_chunks, chunk);
  float* dws = dw->typed_data();
  float* dvs = dv->typed_data();
  std::fill(dws, dws + wsize, 0.0f);
  std::fill(dvs, dvs + vsize, 0.0f);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const float* dwt = partial.data() + c * (wsize + vsize);
    const float* dvc = dwt + wsize;
    for (int64_t e = 0; e < s.experts; ++e)
      for (int64_t i = 0; i < s.k; ++i)
        dws[i * s.experts + e] += dwt[e * s.k + i];
    for (int64_t i = 0; i < vsize; ++i) dvs[i] += dvc[i];
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mov_jax_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MovForward, mov_jax_kernels::MovForwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // x
        .Arg<ffi::Buffer<ffi::F32>>()  // w
        .Arg<ffi::Buffer<ffi::F32>>()  // v
        .Ret<ffi::Buffer<ffi::F32>>()  // y
        .Ret<ffi::Buffer<ffi::F32>>()  // logits
        .Ret<ffi::Buffer<ffi::F32>>());  // probs

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MovBackward, mov_jax_kernels::MovBackwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // x
        .Arg<ffi::Buffer<ffi::F32>>()  // w
        .Arg<ffi::Buffer<ffi::F32>>()  // v
        .Arg<ffi::Buffer<ffi::F32>>()  // probs
        .Arg<ffi::Buffer<ffi::F32>>()  // dy
        .Arg<ffi::Buffer<ffi::F32>>()  // dlogits
        .Arg<ffi::Buffer<ffi::F32>>()  // dprobs
        .Ret<ffi::Buffer<ffi::F32>>()  // dx
        .Ret<ffi::Buffer<ffi::F32>>()  // dw
        .Ret<ffi::Buffer<ffi::F32>>());  // dv
