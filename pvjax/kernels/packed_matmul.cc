// y[M, N] = x[M, K] @ W[K, N] for float32, with W stored in column panels: wp[P, K, NR], panel p
// holding columns p*NR .. p*NR+NR-1 (zero padded past N). Each panel is one contiguous stream, so
// decoding (M of 1 to a few dozen rows) reads the weights sequentially once per call, and an
// 8 x 48 register tile of accumulators reuses every loaded weight vector for 8 rows.
//
// Written with GCC/Clang vector extensions rather than intrinsics: the same source compiles to
// AVX-512, AVX2 or NEON under -march=native / -mcpu=native.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kNR = 48;  // panel width: three 16-float vectors
constexpr int64_t kMR = 8;   // rows per register tile: 24 accumulators + 3 weight vectors
constexpr int64_t kRowBlock = 256;  // rows of x kept hot in cache while panels stream past

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

template <int MR>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t K, const float* panel,
                                                float* y, int64_t ldy, int64_t ncols) {
  v16 acc[MR][3];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 3; ++j) acc[m][j] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kNR;
    v16 w0 = *reinterpret_cast<const v16u*>(w);
    v16 w1 = *reinterpret_cast<const v16u*>(w + 16);
    v16 w2 = *reinterpret_cast<const v16u*>(w + 32);
    for (int m = 0; m < MR; ++m) {
      v16 a = v16{} + x[m * K + k];
      acc[m][0] += a * w0;
      acc[m][1] += a * w1;
      acc[m][2] += a * w2;
    }
  }
  for (int m = 0; m < MR; ++m) {
    if (ncols == kNR) {
      for (int j = 0; j < 3; ++j) *reinterpret_cast<v16u*>(y + m * ldy + 16 * j) = acc[m][j];
    } else {
      float tmp[kNR];
      for (int j = 0; j < 3; ++j) *reinterpret_cast<v16u*>(tmp + 16 * j) = acc[m][j];
      std::memcpy(y + m * ldy, tmp, ncols * sizeof(float));
    }
  }
}

void Panels(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, float* y,
            int64_t p0, int64_t p1) {
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t r1 = std::min(M, r0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = wp + p * K * kNR;
      const int64_t n0 = p * kNR, nc = std::min(kNR, N - n0);
      for (int64_t m0 = r0; m0 < r1; m0 += kMR) {
        const float* xs = x + m0 * K;
        float* ys = y + m0 * N + n0;
        switch (std::min(kMR, r1 - m0)) {
          case 8: Tile<8>(xs, K, panel, ys, N, nc); break;
          case 7: Tile<7>(xs, K, panel, ys, N, nc); break;
          case 6: Tile<6>(xs, K, panel, ys, N, nc); break;
          case 5: Tile<5>(xs, K, panel, ys, N, nc); break;
          case 4: Tile<4>(xs, K, panel, ys, N, nc); break;
          case 3: Tile<3>(xs, K, panel, ys, N, nc); break;
          case 2: Tile<2>(xs, K, panel, ys, N, nc); break;
          default: Tile<1>(xs, K, panel, ys, N, nc); break;
        }
      }
    }
  }
}

// Work is cut into chunks of panels claimed from a shared counter, by the calling thread and by
// helpers scheduled on XLA's intra-op pool. The caller waits only for chunks that were claimed,
// so a helper that never gets a thread (the pool busy with other work) cannot stall the call.
struct Job {
  const float* x;
  const float* wp;
  float* y;
  int64_t M, K, N, chunk, n_chunks, n_panels;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      Panels(x, M, K, wp, N, y, c * chunk, std::min(n_panels, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kNR || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * kNR || yd[1] <= (wd[0] - 1) * kNR) {
    return ffi::Error::InvalidArgument("pvjax_packed_matmul: shapes do not match x[M,K] @ wp[P,K,48] -> y[M,N]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->wp = wp.typed_data();
  job->y = y->typed_data();
  job->M = xd[0];
  job->K = xd[1];
  job->N = yd[1];
  job->n_panels = wd[0];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About four chunks per thread evens out uneven progress; small problems stay on one thread.
  const int64_t flops = 2 * job->M * job->K * job->N;
  const int64_t helpers = flops < (1 << 20) ? 0 : threads - 1;
  job->chunk = std::max<int64_t>(1, job->n_panels / (4 * (helpers + 1)));
  job->n_chunks = (job->n_panels + job->chunk - 1) / job->chunk;
  for (int64_t i = 0; i < std::min(helpers, job->n_chunks - 1); ++i) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
