// CPU implementations of the fastres ops: tensor glue around the kernels of
// kernels_impl.h (memory format, allocation, param dtypes, ISA selection).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>

#include "../common.h"
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

std::tuple<Tensor, Tensor, Tensor> bn_act_train_cpu(const Tensor& x, const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias,
                                                    const optional<Tensor>& residual, double eps,
                                                    bool relu) {
  constexpr const char* op = "bn_act_train";
  check_cpu(x, op);
  const auto fmt = memory_format_of(x);
  const Tensor xc = x.contiguous(fmt);
  Tensor y = empty_like_x(x, fmt);
  Tensor mean = empty_channels(x);
  Tensor var = empty_channels(x);
  if (x.numel() == 0) {
    // M == 0: the mean of nothing, like the aten reference (never reached in training).
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, var};
  }
  const Tensor w = channel_param(weight, x, op, "weight");
  const Tensor b = channel_param(bias, x, op, "bias");
  Tensor r;
  if (residual.has_value() && residual->defined()) r = like_x(*residual, x, fmt, op, "residual");
  BnFwdArgs a;
  a.g = geom_of<Geom>(x, fmt);
  a.dt = dtype_of(x);
  a.x = xc.const_data_ptr();
  a.res = ptr_or_null(r);
  a.weight = ptr_or_null(w);
  a.bias = ptr_or_null(b);
  a.eps = eps;
  a.relu = relu;
  a.y = y.mutable_data_ptr();
  a.mean = mean.mutable_data_ptr();
  a.var = var.mutable_data_ptr();
  active_kernels().bn_fwd(a);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_train_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& var, double eps, bool relu, bool need_grad_z) {
  constexpr const char* op = "bn_act_train_backward";
  check_cpu(x, op);
  const auto fmt = memory_format_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor gx = empty_like_x(x, fmt);
  Tensor gz = empty_like_x_if(need_grad_z, x, fmt);
  if (x.numel() == 0) {
    return {gx, at::zeros({C}, x.options().dtype(acc)), at::zeros({C}, x.options().dtype(acc)), gz};
  }
  Tensor gw = empty_channels(x);
  Tensor gb = empty_channels(x);
  const Tensor gyc = like_x(grad_y, x, fmt, op, "grad_y");
  const Tensor xc = x.contiguous(fmt);
  Tensor yc;
  if (relu) yc = like_x(y, x, fmt, op, "y");
  const Tensor w = channel_param(weight, x, op, "weight");
  const Tensor m = channel_param(mean, x, op, "mean");
  const Tensor v = channel_param(var, x, op, "var");
  BnBwdArgs a;
  a.g = geom_of<Geom>(x, fmt);
  a.dt = dtype_of(x);
  a.gy = gyc.const_data_ptr();
  a.x = xc.const_data_ptr();
  a.y = ptr_or_null(yc);
  a.weight = ptr_or_null(w);
  a.mean = m.const_data_ptr();
  a.var = v.const_data_ptr();
  a.eps = eps;
  a.relu = relu;
  a.gx = gx.mutable_data_ptr();
  a.gw = gw.mutable_data_ptr();
  a.gb = gb.mutable_data_ptr();
  a.gz = need_grad_z ? gz.mutable_data_ptr() : nullptr;
  active_kernels().bn_bwd(a);
  return {gx, gw, gb, gz};
}

Tensor affine_act_cpu(const Tensor& x, const optional<Tensor>& scale, const optional<Tensor>& shift,
                      const optional<Tensor>& residual, bool relu) {
  constexpr const char* op = "affine_act";
  check_cpu(x, op);
  const auto fmt = memory_format_of(x);
  Tensor y = empty_like_x(x, fmt);
  if (x.numel() == 0) return y;
  const Tensor xc = x.contiguous(fmt);
  const Tensor s = channel_param(scale, x, op, "scale");
  const Tensor b = channel_param(shift, x, op, "shift");
  Tensor r;
  if (residual.has_value() && residual->defined()) r = like_x(*residual, x, fmt, op, "residual");
  AffineFwdArgs a;
  a.g = geom_of<Geom>(x, fmt);
  a.dt = dtype_of(x);
  a.x = xc.const_data_ptr();
  a.res = ptr_or_null(r);
  a.scale = ptr_or_null(s);
  a.shift = ptr_or_null(b);
  a.relu = relu;
  a.y = y.mutable_data_ptr();
  active_kernels().affine_fwd(a);
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> affine_act_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& y, const optional<Tensor>& scale, bool relu,
    bool need_grad_z, bool need_param_grads) {
  constexpr const char* op = "affine_act_backward";
  check_cpu(x, op);
  const auto fmt = memory_format_of(x);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor gx = empty_like_x(x, fmt);
  Tensor gz = empty_like_x_if(need_grad_z, x, fmt);
  Tensor gs, gb;
  if (need_param_grads) {
    gs = (x.numel() == 0 ? at::zeros({C}, x.options().dtype(acc)) : empty_channels(x));
    gb = (x.numel() == 0 ? at::zeros({C}, x.options().dtype(acc)) : empty_channels(x));
  } else {
    gs = at::empty({0}, x.options().dtype(acc));
    gb = at::empty({0}, x.options().dtype(acc));
  }
  if (x.numel() == 0) return {gx, gz, gs, gb};
  const Tensor gyc = like_x(grad_y, x, fmt, op, "grad_y");
  Tensor xc, yc;
  if (need_param_grads) xc = x.contiguous(fmt);
  if (relu) yc = like_x(y, x, fmt, op, "y");
  const Tensor s = channel_param(scale, x, op, "scale");
  AffineBwdArgs a;
  a.g = geom_of<Geom>(x, fmt);
  a.dt = dtype_of(x);
  a.gy = gyc.const_data_ptr();
  a.x = ptr_or_null(xc);
  a.y = ptr_or_null(yc);
  a.scale = ptr_or_null(s);
  a.relu = relu;
  a.gx = gx.mutable_data_ptr();
  a.gz = need_grad_z ? gz.mutable_data_ptr() : nullptr;
  a.gscale = need_param_grads ? gs.mutable_data_ptr() : nullptr;
  a.gshift = need_param_grads ? gb.mutable_data_ptr() : nullptr;
  active_kernels().affine_bwd(a);
  return {gx, gz, gs, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_act_train", &bn_act_train_cpu);
  m.impl("bn_act_train_backward", &bn_act_train_backward_cpu);
  m.impl("affine_act", &affine_act_cpu);
  m.impl("affine_act_backward", &affine_act_backward_cpu);
}

}  // namespace fastres::cpu
