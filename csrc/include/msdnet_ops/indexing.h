// Index arithmetic shared by the CPU and CUDA kernels.
#pragma once

#include "msdnet_ops/common.h"

namespace msdnet_ops {

MSDNET_HDI uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Division by a runtime-constant divisor d >= 1 with a multiply-high and a shift
// (Granlund-Montgomery, round-up variant with an N+1-bit multiplier); exact for every
// 32-bit dividend.
struct FastDivmod {
  uint32_t divisor;
  uint32_t multiplier;
  uint32_t shift;

  MSDNET_HD FastDivmod() : divisor(1), multiplier(1), shift(0) {}

  MSDNET_HD explicit FastDivmod(uint32_t d) : divisor(d), multiplier(1), shift(0) {
    if (d == 0) d = divisor = 1;
    while ((uint64_t(1) << shift) < d) ++shift;  // ceil(log2(d))
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  MSDNET_HDI uint32_t div(uint32_t x) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(umulhi32(x, multiplier)) + x) >> shift);
  }

  MSDNET_HDI void divmod(uint32_t x, uint32_t& q, uint32_t& r) const {
    q = div(x);
    r = x - q * divisor;
  }
};

// Maps a flat pixel index q in [0, N*H*W) of one channel to (n, h, w).
struct PixelIndexer {
  FastDivmod hw;  // divides by H*W
  FastDivmod w;   // divides by W

  MSDNET_HD PixelIndexer() {}
  MSDNET_HD PixelIndexer(uint32_t H, uint32_t W) : hw(H * W), w(W) {}

  MSDNET_HDI void operator()(uint32_t q, uint32_t& n, uint32_t& h, uint32_t& wi) const {
    uint32_t r;
    hw.divmod(q, n, r);
    w.divmod(r, h, wi);
  }
};

}  // namespace msdnet_ops
