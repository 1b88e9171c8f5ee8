// The planar scratch rows of the direct convolution kernels (direct_conv.cpp: the forward,
// direct_wgrad.cpp: the weight gradient). Their lanes are output pixels: the input rows an
// output row reads are transposed channel-major, zero padding materialised, split into
// `stride` phases, so that a tap's L neighbouring output pixels read L contiguous elements:
//   xs[(c * stride + phase) * J + j] = x[n, ih, j * stride + phase - pad, c]
// Only the input's pixels are written, the same positions for every row: the zero padding (and
// the slack up to J that the last tile's vectors read) is zeroed once, when the scratch is made.
#pragma once

#include <vector>

#include "common.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

// Where things are in a scratch row, computed once per call (a 64-bit division per tap or per
// pixel cost as much as a few channels' multiply-adds).
struct ScratchTables {
  int64_t J;                  // pixels per (channel, phase) of a row
  std::vector<int64_t> xoff;  // per (kx, c), in weight-row order: where its pixels start
  std::vector<int64_t> xcol;  // per input column iw: its place in the row's first plane

  // OW output columns in tiles of L pixels, from W input columns with C channels.
  ScratchTables(int64_t W, int64_t OW, int64_t C, int64_t k, int64_t stride, int64_t pad,
                int64_t L)
      : J(ceil_div(OW, L) * L + (k - 1) / stride + 1),  // tiles read [ow0 + (k-1)/s, + L)
        xoff(static_cast<size_t>(k * C)),
        xcol(static_cast<size_t>(W)) {
    for (int64_t kx = 0; kx < k; ++kx)
      for (int64_t c = 0; c < C; ++c)
        xoff[kx * C + c] = (kx % stride) * J + kx / stride + c * stride * J;
    for (int64_t iw = 0; iw < W; ++iw)
      xcol[iw] = ((iw + pad) % stride) * J + (iw + pad) / stride;
  }
  // Elements per scratch row of C channels.
  int64_t row(int64_t C, int64_t stride) const { return C * stride * J; }
};

// The scratch row of input row ih of image n. A: any arguments struct with the input view's
// x, W, C, sN, sH, sW, its stride, J and xcol.
template <typename A, typename T>
void transpose_row(const A& a, int64_t n, int64_t ih, T* __restrict__ xs) {
  const int64_t s = a.stride;
  const T* xr = a.x + n * a.sN + ih * a.sH;
  for (int64_t iw = 0; iw < a.W; ++iw) {
    const T* __restrict__ px = xr + iw * a.sW;
    T* __restrict__ dst = xs + a.xcol[iw];
    for (int64_t c = 0; c < a.C; ++c) dst[c * s * a.J] = px[c];
  }
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
