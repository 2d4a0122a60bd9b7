// XLA:CPU custom calls (XLA FFI) for the two kernels that decide a ViT training step on a CPU:
// the linear layers' matmuls and multi-head attention. Why they exist: XLA:CPU's matmul library
// (YNNPACK) reaches ~210 GFLOP/s on the step's shapes where an optimised BLAS sgemm reaches ~265
// on the same cores, and XLA has no fused attention for CPU, so the softmax and its backward are
// separate passes over the (B, H, T, T) logits. docs/benchmarks.md has the measurements.
//
// The BLAS (MKL, or numpy's OpenBLAS) is reached through a cblas_sgemm function pointer with
// 64-bit integers that mae_jax/cpu_kernels/__init__.py hands over. Every BLAS call here is
// single-threaded;
// the parallelism is XLA's intra-op thread pool (ffi::ThreadPool), so the custom calls share the
// cores with XLA's own kernels instead of competing with a second pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm with 64-bit integers (MKL's cblas_sgemm_64, OpenBLAS built with INTERFACE64).
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc);
SgemmFn g_sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

void Sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a, lda, b,
          ldb, beta, c, ldc);
}

// Runs fn(i) for i in [0, n) on the calling thread and up to (pool threads - 1) helpers. The caller
// never waits for a helper that has not started: items are claimed from a shared counter, so a
// helper that the pool runs late (or after this returns) finds nothing left and touches nothing
// but the shared state it co-owns. Hence no deadlock when every pool thread is busy.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  int64_t helpers = std::min<int64_t>(n, std::max<int64_t>(pool.num_threads(), 1)) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, f, n]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*f)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

int64_t Workers(ffi::ThreadPool& pool) { return std::max<int64_t>(pool.num_threads(), 1); }

// ---------------------------------------------------------------------------------------------
// C = op(A) · op(B), float32, row-major; op transposes when the flag is set.
// A is (M, K) or (K, M), B is (K, N) or (N, K), C is (M, N). The output is cut into one block per
// worker along its longer side; each block is one single-threaded sgemm.
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, int32_t trans_a, int32_t trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("mae_jax cpu kernels: BLAS not set");
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("matmul: 2-D operands");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k) return ffi::Error::InvalidArgument("matmul: K mismatch");
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  // Blocks aligned to 16 (one AVX-512 register of floats) so no worker gets a ragged panel.
  // One block per worker: finer blocks (4 per worker, claimed dynamically) measured no better.
  int64_t parts = std::min<int64_t>(Workers(pool), std::max<int64_t>(extent / 64, 1));
  int64_t step = ((extent + parts - 1) / parts + 15) / 16 * 16;
  parts = (extent + step - 1) / step;
  ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t lo = p * step, len = std::min(step, extent - lo);
    if (by_rows) {
      const float* Ap = trans_a ? A + lo : A + lo * lda;
      Sgemm(trans_a, trans_b, len, n, k, 1.f, Ap, lda, B, ldb, 0.f, C + lo * n, n);
    } else {
      const float* Bp = trans_b ? B + lo * ldb : B + lo;
      Sgemm(trans_a, trans_b, m, len, k, 1.f, A, lda, Bp, ldb, 0.f, C + lo, n);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// exp for x <= 0 (softmax arguments), written so the compiler vectorises the loops that call it:
// x = n·ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial (relative error < 2e-7),
// 2^n from the exponent bits. Below -87.3 the result is 0 (float32 underflow anyway).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// max of x[0..n): sixteen independent lanes, so the compiler makes it one AVX-512 max per 16 floats
// (a single running max is a chain of dependent scalar maxes, which GCC does not vectorise even
// under `omp simd reduction(max)`; that chain was two thirds of the forward's own time).
inline float RowMax(const float* x, int64_t n) {
  constexpr int kLanes = 16;
  float lane[kLanes];
  for (int i = 0; i < kLanes; ++i) lane[i] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int i = 0; i < kLanes; ++i) lane[i] = lane[i] > x[j + i] ? lane[i] : x[j + i];
  float mx = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) mx = mx > x[j] ? mx : x[j];
  for (int i = 0; i < kLanes; ++i) mx = mx > lane[i] ? mx : lane[i];
  return mx;
}

std::vector<float>& Scratch(size_t size) {
  thread_local std::vector<float> buf;
  if (buf.size() < size) buf.resize(size);
  return buf;
}

struct Layout {  // qkv (B, T, 3, H, hd), out / dout (B, T, H, hd), lse (B, H, T)
  int64_t batch, tokens, heads, head_dim;
  int64_t width() const { return heads * head_dim; }
  int64_t qkv_offset(int64_t b, int64_t which, int64_t h) const {
    return (b * tokens * 3 + which) * width() + h * head_dim;
  }
  int64_t out_offset(int64_t b, int64_t h) const { return b * tokens * width() + h * head_dim; }
};

ffi::ErrorOr<Layout> QkvLayout(const ffi::Buffer<ffi::F32>& qkv) {
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3) return ffi::Error::InvalidArgument("attention: qkv (B, T, 3, H, hd)");
  if (g_sgemm == nullptr) return ffi::Error::Internal("mae_jax cpu kernels: BLAS not set");
  return Layout{d[0], d[1], d[3], d[4]};
}

// out = softmax(scale · q·kᵀ) · v for every (batch, head); lse = log-sum-exp of each logits row,
// which is all the backward needs to rebuild the probabilities.
ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                            float scale) {
  auto layout = QkvLayout(qkv);
  if (layout.has_error()) return layout.error();
  const Layout L = layout.value();
  const int64_t T = L.tokens, hd = L.head_dim, ld3 = 3 * L.width(), ld = L.width();
  const float* X = qkv.typed_data();
  float* O = out->typed_data();
  float* LSE = lse->typed_data();
  ParallelFor(pool, L.batch * L.heads, [&](int64_t bh) {
    const int64_t b = bh / L.heads, h = bh % L.heads;
    float* S = Scratch(T * T + T).data();
    float* inv_sum = S + T * T;
    const float* q = X + L.qkv_offset(b, 0, h);
    const float* k = X + L.qkv_offset(b, 1, h);
    const float* v = X + L.qkv_offset(b, 2, h);
    float* o = O + L.out_offset(b, h);
    Sgemm(false, true, T, T, hd, scale, q, ld3, k, ld3, 0.f, S, T);
    float* row_lse = LSE + bh * T;
    for (int64_t t = 0; t < T; ++t) {
      float* s = S + t * T;
      const float mx = RowMax(s, T);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < T; ++j) {
        s[j] = ExpNonPositive(s[j] - mx);
        sum += s[j];
      }
      row_lse[t] = mx + std::log(sum);
      inv_sum[t] = 1.f / sum;
    }
    Sgemm(false, false, T, hd, T, 1.f, S, T, v, ld3, 0.f, o, ld);
    // Normalised on the (T, hd) output rather than the (T, T) probabilities: T·hd multiplies.
    for (int64_t t = 0; t < T; ++t) {
      float* row = o + t * ld;
      const float inv = inv_sum[t];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) row[d] *= inv;
    }
  });
  return ffi::Error::Success();
}

// The softmax-attention backward (flash attention's, without tiling: one (T, T) block per head):
// p = exp(scale·q·kᵀ − lse), dv = pᵀ·dout, dp = dout·vᵀ, ds = p ∘ (dp − rowsum(dout ∘ out)),
// dq = scale·ds·k, dk = scale·dsᵀ·q, all written into dqkv's (B, T, 3, H, hd) layout.
ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv,
                            float scale) {
  auto layout = QkvLayout(qkv);
  if (layout.has_error()) return layout.error();
  const Layout L = layout.value();
  const int64_t T = L.tokens, hd = L.head_dim, ld3 = 3 * L.width(), ld = L.width();
  const float* X = qkv.typed_data();
  const float* O = out.typed_data();
  const float* LSE = lse.typed_data();
  const float* dO = dout.typed_data();
  float* dX = dqkv->typed_data();
  ParallelFor(pool, L.batch * L.heads, [&](int64_t bh) {
    const int64_t b = bh / L.heads, h = bh % L.heads;
    std::vector<float>& scratch = Scratch(2 * T * T + T);
    float* P = scratch.data();
    float* dP = P + T * T;
    float* delta = dP + T * T;
    const float* q = X + L.qkv_offset(b, 0, h);
    const float* k = X + L.qkv_offset(b, 1, h);
    const float* v = X + L.qkv_offset(b, 2, h);
    const float* o = O + L.out_offset(b, h);
    const float* dout_bh = dO + L.out_offset(b, h);
    Sgemm(false, true, T, T, hd, scale, q, ld3, k, ld3, 0.f, P, T);
    Sgemm(false, true, T, T, hd, 1.f, dout_bh, ld, v, ld3, 0.f, dP, T);
    const float* row_lse = LSE + bh * T;
    for (int64_t t = 0; t < T; ++t) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < hd; ++d) acc += dout_bh[t * ld + d] * o[t * ld + d];
      delta[t] = acc;
    }
    for (int64_t t = 0; t < T; ++t) {
      float* p = P + t * T;
      float* ds = dP + t * T;
      const float m = row_lse[t], dt = delta[t];
#pragma omp simd
      for (int64_t j = 0; j < T; ++j) {
        p[j] = ExpNonPositive(p[j] - m);
        ds[j] = p[j] * (ds[j] - dt);
      }
    }
    Sgemm(true, false, T, hd, T, 1.f, P, T, dout_bh, ld, 0.f, dX + L.qkv_offset(b, 2, h), ld3);
    Sgemm(false, false, T, hd, T, scale, dP, T, k, ld3, 0.f, dX + L.qkv_offset(b, 0, h), ld3);
    Sgemm(true, false, T, hd, T, scale, dP, T, q, ld3, 0.f, dX + L.qkv_offset(b, 1, h), ld3);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int mae_cpu_kernels_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
  return g_sgemm != nullptr;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaeMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaeAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaeAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
