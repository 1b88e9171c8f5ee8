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
};

// Scratch row: xs[(c * stride + phase) * J + j] = x[n, ih, j*stride + phase - pad, c]. Only
// the input's pixels are written, the same positions for every row: the zero padding (and the
// slack up to J that the last tile's vectors read) is zeroed once, when the scratch is made.
template <typename T>
void transpose_row(const DirectArgs<T>& a, int64_t n, int64_t ih, T* __restrict__ xs) {
  const int64_t s = a.stride;
  const T* xr = a.x + n * a.sN + ih * a.sH;
  for (int64_t iw = 0; iw < a.W; ++iw) {
    const int64_t iwp = iw + a.pad;
    const T* __restrict__ px = xr + iw * a.sW;
    T* __restrict__ dst = xs + (iwp % s) * a.J + iwp / s;
    for (int64_t c = 0; c < a.C; ++c) dst[c * s * a.J] = px[c];
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
  const int64_t s = a.stride;
  for (int64_t ky = 0; ky < a.k; ++ky) {
    const T* xs = rows[ky];
    if (xs == nullptr) continue;  // a row of the zero padding
    for (int64_t kx = 0; kx < a.k; ++kx) {
      const T* xt = xs + (kx % s) * a.J + ow0 + kx / s;
      const T* wk = a.wt + (ky * a.k + kx) * a.C * a.NP + o0;
      for (int64_t c = 0; c < a.C; ++c) {
        const T* __restrict__ xv = xt + c * s * a.J;
        const T* __restrict__ wc = wk + c * a.NP;
#pragma GCC unroll 32
        for (int o = 0; o < OB; ++o) {
          const T w = wc[o];
#pragma omp simd
          for (int l = 0; l < L; ++l) acc[o][l] += xv[l] * w;
        }
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

template <typename T, int OB, int L>
void run_t(const DirectArgs<T>& a, int64_t batch, int num_threads) {
  const int64_t blocks = ceil_div(a.OH, kRowsPerUnit), units = batch * blocks;
  const int64_t row = a.C * a.stride * a.J, span = (kRowsPerUnit - 1) * a.stride + a.k;
  const int team = team_size(units * kRowsPerUnit * a.OW * a.k * a.k * a.C * a.NP, num_threads);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<T> scratch(static_cast<size_t>(span * row), T(0));
    std::vector<const T*> rows(static_cast<size_t>(a.k));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / blocks, oh0 = (u % blocks) * kRowsPerUnit;
      const int64_t oh1 = std::min(a.OH, oh0 + kRowsPerUnit), ih0 = oh0 * a.stride - a.pad;
      const int64_t ih1 = std::min(a.H, (oh1 - 1) * a.stride - a.pad + a.k);
      for (int64_t ih = std::max<int64_t>(0, ih0); ih < ih1; ++ih)
        transpose_row(a, n, ih, scratch.data() + (ih - ih0) * row);
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
template <typename T, int L>
void with_outputs(const DirectArgs<T>& a, int64_t ob, int64_t batch, int num_threads) {
  switch (ob) {
    case 2: return run_t<T, 2, L>(a, batch, num_threads);
    case 4: return run_t<T, 4, L>(a, batch, num_threads);
    case 6: return run_t<T, 6, L>(a, batch, num_threads);
    case 8: return run_t<T, 8, L>(a, batch, num_threads);
    case 12: return run_t<T, 12, L>(a, batch, num_threads);
    default: return run_t<T, 24, L>(a, batch, num_threads);
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

template <typename T>
void direct_conv_t(const View4& x, const void* w, int64_t N, int64_t k, int64_t stride,
                   int64_t pad, const void* bias, bool relu, const View4& y, int num_threads) {
  if (y.N == 0 || y.H == 0 || y.W == 0) return;
  constexpr int V = static_cast<int>(vec_width<T>());
  // pixels per tile: half a vector for narrow maps (8x8: a whole AVX-512 vector would idle
  // half its lanes), else one or two vectors
  const int64_t L = y.W <= V / 2 && V >= 8 ? V / 2 : (y.W > V ? 2 * V : V);
  const int64_t ob = outputs_per_tile(N, L > V ? kAccVectors / 2 : kAccVectors);
  const int64_t NP = ceil_div(N, ob) * ob, C = x.C, taps = k * k * C;
  const T* wp = static_cast<const T*>(w);  // [N][k][k][C] dense
  std::vector<T> wt(static_cast<size_t>(taps * NP), T(0)), b(static_cast<size_t>(NP), T(0));
  for (int64_t o = 0; o < N; ++o) {
    for (int64_t t = 0; t < taps; ++t) wt[t * NP + o] = wp[o * taps + t];
    if (bias != nullptr) b[o] = static_cast<const T*>(bias)[o];
  }
  // a tile's vectors read pixels [ow0 + (k-1)/stride, + L) of a phase row
  const int64_t J = ceil_div(y.W, L) * L + (k - 1) / stride + 1;
  const DirectArgs<T> a{static_cast<const T*>(x.ptr), x.H, x.W, C, x.sN, x.sH, x.sW,
                        k, stride, pad, wt.data(), b.data(), NP, relu, N,
                        static_cast<T*>(y.ptr), y.H, y.W, y.sN, y.sH, y.sW, J};
  if (L == 2 * V)
    with_outputs<T, 2 * V>(a, ob, y.N, num_threads);
  else if (L == V)
    with_outputs<T, V>(a, ob, y.N, num_threads);
  else
    with_outputs<T, (V >= 8 ? V / 2 : V)>(a, ob, y.N, num_threads);
}

}  // namespace

void direct_conv(int dtype, const View4& x, const void* w, int64_t k, int64_t stride,
                 int64_t pad, const void* bias, bool relu, const View4& y, int num_threads) {
  if (y.C < 1 || y.C > kMaxOutputs || (x.C > 1 && x.sC != 1) || (y.C > 1 && y.sC != 1) || y.N != x.N || k < 1 ||
      stride < 1 || pad < 0 || y.H != (x.H + 2 * pad - k) / stride + 1 ||
      y.W != (x.W + 2 * pad - k) / stride + 1)
    throw std::invalid_argument("msdnet_ops CPU kernel direct_conv: expected 1 to " +
                                std::to_string(kMaxOutputs) +
                                " outputs, channels-inner views and y of the convolution's shape");
  dispatch_float(dtype, "direct_conv", [&](auto t) {
    direct_conv_t<decltype(t)>(x, w, y.C, k, stride, pad, bias, relu, y, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
