// Launch plumbing shared by the CUDA kernels: error checks, device guard, launch plans, the
// thread -> (channel, pixel) mappings and block reductions.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "msdnet_ops/common.h"
#include "msdnet_ops/indexing.h"
#include "msdnet_ops/math.h"
#include "msdnet_ops/tensor_view.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

// ------------------------------------------------------------------ errors, devices

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("msdnet_ops CUDA: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// After every launch: a launch error (bad configuration, no kernel image for this GPU, ...)
// becomes an exception naming the kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("msdnet_ops CUDA kernel ") + kernel +
                             " failed to launch: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Makes `device` current for the scope of a launch and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device >= 0 && device != prev_) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

int sm_count(int device);  // runtime.cu (cached per device)

// ------------------------------------------------------------------ launch plans

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kTileC = 32;     // channels-inner: 32 channels x 8 pixel rows
constexpr int kRowsB = 8;
constexpr int kMinPerThread = 4;
constexpr int kMaxGridY = 65535;

// Two mappings of threads to elements, chosen from the strides of all views of a call:
//   planes (channels_inner = false): block (channel c, split y); its 256 threads stride over
//     the channel's N*H*W pixels, consecutive threads on consecutive pixels (coalesced when
//     sW == 1: NCHW buffers and their channel slices).
//   channels-inner (channels_inner = true, every view has sC == 1: channels_last): block
//     (32-channel tile, split y) of 32 x 8 threads; a warp reads 32 consecutive channels.
struct Plan {
  bool channels_inner;
  uint32_t P;  // pixels per channel (N*H*W)
  PixelIndexer ix;
  dim3 grid;
  dim3 block;
  int64_t splits;  // gridDim.y: number of partial results per channel (reductions)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Merges H and W of all views when every view allows it (in place).
inline void merge_views(View4* const* views, int k) {
  bool ok = true;
  for (int i = 0; i < k; ++i) ok = ok && hw_mergeable(*views[i]);
  if (ok)
    for (int i = 0; i < k; ++i) *views[i] = merge_hw(*views[i]);
}

inline bool choose_channels_inner(View4* const* views, int k) {
  bool unit_w = views[0]->W > 1;
  for (int i = 0; i < k; ++i) unit_w = unit_w && views[i]->sW == 1;
  if (unit_w) return false;
  bool unit_c = views[0]->C >= 8;
  for (int i = 0; i < k; ++i) unit_c = unit_c && views[i]->sC == 1;
  return unit_c;
}

// Splits per channel (tile): enough blocks to fill the GPU, each thread >= kMinPerThread
// pixels; reductions are capped at ~8 blocks per SM in total (bounded scratch).
inline int64_t plan_splits(bool channels_inner, int64_t P, int64_t grid_x, bool reduction,
                           int sms) {
  const int64_t rows = channels_inner ? kRowsB : kThreads;
  int64_t s = ceil_div(P, rows * kMinPerThread);
  if (reduction) s = std::min<int64_t>(s, std::max<int64_t>(1, ceil_div(8LL * sms, grid_x)));
  return std::max<int64_t>(1, std::min<int64_t>(s, kMaxGridY));
}

inline Plan make_plan(const char* op, View4* const* views, int k, bool reduction, int device,
                      int64_t max_splits = kMaxGridY) {
  merge_views(views, k);
  const View4& v = *views[0];
  const int64_t P = v.N * v.H * v.W;
  if (P > int64_t(INT32_MAX) || v.C > int64_t(INT32_MAX))
    throw std::invalid_argument(std::string("msdnet_ops CUDA ") + op +
                                ": more than 2^31-1 pixels per channel or channels");
  Plan p;
  p.channels_inner = choose_channels_inner(views, k);
  p.P = static_cast<uint32_t>(P);
  p.ix = PixelIndexer(static_cast<uint32_t>(std::max<int64_t>(v.H, 1)),
                      static_cast<uint32_t>(std::max<int64_t>(v.W, 1)));
  const int64_t grid_x = p.channels_inner ? ceil_div(v.C, kTileC) : v.C;
  const int sms = reduction ? sm_count(device) : 1;
  p.splits = std::min(plan_splits(p.channels_inner, P, grid_x, reduction, sms), max_splits);
  p.splits = std::max<int64_t>(p.splits, 1);
  p.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(p.splits), 1);
  p.block = p.channels_inner ? dim3(kTileC, kRowsB, 1) : dim3(kThreads, 1, 1);
  return p;
}

// ------------------------------------------------------------------ device-side mappings

// This thread's channel, first pixel and pixel step under the plan's mapping. Returns false
// for threads past the last channel (channels-inner tiles).
template <bool CI>
__device__ __forceinline__ bool thread_work(int64_t C, int64_t& c, uint32_t& q0, uint32_t& step) {
  if constexpr (CI) {
    c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
    q0 = blockIdx.y * kRowsB + threadIdx.y;
    step = gridDim.y * kRowsB;
  } else {
    c = blockIdx.x;
    q0 = blockIdx.y * kThreads + threadIdx.x;
    step = gridDim.y * kThreads;
  }
  return c < C;
}

template <typename Acc>
__device__ __forceinline__ Welford<Acc> shfl_down_welford(const Welford<Acc>& s, int offset) {
  Welford<Acc> o;
  o.n = __shfl_down_sync(0xffffffffu, s.n, offset);
  o.mean = __shfl_down_sync(0xffffffffu, s.mean, offset);
  o.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
  return o;
}

// Merges the statistics of a block's threads in a fixed order (deterministic). Result valid in
// thread 0 (planes) or in the threads with threadIdx.y == 0 (channels-inner, one per channel).
template <bool CI, typename Acc>
__device__ __forceinline__ Welford<Acc> block_merge(Welford<Acc> s) {
  if constexpr (CI) {
    __shared__ Welford<Acc> sh[kRowsB][kTileC];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0)
      for (int r = 1; r < kRowsB; ++r) s = welford_merge(s, sh[r][threadIdx.x]);
    return s;
  } else {
    for (int off = 16; off > 0; off >>= 1) s = welford_merge(s, shfl_down_welford(s, off));
    __shared__ Welford<Acc> warp[kThreads / 32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) warp[wid] = s;
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = 1; i < kThreads / 32; ++i) s = welford_merge(s, warp[i]);
    return s;
  }
}

// Same for a pair of sums.
template <bool CI, typename Acc>
__device__ __forceinline__ void block_sum2(Acc& a, Acc& b) {
  if constexpr (CI) {
    __shared__ Acc sa[kRowsB][kTileC];
    __shared__ Acc sb[kRowsB][kTileC];
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0)
      for (int r = 1; r < kRowsB; ++r) {
        a += sa[r][threadIdx.x];
        b += sb[r][threadIdx.x];
      }
  } else {
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
    __shared__ Acc wa[kThreads / 32];
    __shared__ Acc wb[kThreads / 32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) {
      wa[wid] = a;
      wb[wid] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = 1; i < kThreads / 32; ++i) {
        a += wa[i];
        b += wb[i];
      }
  }
}

// Whether this thread holds its block's result for channel c (see block_merge).
template <bool CI>
__device__ __forceinline__ bool block_result_thread() {
  if constexpr (CI) return threadIdx.y == 0;
  else return threadIdx.x == 0;
}

}  // namespace detail
}  // namespace cuda
}  // namespace msdnet_ops
