// Shared host-side helpers of the fastres._C ops (CPU and CUDA wrappers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

#include "geom.h"

namespace fastres {

// The one memory-format rule of docs/DESIGN.md.
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined() && x.dim() == 4, "fastres::", op, ": x must be a 4-D (N, C, H, W) tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "fastres::", op, ": unsupported dtype ", t);
}

// A tensor of x's shape and dtype (residual, grad_y, y), made dense in fmt.
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x, at::MemoryFormat fmt,
                         const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastres::", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres::", op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(),
              ", expected ", x.device());
  return t.contiguous(fmt);
}

// A per-channel parameter converted to the acc dtype, dense, [C] (undefined if absent).
inline at::Tensor channel_param(const std::optional<at::Tensor>& p, const at::Tensor& x,
                                const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  const int64_t C = x.size(1);
  TORCH_CHECK(p->numel() == C, "fastres::", op, ": ", name, " must have ", C, " elements, got ",
              p->numel());
  TORCH_CHECK(p->device() == x.device(), "fastres::", op, ": ", name, " is on ", p->device(),
              ", expected ", x.device());
  return p->to(acc_dtype(x.scalar_type())).contiguous().view({C});
}

inline at::Tensor channel_param(const at::Tensor& p, const at::Tensor& x, const char* op,
                                const char* name) {
  return channel_param(std::optional<at::Tensor>(p), x, op, name);
}

// --- output allocation and kernel geometry, shared by the CPU and CUDA wrappers ----

// An output of x's shape and dtype, dense in fmt (y, grad_x, grad_z).
inline at::Tensor empty_like_x(const at::Tensor& x, at::MemoryFormat fmt) {
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

// An optional output (grad_z): x-shaped when needed, else an empty [0] tensor.
inline at::Tensor empty_like_x_if(bool need, const at::Tensor& x, at::MemoryFormat fmt) {
  return need ? empty_like_x(x, fmt) : at::empty({0}, x.options());
}

// A per-channel [C] output in the acc dtype (mean, var, grad_weight, ...).
inline at::Tensor empty_channels(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
}

// The kernels' view of x (N, C, HW and whether it is stored as rows of C channels).
inline Geom geom_of(const at::Tensor& x, at::MemoryFormat fmt) {
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.rows = fmt == at::MemoryFormat::ChannelsLast || g.HW == 1;
  return g;
}

}  // namespace fastres
