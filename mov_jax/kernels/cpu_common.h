// What the CPU kernels share: XLA FFI, the SIMD vector type and its math
// (loads and stores, horizontal reductions, exp) and the loop that spreads
// a kernel's chunks over XLA's intra-op threads.

#ifndef MOV_JAX_KERNELS_CPU_COMMON_H_
#define MOV_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mov_jax_kernels {

// ---------------------------------------------------------------- threads

// How long a kernel's caller spins on its helpers' last chunks before it
// blocks (see ParallelFor): a few chunks' time, so that an oversubscribed
// host (a helper descheduled) costs a little spinning, not a stall.
constexpr int64_t kSpinMicros = 200;

// Tells the CPU this is a spin-wait loop (fewer wasted cycles and, with
// hyper-threading, more for the sibling thread).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs fn(chunk) for chunk in [0, n_chunks) on the caller and XLA's intra-op
// threads. Chunks are claimed from a shared counter, so the caller never waits
// on a task that has not started (two kernels waiting on each other's queued
// tasks cannot deadlock the pool); a task that starts after every chunk was
// claimed does nothing, and the state it touches is shared-owned.
//
// The caller then waits only for chunks a helper has started. It spins for
// a while before it blocks: a chunk takes tens of microseconds, and a
// blocked thread takes about as long to wake again (50-70 us from a
// notify to running on the 2-core cloud VM measured); waiting blocked had
// cost about 1% of the tiny model's MoV-10 training step there.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n_chunks, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* body = &fn;
  auto work = [state, n_chunks, body]() {
    for (int64_t i = state->next.fetch_add(1); i < n_chunks;
         i = state->next.fetch_add(1)) {
      (*body)(i);
      if (state->done.fetch_add(1) + 1 == n_chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 0), n_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  const auto spin_until =
      std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  while (state->done.load(std::memory_order_acquire) != n_chunks) {
    for (int i = 0; i < 32; ++i) CpuRelax();
    if (std::chrono::steady_clock::now() > spin_until) break;
  }
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_chunks; });
}


// ----------------------------------------------------------------- vectors

// A vector is one register's worth of floats: 16 with AVX-512, else 8 (an
// AVX2 register; two on 128-bit SIMD). kVecRegisters: how many such vectors
// the register file holds, which sizes the loops' sets of accumulators below.
// (A 16-float vector on AVX2 made GCC emulate it through the stack: spills
// and lane-by-lane copies, the kernel then 2-4x slower than XLA's ops.)
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kVecRegisters = 32;
#elif defined(__AVX__) || defined(__aarch64__)
constexpr int64_t kLanes = 8;
constexpr int kVecRegisters = 16;
#else
constexpr int64_t kLanes = 8;
constexpr int kVecRegisters = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));



inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2's lane mask for the first `count` lanes.
inline __m256i FirstLanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// The first `count` (0..kLanes) floats at p, zeros in the other lanes, by a
// masked load where the CPU has one (a row of E < kLanes values copied
// through memory would cost a failed store-to-load forward per row); and the
// store of the first `count` lanes (masked only with AVX-512, see below).
inline Vec LoadFirst(const float* p, int64_t count) {
#if defined(__AVX512F__)
  const __m512 v =
      _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
  Vec r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
#elif defined(__AVX2__)
  const __m256 v = _mm256_maskload_ps(p, FirstLanes(count));
  Vec r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
#else
  Vec r = {};
  for (int64_t i = 0; i < count; ++i) r[i] = p[i];
  return r;
#endif
}

inline void StoreFirst(float* p, Vec v, int64_t count) {
  if (count == kLanes) {
    Store(p, v);
    return;
  }
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1u), m);
#else
  // Lane by lane without AVX-512: AMD CPUs run AVX2's maskstore as slow
  // microcode (the forward of narrow heads, E = 10 on Zen 3, ran ~15% faster
  // this way).
  for (int64_t i = 0; i < count; ++i) p[i] = v[i];
#endif
}

// Lanes of vector n of an expert row of `experts` values.
inline int64_t LanesOf(int64_t experts, int64_t n) {
  return std::clamp<int64_t>(experts - n * kLanes, 0, kLanes);
}

inline Vec Max(Vec a, Vec b) { return a > b ? a : b; }

// Sum and max of a vector's lanes, by halves.
#if defined(__AVX512F__)
inline float HorizontalSum(Vec v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3,
                               4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12,
                               13, 14, 15);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                               13, 14, 15);
  v += __builtin_shufflevector(v, v, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                               13, 14, 15);
  return v[0];
}

inline float HorizontalMax(Vec v) {
  v = Max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1,
                                     2, 3, 4, 5, 6, 7));
  v = Max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10,
                                     11, 12, 13, 14, 15));
  v = Max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10,
                                     11, 12, 13, 14, 15));
  v = Max(v, __builtin_shufflevector(v, v, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                     11, 12, 13, 14, 15));
  return v[0];
}
#else
inline float HorizontalSum(Vec v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 1, 0, 2, 3, 4, 5, 6, 7);
  return v[0];
}

inline float HorizontalMax(Vec v) {
  v = Max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = Max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 4, 5, 6, 7));
  v = Max(v, __builtin_shufflevector(v, v, 1, 0, 2, 3, 4, 5, 6, 7));
  return v[0];
}
#endif

// exp of every lane: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the
// degree-6 minimax polynomial of Cephes' expf (relative error ~1e-7), times
// 2^n built in the exponent bits. Inputs are clamped to [-87, 88].
inline Vec Exp(Vec x) {
  x = x < -87.0f ? Vec{} - 87.0f : x;
  x = x > 88.0f ? Vec{} + 88.0f : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23.
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec poly = Vec{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Vec er = poly * r * r + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
}

}  // namespace mov_jax_kernels

#endif  // MOV_JAX_KERNELS_CPU_COMMON_H_
