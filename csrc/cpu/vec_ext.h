// One vector register of T as GCC's vector extension (direct_wgrad.cpp, direct_dgrad.cpp):
// arithmetic on it is plain C++, and small arrays of them stay in registers where their loops
// are fully unrolled (arrays of lanes under `omp simd` went to the stack in these kernels).
#pragma once

#include "row_copy.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using VecT = typename VecOf<T>::type;

template <typename T>
inline VecT<T> load(const T* p) {
  VecT<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, VecT<T> v) { __builtin_memcpy(p, &v, sizeof v); }
// The first n <= lanes elements at p, the rest zero (never reads past p + n): row_copy.h's
// masked load where the instruction set has one.
template <typename T>
inline VecT<T> load_first(const T* p, int64_t n) {
#if defined(__AVX2__) || defined(__AVX512F__)
  const typename Vec<T>::R v = Vec<T>::load_first(p, n);
  return reinterpret_cast<const VecT<T>&>(v);
#else
  T lanes[vec_width<T>()] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i] = p[i];
  return load(lanes);
#endif
}

// The first n <= lanes lanes of v into p (nothing written past p + n): row_copy.h's masked
// store where the instruction set has one.
template <typename T>
inline void store_first(T* p, VecT<T> v, int64_t n) {
#if defined(__AVX2__) || defined(__AVX512F__)
  Vec<T>::store_first(p, reinterpret_cast<typename Vec<T>::R&>(v), n);
#else
  T lanes[vec_width<T>()];
  store(lanes, v);
  for (int64_t i = 0; i < n; ++i) p[i] = lanes[i];
#endif
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
