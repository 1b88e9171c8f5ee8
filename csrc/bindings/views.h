// Python -> kernel argument conversion shared by the two modules. Python passes a feature view
// as the 9-tuple (data_ptr, N, C, H, W, sN, sC, sH, sW) and a per-channel vector as the
// 2-tuple (data_ptr, stride); no torch types cross this boundary.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "msdnet_ops/tensor_view.h"

namespace msdnet_ops {
namespace bindings {

using ViewArg = std::array<int64_t, 9>;
using VecArg = std::array<int64_t, 2>;

inline View4 to_view(const ViewArg& a, const char* name) {
  for (int i = 1; i < 5; ++i)
    if (a[i] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  View4 v;
  v.ptr = reinterpret_cast<void*>(static_cast<uintptr_t>(a[0]));
  v.N = a[1]; v.C = a[2]; v.H = a[3]; v.W = a[4];
  v.sN = a[5]; v.sC = a[6]; v.sH = a[7]; v.sW = a[8];
  return v;
}

// A row matrix as (data_ptr, rows, cols, row stride).
using RowsArg = std::array<int64_t, 4>;

inline PointwiseRows to_rows(const RowsArg& a, const char* name) {
  if (a[1] < 0 || a[2] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  PointwiseRows r;
  r.ptr = reinterpret_cast<void*>(static_cast<uintptr_t>(a[0]));
  r.rows = a[1]; r.cols = a[2]; r.ld = a[3];
  return r;
}

// A data pointer passed as an integer (0: none).
inline void* to_ptr(int64_t p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

inline VecView to_vec(const VecArg& a) {
  VecView v;
  v.ptr = reinterpret_cast<void*>(static_cast<uintptr_t>(a[0]));
  v.stride = a[1];
  return v;
}

}  // namespace bindings
}  // namespace msdnet_ops
