// dtype code -> element type for host launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "msdnet_ops/common.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the element type of a feature dtype code.
template <typename F>
void dispatch_float(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); return;
    case kFloat64: f(TypeTag<double>{}); return;
    case kFloat16: f(TypeTag<__half>{}); return;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    default:
      throw std::invalid_argument(std::string("msdnet_ops CUDA ") + op + ": unsupported dtype code " +
                                  std::to_string(dtype));
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace msdnet_ops
