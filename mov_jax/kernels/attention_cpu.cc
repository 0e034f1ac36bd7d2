// Fused CPU kernels for T5's attention: per head, logits = q k^T + bias (no
// 1/sqrt(d): T5 folds it into the query projection), softmax, and the
// probabilities' product with v, in one call forward; their gradients in one
// more. No dropout on the probabilities (the JAX path handles that).
//
// Why: XLA's CPU backend runs the per-head products as batched matmuls of
// [len, head_dim] matrices at 30-70 GFLOP/s on a 2-core machine where a
// 2048^2 matmul runs at 110-130; the small register-tiled matmul below does
// one head's products at ~75 GFLOP/s per core, the heads spread over the
// cores. It also reads and writes the projections' own layout, so the
// transposes to [batch, heads, len, head_dim] and back disappear.
//
// Layout: q [b, lq, h, d]; k, v [b, lk, h, d]; out, dq, dk, dv like their
// inputs; bias [bb, hb, lq, lk] with bb in {1, b} and hb in {1, h}
// (broadcast), or empty for none; probs, dlogits [b, h, lq, lk]. dlogits is
// the gradient of the logits (and so of an unbroadcast bias). An empty (0,)
// dq, dk, dv or dlogits result tells the backward kernel not to compute it:
// nothing upstream of a frozen first layer's query, say, needs its gradient.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace mov_jax_kernels {
namespace {

// ------------------------------------------------------------------ matmul

// The micro tile: kMR rows x kNR columns of the product in registers (two
// vectors per row), plus the two vectors of the right operand and one
// broadcast value: 6 x 16 with AVX2's 16 registers, 14 x 32 with AVX-512's 32.
constexpr int64_t kNR = 2 * kLanes;
constexpr int64_t kMR = (kVecRegisters - 4) / 2;

// A matrix view: element (i, j) at data[i * row + j * col]. Transposes and
// the heads' interleaved rows are views of the same buffers.
struct View {
  const float* data;
  int64_t row, col;
  float At(int64_t i, int64_t j) const { return data[i * row + j * col]; }
};

// B's columns [j0, j0 + kNR) for all k rows, as kNR-float rows (zero past n).
void PackColumns(const View& b, int64_t k, int64_t j0, int64_t n,
                 float* dst) {
  const int64_t width = std::min(kNR, n - j0);
  if (b.col == 1 && width == kNR) {
    for (int64_t p = 0; p < k; ++p)
      std::memcpy(dst + p * kNR, b.data + p * b.row + j0, kNR * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < kNR; ++j) {
    if (j < width) {
      for (int64_t p = 0; p < k; ++p) dst[p * kNR + j] = b.At(p, j0 + j);
    } else {
      for (int64_t p = 0; p < k; ++p) dst[p * kNR + j] = 0.0f;
    }
  }
}

// A's rows [i0, i0 + kMR) for all k columns, as kMR-float columns (zero past
// m): the rows of a's last, partial panel.
void PackRows(const View& a, int64_t k, int64_t i0, int64_t m, float* dst) {
  const int64_t height = std::min(kMR, m - i0);
  for (int64_t p = 0; p < k; ++p) {
    float* d = dst + p * kMR;
    for (int64_t i = 0; i < height; ++i) d[i] = a.At(i0 + i, p);
    for (int64_t i = height; i < kMR; ++i) d[i] = 0.0f;
  }
}

// c[0:height, 0:width] (row stride ldc) = a[0:kMR, 0:k] x packed columns.
// a is read in place, A(i, p) at a[p * lda + i] (kColumns: a transposed
// view, or packed rows) or a[i * lda + p]: packing it would cost a scalar
// copy per element, a fifth of the kernel's time when it was done.
template <bool kColumns>
void MicroTile(const float* __restrict a, int64_t lda,
               const float* __restrict columns, int64_t k, float* c,
               int64_t ldc, int64_t height, int64_t width) {
  Vec acc[kMR][2];
  for (int64_t i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = Vec{};
  for (int64_t p = 0; p < k; ++p) {
    const Vec b0 = Load(columns + p * kNR);
    const Vec b1 = Load(columns + p * kNR + kLanes);
    for (int64_t i = 0; i < kMR; ++i) {
      const float ai = kColumns ? a[p * lda + i] : a[i * lda + p];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  if (width == kNR) {
    for (int64_t i = 0; i < height; ++i) {
      Store(c + i * ldc, acc[i][0]);
      Store(c + i * ldc + kLanes, acc[i][1]);
    }
    return;
  }
  for (int64_t i = 0; i < height; ++i) {
    float row[kNR];
    Store(row, acc[i][0]);
    Store(row + kLanes, acc[i][1]);
    std::memcpy(c + i * ldc, row, width * sizeof(float));
  }
}

// Floats of working memory Matmul needs for an [m, k] x [k, n] product.
int64_t MatmulWork(int64_t n, int64_t k) {
  return ((n + kNR - 1) / kNR * kNR + kMR) * k;
}

// c [m, n] (row stride ldc) = a [m, k] x b [k, n], one thread; one of a's
// strides must be 1. b is packed once; a's whole kMR-row panels are read in
// place (the last, partial one packed with zeros).
void Matmul(int64_t m, int64_t n, int64_t k, const View& a, const View& b,
            float* c, int64_t ldc, float* work) {
  const int64_t panels = (n + kNR - 1) / kNR;
  float* packed_b = work;
  float* packed_a = work + panels * kNR * k;
  for (int64_t j = 0; j < panels; ++j)
    PackColumns(b, k, j * kNR, n, packed_b + j * kNR * k);
  for (int64_t i0 = 0; i0 < m; i0 += kMR) {
    const int64_t height = std::min(kMR, m - i0);
    const bool whole = height == kMR && (a.col == 1 || a.row == 1);
    if (!whole) PackRows(a, k, i0, m, packed_a);
    for (int64_t j = 0; j < panels; ++j) {
      float* tile = c + i0 * ldc + j * kNR;
      const float* columns = packed_b + j * kNR * k;
      const int64_t width = std::min(kNR, n - j * kNR);
      if (!whole) {
        MicroTile<true>(packed_a, kMR, columns, k, tile, ldc, height, width);
      } else if (a.col == 1) {
        MicroTile<false>(a.data + i0 * a.row, a.row, columns, k, tile, ldc,
                         height, width);
      } else {
        MicroTile<true>(a.data + i0, a.col, columns, k, tile, ldc, height,
                        width);
      }
    }
  }
}

// Per-thread working memory, kept between calls (no allocation per head),
// 64-byte aligned.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  constexpr int64_t kAlign = 64 / sizeof(float);
  if (static_cast<int64_t>(buffer.size()) < floats + kAlign)
    buffer.resize(floats + kAlign);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// ------------------------------------------------------------------ shapes

struct Shape {
  int64_t batch, heads, q_len, kv_len, depth;
  int64_t bias_batch, bias_heads;  // 0: no bias
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q,
                       const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, Shape* s) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "attention_cpu: expected q [b, lq, h, d], k and v [b, lk, h, d]");
  }
  *s = Shape{qd[0], qd[2], qd[1], kd[1], qd[3], 0, 0};
  for (auto dims : {kd, vd}) {
    if (dims[0] != s->batch || dims[1] != s->kv_len || dims[2] != s->heads ||
        dims[3] != s->depth) {
      return ffi::Error::InvalidArgument("attention_cpu: inconsistent q/k/v");
    }
  }
  return ffi::Error::Success();
}

ffi::Error CheckBias(const ffi::Buffer<ffi::F32>& bias, Shape* s) {
  auto bd = bias.dimensions();
  if (bd.size() == 1 && bd[0] == 0) return ffi::Error::Success();
  if (bd.size() != 4 || (bd[0] != 1 && bd[0] != s->batch) ||
      (bd[1] != 1 && bd[1] != s->heads) || bd[2] != s->q_len ||
      bd[3] != s->kv_len) {
    return ffi::Error::InvalidArgument(
        "attention_cpu: bias must be [1 or b, 1 or h, lq, lk] or empty");
  }
  s->bias_batch = bd[0];
  s->bias_heads = bd[1];
  return ffi::Error::Success();
}

// ----------------------------------------------------------------- softmax

// row[0:n] = softmax(row + bias_row) in place (bias_row may be null).
// Lanes whose shifted logit is below exp's range (masked positions: the
// mask's bias is float32's lowest value) get exactly 0, as in XLA.
void SoftmaxRow(float* row, const float* bias_row, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  float max = -std::numeric_limits<float>::infinity();
  Vec vmax = Vec{} + max;
  for (int64_t j = 0; j < whole; j += kLanes) {
    Vec x = Load(row + j);
    if (bias_row) x += Load(bias_row + j);
    Store(row + j, x);
    vmax = Max(vmax, x);
  }
  for (int64_t j = whole; j < n; ++j) {
    if (bias_row) row[j] += bias_row[j];
    max = std::max(max, row[j]);
  }
  max = std::max(max, HorizontalMax(vmax));
  Vec vsum = Vec{};
  float sum = 0.0f;
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Vec x = Load(row + j) - max;
    const Vec e = x < -87.0f ? Vec{} : Exp(x);
    Store(row + j, e);
    vsum += e;
  }
  for (int64_t j = whole; j < n; ++j) {
    row[j] = std::exp(row[j] - max);
    sum += row[j];
  }
  const float scale = 1.0f / (sum + HorizontalSum(vsum));
  for (int64_t j = 0; j < whole; j += kLanes)
    Store(row + j, Load(row + j) * scale);
  for (int64_t j = whole; j < n; ++j) row[j] *= scale;
}

// dlogits = p * (dp - sum(p * dp)) for one row, in place over dp.
void SoftmaxGradientRow(const float* p, float* dp, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  Vec vdot = Vec{};
  float dot = 0.0f;
  for (int64_t j = 0; j < whole; j += kLanes)
    vdot += Load(p + j) * Load(dp + j);
  for (int64_t j = whole; j < n; ++j) dot += p[j] * dp[j];
  dot += HorizontalSum(vdot);
  for (int64_t j = 0; j < whole; j += kLanes)
    Store(dp + j, Load(p + j) * (Load(dp + j) - dot));
  for (int64_t j = whole; j < n; ++j) dp[j] = p[j] * (dp[j] - dot);
}

// ----------------------------------------------------------------- kernels

// Views of head h of batch element b in a [b, len, h, d] array (rows of the
// head are h * d apart) and of its transpose.
View Head(const float* base, const Shape& s, int64_t len, int64_t b,
          int64_t h) {
  return View{base + (b * len * s.heads + h) * s.depth, s.heads * s.depth, 1};
}
View Transposed(const View& v) { return View{v.data, v.col, v.row}; }

ffi::Error AttentionForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v,
                                ffi::Buffer<ffi::F32> bias,
                                ffi::ResultBuffer<ffi::F32> out,
                                ffi::ResultBuffer<ffi::F32> probs) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, &s); e.failure()) return e;
  if (auto e = CheckBias(bias, &s); e.failure()) return e;
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const float* biases = bias.typed_data();
  float* outs = out->typed_data();
  float* ps = probs->typed_data();
  const int64_t lq = s.q_len, lk = s.kv_len, d = s.depth;
  const int64_t work =
      std::max(MatmulWork(lk, d), MatmulWork(d, lk));
  ParallelFor(pool, s.batch * s.heads, [&](int64_t task) {
    const int64_t b = task / s.heads, h = task % s.heads;
    float* scratch = Scratch(work);
    float* p = ps + task * lq * lk;
    const View qh = Head(qs, s, lq, b, h);
    // logits = q k^T, straight into the probabilities' buffer.
    Matmul(lq, lk, d, qh, Transposed(Head(ks, s, lk, b, h)), p, lk, scratch);
    const float* bias_head =
        s.bias_batch == 0
            ? nullptr
            : biases + ((s.bias_batch == 1 ? 0 : b) * s.bias_heads +
                        (s.bias_heads == 1 ? 0 : h)) * lq * lk;
    for (int64_t i = 0; i < lq; ++i)
      SoftmaxRow(p + i * lk, bias_head ? bias_head + i * lk : nullptr, lk);
    Matmul(lq, d, lk, View{p, lk, 1}, Head(vs, s, lk, b, h),
           outs + (b * lq * s.heads + h) * d, s.heads * d, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackwardImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs,
    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
    ffi::ResultBuffer<ffi::F32> dlogits) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, &s); e.failure()) return e;
  const int64_t lq = s.q_len, lk = s.kv_len, d = s.depth;
  const int64_t logits_size = s.batch * s.heads * lq * lk;
  const int64_t q_size = s.batch * lq * s.heads * d;
  const int64_t kv_size = s.batch * lk * s.heads * d;
  if (probs.element_count() != logits_size || dout.element_count() != q_size) {
    return ffi::Error::InvalidArgument(
        "attention_cpu: probs must be [b, h, lq, lk] and dout like q");
  }
  // Each result is either wanted (its full size) or empty (skipped).
  const bool write_dq = dq->element_count() != 0;
  const bool write_dk = dk->element_count() != 0;
  const bool write_dv = dv->element_count() != 0;
  const bool write_dlogits = dlogits->element_count() != 0;
  if ((write_dq && dq->element_count() != q_size) ||
      (write_dk && dk->element_count() != kv_size) ||
      (write_dv && dv->element_count() != kv_size) ||
      (write_dlogits && dlogits->element_count() != logits_size)) {
    return ffi::Error::InvalidArgument(
        "attention_cpu: dq must be like q, dk and dv like k, dlogits "
        "[b, h, lq, lk]; each may be empty (not computed)");
  }
  const bool need_dlogits = write_dq || write_dk || write_dlogits;
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const float* ps = probs.typed_data();
  const float* dos = dout.typed_data();
  float* dqs = dq->typed_data();
  float* dks = dk->typed_data();
  float* dvs = dv->typed_data();
  float* dls = dlogits->typed_data();
  const int64_t work = std::max({MatmulWork(lk, d), MatmulWork(d, lq),
                                 MatmulWork(d, lk)});
  ParallelFor(pool, s.batch * s.heads, [&](int64_t task) {
    const int64_t b = task / s.heads, h = task % s.heads;
    float* scratch = Scratch(work + (write_dlogits ? 0 : lq * lk));
    float* ds = write_dlogits ? dls + task * lq * lk : scratch + work;
    const float* p = ps + task * lq * lk;
    const View qh = Head(qs, s, lq, b, h);
    const View kh = Head(ks, s, lk, b, h);
    const View douth = Head(dos, s, lq, b, h);
    const int64_t ld = s.heads * d;
    // dprobs = dout v^T; dv = p^T dout.
    if (need_dlogits) {
      Matmul(lq, lk, d, douth, Transposed(Head(vs, s, lk, b, h)), ds, lk,
             scratch);
    }
    if (write_dv) {
      Matmul(lk, d, lq, View{p, 1, lk}, douth,
             dvs + (b * lk * s.heads + h) * d, ld, scratch);
    }
    if (!need_dlogits) return;
    for (int64_t i = 0; i < lq; ++i)
      SoftmaxGradientRow(p + i * lk, ds + i * lk, lk);
    // dq = dlogits k; dk = dlogits^T q.
    if (write_dq) {
      Matmul(lq, d, lk, View{ds, lk, 1}, kh, dqs + (b * lq * s.heads + h) * d,
             ld, scratch);
    }
    if (write_dk) {
      Matmul(lk, d, lq, View{ds, 1, lk}, qh, dks + (b * lk * s.heads + h) * d,
             ld, scratch);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mov_jax_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttentionForward, mov_jax_kernels::AttentionForwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q
        .Arg<ffi::Buffer<ffi::F32>>()  // k
        .Arg<ffi::Buffer<ffi::F32>>()  // v
        .Arg<ffi::Buffer<ffi::F32>>()  // bias (or empty)
        .Ret<ffi::Buffer<ffi::F32>>()  // out
        .Ret<ffi::Buffer<ffi::F32>>());  // probs

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AttentionBackward, mov_jax_kernels::AttentionBackwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q
        .Arg<ffi::Buffer<ffi::F32>>()  // k
        .Arg<ffi::Buffer<ffi::F32>>()  // v
        .Arg<ffi::Buffer<ffi::F32>>()  // probs
        .Arg<ffi::Buffer<ffi::F32>>()  // dout
        .Ret<ffi::Buffer<ffi::F32>>()  // dq (or empty)
        .Ret<ffi::Buffer<ffi::F32>>()  // dk (or empty)
        .Ret<ffi::Buffer<ffi::F32>>()  // dv (or empty)
        .Ret<ffi::Buffer<ffi::F32>>());  // dlogits (or empty)
