// CUDA implementations of the fastres ops (docs/DESIGN.md).
//
// Structure (per op, all on the current stream, no host syncs, no atomics):
//   reductions  : a "partials" kernel (one partial per block, fixed block-level
//                 tree in shared memory), then a "finalize" kernel (one warp per
//                 channel: lane-strided fixed-order merge + fixed shuffle tree),
//                 which also computes the per-channel coefficients of the
//                 element-wise pass. The partition depends only on the shape, so
//                 results are bitwise reproducible run to run.
//   statistics  : per-thread Welford, Chan merges (block tree in acc dtype,
//                 finalize in double).
//   element-wise: one fused sweep (normalize + residual + ReLU, or the dx pass).
// Layouts: NCHW ([N][C][HW]) and "rows" ([N*HW][C]: channels_last, or HW == 1),
// both handled natively. Offsets are int64.
//
// Tests: compiled with -DFASTRES_CUDA_EMULATION (emulation_main.cpp) this file
// builds for the host against emulation.h and registers the same ops as
// torch.ops.fastres_cuda_emu.* on CPU tensors (tests/test_cuda_emulation.py).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(FASTRES_CUDA_EMULATION)
#include "emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define FASTRES_LAUNCH(kernel, grid, block, stream, ...)   \
  do {                                                     \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                        \
  } while (0)
#define FASTRES_CURRENT_STREAM() (at::cuda::getCurrentCUDAStream().stream())
#define FASTRES_DEVICE_GUARD(x) c10::cuda::CUDAGuard fastres_device_guard((x).device())
#define FASTRES_CHECK_DEVICE(x, op) TORCH_CHECK((x).is_cuda(), "fastres::", op, ": expected a CUDA tensor")
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../op_prep.h"
#include "../schemas.h"

namespace fastres::cuda_impl {
namespace {

using at::Tensor;
using std::optional;

constexpr int kThreads = 256;           // threads per block (power of two)
constexpr int64_t kTargetBlocks = 1024;  // reduction blocks aimed at (fixed: numerics depend on it)
constexpr int kFinalizeWarps = 4;        // channels per finalize block

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_at_least(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < v && p < hi) p <<= 1;
  return p;
}


// Balanced split of [0, n) into k parts: start of part i (no overflow).
__host__ __device__ inline int64_t split_start(int64_t n, int64_t k, int64_t i) {
  const int64_t q = n / k, r = n % k;
  return i * q + (i < r ? i : r);
}

// ---------------------------------------------------------------------------
// Reduction plan: grid/block of the partials kernel and the partial count J per
// channel. Partial of block (channel c, part j) is stored at [c * J + j].
struct ReducePlan {
  int tx = 1, ty = 1;
  int64_t J = 1, Jn = 1, Jh = 1;  // NCHW: J = Jn (batch parts) * Jh (spatial parts)
  dim3 grid, block;
};

ReducePlan make_reduce_plan(const Geom& g) {
  ReducePlan p;
  const int64_t M = g.M();
  if (!g.rows) {
    p.tx = pow2_at_least(g.HW, 32, kThreads);
    p.ty = kThreads / p.tx;
    int64_t want = std::max<int64_t>(1, ceil_div(kTargetBlocks, g.C));
    want = std::min(want, std::max<int64_t>(1, M / 2048));
    p.Jh = std::max<int64_t>(1, std::min(want, g.HW / (4 * p.tx)));
    p.Jn = std::max<int64_t>(1, std::min(ceil_div(want, p.Jh), ceil_div(g.N, p.ty)));
    p.J = p.Jn * p.Jh;
    TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(), "fastres: too many channels");
    p.grid = dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(p.J));
  } else {
    p.tx = pow2_at_least(g.C, 1, 32);
    p.ty = kThreads / p.tx;
    const int64_t gx = ceil_div(g.C, p.tx);
    TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "fastres: too many channels");
    int64_t J = std::max<int64_t>(1, ceil_div(kTargetBlocks, gx));
    J = std::min(J, std::max<int64_t>(1, M / (16 * p.ty)));
    p.J = std::min<int64_t>(J, 65535);
    p.Jn = p.J;
    p.Jh = 1;
    p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(p.J));
  }
  p.block = dim3(p.tx, p.ty);
  return p;
}

struct EwPlan {
  dim3 grid, block;
};

EwPlan make_ew_plan(const Geom& g) {
  EwPlan p;
  if (!g.rows) {
    const int tx = pow2_at_least(g.HW, 32, kThreads);
    const int ty = kThreads / tx;
    const int64_t gx = std::min<int64_t>(ceil_div(g.HW, tx), 1 << 16);
    const int64_t gy = std::min<int64_t>(ceil_div(g.N * g.C, ty), 65535);
    p.block = dim3(tx, ty);
    p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  } else {
    const int tx = pow2_at_least(g.C, 1, kThreads);
    const int ty = kThreads / tx;
    const int64_t gx = ceil_div(g.C, tx);
    TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "fastres: too many channels");
    const int64_t gy = std::min<int64_t>(ceil_div(g.M(), ty), 65535);
    p.block = dim3(tx, ty);
    p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  }
  return p;
}

// ---------------------------------------------------------------------------
// Device helpers.
template <typename A>
__device__ __forceinline__ A relu_d(A z) { return z < A(0) ? A(0) : z; }  // NaN passes

template <typename A>
__device__ __forceinline__ A mask_d(A gy, A y) { return (y <= A(0)) ? A(0) : gy; }  // threshold_backward

template <typename A>
__device__ __forceinline__ A sqrt_d(A v) {
  if constexpr (std::is_same_v<A, float>) return ::sqrtf(v);
  else return ::sqrt(v);
}

template <typename T, typename A>
__device__ __forceinline__ A ld(const T* p, int64_t i) { return static_cast<A>(p[i]); }

// Welford / Chan state, plus the plain sum: aten's mean is sum(x)/M, which is
// +-Inf for a channel holding +-Inf, where the Welford mean is NaN (inf - inf);
// the finalize falls back to sum/M when the merged mean is not finite.
template <typename A>
struct WelfordS {
  A n, mean, m2, sum;
};

template <typename A>
__device__ __forceinline__ void chan_merge(WelfordS<A>& a, const WelfordS<A>& b) {
  if (b.n == A(0)) return;
  if (a.n == A(0)) {
    a = b;
    return;
  }
  const A n = a.n + b.n;
  const A d = b.mean - a.mean;
  const A f = b.n / n;
  a.mean += d * f;
  a.m2 += b.m2 + d * d * a.n * f;
  a.n = n;
  a.sum += b.sum;
}

template <typename A>
struct Sum2S {
  A s1, s2;
};

// ---------------------------------------------------------------------------
// Reduction ops. Each provides: State, Ctx ctx(c), init(State&),
// push(State&, const Ctx&, int64_t idx), merge(State&, const State&),
// store(const State&, int64_t slot).

template <typename T>
struct StatsOp {
  using A = at::acc_type<T, true>;
  using State = WelfordS<A>;
  struct Ctx {};
  const T* x;
  A* pn;
  A* pm;
  A* pq;
  A* ps;
  __device__ Ctx ctx(int64_t) const { return {}; }
  __device__ void init(State& s) const { s.n = A(0); s.mean = A(0); s.m2 = A(0); s.sum = A(0); }
  __device__ void push(State& s, const Ctx&, int64_t i) const {
    const A v = ld<T, A>(x, i);
    s.sum += v;
    s.n += A(1);
    const A d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }
  __device__ void merge(State& a, const State& b) const { chan_merge(a, b); }
  __device__ void store(const State& s, int64_t slot) const {
    pn[slot] = s.n;
    pm[slot] = s.mean;
    pq[slot] = s.m2;
    ps[slot] = s.sum;
  }
};

// S1 = sum dz, S2 = sum dz * (x - center); dz = mask(gy, y) if RELU.
// GZ: store dz into gz; GX: store gx = dz * gscale[c] (affine backward).
template <typename T, bool RELU, bool GZ, bool GX>
struct DsumOp {
  using A = at::acc_type<T, true>;
  using State = Sum2S<A>;
  struct Ctx {
    A center, gscale;
  };
  const T* gy;
  const T* x;
  const T* y;
  T* gz;
  T* gx;
  const A* center;  // nullable: 0
  const A* gscale;  // nullable: 1 (only read when GX)
  A* p1;
  A* p2;
  __device__ Ctx ctx(int64_t c) const {
    Ctx k;
    k.center = center ? center[c] : A(0);
    k.gscale = (GX && gscale) ? gscale[c] : A(1);
    return k;
  }
  __device__ void init(State& s) const { s.s1 = A(0); s.s2 = A(0); }
  __device__ void push(State& s, const Ctx& k, int64_t i) const {
    A d = ld<T, A>(gy, i);
    if constexpr (RELU) d = mask_d(d, ld<T, A>(y, i));
    if constexpr (GZ) gz[i] = static_cast<T>(d);
    if constexpr (GX) gx[i] = static_cast<T>(d * k.gscale);
    s.s1 += d;
    s.s2 += d * (ld<T, A>(x, i) - k.center);
  }
  __device__ void merge(State& a, const State& b) const {
    a.s1 += b.s1;
    a.s2 += b.s2;
  }
  __device__ void store(const State& s, int64_t slot) const {
    p1[slot] = s.s1;
    p2[slot] = s.s2;
  }
};

// Block-level fixed tree over sm[0 .. count) with stride `stride` between the
// reduced entries (lane `base` of each row). All threads of the block call it.
template <class Op>
__device__ __forceinline__ void block_tree(const Op& op, typename Op::State* sm, int tid_red, int count,
                                           int stride, int base) {
  for (int s = count / 2; s > 0; s >>= 1) {
    if (tid_red < s) op.merge(sm[tid_red * stride + base], sm[(tid_red + s) * stride + base]);
    __syncthreads();
  }
}

// NCHW partials: block (c, j) reduces channel c over batch part jn and spatial
// part jh; all blockDim.x * blockDim.y threads are reduced together.
template <class Op>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(const Op op, int64_t N, int64_t C, int64_t HW, int64_t Jn, int64_t Jh) {
  using State = typename Op::State;
  __shared__ State sm[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t j = blockIdx.y;
  const int64_t jn = j / Jh, jh = j % Jh;
  const int64_t n0 = split_start(N, Jn, jn), n1 = split_start(N, Jn, jn + 1);
  const int64_t h0 = split_start(HW, Jh, jh), h1 = split_start(HW, Jh, jh + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const auto k = op.ctx(c);
  State s;
  op.init(s);
  for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
    const int64_t base = (n * C + c) * HW;
    for (int64_t hw = h0 + threadIdx.x; hw < h1; hw += blockDim.x) op.push(s, k, base + hw);
  }
  sm[tid] = s;
  __syncthreads();
  block_tree(op, sm, tid, blockDim.x * blockDim.y, 1, 0);
  if (tid == 0) op.store(sm[0], c * (Jn * Jh) + j);
}

// Rows partials: block (channel tile, row part j); thread (tx, ty) reduces
// channel tile*blockDim.x + tx over the rows ty, ty + blockDim.y, ... of part j.
template <class Op>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const Op op, int64_t M, int64_t C, int64_t J) {
  using State = typename Op::State;
  __shared__ State sm[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + tx;
  const int64_t j = blockIdx.y;
  const int64_t r0 = split_start(M, J, j), r1 = split_start(M, J, j + 1);
  State s;
  op.init(s);
  if (c < C) {
    const auto k = op.ctx(c);
    for (int64_t r = r0 + ty; r < r1; r += blockDim.y) op.push(s, k, r * C + c);
  }
  sm[ty * blockDim.x + tx] = s;
  __syncthreads();
  block_tree(op, sm, ty, blockDim.y, blockDim.x, tx);
  if (ty == 0 && c < C) op.store(sm[tx], c * J + j);
}

template <class Op>
void launch_reduce(const Op& op, const Geom& g, const ReducePlan& p, cudaStream_t stream) {
  if (!g.rows) {
    FASTRES_LAUNCH(reduce_nchw_kernel<Op>, p.grid, p.block, stream, op, g.N, g.C, g.HW, p.Jn, p.Jh);
  } else {
    FASTRES_LAUNCH(reduce_rows_kernel<Op>, p.grid, p.block, stream, op, g.M(), g.C, p.J);
  }
}

// ---------------------------------------------------------------------------
// Finalize kernels: one warp per channel; double precision merges.

using WelfordD = WelfordS<double>;  // the finalize merges in double (chan_merge<double>)

// mean/var of channel c from its J partials; writes mean, var and the
// element-wise coefficients scale = w * invstd, shift = b.
template <typename A>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
    stats_finalize_kernel(const A* pn, const A* pm, const A* pq, const A* ps, int64_t C, int64_t J, int64_t M,
                          const A* weight, const A* bias, double eps, A* mean_out, A* var_out,
                          A* scale_out, A* shift_out) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warp
  WelfordD s{0.0, 0.0, 0.0, 0.0};
  for (int64_t j = lane; j < J; j += 32) {
    const int64_t k = c * J + j;
    const WelfordD b{static_cast<double>(pn[k]), static_cast<double>(pm[k]), static_cast<double>(pq[k]),
                     static_cast<double>(ps[k])};
    chan_merge(s, b);
  }
  for (int off = 16; off > 0; off >>= 1) {
    WelfordD o;
    o.n = __shfl_down_sync(0xffffffffu, s.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, off);
    o.sum = __shfl_down_sync(0xffffffffu, s.sum, off);
    chan_merge(s, o);  // lanes >= 32 - off merge garbage; only lane 0 is used
  }
  if (lane == 0) {
    const double mean = isfinite(s.mean) ? s.mean : s.sum / static_cast<double>(M);
    const A m = static_cast<A>(mean);
    const A v = static_cast<A>(s.m2 / static_cast<double>(M));
    mean_out[c] = m;
    var_out[c] = v;
    const A invstd = A(1) / sqrt_d<A>(v + static_cast<A>(eps));
    scale_out[c] = invstd * (weight ? weight[c] : A(1));
    shift_out[c] = bias ? bias[c] : A(0);
  }
}

// MODE 0 (bn backward): gb = S1, gw = S2 * invstd, and the dx coefficients
//   ka = w*invstd, kb = -ka*invstd*gw/M, kd = -ka*gb/M.
// MODE 1 (affine backward): gshift = S1, gscale = S2 (into gb_out, gw_out).
template <typename A, int MODE>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
    sums_finalize_kernel(const A* p1, const A* p2, int64_t C, int64_t J, int64_t M, const A* weight,
                         const A* var, double eps, A* gw_out, A* gb_out, A* ka, A* kb, A* kd) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warp
  double s1 = 0.0, s2 = 0.0;
  for (int64_t j = lane; j < J; j += 32) {
    s1 += static_cast<double>(p1[c * J + j]);
    s2 += static_cast<double>(p2[c * J + j]);
  }
  for (int off = 16; off > 0; off >>= 1) {
    s1 += __shfl_down_sync(0xffffffffu, s1, off);
    s2 += __shfl_down_sync(0xffffffffu, s2, off);
  }
  if (lane == 0) {
    if constexpr (MODE == 0) {
      const A invstd_a = A(1) / sqrt_d<A>(var[c] + static_cast<A>(eps));
      const double invstd = static_cast<double>(invstd_a);
      const double gb = s1;
      const double gw = s2 * invstd;
      gb_out[c] = static_cast<A>(gb);
      gw_out[c] = static_cast<A>(gw);
      const double k = (weight ? static_cast<double>(weight[c]) : 1.0) * invstd;
      const double m = static_cast<double>(M);
      ka[c] = static_cast<A>(k);
      kb[c] = static_cast<A>(-k * invstd * gw / m);
      kd[c] = static_cast<A>(-k * gb / m);
    } else {
      gb_out[c] = static_cast<A>(s1);
      gw_out[c] = static_cast<A>(s2);
    }
  }
}

inline dim3 finalize_grid(int64_t C) {
  return dim3(static_cast<unsigned>(ceil_div(C, kFinalizeWarps)));
}

// ---------------------------------------------------------------------------
// Element-wise ops: Ctx ctx(c), apply(const Ctx&, int64_t idx).

template <typename T, bool RELU, bool RES>
struct AffineApplyOp {
  using A = at::acc_type<T, true>;
  struct Ctx {
    A center, scale, shift;
  };
  const T* x;
  const T* res;
  T* y;
  const A* center;  // nullable: 0
  const A* scale;   // nullable: 1
  const A* shift;   // nullable: 0
  __device__ Ctx ctx(int64_t c) const {
    return {center ? center[c] : A(0), scale ? scale[c] : A(1), shift ? shift[c] : A(0)};
  }
  __device__ void apply(const Ctx& k, int64_t i) const {
    A z = (ld<T, A>(x, i) - k.center) * k.scale + k.shift;
    if constexpr (RES) z += ld<T, A>(res, i);
    if constexpr (RELU) z = relu_d(z);
    y[i] = static_cast<T>(z);
  }
};

template <typename T, bool RELU, bool FROM_GZ>
struct BnBwdApplyOp {
  using A = at::acc_type<T, true>;
  struct Ctx {
    A center, ka, kb, kd;
  };
  const T* gy;
  const T* x;
  const T* y;
  const T* gz;
  T* gx;
  const A* center;
  const A* ka;
  const A* kb;
  const A* kd;
  __device__ Ctx ctx(int64_t c) const { return {center[c], ka[c], kb[c], kd[c]}; }
  __device__ void apply(const Ctx& k, int64_t i) const {
    A d;
    if constexpr (FROM_GZ) {
      d = ld<T, A>(gz, i);
    } else {
      d = ld<T, A>(gy, i);
      if constexpr (RELU) d = mask_d(d, ld<T, A>(y, i));
    }
    gx[i] = static_cast<T>(k.ka * d + (k.kb * (ld<T, A>(x, i) - k.center) + k.kd));
  }
};

template <typename T, bool RELU, bool GZ>
struct AffineBwdOp {
  using A = at::acc_type<T, true>;
  struct Ctx {
    A scale;
  };
  const T* gy;
  const T* y;
  T* gx;
  T* gz;
  const A* scale;  // nullable: 1
  __device__ Ctx ctx(int64_t c) const { return {scale ? scale[c] : A(1)}; }
  __device__ void apply(const Ctx& k, int64_t i) const {
    A d = ld<T, A>(gy, i);
    if constexpr (RELU) d = mask_d(d, ld<T, A>(y, i));
    if constexpr (GZ) gz[i] = static_cast<T>(d);
    gx[i] = static_cast<T>(d * k.scale);
  }
};

template <class Op>
__global__ void __launch_bounds__(kThreads) ew_nchw_kernel(const Op op, int64_t NC, int64_t C, int64_t HW) {
  const int64_t pstride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t hstride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t h_first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t plane = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; plane < NC;
       plane += pstride) {
    if (h_first >= HW) continue;
    const auto k = op.ctx(plane % C);
    const int64_t base = plane * HW;
    for (int64_t hw = h_first; hw < HW; hw += hstride) op.apply(k, base + hw);
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads) ew_rows_kernel(const Op op, int64_t M, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;  // no block-level synchronization in this kernel
  const auto k = op.ctx(c);
  const int64_t rstride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += rstride)
    op.apply(k, r * C + c);
}

template <class Op>
void launch_ew(const Op& op, const Geom& g, cudaStream_t stream) {
  const EwPlan p = make_ew_plan(g);
  if (!g.rows) {
    FASTRES_LAUNCH(ew_nchw_kernel<Op>, p.grid, p.block, stream, op, g.N * g.C, g.C, g.HW);
  } else {
    FASTRES_LAUNCH(ew_rows_kernel<Op>, p.grid, p.block, stream, op, g.M(), g.C);
  }
}

// Compile-time dispatch of runtime bools.
template <typename F>
void with_bool(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

template <typename T>
const T* cptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

void check_cuda(const Tensor& x, const char* op) {
  check_x(x, op);
  FASTRES_CHECK_DEVICE(x, op);
}

// ---------------------------------------------------------------------------
// Ops.

std::tuple<Tensor, Tensor, Tensor> bn_act_train_cuda(const Tensor& x, const optional<Tensor>& weight,
                                                     const optional<Tensor>& bias,
                                                     const optional<Tensor>& residual, double eps,
                                                     bool relu) {
  check_cuda(x, BnActTrainPrep::op);
  FASTRES_DEVICE_GUARD(x);
  const BnActTrainPrep p(x, weight, bias, residual);
  if (p.done) return p.result();
  const Geom& g = p.g;
  const int64_t C = g.C;
  const Tensor &xc = p.xc, &w = p.w, &b = p.b, &r = p.r, &y = p.y, &mean = p.mean, &var = p.var;
  const ReducePlan plan = make_reduce_plan(g);
  Tensor ws = at::empty({4 * C * plan.J + 2 * C}, mean.options());
  cudaStream_t stream = FASTRES_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_act_train", [&] {
    using A = at::acc_type<scalar_t, true>;
    A* base = ws.mutable_data_ptr<A>();
    A* pn = base;
    A* pm = base + C * plan.J;
    A* pq = base + 2 * C * plan.J;
    A* ps = base + 3 * C * plan.J;
    A* scale = base + 4 * C * plan.J;
    A* shift = scale + C;
    StatsOp<scalar_t> sop{xc.const_data_ptr<scalar_t>(), pn, pm, pq, ps};
    launch_reduce(sop, g, plan, stream);
    FASTRES_LAUNCH(stats_finalize_kernel<A>, finalize_grid(C), dim3(kFinalizeWarps * 32), stream, pn, pm,
                   pq, ps, C, plan.J, g.M(), cptr<A>(w), cptr<A>(b), eps, mean.mutable_data_ptr<A>(),
                   var.mutable_data_ptr<A>(), scale, shift);
    with_bool(relu, [&](auto RELU) {
      with_bool(r.defined(), [&](auto RES) {
        AffineApplyOp<scalar_t, decltype(RELU)::value, decltype(RES)::value> aop{
            xc.const_data_ptr<scalar_t>(), cptr<scalar_t>(r), y.mutable_data_ptr<scalar_t>(),
            mean.const_data_ptr<A>(), scale, shift};
        launch_ew(aop, g, stream);
      });
    });
  });
  return p.result();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_train_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& var, double eps, bool relu, bool need_grad_z) {
  check_cuda(x, BnActTrainBackwardPrep::op);
  FASTRES_DEVICE_GUARD(x);
  const BnActTrainBackwardPrep p(grad_y, x, y, weight, mean, var, relu, need_grad_z);
  if (p.done) return p.result();
  const Geom& g = p.g;
  const int64_t C = g.C;
  const Tensor &gyc = p.gyc, &xc = p.xc, &yc = p.yc, &w = p.w, &m = p.m, &v = p.v;
  const Tensor &gx = p.gx, &gw = p.gw, &gb = p.gb, &gz = p.gz;
  const ReducePlan plan = make_reduce_plan(g);
  Tensor ws = at::empty({2 * C * plan.J + 3 * C}, gw.options());
  cudaStream_t stream = FASTRES_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_act_train_backward", [&] {
    using A = at::acc_type<scalar_t, true>;
    A* base = ws.mutable_data_ptr<A>();
    A* p1 = base;
    A* p2 = base + C * plan.J;
    A* ka = base + 2 * C * plan.J;
    A* kb = ka + C;
    A* kd = kb + C;
    const scalar_t* gy_p = gyc.const_data_ptr<scalar_t>();
    const scalar_t* x_p = xc.const_data_ptr<scalar_t>();
    const scalar_t* y_p = cptr<scalar_t>(yc);
    scalar_t* gz_p = need_grad_z ? gz.mutable_data_ptr<scalar_t>() : nullptr;
    with_bool(relu, [&](auto RELU) {
      with_bool(need_grad_z, [&](auto GZ) {
        DsumOp<scalar_t, decltype(RELU)::value, decltype(GZ)::value, false> dop{
            gy_p, x_p, y_p, gz_p, nullptr, m.const_data_ptr<A>(), nullptr, p1, p2};
        launch_reduce(dop, g, plan, stream);
      });
      auto* fin = &sums_finalize_kernel<A, 0>;
      FASTRES_LAUNCH(fin, finalize_grid(C), dim3(kFinalizeWarps * 32), stream, p1, p2, C, plan.J, g.M(),
                     cptr<A>(w), v.const_data_ptr<A>(), eps, gw.mutable_data_ptr<A>(),
                     gb.mutable_data_ptr<A>(), ka, kb, kd);
      with_bool(need_grad_z, [&](auto FROM_GZ) {
        BnBwdApplyOp<scalar_t, decltype(RELU)::value, decltype(FROM_GZ)::value> aop{
            gy_p, x_p, y_p, gz_p, gx.mutable_data_ptr<scalar_t>(), m.const_data_ptr<A>(), ka, kb, kd};
        launch_ew(aop, g, stream);
      });
    });
  });
  return p.result();
}

Tensor affine_act_cuda(const Tensor& x, const optional<Tensor>& scale, const optional<Tensor>& shift,
                       const optional<Tensor>& residual, bool relu) {
  check_cuda(x, AffineActPrep::op);
  FASTRES_DEVICE_GUARD(x);
  const AffineActPrep p(x, scale, shift, residual);
  if (p.done) return p.result();
  const Geom& g = p.g;
  const Tensor &xc = p.xc, &s = p.s, &b = p.b, &r = p.r, &y = p.y;
  cudaStream_t stream = FASTRES_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_affine_act", [&] {
    using A = at::acc_type<scalar_t, true>;
    with_bool(relu, [&](auto RELU) {
      with_bool(r.defined(), [&](auto RES) {
        AffineApplyOp<scalar_t, decltype(RELU)::value, decltype(RES)::value> aop{
            xc.const_data_ptr<scalar_t>(), cptr<scalar_t>(r), y.mutable_data_ptr<scalar_t>(), nullptr,
            cptr<A>(s), cptr<A>(b)};
        launch_ew(aop, g, stream);
      });
    });
  });
  return p.result();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> affine_act_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& scale, bool relu,
    bool need_grad_z, bool need_param_grads) {
  check_cuda(x, AffineActBackwardPrep::op);
  FASTRES_DEVICE_GUARD(x);
  const AffineActBackwardPrep p(grad_y, x, y, scale, relu, need_grad_z, need_param_grads);
  if (p.done) return p.result();
  const Geom& g = p.g;
  const int64_t C = g.C;
  const Tensor &gyc = p.gyc, &xc = p.xc, &yc = p.yc, &s = p.s;
  const Tensor &gx = p.gx, &gz = p.gz, &gs = p.gs, &gb = p.gb;
  cudaStream_t stream = FASTRES_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_affine_act_backward", [&] {
    using A = at::acc_type<scalar_t, true>;
    const scalar_t* gy_p = gyc.const_data_ptr<scalar_t>();
    const scalar_t* y_p = cptr<scalar_t>(yc);
    scalar_t* gz_p = need_grad_z ? gz.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx_p = gx.mutable_data_ptr<scalar_t>();
    if (need_param_grads) {
      const ReducePlan plan = make_reduce_plan(g);
      Tensor ws = at::empty({2 * C * plan.J}, gs.options());
      A* p1 = ws.mutable_data_ptr<A>();
      A* p2 = p1 + C * plan.J;
      with_bool(relu, [&](auto RELU) {
        with_bool(need_grad_z, [&](auto GZ) {
          DsumOp<scalar_t, decltype(RELU)::value, decltype(GZ)::value, true> dop{
              gy_p, xc.const_data_ptr<scalar_t>(), y_p, gz_p, gx_p, nullptr, cptr<A>(s), p1, p2};
          launch_reduce(dop, g, plan, stream);
        });
      });
      auto* fin = &sums_finalize_kernel<A, 1>;
      FASTRES_LAUNCH(fin, finalize_grid(C), dim3(kFinalizeWarps * 32), stream, p1, p2, C, plan.J, g.M(),
                     static_cast<const A*>(nullptr), static_cast<const A*>(nullptr), 0.0,
                     gs.mutable_data_ptr<A>(), gb.mutable_data_ptr<A>(), static_cast<A*>(nullptr),
                     static_cast<A*>(nullptr), static_cast<A*>(nullptr));
    } else {
      with_bool(relu, [&](auto RELU) {
        with_bool(need_grad_z, [&](auto GZ) {
          AffineBwdOp<scalar_t, decltype(RELU)::value, decltype(GZ)::value> aop{gy_p, y_p, gx_p, gz_p,
                                                                                 cptr<A>(s)};
          launch_ew(aop, g, stream);
        });
      });
    }
  });
  return p.result();
}

}  // namespace

#if defined(FASTRES_CUDA_EMULATION)
TORCH_LIBRARY(fastres_cuda_emu, m) {
  m.def(FASTRES_SCHEMA_BN_ACT_TRAIN);
  m.def(FASTRES_SCHEMA_BN_ACT_TRAIN_BACKWARD);
  m.def(FASTRES_SCHEMA_AFFINE_ACT);
  m.def(FASTRES_SCHEMA_AFFINE_ACT_BACKWARD);
}
#define FASTRES_IMPL_NS fastres_cuda_emu
#define FASTRES_IMPL_KEY CPU
#else
#define FASTRES_IMPL_NS fastres
#define FASTRES_IMPL_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(FASTRES_IMPL_NS, FASTRES_IMPL_KEY, m) {
  m.impl("bn_act_train", &bn_act_train_cuda);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cuda);
  m.impl("affine_act", &affine_act_cuda);
  m.impl("affine_act_backward", &affine_act_backward_cuda);
}

}  // namespace fastres::cuda_impl
