// direct_wgrad: the weight gradient of direct_conv's convolution (a k x k kernel, any stride
// and zero padding, few output channels) from NHWC views of its input x and of the gradient g
// of its output:
//   dw[o, ky, kx, c] = sum_{n, oh, ow} g[n, oh, ow, o] * x[n, oh*s-p+ky, ow*s-p+kx, c]
// oneDNN runs these shapes well below the machine's multiply-add rate (measured on the 2-core
// development CPU: ~34 GMAC/s for DenseNet-BC's 48 -> 12 channels at 32x32, 15-25 for MSDNet's
// narrow ones). Here the input channels are the vector lanes, read straight from x's pixels (no
// copy, no transposition): per tap (ky, kx), a block of OB outputs x CB channel vectors keeps
// its OB x CB partial sums in registers over the unit's pixels; per pixel CB loads and OB
// broadcast gradient values for OB * CB multiply-adds. Only the pixels a tap reads inside the
// image are visited (the zero padding adds nothing). A unit is a few output rows (enough
// pixels to pay for loading and storing the block's sums); its input and gradient rows stay in
// L1 across its taps and blocks. Work is split into a fixed number of image groups, each with
// its own partial sums, added in a fixed order: the result does not depend on the thread count.
#include <vector>

#include "common.h"
#include "vec_ext.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

constexpr int64_t kMaxOutputs = 64;
constexpr int64_t kImageGroups = 8;
constexpr int64_t kPixelsPerUnit = 64;  // output pixels per unit at least (whole rows)
// Outputs per block with one and with two channel vectors: the accumulators, the channel
// vectors and a broadcast within the register file (16 vectors below AVX-512, 32 with it).
constexpr int kOB1 = 12;
constexpr int kOB2 = kVecBytes == 64 ? 12 : 6;

template <typename T>
struct WgradArgs {
  const T* x;
  int64_t H, W, C, sN, sH, sW;  // the input (NHWC: channels contiguous)
  int64_t k, stride, pad;
  const T* g;
  int64_t O, OH, OW, gsN, gsH, gsW;  // the output gradient (NHWC)
  int64_t CP;  // channels rounded up to whole vectors: a partial sums row per (output, tap)
  int64_t IP;  // k * k * CP: the distance between two outputs' partial sums
};

// OB outputs x CB channel vectors of one tap over npix output pixels of the unit's rows (a
// partial last vector: crem channels left), added into P (at the block's first output, the
// tap and its first channel). xr[r]: row r's first input pixel for the tap (at the block's
// first channel), or null where the tap reads the zero padding; gr[r]: row r's gradient at
// that pixel (the block's first output). A partial vector's extra lanes read the next
// channels or pixel, into sums that are never stored; the last pixels of a row, whose extra
// lanes would reach past its last visited pixel's channels (at the end of x: past its
// allocation), read only the channels that exist.
template <typename T, int OB, int CB>
void block_t(const WgradArgs<T>& a, const T* const* xr, const T* const* gr, int64_t nrows,
             int64_t npix, int64_t crem, T* __restrict__ P) {
  constexpr int64_t L = vec_width<T>();
  VecT<T> acc[OB][CB];
#pragma GCC unroll 16
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < CB; ++v) acc[o][v] = load(P + o * a.IP + v * L);
  const int64_t xs = a.stride * a.sW, gs = a.gsW, over = CB * L - crem;
  const int64_t whole = over <= 0 ? npix
                        : xs > 0  ? std::max<int64_t>(0, npix - ceil_div(over, xs))
                                  : 0;  // pixels read with whole vectors
  auto add = [&](const VecT<T>(&xv)[CB], const T* gp) {
#pragma GCC unroll 16
    for (int o = 0; o < OB; ++o) {
      const T go = gp[o];
#pragma GCC unroll 4
      for (int v = 0; v < CB; ++v) acc[o][v] += xv[v] * go;
    }
  };
  for (int64_t r = 0; r < nrows; ++r) {
    const T* xp = xr[r];
    if (xp == nullptr) continue;
    const T* gp = gr[r];
    int64_t j = 0;
    for (; j < whole; ++j, xp += xs, gp += gs) {
      VecT<T> xv[CB];
#pragma GCC unroll 4
      for (int v = 0; v < CB; ++v) xv[v] = load(xp + v * L);
      add(xv, gp);
    }
    for (; j < npix; ++j, xp += xs, gp += gs) {
      VecT<T> xv[CB];
      for (int v = 0; v < CB; ++v)
        xv[v] = load_first(xp + v * L, std::max<int64_t>(0, std::min(L, crem - v * L)));
      add(xv, gp);
    }
  }
#pragma GCC unroll 16
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < CB; ++v) store(P + o * a.IP + v * L, acc[o][v]);
}

// Per-thread row pointers of a unit: per row, for the kernel row (x: null in the padding),
// then for the tap and its first channel, then for a block's first output.
template <typename T>
struct UnitRows {
  std::vector<const T*> x, g, xtap, gtap, xblock, gblock;
  explicit UnitRows(int64_t n)
      : x(n), g(n), xtap(n), gtap(n), xblock(n), gblock(n) {}
};

// Every block of outputs of one tap and CB channel vectors (crem channels left from the
// first); rows.xblock and rows.gtap point at the tap's first pixel.
template <typename T, int CB>
void channel_block_t(const WgradArgs<T>& a, UnitRows<T>& rows, int64_t nrows, int64_t npix,
                     int64_t crem, T* P) {
  constexpr int OB = CB == 1 ? kOB1 : kOB2;
  for (int64_t o0 = 0; o0 < a.O; o0 += OB) {
    for (int64_t r = 0; r < nrows; ++r) rows.gblock[r] = rows.gtap[r] + o0;
    const T* const* xr = rows.xblock.data();
    const T* const* gr = rows.gblock.data();
    T* p = P + o0 * a.IP;
    switch (std::min<int64_t>(OB, a.O - o0)) {
#define MSDNET_WGRAD_OB(n) \
  case n: block_t<T, (n <= OB ? n : 1), CB>(a, xr, gr, nrows, npix, crem, p); break;
      MSDNET_WGRAD_OB(1) MSDNET_WGRAD_OB(2) MSDNET_WGRAD_OB(3) MSDNET_WGRAD_OB(4)
      MSDNET_WGRAD_OB(5) MSDNET_WGRAD_OB(6) MSDNET_WGRAD_OB(7) MSDNET_WGRAD_OB(8)
      MSDNET_WGRAD_OB(9) MSDNET_WGRAD_OB(10) MSDNET_WGRAD_OB(11)
#undef MSDNET_WGRAD_OB
      default: block_t<T, OB, CB>(a, xr, gr, nrows, npix, crem, p);
    }
  }
}

// A unit: output rows [oh0, oh1) of images [n0, n1), added into P [O][k*k][CP].
template <typename T>
void unit_t(const WgradArgs<T>& a, int64_t n0, int64_t n1, int64_t oh0, int64_t oh1,
            UnitRows<T>& rows, T* P) {
  constexpr int64_t L = vec_width<T>();
  const int64_t per_image = oh1 - oh0, nrows = (n1 - n0) * per_image;
  for (int64_t ky = 0; ky < a.k; ++ky) {
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t n = n0 + r / per_image, oh = oh0 + r % per_image;
      const int64_t ih = oh * a.stride - a.pad + ky;
      rows.x[r] = ih < 0 || ih >= a.H ? nullptr : a.x + n * a.sN + ih * a.sH;
      rows.g[r] = a.g + n * a.gsN + oh * a.gsH;
    }
    for (int64_t kx = 0; kx < a.k; ++kx) {
      // the output columns [lo, hi) whose input column ow*s - pad + kx is inside the image
      const int64_t lo = std::max<int64_t>(0, ceil_div(a.pad - kx, a.stride));
      const int64_t last = a.W - 1 + a.pad - kx;  // ow*s <= last
      const int64_t hi = last < 0 ? 0 : std::min(a.OW, last / a.stride + 1);
      if (hi <= lo) continue;
      const int64_t iw = lo * a.stride - a.pad + kx;
      for (int64_t r = 0; r < nrows; ++r) {
        rows.xtap[r] = rows.x[r] == nullptr ? nullptr : rows.x[r] + iw * a.sW;
        rows.gtap[r] = rows.g[r] + lo * a.gsW;
      }
      T* Ptap = P + (ky * a.k + kx) * a.CP;
      for (int64_t c0 = 0; c0 < a.C; c0 += 2 * L) {
        for (int64_t r = 0; r < nrows; ++r)
          rows.xblock[r] = rows.xtap[r] == nullptr ? nullptr : rows.xtap[r] + c0;
        const int64_t crem = a.C - c0;
        if (crem > L)
          channel_block_t<T, 2>(a, rows, nrows, hi - lo, crem, Ptap + c0);
        else
          channel_block_t<T, 1>(a, rows, nrows, hi - lo, crem, Ptap + c0);
      }
    }
  }
}

template <typename T>
void run_t(const WgradArgs<T>& a, int64_t batch, T* dw, int num_threads) {
  const int64_t part = a.O * a.IP;
  const int64_t groups = std::max<int64_t>(1, std::min(kImageGroups, batch));
  // a unit: `block` output rows of one image, or `images` whole images
  const int64_t rows = std::max<int64_t>(1, ceil_div(kPixelsPerUnit, a.OW));
  const int64_t block = std::min(rows, a.OH), images = std::max<int64_t>(1, rows / a.OH);
  const int64_t blocks = ceil_div(a.OH, block);
  std::vector<T> partial(static_cast<size_t>(groups * part), T(0));
  const int team = team_size(batch * a.OH * a.OW * a.k * a.k * a.C * a.O, num_threads);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    UnitRows<T> unit_rows(images * block);
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t end = batch * (grp + 1) / groups;
      for (int64_t n = batch * grp / groups; n < end; n += images)
        for (int64_t b = 0; b < blocks; ++b)
          unit_t(a, n, std::min(end, n + images), b * block, std::min(a.OH, (b + 1) * block),
                 unit_rows, partial.data() + grp * part);
    }
  }
  // the groups' partial sums added in order
  T* sum = partial.data();
  for (int64_t grp = 1; grp < groups; ++grp) {
    const T* __restrict__ p = partial.data() + grp * part;
#pragma omp simd
    for (int64_t e = 0; e < part; ++e) sum[e] += p[e];
  }
  const int64_t taps = a.k * a.k;
  for (int64_t o = 0; o < a.O; ++o)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < a.C; ++c) dw[(o * taps + t) * a.C + c] = sum[o * a.IP + t * a.CP + c];
}

template <typename T>
void direct_wgrad_t(const View4& x, const View4& g, int64_t k, int64_t stride, int64_t pad,
                    void* dw, int num_threads) {
  constexpr int64_t L = vec_width<T>();
  const int64_t CP = ceil_div(x.C, L) * L;
  const WgradArgs<T> a{static_cast<const T*>(x.ptr), x.H, x.W, x.C, x.sN, x.sH, x.sW,
                       k, stride, pad, static_cast<const T*>(g.ptr), g.C, g.H, g.W, g.sN,
                       g.sH, g.sW, CP, k * k * CP};
  T* out = static_cast<T*>(dw);
  if (g.N == 0 || g.H == 0 || g.W == 0) {
    std::fill(out, out + g.C * k * k * x.C, T(0));
    return;
  }
  run_t<T>(a, g.N, out, num_threads);
}

}  // namespace

void direct_wgrad(int dtype, const View4& x, const View4& g, int64_t k, int64_t stride,
                  int64_t pad, void* dw, int num_threads) {
  if (g.C < 1 || g.C > kMaxOutputs || x.C < 1 || k < 1 || stride < 1 || pad < 0 ||
      g.N != x.N || (x.C > 1 && x.sC != 1) || (g.C > 1 && g.sC != 1) ||
      g.H != (x.H + 2 * pad - k) / stride + 1 || g.W != (x.W + 2 * pad - k) / stride + 1)
    throw std::invalid_argument("msdnet_ops CPU kernel direct_wgrad: expected 1 to " +
                                std::to_string(kMaxOutputs) +
                                " outputs, channels-inner views and g of the convolution's "
                                "output shape");
  dispatch_float(dtype, "direct_wgrad", [&](auto t) {
    direct_wgrad_t<decltype(t)>(x, g, k, stride, pad, dw, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
