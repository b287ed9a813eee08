// y[M, N] = x[M, K] @ W[K, N] for float32, with W stored in column panels: wp[P, K, NR], panel p
// holding columns p*NR .. p*NR+NR-1 (zero padded past N). Each panel is one contiguous stream, so
// decoding (M of 1 to a few dozen rows) reads the weights sequentially once per call, and a
// register tile of accumulators (8 x 48 on AVX-512, 2 x 48 on AVX2) reuses every loaded weight
// vector for each of its rows. Also here:
// one new token's attention over the KV cache (DecodeAttention, below).
//
// Written with GCC/Clang vector extensions rather than intrinsics: the same source compiles to
// AVX-512, AVX2 or NEON under -march=native / -mcpu=native.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kNR = 48;  // panel width: three 16-float vectors
constexpr int64_t kRowBlock = 256;  // rows of x kept hot in cache while panels stream past
constexpr int64_t kPrefetch = 16 * kNR;  // floats ahead of the current panel row
constexpr int64_t kKBlock = 64;  // rows of a panel (12 KB) shared by all tiles while in L1

// The register tile follows the machine's vector registers. A vector wider than the hardware's
// is split by the compiler through the stack (measured on an AVX2 EPYC: 5 GFLOP/s, a tenth of
// XLA's dot), so each ISA gets its own width and as many rows as its register file holds:
// AVX-512 (32 x 16 floats): 8 rows x 3 vectors = 24 accumulators; AVX2 (16 x 8 floats): 2 rows x 6
// vectors = 12; NEON (32 x 4 floats): 2 rows x 12 = 24; anything else (SSE: 16 x 4): 1 row x 12.
#if defined(__AVX512F__)
constexpr int kVec = 16;
constexpr int64_t kMR = 8;
#elif defined(__AVX__)
constexpr int kVec = 8;
constexpr int64_t kMR = 2;
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kVec = 4;
constexpr int64_t kMR = 2;
#else
constexpr int kVec = 4;
constexpr int64_t kMR = 1;
#endif
constexpr int kNV = kNR / kVec;  // vectors per panel row
typedef float vec __attribute__((vector_size(4 * kVec)));
typedef float vecu __attribute__((vector_size(4 * kVec), aligned(4)));

// Accumulates x[MR, kc] @ panel[kc, 48] into acc[MR, 48] (acc row stride 48), or overwrites it
// when `first`. The accumulators live in registers for the whole k block.
template <int MR>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t ldx, int64_t kc,
                                                const float* panel, float* acc_out, bool first) {
  // Adding -0.0 leaves every float unchanged, so `x + kNegZero` folds to one broadcast load;
  // adding +0.0 would not (it turns -0.0 into 0.0) and costs an add and a register broadcast.
  const vec kNegZero = -vec{};
  vec acc[MR][kNV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kNV; ++j)
      acc[m][j] = first ? vec{} : *reinterpret_cast<const vec*>(acc_out + m * kNR + kVec * j);
  for (int64_t k = 0; k < kc; ++k) {
    const float* w = panel + k * kNR;
    // The hardware prefetcher alone leaves a cold panel's stream latency bound (measured: 12 of
    // the machine's 19 GB/s for the output head at batch 16); ask for lines 16 rows ahead.
    __builtin_prefetch(w + kPrefetch);
    __builtin_prefetch(w + kPrefetch + 16);
    __builtin_prefetch(w + kPrefetch + 32);
    vec wv[kNV];
    for (int j = 0; j < kNV; ++j) wv[j] = *reinterpret_cast<const vecu*>(w + kVec * j);
    for (int m = 0; m < MR; ++m) {
      vec a = x[m * ldx + k] + kNegZero;
      for (int j = 0; j < kNV; ++j) acc[m][j] += a * wv[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kNV; ++j) *reinterpret_cast<vec*>(acc_out + m * kNR + kVec * j) = acc[m][j];
}

// Panels p0..p1 of the product. Within a block of rows, every 8-row tile passes over the same
// k block of a panel before the next block streams in: the panel is read from memory once and
// the later tiles find it in L1 (two passes over whole panels left the first one bound by
// memory latency and the second by L2).
void Panels(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, float* y,
            int64_t p0, int64_t p1) {
  alignas(64) static thread_local float acc[kRowBlock * kNR];
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t r1 = std::min(M, r0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = wp + p * K * kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t kc = std::min(kKBlock, K - k0);
        for (int64_t m0 = r0; m0 < r1; m0 += kMR) {
          const float* xs = x + m0 * K + k0;
          const float* ps = panel + k0 * kNR;
          float* as = acc + (m0 - r0) * kNR;
          const bool first = k0 == 0;
          switch (std::min(kMR, r1 - m0)) {
            case 8: Tile<8>(xs, K, kc, ps, as, first); break;
            case 7: Tile<7>(xs, K, kc, ps, as, first); break;
            case 6: Tile<6>(xs, K, kc, ps, as, first); break;
            case 5: Tile<5>(xs, K, kc, ps, as, first); break;
            case 4: Tile<4>(xs, K, kc, ps, as, first); break;
            case 3: Tile<3>(xs, K, kc, ps, as, first); break;
            case 2: Tile<2>(xs, K, kc, ps, as, first); break;
            default: Tile<1>(xs, K, kc, ps, as, first); break;
          }
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
  const float* w = wp.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  ParallelFor(pool, wd[0], 2 * M * K * N,
              [=](int64_t p0, int64_t p1) { Panels(xp, M, K, w, N, yp, p0, p1); });
  return ffi::Error::Success();
}

// One new token's attention for each of R = B*Kv cache rows (batch-major, kv head minor):
// q[R, G, E] (the G query heads of a kv head), keys k[R, E, S], values v[R, S, E], slot validity
// valid[B, S]; out[R, G, E]. Only slots below `upto` (the cache's fill level) are read.
// Scores, softmax and the value sum are float32; masked slots get -1e30 (as in the XLA path).
void AttendRows(const float* q, const float* k, const float* v, const bool* valid, float* out,
                int64_t r0, int64_t r1, int64_t R, int64_t B, int64_t G, int64_t E, int64_t S,
                int64_t upto, float scale) {
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
        pg[s] = ok[s] ? pg[s] * scale : -1e30f;
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
                           ffi::Buffer<ffi::S32> upto, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 2 || kd[0] != qd[0] ||
      kd[1] != qd[2] || vd[0] != qd[0] || vd[1] != kd[2] || vd[2] != qd[2] || md[1] != kd[2] ||
      md[0] == 0 || qd[0] % md[0] != 0) {
    return ffi::Error::InvalidArgument(
        "pvjax_decode_attention: expected q[R,G,E], k[R,E,S], v[R,S,E], valid[B,S] with B dividing R");
  }
  const int64_t R = qd[0], G = qd[1], E = qd[2], S = kd[2], B = md[0];
  const int64_t n = std::min<int64_t>(S, std::max<int64_t>(1, upto.typed_data()[0]));
  const float scale = 1.0f / std::sqrt(static_cast<float>(E));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = valid.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, R, 4 * R * G * E * n, [=](int64_t r0, int64_t r1) {
    AttendRows(qp, kp, vp, mp, op, r0, r1, R, B, G, E, S, n, scale);
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
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
