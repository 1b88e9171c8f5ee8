// Strided views the kernels read and write: sizes and strides in elements, never copies.
#pragma once

#include "msdnet_ops/common.h"

namespace msdnet_ops {

// An NCHW tensor view: data pointer (first element), sizes, strides (elements).
struct View4 {
  void* ptr;
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;
};

// A per-channel vector [C] (mean, invstd, scale, shift and their gradients): pointer, stride.
struct VecView {
  void* ptr;
  int64_t stride;
};

template <typename T>
MSDNET_HDI T vec_get(const VecView& v, int64_t c) {
  return static_cast<const T*>(v.ptr)[c * v.stride];
}

template <typename T>
MSDNET_HDI T& vec_ref(const VecView& v, int64_t c) {
  return static_cast<T*>(v.ptr)[c * v.stride];
}

// A matrix of rows with unit column stride (a 1x1 convolution's view of NHWC pixels): pointer,
// rows, columns, row stride (elements).
struct PointwiseRows {
  void* ptr;
  int64_t rows, cols, ld;
};

// Element offset of (n, c, h, w) in a view.
MSDNET_HDI int64_t elem_offset(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * v.sN + c * v.sC + h * v.sH + w * v.sW;
}

// Offset of pixel (n, h, w) of channel 0 (add c * sC for channel c).
MSDNET_HDI int64_t pixel_offset(const View4& v, int64_t n, int64_t h, int64_t w) {
  return n * v.sN + h * v.sH + w * v.sW;
}

// H and W can be walked as one dimension of size H*W (stride sW).
MSDNET_HDI bool hw_mergeable(const View4& v) {
  return v.H == 1 || v.W == 1 || v.sH == v.W * v.sW;
}

// The same view with H and W merged into W (H = 1); requires hw_mergeable(v).
MSDNET_HDI View4 merge_hw(View4 v) {
  if (v.H != 1 && v.W == 1) v.sW = v.sH;
  v.W = v.H * v.W;
  v.H = 1;
  v.sH = v.W * v.sW;
  return v;
}

// Pixels per channel (the reduction size of a per-channel statistic).
MSDNET_HDI int64_t pixels(const View4& v) { return v.N * v.H * v.W; }

}  // namespace msdnet_ops
