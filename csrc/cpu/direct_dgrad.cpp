// direct_dgrad: the input gradient of direct_conv's convolution (a k x k kernel, any stride
// and zero padding) for few input channels, from an NHWC view of the gradient g of its output:
//   dx[n, ih, iw, c] = sum over the taps (ky, kx) with oh = (ih + pad - ky) / stride and
//                      ow = (iw + pad - kx) / stride whole and inside g of
//                      sum_o g[n, oh, ow, o] * w[o, c, ky, kx]
// oneDNN runs the strided ones at a small fraction of the machine's multiply-add rate
// (measured on the 2-core development CPU: 6 GMAC/s for MSDNet's 6 -> 6 channels at stride
// 2, 32x32). At stride 1 direct_conv with flipped weights computes it; a stride leaves most
// taps of a zero-dilated gradient empty. Here each input pixel gathers only the taps that
// reach it: the pixels of one input row whose column is in phase q (iw = q + stride * m) share
// one set of taps, and for each tap their gradient pixels are consecutive. A tile of P such
// pixels x CB vectors of input channels (the lanes) keeps its sums in registers over the
// taps and outputs: per (tap, output) CB weight-vector loads and P broadcast gradient values
// for P * CB multiply-adds. The gradient is first copied into a zero-bordered scratch per
// image, so that taps reaching past its edges (and a row's last, partial tile) read zeros.
#include <vector>

#include "common.h"
#include "vec_ext.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

constexpr int64_t kMaxChannels = 64;  // input channels (the gradient's channels: any)
constexpr int kPixels = 4;            // pixels per tile (two channel vectors; 8 with one)

template <typename T>
struct DgradArgs {
  const T* g;
  int64_t O, OH, OW, gsN, gsH, gsW;  // the output gradient (NHWC)
  const T* wt;     // [k][k][O][CP]: each tap's and output's weights over the input channels
  int64_t C, CP;   // input channels, rounded up to whole vectors
  int64_t H, W;    // the input
  int64_t k, stride, pad;
  int64_t top, left, GH, GW;  // the scratch's zero border above and left, its rows and columns
  T* dx;
  int64_t dsN, dsH, dsW;  // the input gradient (NHWC, written)
};

// A tap reaching the pixels of one row and column phase: their first pixel's (m = 0)
// gradient in the scratch, and the tap's weights [O][CP].
template <typename T>
struct Tap {
  const T* g;
  const T* w;
};

// A tile: pixels m0 + j (j < npix) of one row and phase, gathering the row's taps, CB channel
// vectors from c0, written from dst (pixel m0's channel c0; dstep between pixels).
template <typename T, int P, int CB>
void tile_t(const DgradArgs<T>& a, const Tap<T>* taps, int64_t ntaps, int64_t m0, int64_t npix,
            int64_t c0, T* dst, int64_t dstep) {
  constexpr int64_t L = vec_width<T>();
  VecT<T> acc[P][CB] = {};
  for (int64_t t = 0; t < ntaps; ++t) {
    const T* gp = taps[t].g + m0 * a.O;  // pixel j's gradient: gp[j * O + o]
    const T* wp = taps[t].w + c0;
    for (int64_t o = 0; o < a.O; ++o, wp += a.CP) {
      VecT<T> wv[CB];
#pragma GCC unroll 4
      for (int v = 0; v < CB; ++v) wv[v] = load(wp + v * L);
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        const T gj = gp[j * a.O + o];
#pragma GCC unroll 4
        for (int v = 0; v < CB; ++v) acc[j][v] += wv[v] * gj;
      }
    }
  }
  const int64_t crem = a.C - c0;
  for (int64_t j = 0; j < npix; ++j, dst += dstep) {
#pragma GCC unroll 4
    for (int v = 0; v < CB; ++v) {
      if ((v + 1) * L <= crem)
        store(dst + v * L, acc[j][v]);
      else if (v * L < crem)  // a partial vector: only the channels that exist
        store_first(dst + v * L, acc[j][v], crem - v * L);
    }
  }
}

// Input rows [ih0, ih1) of image n; gpad: this thread's scratch (its border zero), taps: room
// for k * k.
template <typename T>
void rows_t(const DgradArgs<T>& a, int64_t n, int64_t ih0, int64_t ih1, T* gpad, Tap<T>* taps) {
  constexpr int64_t L = vec_width<T>();
  for (int64_t oh = 0; oh < a.OH; ++oh) {
    const T* gr = a.g + n * a.gsN + oh * a.gsH;
    T* __restrict__ dst = gpad + ((oh + a.top) * a.GW + a.left) * a.O;
    for (int64_t ow = 0; ow < a.OW; ++ow)
      for (int64_t o = 0; o < a.O; ++o) dst[ow * a.O + o] = gr[ow * a.gsW + o];
  }
  const int64_t s = a.stride;
  for (int64_t ih = ih0; ih < ih1; ++ih) {
    T* dxrow = a.dx + n * a.dsN + ih * a.dsH;
    for (int64_t q = 0; q < std::min(s, a.W); ++q) {
      // the taps reaching row ih and phase q: ih + pad - ky and q + pad - kx divisible by s
      int64_t ntaps = 0;
      for (int64_t ky = (ih + a.pad) % s; ky < a.k; ky += s) {
        const T* grow = gpad + ((ih + a.pad - ky) / s + a.top) * a.GW * a.O;
        for (int64_t kx = (q + a.pad) % s; kx < a.k; kx += s)
          taps[ntaps++] = {grow + ((q + a.pad - kx) / s + a.left) * a.O,
                           a.wt + (ky * a.k + kx) * a.O * a.CP};
      }
      const int64_t M = (a.W - 1 - q) / s + 1;  // pixels of the row in phase q
      T* d0 = dxrow + q * a.dsW;
      for (int64_t c0 = 0; c0 < a.C; c0 += 2 * L) {
        if (a.C - c0 > L) {
          for (int64_t m0 = 0; m0 < M; m0 += kPixels)
            tile_t<T, kPixels, 2>(a, taps, ntaps, m0, std::min<int64_t>(kPixels, M - m0), c0,
                                  d0 + m0 * s * a.dsW + c0, s * a.dsW);
        } else {
          for (int64_t m0 = 0; m0 < M; m0 += 2 * kPixels)
            tile_t<T, 2 * kPixels, 1>(a, taps, ntaps, m0,
                                      std::min<int64_t>(2 * kPixels, M - m0), c0,
                                      d0 + m0 * s * a.dsW + c0, s * a.dsW);
        }
      }
    }
  }
}

template <typename T>
void direct_dgrad_t(const View4& g, const void* w, const View4& dx, int64_t k, int64_t stride,
                    int64_t pad, int num_threads) {
  constexpr int64_t L = vec_width<T>();
  const int64_t O = g.C, C = dx.C, CP = ceil_div(C, L) * L;
  const T* wp = static_cast<const T*>(w);  // [O][C][k][k] dense
  std::vector<T> wt(static_cast<size_t>(k * k * O * CP), T(0));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < k * k; ++t) wt[(t * O + o) * CP + c] = wp[(o * C + c) * k * k + t];
  // the gradient rows and columns the taps reach: from (pad - (k-1)) / stride (rounded down)
  // to (H - 1 + pad) / stride, and a tile's pixels past the row (up to 2 * kPixels - 1)
  const int64_t top = std::max<int64_t>(0, ceil_div(k - 1 - pad, stride));
  const int64_t left = top;  // a square kernel, the same padding
  const int64_t GH = top + std::max(g.H, (dx.H - 1 + pad) / stride + 1);
  const int64_t GW = left + std::max(g.W, (dx.W - 1 + pad) / stride + 1) + 2 * kPixels;
  const DgradArgs<T> a{static_cast<const T*>(g.ptr), O, g.H, g.W, g.sN, g.sH, g.sW,
                       wt.data(), C, CP, dx.H, dx.W, k, stride, pad, top, left, GH, GW,
                       static_cast<T*>(dx.ptr), dx.sN, dx.sH, dx.sW};
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  // a unit: a whole image when there are enough for every thread, else a block of rows
  const int64_t rows = dx.N >= 2 * threads ? dx.H : std::max<int64_t>(1, ceil_div(dx.H, 4));
  const int64_t blocks = ceil_div(dx.H, rows), units = dx.N * blocks;
  const int team = team_size(dx.N * dx.H * dx.W * C * O * k * k / (stride * stride), num_threads);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<T> gpad(static_cast<size_t>(GH * GW * O), T(0));
    std::vector<Tap<T>> taps(static_cast<size_t>(k * k));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / blocks, b = u % blocks;
      rows_t(a, n, b * rows, std::min(dx.H, (b + 1) * rows), gpad.data(), taps.data());
    }
  }
}

}  // namespace

void direct_dgrad(int dtype, const View4& g, const void* w, int64_t k, int64_t stride,
                  int64_t pad, const View4& dx, int num_threads) {
  if (dx.C < 1 || dx.C > kMaxChannels || g.C < 1 || k < 1 || stride < 1 || pad < 0 ||
      pad >= k || g.N != dx.N || (dx.C > 1 && dx.sC != 1) || (g.C > 1 && g.sC != 1) ||
      g.H != (dx.H + 2 * pad - k) / stride + 1 || g.W != (dx.W + 2 * pad - k) / stride + 1)
    throw std::invalid_argument("msdnet_ops CPU kernel direct_dgrad: expected 1 to " +
                                std::to_string(kMaxChannels) +
                                " input channels, padding below the kernel size, "
                                "channels-inner views and g of the convolution's output shape");
  if (dx.N == 0 || dx.H == 0 || dx.W == 0) return;
  dispatch_float(dtype, "direct_dgrad", [&](auto t) {
    direct_dgrad_t<decltype(t)>(g, w, dx, k, stride, pad, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
