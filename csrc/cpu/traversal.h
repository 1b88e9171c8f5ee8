// Traversals of the feature views, chosen from the strides of all views a call touches (after
// merging H and W where every view allows it):
//   planes          every view has sW == 1 (NCHW buffers and their channel slices): each
//                   (n, c) plane is walked row by row with a unit-stride, vectorized inner
//                   loop. Work units: (plane, chunk of ~4096 elements).
//   channels-inner  every view has sC == 1 (channels_last, NHWC buffers and their channel
//                   slices): vector loops over "lanes", runs of pixels with per-channel
//                   parameters tiled along them (lanes.h). Work units: blocks of ~4096/C pixels.
//   tiled           anything else (mixed layouts, e.g. a channels_last x with an NCHW
//                   gradient): tiles of 16 channels x 64 pixels, so both layouts stay in cache.
// Reductions are deterministic and independent of the thread count: partial results belong to
// work units, or to a fixed partition of the units into at most kGroups groups, and are merged
// in a fixed order.
#pragma once

#include "common.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

constexpr int64_t kTileW = 64, kTileC = 16;

enum class Layout { kPlanes, kChannelsInner, kTiled };

// Puts N into the pixel rows where every view allows it (sN == H * sH), then H into W again.
inline void merge_batch(View4* const* views, int k) {
  for (int i = 0; i < k; ++i)
    if (views[i]->N != 1 && views[i]->sN != views[i]->H * views[i]->sH) return;
  bool mergeable = true;
  for (int i = 0; i < k; ++i) {
    View4& v = *views[i];  // row n*H + h starts at (n*H + h) * sH
    v.H *= v.N;
    v.N = 1;
    v.sN = v.H * v.sH;
    mergeable = mergeable && hw_mergeable(v);
  }
  if (mergeable)
    for (int i = 0; i < k; ++i) *views[i] = merge_hw(*views[i]);
}

// Merges H and W of every view when all allow it, then picks the traversal (channels-inner:
// with N merged into the rows too where possible).
inline Layout prepare(View4* const* views, int k) {
  bool mergeable = true;
  for (int i = 0; i < k; ++i) mergeable = mergeable && hw_mergeable(*views[i]);
  if (mergeable)
    for (int i = 0; i < k; ++i) *views[i] = merge_hw(*views[i]);
  const View4& v0 = *views[0];
  bool unit_w = v0.W > 1;
  for (int i = 0; i < k; ++i) unit_w = unit_w && views[i]->sW == 1;
  if (unit_w) return Layout::kPlanes;
  bool unit_c = v0.C > 1;
  for (int i = 0; i < k; ++i) unit_c = unit_c && views[i]->sC == 1;
  if (unit_c) {
    merge_batch(views, k);
    return Layout::kChannelsInner;
  }
  bool trivial_w = v0.W == 1;  // one pixel per row (after merging): planes of single elements
  return trivial_w && k == 1 ? Layout::kPlanes : Layout::kTiled;
}

inline bool all_unit_w(View4* const* views, int k) {
  for (int i = 0; i < k; ++i)
    if (views[i]->sW != 1 && views[i]->W > 1) return false;
  return true;
}

// Planes traversal: plane (n, c) split into K chunks of whole rows (or row pieces when a row
// is longer than kChunk). Unit u = (n * C + c) * K + k.
struct Chunking {
  int64_t H, W, rows_per, w_per, w_blocks, K;
  Chunking(int64_t H_, int64_t W_) : H(H_), W(W_) {
    if (W >= kChunk) {
      w_per = kChunk;
      w_blocks = ceil_div(W, kChunk);
      rows_per = 1;
      K = H * w_blocks;
    } else {
      w_per = W;
      w_blocks = 1;
      rows_per = std::max<int64_t>(1, kChunk / std::max<int64_t>(W, 1));
      K = ceil_div(H, rows_per);
    }
  }
  void range(int64_t k, int64_t& h0, int64_t& h1, int64_t& w0, int64_t& w1) const {
    h0 = (k / w_blocks) * rows_per;
    h1 = std::min(H, h0 + rows_per);
    w0 = (k % w_blocks) * w_per;
    w1 = std::min(W, w0 + w_per);
  }
};

// Tiled traversal: unit u = (row n*H+h, block of kTileW pixels, block of kTileC channels).
struct Tiles {
  int64_t H, W, C, WB, CB, U;
  Tiles(int64_t N, int64_t H_, int64_t W_, int64_t C_) : H(H_), W(W_), C(C_) {
    WB = ceil_div(W, kTileW);
    CB = ceil_div(C, kTileC);
    U = N * H * WB * CB;
  }
  void range(int64_t u, int64_t& n, int64_t& h, int64_t& w0, int64_t& w1, int64_t& c0,
             int64_t& c1) const {
    const int64_t cb = u % CB, rest = u / CB, wb = rest % WB, row = rest / WB;
    n = row / H;
    h = row % H;
    w0 = wb * kTileW;
    w1 = std::min(W, w0 + kTileW);
    c0 = cb * kTileC;
    c1 = std::min(C, c0 + kTileC);
  }
};

// Tiles are copied through a small [kTileC][kTileW] buffer, read and written in each view's
// own fast order, so the arithmetic runs on unit-stride rows whatever the layouts.
template <typename T>
void tile_load(const View4& v, int64_t n, int64_t h, int64_t w0, int64_t w1, int64_t c0,
               int64_t c1, T* __restrict__ buf) {
  const T* base = static_cast<const T*>(v.ptr) + elem_offset(v, n, c0, h, w0);
  const int64_t nc = c1 - c0, nw = w1 - w0;
  if (v.sC == 1 && nc == kTileC) {  // full channels_last tile: fixed-size transposes
    for (int64_t w = 0; w < nw; ++w) {
      const T* __restrict__ px = base + w * v.sW;
#pragma omp simd
      for (int64_t c = 0; c < kTileC; ++c) buf[c * kTileW + w] = px[c];
    }
  } else if (v.sC < v.sW && v.sC > 0) {
    for (int64_t w = 0; w < nw; ++w)
      for (int64_t c = 0; c < nc; ++c) buf[c * kTileW + w] = base[w * v.sW + c * v.sC];
  } else {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t w = 0; w < nw; ++w) buf[c * kTileW + w] = base[w * v.sW + c * v.sC];
  }
}

template <typename T>
void tile_store(const View4& v, int64_t n, int64_t h, int64_t w0, int64_t w1, int64_t c0,
                int64_t c1, const T* __restrict__ buf) {
  T* base = static_cast<T*>(v.ptr) + elem_offset(v, n, c0, h, w0);
  const int64_t nc = c1 - c0, nw = w1 - w0;
  if (v.sC == 1 && nc == kTileC) {
    for (int64_t w = 0; w < nw; ++w) {
      T* __restrict__ px = base + w * v.sW;
#pragma omp simd
      for (int64_t c = 0; c < kTileC; ++c) px[c] = buf[c * kTileW + w];
    }
  } else if (v.sC < v.sW && v.sC > 0) {
    for (int64_t w = 0; w < nw; ++w)
      for (int64_t c = 0; c < nc; ++c) base[w * v.sW + c * v.sC] = buf[c * kTileW + w];
  } else {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t w = 0; w < nw; ++w) base[w * v.sW + c * v.sC] = buf[c * kTileW + w];
  }
}

// A fixed partition of U units into G contiguous groups.
struct Groups {
  int64_t U, G;
  explicit Groups(int64_t U_) : U(U_), G(std::max<int64_t>(1, std::min(U_, kGroups))) {}
  int64_t begin(int64_t g) const { return g * U / G; }
  int64_t end(int64_t g) const { return (g + 1) * U / G; }
};

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
