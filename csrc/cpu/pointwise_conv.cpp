// pointwise_conv: a 1x1 convolution with few output channels (at most kMaxOutputs) on NHWC
// rows, written straight into strided output rows:
//   y[p, o] = act(sum_k x[p, k] * w[o, k] + bias[o]),  act = ReLU (NaN kept) or identity.
// MKL's GEMM runs these shapes (M = N*H*W rows, K input channels, a handful of outputs) far
// below the memory bandwidth (measured on the 2-core development CPU: 1.05 ms for 32768 rows,
// 46 -> 6 channels, where copying the input takes 0.24 ms). Here the outputs are the vector
// lanes: a row costs K broadcasts and K fused multiply-adds per 8 outputs, R rows share each
// load of the (transposed, zero-padded) weights, and the input is read once. Outputs are padded
// to 8 lanes, not 16: AMD's AVX-512 runs a 16-lane op as two 8-lane halves, so padding 6
// outputs to 16 would double the work there (measured 0.25 vs 0.33 ms at 32768 x 46 -> 6, and
// 0.26 vs 0.32 ms at 8192 x 106 -> 24).
#include <vector>

#include "common.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

constexpr int kOutLanes = 8;           // outputs per register block (zero-padded)
constexpr int64_t kMaxOutputs = 8 * kOutLanes;
constexpr int64_t kRowsPerUnit = 256;  // rows per work unit
constexpr int64_t kMaxWgradOutputs = 4 * kOutLanes;

template <typename T>
struct PointwiseArgs {
  const T* x;
  int64_t lda, K;
  const T* wt;    // [K][NP]: w transposed, outputs zero-padded to NP
  const T* bias;  // [NP], zero-padded
  bool relu;
  int64_t N;      // outputs written
  T* y;
  int64_t ldy;
};

template <typename T>
inline void store_row(const PointwiseArgs<T>& a, const T* acc, int64_t p) {
  T* __restrict__ yr = a.y + p * a.ldy;
  for (int64_t o = 0; o < a.N; ++o) {
    const T v = acc[o];
    yr[o] = a.relu && v < T(0) ? T(0) : v;  // NaN < 0 is false: NaN stays, as torch.relu
  }
}

// Rows [p0, p1), R at a time, NP = NV * kOutLanes outputs per row held in registers.
template <typename T, int NV, int R>
void rows_t(const PointwiseArgs<T>& a, int64_t p0, int64_t p1) {
  constexpr int NP = NV * kOutLanes;
  const T* __restrict__ wt = a.wt;
  int64_t p = p0;
  for (; p + R <= p1; p += R) {
    alignas(64) T acc[R][NP];
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int o = 0; o < NP; ++o) acc[r][o] = a.bias[o];
    for (int64_t k = 0; k < a.K; ++k) {
      const T* __restrict__ wk = wt + k * NP;
      for (int r = 0; r < R; ++r) {
        const T xv = a.x[(p + r) * a.lda + k];
#pragma omp simd
        for (int o = 0; o < NP; ++o) acc[r][o] += xv * wk[o];
      }
    }
    for (int r = 0; r < R; ++r) store_row(a, acc[r], p + r);
  }
  for (; p < p1; ++p) {
    alignas(64) T acc[NP];
#pragma omp simd
    for (int o = 0; o < NP; ++o) acc[o] = a.bias[o];
    for (int64_t k = 0; k < a.K; ++k) {
      const T xv = a.x[p * a.lda + k];
      const T* __restrict__ wk = wt + k * NP;
#pragma omp simd
      for (int o = 0; o < NP; ++o) acc[o] += xv * wk[o];
    }
    store_row(a, acc, p);
  }
}

template <typename T>
void rows_any(const PointwiseArgs<T>& a, int nv, int64_t p0, int64_t p1) {
  switch (nv) {  // accumulators: R * NV blocks of 8 lanes, within the register file
    case 1: return rows_t<T, 1, 6>(a, p0, p1);
    case 2: return rows_t<T, 2, 4>(a, p0, p1);
    case 3: return rows_t<T, 3, 4>(a, p0, p1);
    case 4: return rows_t<T, 4, 3>(a, p0, p1);
    case 5: return rows_t<T, 5, 2>(a, p0, p1);
    case 6: return rows_t<T, 6, 2>(a, p0, p1);
    case 7: return rows_t<T, 7, 2>(a, p0, p1);
    default: return rows_t<T, 8, 2>(a, p0, p1);
  }
}

template <typename T>
void pointwise_conv_t(const PointwiseRows& x, const void* w, int64_t N, const void* bias,
                      bool relu, const PointwiseRows& y, int num_threads) {
  const int64_t M = x.rows, K = x.cols;
  if (M == 0) return;
  const int nv = static_cast<int>(ceil_div(N, kOutLanes));
  const int64_t NP = nv * kOutLanes;
  const T* wp = static_cast<const T*>(w);
  std::vector<T> wt(static_cast<size_t>(K * NP), T(0)), b(static_cast<size_t>(NP), T(0));
  for (int64_t o = 0; o < N; ++o) {
    for (int64_t k = 0; k < K; ++k) wt[k * NP + o] = wp[o * K + k];
    if (bias != nullptr) b[o] = static_cast<const T*>(bias)[o];
  }
  const PointwiseArgs<T> a{static_cast<const T*>(x.ptr), x.ld, K, wt.data(), b.data(), relu, N,
                           static_cast<T*>(y.ptr), y.ld};
  const int64_t units = ceil_div(M, kRowsPerUnit);
  const int team = team_size(M * K, num_threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t u = 0; u < units; ++u)
    rows_any(a, nv, u * kRowsPerUnit, std::min(M, (u + 1) * kRowsPerUnit));
}

// The weight gradient: dw[o, k] = sum_p g[p, o] * x[p, k], outputs again the lanes. Rows are
// split into a fixed number of groups (results do not depend on the thread count); a group
// accumulates dw^T [K][NP] in memory, R rows per load and store of each accumulator vector,
// their R gradient vectors held in registers.
constexpr int64_t kWgradGroups = 16;

template <typename T, int NV, int R>
void wgrad_rows_t(const T* x, int64_t lda, const T* g, int64_t ldg, int64_t N, int64_t K,
                  int64_t p0, int64_t p1, T* __restrict__ acc /* [K][NP], zeroed */) {
  constexpr int NP = NV * kOutLanes;
  int64_t p = p0;
  for (; p + R <= p1; p += R) {
    alignas(64) T gv[R][NP];
    for (int r = 0; r < R; ++r) {
      const T* gr = g + (p + r) * ldg;
      for (int o = 0; o < NP; ++o) gv[r][o] = o < N ? gr[o] : T(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      T* __restrict__ ak = acc + k * NP;
      for (int r = 0; r < R; ++r) {
        const T xv = x[(p + r) * lda + k];
#pragma omp simd
        for (int o = 0; o < NP; ++o) ak[o] += xv * gv[r][o];
      }
    }
  }
  for (; p < p1; ++p) {
    alignas(64) T gv[NP];
    const T* gr = g + p * ldg;
    for (int o = 0; o < NP; ++o) gv[o] = o < N ? gr[o] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T xv = x[p * lda + k];
      T* __restrict__ ak = acc + k * NP;
#pragma omp simd
      for (int o = 0; o < NP; ++o) ak[o] += xv * gv[o];
    }
  }
}

template <typename T>
void wgrad_rows_any(int nv, const T* x, int64_t lda, const T* g, int64_t ldg, int64_t N,
                    int64_t K, int64_t p0, int64_t p1, T* acc) {
  switch (nv) {
    case 1: return wgrad_rows_t<T, 1, 4>(x, lda, g, ldg, N, K, p0, p1, acc);
    case 2: return wgrad_rows_t<T, 2, 4>(x, lda, g, ldg, N, K, p0, p1, acc);
    case 3: return wgrad_rows_t<T, 3, 2>(x, lda, g, ldg, N, K, p0, p1, acc);
    default: return wgrad_rows_t<T, 4, 2>(x, lda, g, ldg, N, K, p0, p1, acc);
  }
}

template <typename T>
void pointwise_conv_wgrad_t(const PointwiseRows& x, const PointwiseRows& g, void* dw,
                            int num_threads) {
  const int64_t M = x.rows, K = x.cols, N = g.cols;
  const int nv = static_cast<int>(ceil_div(N, kOutLanes));
  const int64_t NP = nv * kOutLanes;
  const int64_t groups = std::max<int64_t>(1, std::min(kWgradGroups, ceil_div(M, kRowsPerUnit)));
  std::vector<T> partial(static_cast<size_t>(groups * K * NP), T(0));
  const T* xp = static_cast<const T*>(x.ptr);
  const T* gp = static_cast<const T*>(g.ptr);
  const int team = team_size(M * K, num_threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t i = 0; i < groups; ++i)
    wgrad_rows_any(nv, xp, x.ld, gp, g.ld, N, K, M * i / groups, M * (i + 1) / groups,
                   partial.data() + i * K * NP);
  T* out = static_cast<T*>(dw);
  for (int64_t o = 0; o < N; ++o)
    for (int64_t k = 0; k < K; ++k) {
      T sum = T(0);
      for (int64_t i = 0; i < groups; ++i) sum += partial[(i * K + k) * NP + o];
      out[o * K + k] = sum;
    }
}

}  // namespace

void pointwise_conv_wgrad(int dtype, const PointwiseRows& x, const PointwiseRows& g, void* dw,
                          int num_threads) {
  if (g.cols < 1 || g.cols > kMaxWgradOutputs || g.rows != x.rows)
    throw std::invalid_argument("msdnet_ops CPU kernel pointwise_conv_wgrad: expected 1 to " +
                                std::to_string(kMaxWgradOutputs) +
                                " outputs and as many gradient rows as input rows");
  dispatch_float(dtype, "pointwise_conv_wgrad", [&](auto t) {
    pointwise_conv_wgrad_t<decltype(t)>(x, g, dw, num_threads);
  });
}

void pointwise_conv(int dtype, const PointwiseRows& x, const void* w, int64_t N,
                    const void* bias, bool relu, const PointwiseRows& y, int num_threads) {
  if (N < 1 || N > kMaxOutputs || y.rows != x.rows || y.cols != N)
    throw std::invalid_argument("msdnet_ops CPU kernel pointwise_conv: expected 1 to " +
                                std::to_string(kMaxOutputs) + " outputs and y of shape [rows, N]");
  dispatch_float(dtype, "pointwise_conv", [&](auto t) {
    pointwise_conv_t<decltype(t)>(x, w, N, bias, relu, y, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
