// CPU implementations of the fastres ops: the kernels of kernels_impl.h (ISA chosen
// at run time) on the tensors prepared by ../op_prep.h (shared with the CUDA ops).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../op_prep.h"
#include "kernels.h"

namespace fastres::cpu {

// The kernel table for this machine, chosen like torch's own CPU kernels
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
const Kernels& active_kernels() {
  static const Kernels& k = []() -> const Kernels& {
#if defined(FASTRES_CPU_X86)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return AVX512::kernels();
    if (cap == "AVX2") return AVX2::kernels();
#endif
    return DEFAULT::kernels();
  }();
  return k;
}

namespace {

using at::Tensor;
using std::optional;

DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble: return DType::kF64;
    case at::kFloat: return DType::kF32;
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    default: TORCH_CHECK(false, "fastres: unsupported dtype ", x.scalar_type());
  }
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void check_cpu(const Tensor& x, const char* op) {
  check_x(x, op);
  TORCH_CHECK(x.device().is_cpu(), "fastres::", op, ": expected a CPU tensor");
}

// The fields every forward / backward kernel takes, from the op's Prep.
template <class Prep>
void set_fwd(FwdArgs& a, const Prep& p, bool relu) {
  a.g = p.g;
  a.dt = dtype_of(p.xc);
  a.x = p.xc.const_data_ptr();
  a.res = ptr_or_null(p.r);
  a.relu = relu;
  a.y = p.y.mutable_data_ptr();
}

template <class Prep>
void set_bwd(BwdArgs& a, const Prep& p, bool relu, bool need_grad_z) {
  a.g = p.g;
  a.dt = dtype_of(p.gyc);
  a.gy = p.gyc.const_data_ptr();
  a.x = ptr_or_null(p.xc);
  a.y = ptr_or_null(p.yc);
  a.relu = relu;
  a.gx = p.gx.mutable_data_ptr();
  a.gz = need_grad_z ? p.gz.mutable_data_ptr() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_train_cpu(const Tensor& x, const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias,
                                                    const optional<Tensor>& residual, double eps,
                                                    bool relu) {
  check_cpu(x, BnActTrainPrep::op);
  const BnActTrainPrep p(x, weight, bias, residual);
  if (p.done) return p.result();
  BnFwdArgs a;
  set_fwd(a, p, relu);
  a.weight = ptr_or_null(p.w);
  a.bias = ptr_or_null(p.b);
  a.eps = eps;
  a.mean = p.mean.mutable_data_ptr();
  a.var = p.var.mutable_data_ptr();
  active_kernels().bn_fwd(a);
  return p.result();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_train_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& var, double eps, bool relu, bool need_grad_z) {
  check_cpu(x, BnActTrainBackwardPrep::op);
  const BnActTrainBackwardPrep p(grad_y, x, y, weight, mean, var, relu, need_grad_z);
  if (p.done) return p.result();
  BnBwdArgs a;
  set_bwd(a, p, relu, need_grad_z);
  a.weight = ptr_or_null(p.w);
  a.mean = p.m.const_data_ptr();
  a.var = p.v.const_data_ptr();
  a.eps = eps;
  a.gw = p.gw.mutable_data_ptr();
  a.gb = p.gb.mutable_data_ptr();
  active_kernels().bn_bwd(a);
  return p.result();
}

Tensor affine_act_cpu(const Tensor& x, const optional<Tensor>& scale, const optional<Tensor>& shift,
                      const optional<Tensor>& residual, bool relu) {
  check_cpu(x, AffineActPrep::op);
  const AffineActPrep p(x, scale, shift, residual);
  if (p.done) return p.result();
  AffineFwdArgs a;
  set_fwd(a, p, relu);
  a.scale = ptr_or_null(p.s);
  a.shift = ptr_or_null(p.b);
  active_kernels().affine_fwd(a);
  return p.result();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> affine_act_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& scale, bool relu,
    bool need_grad_z, bool need_param_grads) {
  check_cpu(x, AffineActBackwardPrep::op);
  const AffineActBackwardPrep p(grad_y, x, y, scale, relu, need_grad_z, need_param_grads);
  if (p.done) return p.result();
  AffineBwdArgs a;
  set_bwd(a, p, relu, need_grad_z);
  a.scale = ptr_or_null(p.s);
  a.gscale = need_param_grads ? p.gs.mutable_data_ptr() : nullptr;
  a.gshift = need_param_grads ? p.gb.mutable_data_ptr() : nullptr;
  active_kernels().affine_bwd(a);
  return p.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_act_train", &bn_act_train_cpu);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cpu);
  m.impl("affine_act", &affine_act_cpu);
  m.impl("affine_act_backward", &affine_act_backward_cpu);
}

}  // namespace fastres::cpu
