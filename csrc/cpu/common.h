// Shared by the CPU kernel files, each compiled once per instruction set (baseline, AVX2,
// AVX-512) into namespace MSDNET_CPU_ISA; dispatch.cpp picks one at run time. Everything here
// lives in that namespace, so the variants never share (and the linker never merges) a helper
// compiled for another instruction set.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "msdnet_ops/cpu_kernels.h"
#include "msdnet_ops/math.h"

#ifndef MSDNET_CPU_ISA
#error "compile with -DMSDNET_CPU_ISA=isa_<name>"
#endif

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

constexpr int64_t kChunk = 4096;           // elements per work unit / statistics chunk (L1-sized)
constexpr int64_t kSerialBelow = 1 << 15;  // fewer elements than this: no thread team
constexpr int64_t kGroups = 64;            // reduction groups (fixed: results do not depend on threads)

inline int team_size(int64_t work, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  if (work < kSerialBelow || num_threads < 1) return 1;
  return num_threads;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
std::vector<T> load_vec(const VecView& v, int64_t C) {
  std::vector<T> out(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) out[c] = vec_get<T>(v, c);
  return out;
}

template <typename T>
T* at(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  return static_cast<T*>(v.ptr) + elem_offset(v, n, c, h, w);
}

[[noreturn]] inline void bad_dtype(const char* op, int dtype) {
  throw std::invalid_argument(std::string("msdnet_ops CPU kernel ") + op +
                              ": unsupported dtype " + dtype_name(dtype) +
                              " (the CPU kernels run float32 and float64)");
}

// Calls f(T{}) with the element type of a feature dtype code (float32, float64).
template <typename F>
void dispatch_float(int dtype, const char* op, F&& f) {
  if (dtype == kFloat32) return f(float{});
  if (dtype == kFloat64) return f(double{});
  bad_dtype(op, dtype);
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
