// y[M, N] = x[M, K] @ W[K, N], x and y float32, W float32 or bfloat16, with W stored in column
// panels: wp[P, K, NR], panel p holding columns p*NR .. p*NR+NR-1 (zero padded past N). Each
// panel is one contiguous stream, so decoding (M of 1 to a few dozen rows) reads the weights
// sequentially once per call, and a register tile of accumulators (8 x 48 on AVX-512, 4 x 24 on
// AVX2) reuses every loaded weight vector for each of its rows. bfloat16 weights are widened to
// float32 in registers (a shift or a mask), so they cost half the bytes and accumulate in float32;
// with AVX-512-BF16 (-march says so) vdpbf16ps multiplies them instead. Also here:
// one new token's attention over the KV cache (DecodeAttention, below).
//
// Written with GCC/Clang vector extensions rather than intrinsics (but for vdpbf16ps): the same
// source compiles to AVX-512, AVX2 or NEON under -march=native / -mcpu=native.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kNR = 48;  // panel width: three 16-float vectors
constexpr int64_t kRowBlock = 256;  // rows of x kept hot in cache while panels stream past
// Prefetch distance in panel rows: 16 (AVX-512, measured there); 32 on AVX2, where the output
// head at 16 rows ran at 64-68 GFLOP/s against 57-59 with 16 (one thread, the EPYC).
#ifndef PVJAX_PREFETCH_ROWS
#if !defined(__AVX512F__) && defined(__AVX__)
#define PVJAX_PREFETCH_ROWS 32
#else
#define PVJAX_PREFETCH_ROWS 16
#endif
#endif
constexpr int64_t kPrefetch = PVJAX_PREFETCH_ROWS * kNR;  // 32-bit words ahead of a panel row
constexpr int64_t kKBlock = 64;  // panel rows (12 KB) shared by all tiles while in L1

// The register tile follows the machine's vector registers. A vector wider than the hardware's
// is split by the compiler through the stack (measured on an AVX2 EPYC: 5 GFLOP/s, a tenth of
// XLA's dot), so each ISA gets its own width and as many rows as its register file holds. A tile
// is MR rows x NV vectors of a panel's columns; a panel of kNR columns is covered by kNV / NV
// tiles side by side.
// AVX-512 (32 x 16 floats): 8 rows x 3 vectors = 24 accumulators, the whole panel.
// AVX2 (16 x 8 floats): 4 rows x 3 vectors (half a panel) = 12 accumulators + 3 weights + 1
// broadcast. Measured on the AVX2 EPYC at 16 rows, one thread: 72-85 GFLOP/s against 45-51 for
// the earlier 2 x 6 (whose 6 weights + 12 accumulators + broadcasts do not fit 16 registers once
// the weights are held in registers) and 54-66 for 6 x 2. For bf16 weights 2 x 3 (two
// broadcasts per row per word, and the widened pair): 71-73 GFLOP/s against 63-65 for 4 x 3 or
// 3 x 2.
// NEON (32 x 4 floats): 2 rows x 12 = 24 of 32 registers; anything else (SSE: 16 x 4): 1 x 12.
#if defined(__AVX512F__)
constexpr int kVec = 16;
#ifndef PVJAX_MR
#define PVJAX_MR 8
#define PVJAX_NV 3
#if defined(__AVX512BF16__)  // one broadcast pair per row: the float32 tile's registers
#define PVJAX_MR16 8
#else  // two broadcasts per row and the widened pair: 8 rows would spill
#define PVJAX_MR16 4
#endif
#define PVJAX_NV16 3
#endif
#elif defined(__AVX__)
constexpr int kVec = 8;
#ifndef PVJAX_MR
#define PVJAX_MR 4
#define PVJAX_NV 3
#define PVJAX_MR16 2
#define PVJAX_NV16 3
#endif
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kVec = 4;
#ifndef PVJAX_MR
#define PVJAX_MR 2
#define PVJAX_NV 12
#define PVJAX_MR16 2
#define PVJAX_NV16 6
#endif
#else
constexpr int kVec = 4;
#ifndef PVJAX_MR
#define PVJAX_MR 1
#define PVJAX_NV 12
#define PVJAX_MR16 1
#define PVJAX_NV16 6
#endif
#endif
constexpr int kNV = kNR / kVec;  // vectors per panel row
typedef float vec __attribute__((vector_size(4 * kVec)));
typedef float vecu __attribute__((vector_size(4 * kVec), aligned(4)));
typedef uint32_t uvec __attribute__((vector_size(4 * kVec)));
typedef uint32_t uvecu __attribute__((vector_size(4 * kVec), aligned(4)));

// The two weight formats. float32: panel row k holds its kNR floats. bfloat16: panels hold rows
// in pairs, each column's (k, k+1) weights side by side in one 32-bit word (k in the low half), so
// a panel row pair is kNR words, the same 192 bytes as a float32 row: widening is a shift (k) and
// a mask (k+1) of the loaded words, with no shuffle across vector lanes, and the same pairs are
// what AVX-512-BF16's dot product instruction takes.
struct F32 {
  static constexpr int kSteps = 1;  // k per panel row
  static constexpr int kMR = PVJAX_MR, kTileNV = PVJAX_NV;
};
struct BF16 {
  static constexpr int kSteps = 2;
  static constexpr int kMR = PVJAX_MR16, kTileNV = PVJAX_NV16;
};

#if defined(__AVX512BF16__)
// x[MR, 2 kc] rounded to bf16 pairs for vdpbf16ps (exact for a bfloat16 model's activations).
// UNTESTED: no machine with AVX-512-BF16 was at hand when this was written; the bf16 tests in
// tests/test_kernels.py check it wherever they run on one.
constexpr bool kDotBF16 = true;
#else
constexpr bool kDotBF16 = false;
#endif

// Accumulates x[MR, kc * steps] @ panel[kc rows, NV vectors from column c0] into acc[MR, kNR]
// (acc row stride kNR), or overwrites it when `first`. The accumulators live in registers for the
// whole k block.
template <typename W, int MR, int NV>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t ldx, int64_t kc,
                                                const uint32_t* panel, int c0, float* acc_out,
                                                bool first) {
  // Adding -0.0 leaves every float unchanged, so `x + kNegZero` folds to one broadcast load;
  // adding +0.0 would not (it turns -0.0 into 0.0) and costs an add and a register broadcast.
  const vec kNegZero = -vec{};
  vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j)
      acc[m][j] = first ? vec{} : *reinterpret_cast<const vec*>(acc_out + m * kNR + c0 + kVec * j);
  for (int64_t k = 0; k < kc; ++k) {
    const uint32_t* w = panel + k * kNR + c0;
    // The hardware prefetcher alone leaves a cold panel's stream latency bound (measured: 12 of
    // the machine's 19 GB/s for the output head at batch 16); ask for lines ahead. (Only
    // the first row tile over a k block needs to; skipping it in the others measured no faster.)
    for (int j = 0; j < NV * kVec; j += 16) __builtin_prefetch(w + kPrefetch + j);
    if constexpr (W::kSteps == 1) {
      vec wv[NV];
      for (int j = 0; j < NV; ++j) {
        vec t = *reinterpret_cast<const vecu*>(w + kVec * j);
#if !defined(__AVX512F__) && defined(__AVX__)
        // Keep each weight vector in a register: GCC otherwise folds the load into every FMA
        // that uses it (MR loads of the same vector; 4 x 3 ran at 40 of 78 GFLOP/s, load bound).
        asm("" : "+x"(t));
#endif
        wv[j] = t;
      }
      for (int m = 0; m < MR; ++m) {
        vec a = x[m * ldx + k] + kNegZero;
        for (int j = 0; j < NV; ++j) acc[m][j] += a * wv[j];
      }
    } else {
#if defined(__AVX512BF16__)
      for (int m = 0; m < MR; ++m) {
        const __m512bh a = (__m512bh)_mm512_set1_ps(
            __builtin_bit_cast(float, reinterpret_cast<const uint32_t*>(x)[m * ldx + k]));
        for (int j = 0; j < NV; ++j)
          acc[m][j] = (vec)_mm512_dpbf16_ps((__m512)acc[m][j], a,
                                            (__m512bh)*reinterpret_cast<const uvecu*>(w + kVec * j));
      }
#else
      const uvec kHigh = uvec{} + 0xffff0000u;
      for (int j = 0; j < NV; ++j) {
        const uvec u = *reinterpret_cast<const uvecu*>(w + kVec * j);
        const vec w0 = (vec)(u << 16), w1 = (vec)(u & kHigh);
        for (int m = 0; m < MR; ++m) {
          acc[m][j] += (x[m * ldx + 2 * k] + kNegZero) * w0;
          acc[m][j] += (x[m * ldx + 2 * k + 1] + kNegZero) * w1;
        }
      }
#endif
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j)
      *reinterpret_cast<vec*>(acc_out + m * kNR + c0 + kVec * j) = acc[m][j];
}

// All the column tiles of rows m0 .. m0 + rows (rows <= MR) over one k block.
// A single row (batch-1 decode, bound by memory) takes the whole panel row in one tile: measured
// on the AVX2 EPYC, 1 x 6 vectors streamed 43-51 GB/s from cache against 33-39 for 1 x 3.
template <typename W, int MR>
inline void RowTiles(const float* xs, int64_t ldx, int64_t kc, const uint32_t* ps, float* as,
                     bool first) {
  constexpr int NV = MR == 1 ? kNV : W::kTileNV;
  for (int c0 = 0; c0 < kNR; c0 += NV * kVec) {
    Tile<W, MR, NV>(xs, ldx, kc, ps, c0, as, first);
  }
}

template <typename W>
inline void RowTilesN(int rows, const float* xs, int64_t ldx, int64_t kc, const uint32_t* ps,
                      float* as, bool first) {
  static_assert(W::kMR <= 8, "tiles of up to 8 rows");
  switch (rows) {
    case 8: if constexpr (W::kMR >= 8) { RowTiles<W, 8>(xs, ldx, kc, ps, as, first); break; }
    case 7: if constexpr (W::kMR >= 7) { RowTiles<W, 7>(xs, ldx, kc, ps, as, first); break; }
    case 6: if constexpr (W::kMR >= 6) { RowTiles<W, 6>(xs, ldx, kc, ps, as, first); break; }
    case 5: if constexpr (W::kMR >= 5) { RowTiles<W, 5>(xs, ldx, kc, ps, as, first); break; }
    case 4: if constexpr (W::kMR >= 4) { RowTiles<W, 4>(xs, ldx, kc, ps, as, first); break; }
    case 3: if constexpr (W::kMR >= 3) { RowTiles<W, 3>(xs, ldx, kc, ps, as, first); break; }
    case 2: if constexpr (W::kMR >= 2) { RowTiles<W, 2>(xs, ldx, kc, ps, as, first); break; }
    default: RowTiles<W, 1>(xs, ldx, kc, ps, as, first); break;
  }
}

// Panels p0..p1 of the product; K counts x's columns (even for bf16 weights). Within a block of
// rows, every row tile passes over the same k block of a panel before the next block streams in:
// the panel is read from memory once and the later tiles find it in L1 (two passes over whole
// panels left the first one bound by memory latency and the second by L2).
template <typename W>
void Panels(const float* x, int64_t M, int64_t K, const uint32_t* wp, int64_t N, float* y,
            int64_t p0, int64_t p1) {
  constexpr int64_t kBlock = kKBlock / W::kSteps;  // panel rows per k block
  const int64_t rows = K / W::kSteps;  // panel rows
  alignas(64) static thread_local float acc[kRowBlock * kNR];
  const float* xk = x;
#if defined(__AVX512BF16__)
  // vdpbf16ps takes x as bf16 pairs: round each row once per call (exact for bf16 activations).
  static thread_local std::unique_ptr<uint16_t[]> xb;
  static thread_local int64_t xb_size = 0;
  if constexpr (W::kSteps == 2) {
    if (xb_size < M * K) xb.reset(new uint16_t[xb_size = M * K]);
    for (int64_t i = 0; i < M * K; ++i) {
      const uint32_t b = __builtin_bit_cast(uint32_t, x[i]);
      xb[i] = static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1)) >> 16);  // nearest even
    }
    xk = reinterpret_cast<const float*>(xb.get());  // read as 32-bit pairs, row stride K / 2
  }
  const int64_t ldx = W::kSteps == 2 ? K / 2 : K;  // in x's units: pairs or floats
  const int64_t xsteps = W::kSteps == 2 ? 1 : W::kSteps;  // x's units per panel row
#else
  const int64_t ldx = K;
  const int64_t xsteps = W::kSteps;
#endif
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t r1 = std::min(M, r0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const uint32_t* panel = wp + p * rows * kNR;
      for (int64_t k0 = 0; k0 < rows; k0 += kBlock) {
        const int64_t kc = std::min(kBlock, rows - k0);
        const int64_t xoff = k0 * xsteps;
        for (int64_t m0 = r0; m0 < r1; m0 += W::kMR) {
          RowTilesN<W>(static_cast<int>(std::min<int64_t>(W::kMR, r1 - m0)), xk + m0 * ldx + xoff,
                       ldx, kc, panel + k0 * kNR, acc + (m0 - r0) * kNR, k0 == 0);
        }
      }
      const int64_t n0 = p * kNR, nc = std::min(kNR, N - n0);
      for (int64_t m = r0; m < r1; ++m) std::memcpy(y + m * N + n0, acc + (m - r0) * kNR, nc * sizeof(float));
    }
  }
}

// Work is cut into chunks claimed from a shared counter, by the calling thread and by helpers
// scheduled on XLA's intra-op pool. The caller waits only for chunks that were claimed, so a
// helper that never gets a thread (the pool busy with other work) cannot stall the call; the
// state is shared, so a helper that starts after the call returned finds nothing left to do.
template <typename F>
struct Job {
  F work;  // work(first_item, end_item)
  int64_t items, chunk, n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  Job(F f, int64_t n, int64_t c) : work(f), items(n), chunk(c), n_chunks((n + c - 1) / c) {}

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      work(c * chunk, std::min(items, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs work over [0, items) on this thread and up to threads-1 helpers, about four chunks per
// thread so that uneven progress evens out.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t flops, F work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Below about 0.25 MFLOP the hand-off costs more than it saves. Batch-1 decode products sit
  // above it (a 576 x 576 matrix-vector product is 0.66 MFLOP, bound by reading 1.3 MB).
  const int64_t helpers = flops < (1 << 18) ? 0 : threads - 1;
  auto job = std::make_shared<Job<F>>(work, items, std::max<int64_t>(1, items / (4 * (helpers + 1))));
  for (int64_t i = 0; i < std::min(helpers, job->n_chunks - 1); ++i) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) std::this_thread::yield();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kNR || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * kNR || yd[1] <= (wd[0] - 1) * kNR) {
    return ffi::Error::InvalidArgument("pvjax_packed_matmul: shapes do not match x[M,K] @ wp[P,K,48] -> y[M,N]");
  }
  const float* xp = x.typed_data();
  const uint32_t* w = reinterpret_cast<const uint32_t*>(wp.untyped_data());
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  ParallelFor(pool, wd[0], 2 * M * K * N,
              [=](int64_t p0, int64_t p1) { Panels<F32>(xp, M, K, w, N, yp, p0, p1); });
  return ffi::Error::Success();
}

// The same product with bfloat16 weights wp[P, K, 48], K even, each panel's rows stored in pairs
// (see BF16 above; `pvjax.kernels.PackedWeight.pack` lays them out). x and y stay float32.
ffi::Error PackedMatmulBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::BF16> wp, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kNR || wd[1] != xd[1] ||
      xd[1] % 2 != 0 || yd[0] != xd[0] || yd[1] > wd[0] * kNR || yd[1] <= (wd[0] - 1) * kNR) {
    return ffi::Error::InvalidArgument(
        "pvjax_packed_matmul_bf16: shapes do not match x[M,K] @ wp[P,K,48] -> y[M,N] with K even");
  }
  const float* xp = x.typed_data();
  const uint32_t* w = reinterpret_cast<const uint32_t*>(wp.untyped_data());
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  ParallelFor(pool, wd[0], 2 * M * K * N,
              [=](int64_t p0, int64_t p1) { Panels<BF16>(xp, M, K, w, N, yp, p0, p1); });
  return ffi::Error::Success();
}

// One new token's attention for each of R = B*Kv cache rows (batch-major, kv head minor):
// q[R, G, E] (the G query heads of a kv head), keys k[R, E, S], values v[R, S, E], slot validity
// valid[B, S]; out[R, G, E]. Only slots below `upto` (the cache's fill level) are read.
// Scores, softmax and the value sum are float32; masked slots get -1e30 (as in the XLA path).
void AttendRows(const float* q, const float* k, const float* v, const bool* valid, float* out,
                int64_t r0, int64_t r1, int64_t R, int64_t B, int64_t G, int64_t E, int64_t S,
                int64_t upto, float scale, float softcap) {
  const int64_t kv_heads = R / B;
  std::unique_ptr<float[]> p(new float[G * upto]);
  for (int64_t r = r0; r < r1; ++r) {
    const bool* ok = valid + (r / kv_heads) * S;
    const float* kr = k + r * E * S;
    const float* vr = v + r * S * E;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + (r * G + g) * E;
      float* pg = p.get() + g * upto;
      for (int64_t s = 0; s < upto; ++s) pg[s] = 0.f;
      for (int64_t e = 0; e < E; ++e) {  // keys are [E, S]: each e adds a contiguous row
        const float qe = qg[e];
        const float* ke = kr + e * S;
        for (int64_t s = 0; s < upto; ++s) pg[s] += qe * ke[s];
      }
      float mx = -3.0e38f;
      for (int64_t s = 0; s < upto; ++s) {
        float x = pg[s] * scale;
        if (softcap > 0.f) x = std::tanh(x / softcap) * softcap;  // Gemma 2, after the scale
        pg[s] = ok[s] ? x : -1e30f;
        mx = std::max(mx, pg[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < upto; ++s) {
        pg[s] = std::exp(pg[s] - mx);
        sum += pg[s];
      }
      float* og = out + (r * G + g) * E;
      for (int64_t e = 0; e < E; ++e) og[e] = 0.f;
      for (int64_t s = 0; s < upto; ++s) {  // values are [S, E]: each slot adds a contiguous row
        const float ps = pg[s] / sum;
        const float* vs = vr + s * E;
        for (int64_t e = 0; e < E; ++e) og[e] += ps * vs[e];
      }
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                           ffi::Buffer<ffi::S32> upto, float scale, float softcap,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 || kd[0] != qd[0] ||
      kd[1] != qd[2] || vd[0] != qd[0] || vd[1] != kd[2] || vd[2] != qd[2] || md[1] != kd[2] ||
      md[0] == 0 || qd[0] % md[0] != 0) {
    return ffi::Error::InvalidArgument(
        "pvjax_decode_attention: expected q[R,G,E], k[R,E,S], v[R,S,E], valid[B,S] with B dividing R");
  }
  const int64_t R = qd[0], G = qd[1], E = qd[2], S = kd[2], B = md[0];
  const int64_t n = std::min<int64_t>(S, std::max<int64_t>(1, upto.typed_data()[0]));
  if (!(scale > 0.f)) scale = 1.0f / std::sqrt(static_cast<float>(E));  // 0: Llama's
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = valid.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, R, 4 * R * G * E * n, [=](int64_t r0, int64_t r1) {
    AttendRows(qp, kp, vp, mp, op, r0, r1, R, B, G, E, S, n, scale, softcap);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvjaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvjaxPackedMatmulBF16, PackedMatmulBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
