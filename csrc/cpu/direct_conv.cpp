// direct_conv: a k x k convolution (any stride and zero padding) with few output channels (at
// most kMaxOutputs) of an NHWC view, written straight into a strided NHWC output view:
//   y[n, oh, ow, o] = act(sum_{ky, kx, c} x[n, oh*s-p+ky, ow*s-p+kx, c] * w[o, ky, kx, c] + b[o])
// act = ReLU (NaN kept) or identity. MSDNet's 3x3 convolutions at the finest scales have 6 to
// 24 outputs, where oneDNN runs far below the machine's multiply-add rate (measured on the
// 2-core development CPU, batch 64: 23 GMAC/s for 6 -> 6 channels at 32x32): its NHWC kernels
// put the output channels on the vector lanes in blocks of 16, mostly empty here. Putting the
// outputs on the lanes in blocks of 8 instead (pointwise_conv.cpp's scheme) measured at most
// 1.2x oneDNN, and slower from 24 input channels: every multiply-add then needs its own
// broadcast input value. So here the lanes are
// output pixels: the k input rows an output row reads are first transposed into a small planar
// scratch (channel-major, zero padding materialised, split into `stride` phases so that a tap's
// pixels are contiguous for any stride), then each (tap, input channel) is one vector load of
// L neighbouring pixels and OB multiply-adds with broadcast weights into OB x L accumulators
// held in registers. The output tile is written pixel by pixel into the strided NHWC output,
// with the bias and ReLU applied: no dense temporary, no copy into a buffer slice afterwards.
//
// bottleneck_direct_conv fuses the 1x1 unit in front of it (MSDNet's inference paths:
// relu(conv1x1(x) + b1) -> k x k): the scratch rows are computed from x's rows instead of
// transposed (per pixel, the bottleneck's outputs as the vector lanes, as pointwise_conv.cpp
// does, then scattered into the planar rows), so the bottleneck's output never goes to memory
// and back. A work unit is a whole image when there are enough images for every thread (no
// bottleneck row is computed twice), else a block of output rows (their overlapping input rows
// are computed by each block).
#include <vector>

#include "common.h"
#include "row_copy.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

constexpr int64_t kMaxOutputs = 64;
// accumulator vectors per tile: most of the register file (32 vectors with AVX-512, 16 below)
constexpr int kAccVectors = kVecBytes == 64 ? 24 : 12;

template <typename T>
struct DirectArgs {
  const T* x;
  int64_t H, W, C, sN, sH, sW;  // input (NHWC: channels contiguous)
  int64_t k, stride, pad;
  const T* wt;    // [k*k*C][NP]: (tap, channel) rows of the outputs' weights, zero-padded
  const T* bias;  // [NP], zero-padded
  int64_t NP;     // outputs rounded up to whole tiles
  bool relu;
  int64_t N;      // outputs written
  T* y;
  int64_t OH, OW, ysN, ysH, ysW;
  int64_t J;      // scratch pixels per (row, channel, phase)
  // per (kx, c) of a kernel row, in weight-row order: where its pixels start in a scratch row
  // (the phase and shift of kx, the channel's plane), so that a tile's inner loop runs over
  // k * C rows with no division (a 64-bit idiv per tap cost as much as a few channels' FMAs)
  const int64_t* xoff;
  const int64_t* xcol;  // per input column iw: its place in a scratch row's first plane
};

// Scratch row: xs[(c * stride + phase) * J + j] = x[n, ih, j*stride + phase - pad, c]. Only
// the input's pixels are written, the same positions for every row: the zero padding (and the
// slack up to J that the last tile's vectors read) is zeroed once, when the scratch is made.
template <typename T>
void transpose_row(const DirectArgs<T>& a, int64_t n, int64_t ih, T* __restrict__ xs) {
  const int64_t s = a.stride;
  const T* xr = a.x + n * a.sN + ih * a.sH;
  for (int64_t iw = 0; iw < a.W; ++iw) {
    const T* __restrict__ px = xr + iw * a.sW;
    T* __restrict__ dst = xs + a.xcol[iw];
    for (int64_t c = 0; c < a.C; ++c) dst[c * s * a.J] = px[c];
  }
}

// The fused bottleneck: relu(x @ w1^T + b1) per pixel, MP = MV * 8 outputs as the lanes.
template <typename T>
struct BottleneckArgs {
  const T* x;
  int64_t K, sN, sH, sW;  // its input (NHWC: channels contiguous)
  const T* w1t;           // [K][MP]: w1 transposed, outputs zero-padded
  const T* b1;            // [MP], zero-padded
};

constexpr int kMidLanes = 8;
constexpr int64_t kMaxMid = 4 * kMidLanes;

// The scratch row of input row ih (as transpose_row writes it) from the bottleneck's input.
template <typename T, int MV>
void bottleneck_row(const DirectArgs<T>& a, const BottleneckArgs<T>& b, int64_t n, int64_t ih,
                    T* __restrict__ xs) {
  constexpr int MP = MV * kMidLanes, R = MV == 1 ? 6 : (MV == 2 ? 4 : 3);
  const int64_t s = a.stride;
  const T* xr = b.x + n * b.sN + ih * b.sH;
  for (int64_t iw0 = 0; iw0 < a.W; iw0 += R) {
    const int64_t rn = std::min<int64_t>(R, a.W - iw0);
    const T* px[R];
    for (int r = 0; r < R; ++r) px[r] = xr + std::min<int64_t>(iw0 + r, a.W - 1) * b.sW;
    alignas(64) T acc[R][MP];
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int o = 0; o < MP; ++o) acc[r][o] = b.b1[o];
    for (int64_t k = 0; k < b.K; ++k) {
      const T* __restrict__ wk = b.w1t + k * MP;
      for (int r = 0; r < R; ++r) {
        const T xv = px[r][k];
#pragma omp simd
        for (int o = 0; o < MP; ++o) acc[r][o] += xv * wk[o];
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      T* __restrict__ dst = xs + a.xcol[iw0 + r];
      for (int64_t c = 0; c < a.C; ++c) {  // NaN < 0 is false: NaN stays, as torch.relu
        const T v = acc[r][c];
        dst[c * s * a.J] = v < T(0) ? T(0) : v;
      }
    }
  }
}

// One tile: outputs [o0, o0 + OB) of output pixels [ow0, ow0 + L) in row (n, oh).
template <typename T, int OB, int L>
void tile_t(const DirectArgs<T>& a, const T* const* rows, int64_t o0, int64_t ow0,
            T* __restrict__ yrow) {
  alignas(64) T acc[OB][L];
#pragma GCC unroll 32
  for (int o = 0; o < OB; ++o)
#pragma omp simd
    for (int l = 0; l < L; ++l) acc[o][l] = a.bias[o0 + o];
  const int64_t kc = a.k * a.C;
  for (int64_t ky = 0; ky < a.k; ++ky) {
    const T* xs = rows[ky];
    if (xs == nullptr) continue;  // a row of the zero padding
    const T* xt = xs + ow0;
    const T* wk = a.wt + ky * kc * a.NP + o0;
    for (int64_t i = 0; i < kc; ++i) {  // (kx, c), in the weight rows' order
      const T* __restrict__ xv = xt + a.xoff[i];
      const T* __restrict__ wc = wk + i * a.NP;
#pragma GCC unroll 32
      for (int o = 0; o < OB; ++o) {
        const T w = wc[o];
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[o][l] += xv[l] * w;
      }
    }
  }
  if (a.relu)
#pragma GCC unroll 32
    for (int o = 0; o < OB; ++o)
#pragma omp simd
      for (int l = 0; l < L; ++l)  // NaN < 0 is false: NaN stays, as torch.relu keeps it
        acc[o][l] = acc[o][l] < T(0) ? T(0) : acc[o][l];
  const int64_t np = std::min<int64_t>(L, a.OW - ow0), no = std::min<int64_t>(OB, a.N - o0);
  for (int64_t l = 0; l < np; ++l) {
    T* __restrict__ yp = yrow + (ow0 + l) * a.ysW + o0;
    for (int64_t o = 0; o < no; ++o) yp[o] = acc[o][l];
  }
}

// Output rows per work unit: the input rows they share are transposed once.
constexpr int64_t kRowsPerUnit = 8;

// fill(n, ih, scratch row) writes the scratch row of input row ih (transpose_row, or
// bottleneck_row for the fused form); a unit is up to rows_per_unit output rows.
template <typename T, int OB, int L, typename Fill>
void run_t(const DirectArgs<T>& a, int64_t batch, int64_t rows_per_unit, const Fill& fill,
           int num_threads) {
  const int64_t blocks = ceil_div(a.OH, rows_per_unit), units = batch * blocks;
  const int64_t row = a.C * a.stride * a.J, span = (rows_per_unit - 1) * a.stride + a.k;
  const int team = team_size(units * rows_per_unit * a.OW * a.k * a.k * a.C * a.NP, num_threads);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<T> scratch(static_cast<size_t>(span * row), T(0));
    std::vector<const T*> rows(static_cast<size_t>(a.k));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / blocks, oh0 = (u % blocks) * rows_per_unit;
      const int64_t oh1 = std::min(a.OH, oh0 + rows_per_unit), ih0 = oh0 * a.stride - a.pad;
      const int64_t ih1 = std::min(a.H, (oh1 - 1) * a.stride - a.pad + a.k);
      for (int64_t ih = std::max<int64_t>(0, ih0); ih < ih1; ++ih)
        fill(n, ih, scratch.data() + (ih - ih0) * row);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ky = 0; ky < a.k; ++ky) {
          const int64_t ih = oh * a.stride - a.pad + ky;
          rows[ky] = ih < 0 || ih >= a.H ? nullptr : scratch.data() + (ih - ih0) * row;
        }
        T* yrow = a.y + n * a.ysN + oh * a.ysH;
        for (int64_t ow0 = 0; ow0 < a.OW; ow0 += L)
          for (int64_t o0 = 0; o0 < a.N; o0 += OB) tile_t<T, OB, L>(a, rows.data(), o0, ow0, yrow);
      }
    }
  }
}

// Runs with L pixels per tile (half a vector, one or two: direct_conv_t) and OB outputs per
// tile (outputs_per_tile: the fewest of the instantiated sizes covering all outputs, within the
// accumulator budget).
template <typename T, int L, typename Fill>
void with_outputs(const DirectArgs<T>& a, int64_t ob, int64_t batch, int64_t rows_per_unit,
                  const Fill& fill, int num_threads) {
  switch (ob) {
    case 2: return run_t<T, 2, L>(a, batch, rows_per_unit, fill, num_threads);
    case 4: return run_t<T, 4, L>(a, batch, rows_per_unit, fill, num_threads);
    case 6: return run_t<T, 6, L>(a, batch, rows_per_unit, fill, num_threads);
    case 8: return run_t<T, 8, L>(a, batch, rows_per_unit, fill, num_threads);
    case 12: return run_t<T, 12, L>(a, batch, rows_per_unit, fill, num_threads);
    default: return run_t<T, 24, L>(a, batch, rows_per_unit, fill, num_threads);
  }
}

int64_t outputs_per_tile(int64_t N, int64_t budget) {
  int64_t best = 2;
  for (int64_t ob : {2, 4, 6, 8, 12, 24}) {
    if (ob > budget) break;
    best = ob;
    if (ob >= N) break;
  }
  return best;
}

// x: the k x k convolution's input (its sizes; its values only where fill reads them).
template <typename T, typename MakeFill>
void direct_conv_t(const View4& x, int64_t C, const void* w, int64_t N, int64_t k,
                   int64_t stride, int64_t pad, const void* bias, bool relu, const View4& y,
                   int64_t rows_per_unit, const MakeFill& make_fill, int num_threads) {
  if (y.N == 0 || y.H == 0 || y.W == 0) return;
  constexpr int V = static_cast<int>(vec_width<T>());
  // pixels per tile: half a vector for narrow maps (8x8: a whole AVX-512 vector would idle
  // half its lanes), else one or two vectors
  const int64_t L = y.W <= V / 2 && V >= 8 ? V / 2 : (y.W > V ? 2 * V : V);
  const int64_t ob = outputs_per_tile(N, L > V ? kAccVectors / 2 : kAccVectors);
  const int64_t NP = ceil_div(N, ob) * ob, taps = k * k * C;
  const T* wp = static_cast<const T*>(w);  // [N][k][k][C] dense
  std::vector<T> wt(static_cast<size_t>(taps * NP), T(0)), b(static_cast<size_t>(NP), T(0));
  for (int64_t o = 0; o < N; ++o) {
    for (int64_t t = 0; t < taps; ++t) wt[t * NP + o] = wp[o * taps + t];
    if (bias != nullptr) b[o] = static_cast<const T*>(bias)[o];
  }
  // a tile's vectors read pixels [ow0 + (k-1)/stride, + L) of a phase row
  const int64_t J = ceil_div(y.W, L) * L + (k - 1) / stride + 1;
  std::vector<int64_t> xoff(static_cast<size_t>(k * C)), xcol(static_cast<size_t>(x.W));
  for (int64_t kx = 0; kx < k; ++kx)
    for (int64_t c = 0; c < C; ++c)
      xoff[kx * C + c] = (kx % stride) * J + kx / stride + c * stride * J;
  for (int64_t iw = 0; iw < x.W; ++iw)  // (the divisions once per call, not per pixel)
    xcol[iw] = ((iw + pad) % stride) * J + (iw + pad) / stride;
  const DirectArgs<T> a{static_cast<const T*>(x.ptr), x.H, x.W, C, x.sN, x.sH, x.sW,
                        k, stride, pad, wt.data(), b.data(), NP, relu, N,
                        static_cast<T*>(y.ptr), y.H, y.W, y.sN, y.sH, y.sW, J, xoff.data(),
                        xcol.data()};
  make_fill(a, [&](const auto& fill) {
    if (L == 2 * V)
      with_outputs<T, 2 * V>(a, ob, y.N, rows_per_unit, fill, num_threads);
    else if (L == V)
      with_outputs<T, V>(a, ob, y.N, rows_per_unit, fill, num_threads);
    else
      with_outputs<T, (V >= 8 ? V / 2 : V)>(a, ob, y.N, rows_per_unit, fill, num_threads);
  });
}

template <typename T>
void plain_direct_conv_t(const View4& x, const void* w, int64_t N, int64_t k, int64_t stride,
                         int64_t pad, const void* bias, bool relu, const View4& y,
                         int num_threads) {
  direct_conv_t<T>(x, x.C, w, N, k, stride, pad, bias, relu, y, kRowsPerUnit,
                   [](const DirectArgs<T>& a, const auto& run) {
                     run([&a](int64_t n, int64_t ih, T* xs) { transpose_row(a, n, ih, xs); });
                   },
                   num_threads);
}

template <typename T>
void bottleneck_direct_conv_t(const View4& x, const void* w1, int64_t Cm, const void* b1,
                              const void* w, int64_t N, int64_t k, int64_t stride, int64_t pad,
                              const void* bias, bool relu, const View4& y, int num_threads) {
  const int mv = static_cast<int>(ceil_div(Cm, kMidLanes));
  const int64_t MP = mv * kMidLanes, K = x.C;
  const T* w1p = static_cast<const T*>(w1);  // [Cm][K] dense
  std::vector<T> w1t(static_cast<size_t>(K * MP), T(0)), b1p(static_cast<size_t>(MP), T(0));
  for (int64_t o = 0; o < Cm; ++o) {
    for (int64_t c = 0; c < K; ++c) w1t[c * MP + o] = w1p[o * K + c];
    b1p[o] = static_cast<const T*>(b1)[o];
  }
  const BottleneckArgs<T> b{static_cast<const T*>(x.ptr), K, x.sN, x.sH, x.sW, w1t.data(),
                            b1p.data()};
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t rows_per_unit = y.N >= 2 * threads ? y.H : kRowsPerUnit;
  direct_conv_t<T>(x, Cm, w, N, k, stride, pad, bias, relu, y, rows_per_unit,
                   [&b, mv](const DirectArgs<T>& a, const auto& run) {
                     auto with = [&](auto mid) {
                       constexpr int MV = decltype(mid)::value;
                       run([&a, &b](int64_t n, int64_t ih, T* xs) {
                         bottleneck_row<T, MV>(a, b, n, ih, xs);
                       });
                     };
                     switch (mv) {
                       case 1: return with(std::integral_constant<int, 1>());
                       case 2: return with(std::integral_constant<int, 2>());
                       case 3: return with(std::integral_constant<int, 3>());
                       default: return with(std::integral_constant<int, 4>());
                     }
                   },
                   num_threads);
}

bool conv_shape_ok(const View4& x, int64_t k, int64_t stride, int64_t pad, const View4& y) {
  return (x.C <= 1 || x.sC == 1) && (y.C <= 1 || y.sC == 1) && y.N == x.N && k >= 1 &&
         stride >= 1 && pad >= 0 && y.H == (x.H + 2 * pad - k) / stride + 1 &&
         y.W == (x.W + 2 * pad - k) / stride + 1;
}

}  // namespace

void direct_conv(int dtype, const View4& x, const void* w, int64_t k, int64_t stride,
                 int64_t pad, const void* bias, bool relu, const View4& y, int num_threads) {
  if (y.C < 1 || y.C > kMaxOutputs || !conv_shape_ok(x, k, stride, pad, y))
    throw std::invalid_argument("msdnet_ops CPU kernel direct_conv: expected 1 to " +
                                std::to_string(kMaxOutputs) +
                                " outputs, channels-inner views and y of the convolution's shape");
  dispatch_float(dtype, "direct_conv", [&](auto t) {
    plain_direct_conv_t<decltype(t)>(x, w, y.C, k, stride, pad, bias, relu, y, num_threads);
  });
}

void bottleneck_direct_conv(int dtype, const View4& x, const void* w1, int64_t mid,
                            const void* b1, const void* w, int64_t k, int64_t stride,
                            int64_t pad, const void* bias, bool relu, const View4& y,
                            int num_threads) {
  if (y.C < 1 || y.C > kMaxOutputs || mid < 1 || mid > kMaxMid || x.C < 1 || b1 == nullptr ||
      !conv_shape_ok(x, k, stride, pad, y))
    throw std::invalid_argument("msdnet_ops CPU kernel bottleneck_direct_conv: expected 1 to " +
                                std::to_string(kMaxOutputs) + " outputs, 1 to " +
                                std::to_string(kMaxMid) + " bottleneck channels with a bias, "
                                "channels-inner views and y of the convolution's shape");
  dispatch_float(dtype, "bottleneck_direct_conv", [&](auto t) {
    bottleneck_direct_conv_t<decltype(t)>(x, w1, mid, b1, w, y.C, k, stride, pad, bias, relu, y,
                                          num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
