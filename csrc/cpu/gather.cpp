// gather_batch: out[i] = src[index[i]], bit copies of 1, 2, 4 or 8-byte elements.
#include <cstring>
#include <utility>

#include "common.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

// The [C, H, W] block of one sample is dense (a permutation of a contiguous block).
bool sample_block_dense(const View4& v) {
  std::pair<int64_t, int64_t> dims[3] = {{v.sC, v.C}, {v.sH, v.H}, {v.sW, v.W}};  // (stride, size)
  std::sort(dims, dims + 3);
  int64_t expected = 1;
  for (const auto& d : dims) {
    if (d.second == 1) continue;
    if (d.first != expected) return false;
    expected *= d.second;
  }
  return true;
}

bool same_sample_layout(const View4& a, const View4& b) {
  return (a.C == 1 || a.sC == b.sC) && (a.H == 1 || a.sH == b.sH) && (a.W == 1 || a.sW == b.sW);
}

template <typename E>
void gather_t(View4 src, const int64_t* index, View4 out, int num_threads) {
  const int64_t M = out.N, C = out.C, per_sample = C * out.H * out.W;
  if (M == 0 || per_sample == 0) return;
  const int team = team_size(M * per_sample, num_threads);
  const E* s = static_cast<const E*>(src.ptr);
  E* o = static_cast<E*>(out.ptr);
  if (sample_block_dense(src) && sample_block_dense(out) && same_sample_layout(src, out)) {
    // Both blocks start at their lowest address (non-negative strides): one memcpy per sample.
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && M > 1)
    for (int64_t i = 0; i < M; ++i)
      std::memcpy(o + i * out.sN, s + index[i] * src.sN, static_cast<size_t>(per_sample) * sizeof(E));
    return;
  }
  if (hw_mergeable(src) && hw_mergeable(out)) {
    src = merge_hw(src);
    out = merge_hw(out);
  }
  const bool channels_inner = (src.W == 1 || src.sW != 1 || out.sW != 1) && C > 1 &&
                              src.sC == 1 && out.sC == 1;
  if (channels_inner) {
    const int64_t H = out.H, W = out.W;
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t r = 0; r < M * H; ++r) {
      const int64_t i = r / H, h = r % H;
      const E* srow = s + index[i] * src.sN + h * src.sH;
      E* orow = o + i * out.sN + h * out.sH;
      for (int64_t w = 0; w < W; ++w)
        std::memcpy(orow + w * out.sW, srow + w * src.sW, static_cast<size_t>(C) * sizeof(E));
    }
    return;
  }
  const int64_t H = out.H, W = out.W;
  const bool unit = (W == 1) || (src.sW == 1 && out.sW == 1);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (int64_t p = 0; p < M * C; ++p) {
    const int64_t i = p / C, c = p % C;
    const E* splane = s + index[i] * src.sN + c * src.sC;
    E* oplane = o + i * out.sN + c * out.sC;
    for (int64_t h = 0; h < H; ++h) {
      const E* sr = splane + h * src.sH;
      E* orow = oplane + h * out.sH;
      if (unit) {
        std::memcpy(orow, sr, static_cast<size_t>(W) * sizeof(E));
      } else {
        for (int64_t w = 0; w < W; ++w) orow[w * out.sW] = sr[w * src.sW];
      }
    }
  }
}

}  // namespace

void gather_batch(int element_size, const View4& src, const int64_t* index, const View4& out,
                  int num_threads) {
  switch (element_size) {
    case 1: return gather_t<uint8_t>(src, index, out, num_threads);
    case 2: return gather_t<uint16_t>(src, index, out, num_threads);
    case 4: return gather_t<uint32_t>(src, index, out, num_threads);
    case 8: return gather_t<uint64_t>(src, index, out, num_threads);
    default:
      throw std::invalid_argument("msdnet_ops CPU kernel gather_batch: element size " +
                                  std::to_string(element_size) + " (expected 1, 2, 4 or 8)");
  }
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
