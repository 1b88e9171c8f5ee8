// affine_relu: out = relu(scale*x + shift), per channel.
#include "elementwise.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

template <typename T>
struct AffineReluOp {
  static constexpr int kReads = 1, kWrites = 2;  // reads x; writes out
  const T* s;   // per channel
  const T* b;
  const T* sl;  // per lane (channels-inner)
  const T* bl;
  // v = {x, out}
  template <bool UNIT>
  void run(int64_t c, T* const* r, int64_t len, const View4 (&v)[2]) const {
    const T* __restrict__ xr = r[0];
    T* __restrict__ orow = r[1];
    const T sc = s[c], bc = b[c];
    const int64_t sx = v[0].sW, so = v[1].sW;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      orow[UNIT ? i : i * so] = affine_relu_value(xr[UNIT ? i : i * sx], sc, bc);
  }
  template <typename Len>
  void lanes(T* const* p, Len len) const {
    const T* __restrict__ px = p[0];
    T* __restrict__ po = p[1];
    const T* __restrict__ ps = sl;
    const T* __restrict__ pb = bl;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) po[i] = affine_relu_value(px[i], ps[i], pb[i]);
  }
};

template <typename T>
void affine_relu_t(View4 x, VecView scale, VecView shift, View4 out, int num_threads) {
  const int64_t C = x.C;
  if (C == 0 || pixels(x) == 0) return;
  const std::vector<T> s = load_vec<T>(scale, C), b = load_vec<T>(shift, C);
  View4 v[2] = {x, out};
  View4* views[] = {&v[0], &v[1]};
  const Layout layout = prepare(views, 2);
  const int team = team_size(x.N * C * x.H * x.W, num_threads);
  const LanePlan<T> plan(views, 2);
  const bool ci = layout == Layout::kChannelsInner;
  const std::vector<T> sl = tile_lanes(s, plan, ci), bl = tile_lanes(b, plan, ci);
  elementwise<T>(v, layout, plan, team, AffineReluOp<T>{s.data(), b.data(), sl.data(), bl.data()});
}

}  // namespace

void affine_relu(int dtype, const View4& x, VecView scale, VecView shift, const View4& out,
                 int num_threads) {
  dispatch_float(dtype, "affine_relu", [&](auto t) {
    affine_relu_t<decltype(t)>(x, scale, shift, out, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
