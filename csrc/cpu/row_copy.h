// Copies of one pixel row (n channels, n often below the vector width) between a strided view
// and a dense scratch buffer: whole vectors plus one masked vector (AVX-512, AVX2), so a row of
// 6 floats costs one load and one store instead of 6 scalar moves. The scratch side may be
// read or written up to the next multiple of the vector width (the caller keeps vec_width()
// elements of slack); the view side is touched exactly on its n elements.
// The loops of whole vectors end in an empty asm statement: without it GCC turns them into a
// call to memmove per row, which costs more than the row.
#pragma once

#include "common.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;  // SSE2 / NEON width: what the baseline variant's loops use
#endif

template <typename T>
constexpr int64_t vec_width() { return kVecBytes / static_cast<int>(sizeof(T)); }

inline void keep_loop() { asm volatile(""); }

// One vector register of T: whole loads and stores, and the first r < width lanes.
template <typename T>
struct Vec;

#if defined(__AVX512F__)
template <>
struct Vec<float> {
  using R = __m512;
  static __mmask16 first(int64_t r) { return static_cast<__mmask16>((1u << r) - 1); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R load_first(const float* p, int64_t r) { return _mm512_maskz_loadu_ps(first(r), p); }
  static void store_first(float* p, R v, int64_t r) { _mm512_mask_storeu_ps(p, first(r), v); }
};
template <>
struct Vec<double> {
  using R = __m512d;
  static __mmask8 first(int64_t r) { return static_cast<__mmask8>((1u << r) - 1); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static R load_first(const double* p, int64_t r) { return _mm512_maskz_loadu_pd(first(r), p); }
  static void store_first(double* p, R v, int64_t r) { _mm512_mask_storeu_pd(p, first(r), v); }
};
#elif defined(__AVX2__)
template <>
struct Vec<float> {
  using R = __m256;
  static __m256i first(int64_t r) {  // lanes j < r set
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R load_first(const float* p, int64_t r) { return _mm256_maskload_ps(p, first(r)); }
  static void store_first(float* p, R v, int64_t r) { _mm256_maskstore_ps(p, first(r), v); }
};
template <>
struct Vec<double> {
  using R = __m256d;
  static __m256i first(int64_t r) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(r), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R load_first(const double* p, int64_t r) { return _mm256_maskload_pd(p, first(r)); }
  static void store_first(double* p, R v, int64_t r) { _mm256_maskstore_pd(p, first(r), v); }
};
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
// dst[0, roundup(n)) = src[0, n) (lanes past n zero).
template <typename T>
void row_to_scratch(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  constexpr int64_t V = vec_width<T>();
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    Vec<T>::store(dst + i, Vec<T>::load(src + i));
    keep_loop();
  }
  if (i < n) Vec<T>::store(dst + i, Vec<T>::load_first(src + i, n - i));
}

// dst[0, n) = src[0, n) (src readable up to roundup(n)).
template <typename T>
void row_from_scratch(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  constexpr int64_t V = vec_width<T>();
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    Vec<T>::store(dst + i, Vec<T>::load(src + i));
    keep_loop();
  }
  if (i < n) Vec<T>::store_first(dst + i, Vec<T>::load(src + i), n - i);
}
#else
template <typename T>
void row_to_scratch(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
template <typename T>
void row_from_scratch(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
#endif

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
