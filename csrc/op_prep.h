// Device-generic preparation of the fastres ops, shared by the CPU wrappers
// (cpu/ops_cpu.cpp) and the CUDA wrappers (cuda/ops_cuda.cu): argument checks,
// memory format, output allocation, the zero-size results, and the inputs made
// dense (x-shaped tensors in x's format, per-channel parameters in the acc dtype).
// A wrapper checks the device of x (and sets its device guard) first, builds the
// op's Prep, and launches its kernels on it unless `done` (x has no element: the
// outputs are already final). Only that check and the launch differ per device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common.h"

namespace fastres {

// A [C] tensor of zeros in the acc dtype (the parameter gradients of an empty x).
inline at::Tensor zeros_channels(const at::Tensor& x) {
  return at::zeros({x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
}

// The optional residual: x-shaped, dense in fmt (undefined if absent).
inline at::Tensor residual_like_x(const std::optional<at::Tensor>& residual, const at::Tensor& x,
                                  at::MemoryFormat fmt, const char* op) {
  if (residual.has_value() && residual->defined()) return like_x(*residual, x, fmt, op, "residual");
  return at::Tensor();
}

// bn_act_train(x, weight?, bias?, residual?) -> (y, mean, var)
struct BnActTrainPrep {
  static constexpr const char* op = "bn_act_train";
  Geom g;
  at::Tensor xc, w, b, r;  // x dense; weight, bias (acc [C]); residual: undefined if absent
  at::Tensor y, mean, var;
  bool done = false;
  BnActTrainPrep(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
    const auto fmt = memory_format_of(x);
    g = geom_of(x, fmt);
    xc = x.contiguous(fmt);
    y = empty_like_x(x, fmt);
    mean = empty_channels(x);
    var = empty_channels(x);
    if (x.numel() == 0) {
      // M == 0: the mean of nothing, like the aten reference (never reached in training).
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
      done = true;
      return;
    }
    w = channel_param(weight, x, op, "weight");
    b = channel_param(bias, x, op, "bias");
    r = residual_like_x(residual, x, fmt, op);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const { return {y, mean, var}; }
};

// bn_act_train_backward(grad_y, x, y, weight?, mean, var, need_grad_z)
//   -> (grad_x, grad_weight, grad_bias, grad_z)
struct BnActTrainBackwardPrep {
  static constexpr const char* op = "bn_act_train_backward";
  Geom g;
  at::Tensor gyc, xc, yc;  // dense; yc only when relu
  at::Tensor w, m, v;      // acc [C]; w undefined if absent
  at::Tensor gx, gw, gb, gz;  // gz: [0] unless need_grad_z
  bool done = false;
  BnActTrainBackwardPrep(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                         const at::Tensor& var, bool relu, bool need_grad_z) {
    const auto fmt = memory_format_of(x);
    g = geom_of(x, fmt);
    gx = empty_like_x(x, fmt);
    gz = empty_like_x_if(need_grad_z, x, fmt);
    if (x.numel() == 0) {
      gw = zeros_channels(x);
      gb = zeros_channels(x);
      done = true;
      return;
    }
    gw = empty_channels(x);
    gb = empty_channels(x);
    gyc = like_x(grad_y, x, fmt, op, "grad_y");
    xc = x.contiguous(fmt);
    if (relu) yc = like_x(y, x, fmt, op, "y");
    w = channel_param(weight, x, op, "weight");
    m = channel_param(mean, x, op, "mean");
    v = channel_param(var, x, op, "var");
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const { return {gx, gw, gb, gz}; }
};

// affine_act(x, scale?, shift?, residual?) -> y
struct AffineActPrep {
  static constexpr const char* op = "affine_act";
  Geom g;
  at::Tensor xc, s, b, r;  // x dense; scale, shift (acc [C]); residual: undefined if absent
  at::Tensor y;
  bool done = false;
  AffineActPrep(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual) {
    const auto fmt = memory_format_of(x);
    g = geom_of(x, fmt);
    y = empty_like_x(x, fmt);
    if (x.numel() == 0) {
      done = true;
      return;
    }
    xc = x.contiguous(fmt);
    s = channel_param(scale, x, op, "scale");
    b = channel_param(shift, x, op, "shift");
    r = residual_like_x(residual, x, fmt, op);
  }
  at::Tensor result() const { return y; }
};

// affine_act_backward(grad_y, x, y, scale?, relu, need_grad_z, need_param_grads)
//   -> (grad_x, grad_z, grad_scale, grad_shift)
struct AffineActBackwardPrep {
  static constexpr const char* op = "affine_act_backward";
  Geom g;
  at::Tensor gyc, xc, yc;  // dense; xc only when need_param_grads, yc only when relu
  at::Tensor s;            // acc [C], undefined if absent
  at::Tensor gx, gz, gs, gb;  // gz: [0] unless need_grad_z; gs, gb: [0] unless need_param_grads
  bool done = false;
  AffineActBackwardPrep(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& scale, bool relu, bool need_grad_z,
                        bool need_param_grads) {
    const auto fmt = memory_format_of(x);
    g = geom_of(x, fmt);
    gx = empty_like_x(x, fmt);
    gz = empty_like_x_if(need_grad_z, x, fmt);
    if (need_param_grads) {
      gs = x.numel() == 0 ? zeros_channels(x) : empty_channels(x);
      gb = x.numel() == 0 ? zeros_channels(x) : empty_channels(x);
    } else {
      const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
      gs = at::empty({0}, acc);
      gb = at::empty({0}, acc);
    }
    if (x.numel() == 0) {
      done = true;
      return;
    }
    gyc = like_x(grad_y, x, fmt, op, "grad_y");
    if (need_param_grads) xc = x.contiguous(fmt);
    if (relu) yc = like_x(y, x, fmt, op, "y");
    s = channel_param(scale, x, op, "scale");
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const { return {gx, gz, gs, gb}; }
};

}  // namespace fastres
