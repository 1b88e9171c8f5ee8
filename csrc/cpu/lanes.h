// The channels-inner traversal (every view channels_last, sC == 1) on lanes.
//
// NHWC feature views have few channels (6, 12, 16, 24, 48 are typical): a loop over the C
// channels of one pixel would be mostly scalar remainder, and per-channel accumulators would
// live in memory. Instead, k consecutive pixels of a dense view (row stride C) form one stream
// of M = k*C elements, a "segment", and per-channel parameters are tiled to M lanes (lane i is
// channel i % C). M = lcm(C, block_lanes) is a multiple of the register block (4 vectors):
// reductions walk one block of lanes at a time through all segments of a unit, that block's
// parameters and accumulators held in registers (run); elementwise ops stream the segments in
// memory order, parameters read from L1 (each_segment: faster on large tensors).
// A strided view (a channel slice of a wider NHWC buffer, row stride > C) has no such streams:
// its rows are copied into a dense L1-sized scratch first, one masked vector per row
// (row_copy.h), and copied back when written, unless C is a whole number of vectors or at
// least two (the copies cost more than a partial vector per row): then M = C ("row mode",
// k = 1, also when lcm(C, block_lanes) > kMaxLanes): a segment is one pixel, nothing is
// copied, and a block that is not a whole number of vectors runs as whole vectors plus the rest.
//
// Work units are blocks of B pixels (a multiple of k, ~kLaneChunkBytes) along rows of pixels;
// N joins the rows when the strides allow it (dense NHWC tensors and channel slices of one),
// so small images still give full units. Units do not depend on the thread count.
#pragma once

#include <numeric>
#include <type_traits>

#include "row_copy.h"
#include "traversal.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

constexpr int64_t kMaxLanes = 1024;
// Bytes per work unit: the two passes of a statistic over 32 KB (8192 floats, twice the planes'
// kChunk: the per-unit folds and merges cost less; measured faster than 16 KB and 64 KB).
constexpr int64_t kLaneChunkBytes = 32 * 1024;

// Lanes per register block (4 vectors). Ops see a block's length as a compile-time constant
// when it is a whole number of vectors (Lanes<n>), so their loops unroll into whole vectors
// whose accumulators stay in registers; otherwise (partial segments) as a count.
template <typename T>
constexpr int64_t block_lanes() { return 4 * vec_width<T>(); }
template <int64_t N>
using Lanes = std::integral_constant<int64_t, N>;

// Calls f(Lanes<len>{}) for len = 1 to 4 whole vectors (else f(len)).
template <typename T, typename F>
void with_lanes(int64_t len, F&& f) {
  constexpr int64_t V = vec_width<T>();
  switch (len % V == 0 ? len / V : 0) {
    case 4: return f(Lanes<4 * V>{});
    case 3: return f(Lanes<3 * V>{});
    case 2: return f(Lanes<2 * V>{});
    case 1: return f(Lanes<V>{});
    default: return f(len);
  }
}

template <typename T>
struct LanePlan {
  int64_t C, M, k, B;  // channels, lanes per segment, pixels per segment, pixels per unit

  // For views prepared as Layout::kChannelsInner (traversal.h).
  LanePlan(View4* const* views, int n) : LanePlan(views[0]->C, any_strided(views, n)) {}

  // strided: some view's pixels are not C elements apart.
  LanePlan(int64_t C_, bool strided) : C(C_) {
    M = std::lcm(C, block_lanes<T>());
    if (M > kMaxLanes || (strided && (C % vec_width<T>() == 0 || C >= 2 * vec_width<T>()))) M = C;
    k = M / C;
    B = k * std::max<int64_t>(1, kLaneChunkBytes / static_cast<int64_t>(sizeof(T)) / M);
  }
  bool row_mode() const { return k == 1; }

  // Its pixels are not C elements apart (a single pixel per row never is).
  static bool strided(const View4& v) { return v.W > 1 && v.sW != v.C; }
  static bool any_strided(View4* const* views, int n) {
    for (int i = 0; i < n; ++i)
      if (strided(*views[i])) return true;
    return false;
  }
};

// Unit u = (n, h, block of P pixels along W).
struct PixelBlocks {
  int64_t N, H, W, P, WB, U;
  PixelBlocks(int64_t N_, int64_t H_, int64_t W_, int64_t P_) : N(N_), H(H_), W(W_), P(P_) {
    WB = ceil_div(W, P);
    U = N * H * WB;
  }
  void range(int64_t u, int64_t& n, int64_t& h, int64_t& w0, int64_t& w1) const {
    n = u / (H * WB);
    const int64_t r = u % (H * WB);
    h = r / WB;
    w0 = (r % WB) * P;
    w1 = std::min(W, w0 + P);
  }
};

// lanes[j*C + c] = per_channel[c] for the k pixels j of a segment. (Plain loops here and in
// fold_lanes: std::copy would be a memmove call per pixel, per unit.)
template <typename T>
void tile_lanes(const T* __restrict__ per_channel, const LanePlan<T>& plan, T* __restrict__ lanes) {
  for (int64_t i = 0, c = 0; i < plan.M; ++i, c = c + 1 == plan.C ? 0 : c + 1) lanes[i] = per_channel[c];
}

// The same as a new vector (empty unless used: only the channels-inner traversal needs it).
template <typename T>
std::vector<T> tile_lanes(const std::vector<T>& per_channel, const LanePlan<T>& plan, bool used) {
  std::vector<T> out(used ? static_cast<size_t>(plan.M) : 0);
  if (used) tile_lanes(per_channel.data(), plan, out.data());
  return out;
}

// out[c] = sum over the k pixels of a segment of lanes[j*C + c], j in order.
template <typename T>
void fold_lanes(const T* __restrict__ lanes, const LanePlan<T>& plan, T* __restrict__ out) {
  for (int64_t c = 0; c < plan.C; ++c) out[c] = lanes[c];
  for (int64_t j = 1; j < plan.k; ++j) {
    const T* __restrict__ l = lanes + j * plan.C;
#pragma omp simd
    for (int64_t c = 0; c < plan.C; ++c) out[c] += l[c];
  }
}

// One thread's walk over units of K views: load(u) points at unit u (copying the rows of
// strided views it reads into scratch), each_segment() or run() hand out its segments or its
// blocks of lanes, store() copies the scratch rows of strided views it writes back.
template <typename T, int K>
class LaneWalk {
 public:
  LaneWalk(const LanePlan<T>& plan, const PixelBlocks& pb, const View4 (&v)[K]) : plan_(plan), pb_(pb) {
    for (int i = 0; i < K; ++i) {
      v_[i] = v[i];
      packed_[i] = !plan.row_mode() && LanePlan<T>::strided(v[i]);
      if (packed_[i]) scratch_[i].assign(static_cast<size_t>(plan.B * plan.C + vec_width<T>()), T(0));
    }
  }

  void load(int64_t u, unsigned reads) {
    int64_t n, h, w0, w1;
    pb_.range(u, n, h, w0, w1);
    npix_ = w1 - w0;
    for (int i = 0; i < K; ++i) {
      view_[i] = static_cast<T*>(v_[i].ptr) + pixel_offset(v_[i], n, h, w0);
      ptr_[i] = packed_[i] ? scratch_[i].data() : view_[i];
      step_[i] = plan_.row_mode() ? v_[i].sW : plan_.M;
      if (packed_[i] && (reads & (1u << i)))
        for (int64_t j = 0; j < npix_; ++j)
          row_to_scratch(ptr_[i] + j * plan_.C, view_[i] + j * v_[i].sW, plan_.C);
    }
  }

  // Calls f(p, len) for each segment of the unit in memory order: p[i] the segment in view i,
  // len its lanes (M, as Lanes<M> when M is at most one block of whole vectors; fewer for the
  // last, partial one). For elementwise ops: on large tensors streaming in memory order beats
  // register-resident parameters.
  template <typename F>
  void each_segment(F&& f) const {
    const int64_t full = npix_ / plan_.k, tail = (npix_ - full * plan_.k) * plan_.C;
    auto segments = [&](auto len) {
      T* p[K];
      for (int64_t s = 0; s < full; ++s) {
        for (int i = 0; i < K; ++i) p[i] = ptr_[i] + s * step_[i];
        f(p, len);
      }
    };
    if (plan_.M <= block_lanes<T>() && plan_.M % vec_width<T>() == 0)
      with_lanes<T>(plan_.M, segments);
    else
      segments(plan_.M);
    if (tail > 0) {
      T* p[K];
      for (int i = 0; i < K; ++i) p[i] = ptr_[i] + full * step_[i];
      f(p, tail);
    }
  }

  // Runs op over the unit one block of lanes at a time: op(p, step, nseg, l0, len), with p[i]
  // lane l0 of the first segment in view i, step[i] the distance between segments, nseg
  // segments of len lanes (Lanes<n> or a count, see with_lanes), then the same for the part
  // of the block in the unit's last, partial segment.
  template <typename Op>
  void run(const Op& op) const {
    const int64_t full = npix_ / plan_.k, tail = (npix_ - full * plan_.k) * plan_.C;
    constexpr int64_t L = block_lanes<T>();
    for (int64_t l0 = 0; l0 < plan_.M; l0 += L) {
      T* p[K];
      for (int i = 0; i < K; ++i) p[i] = ptr_[i] + l0;
      const int64_t len = std::min(L, plan_.M - l0), whole = len - len % vec_width<T>();
      if (whole > 0) with_lanes<T>(whole, [&](auto n) { op(p, step_, full, l0, n); });
      if (whole < len) {
        T* q[K];
        for (int i = 0; i < K; ++i) q[i] = p[i] + whole;
        op(q, step_, full, l0 + whole, len - whole);
      }
      if (tail > l0) {
        for (int i = 0; i < K; ++i) p[i] += full * step_[i];
        op(p, step_, int64_t(1), l0, std::min(L, tail - l0));
      }
    }
  }

  void store(unsigned writes) const {
    for (int i = 0; i < K; ++i)
      if (packed_[i] && (writes & (1u << i)))
        for (int64_t j = 0; j < npix_; ++j)
          row_from_scratch(view_[i] + j * v_[i].sW, ptr_[i] + j * plan_.C, plan_.C);
  }

  int64_t pixels() const { return npix_; }

 private:
  const LanePlan<T>& plan_;
  const PixelBlocks& pb_;
  View4 v_[K];
  bool packed_[K];
  std::vector<T> scratch_[K];
  T* view_[K];
  T* ptr_[K];
  int64_t step_[K];
  int64_t npix_ = 0;
};

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
