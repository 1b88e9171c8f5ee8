// Shared by the CPU (plain C++) and CUDA builds: host-device qualifiers and dtype codes.
// No torch headers anywhere under csrc/ (see DESIGN.md, "Build").
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSDNET_HD __host__ __device__
#define MSDNET_HDI __host__ __device__ __forceinline__
#else
#define MSDNET_HD
#define MSDNET_HDI inline __attribute__((always_inline))
#endif

namespace msdnet_ops {

// dtype codes passed from Python (msdnet_ops/kernels/_common.py mirrors them).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown dtype";
  }
}

}  // namespace msdnet_ops
