// cuDNN fused-convolution graphs (issue 11), through cuDNN's backend (graph) API.
//
//   fastres::cudnn_conv_bias_act   conv_fprop -> [+ bias] -> [+ residual] -> [ReLU]
//                                  (inference: the folded conv-BN, one cuDNN graph)
//   fastres::cudnn_conv_act_stats  [x*scale + shift -> ReLU] -> conv_fprop -> y,
//                                  genstats(y) -> per-channel sum, sum of squares (fp32)
//                                  (training forward: the "ConvBNfprop" pattern)
//   fastres::cudnn_dgrad_drelu_dbn conv_dgrad -> ReLU mask of x*scale + shift -> dv,
//                                  BN-backward weights -> Σdv·x, Σdv (fp32)
//                                  (training backward: "DgradDreluBNBwdWeight")
//   fastres::cudnn_wgrad_scale_shift_relu  [x*scale + shift -> ReLU] -> conv_wgrad -> dw
//                                  (training backward: "ConvBNwgrad")
//
// The schemas are defined in ops.cpp (always, so the fake kernels of
// fastres/cudnn.py exist on every build); this file adds the CUDA kernels and is
// compiled only where the cuDNN headers were found (FASTRES_WITH_CUDNN, setup.py /
// CMakeLists.txt). It is a plain .cpp (host compiler): no device code here.
//
// Layout: cuDNN's fusion engines want NHWC, so x, weight, residual and y are used
// channels_last inside; y comes back in x's memory format (docs/DESIGN.md's rule).
// Per-channel operands (bias, scale, shift) are in x's dtype for bf16/fp16 (the
// dtype of cuDNN's own fusion samples; the engines for fp32 operands with 16-bit
// I/O are not documented), fp32 for fp32; intermediates and compute are fp32.
//
// Plans: built once per key (everything a plan depends on: device, pattern, dtypes,
// shapes, strides, conv parameters, pointer alignment, TF32 permission), through
// heuristics mode A then FALLBACK; FASTRES_CUDNN_AUTOTUNE=1 times the candidate
// engines on first use (not while a CUDA graph is being captured). The workspace
// comes from the caching allocator and the handle is torch's for the current stream:
// no host synchronisation per call, CUDA-graph capturable once the plan exists.
#if defined(FASTRES_WITH_CUDNN)

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cudnn.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastres {
namespace cudnn_graph {
namespace {

#define FASTRES_CUDNN_CHECK(expr)                                                     \
  do {                                                                                \
    cudnnStatus_t status_ = (expr);                                                   \
    if (status_ != CUDNN_STATUS_SUCCESS) {                                            \
      char msg_[1024] = {0};                                                          \
      cudnnGetLastErrorString(msg_, sizeof(msg_));                                    \
      TORCH_CHECK(false, "fastres cudnn: ", #expr, " failed: ", cudnnGetErrorString(status_), \
                  " ", msg_);                                                         \
    }                                                                                 \
  } while (0)

// The message the Python side recognises as "this graph has no engine here".
constexpr const char* kNoEngine = "fastres cudnn: no engine supports this graph";

// RAII owner of one backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    FASTRES_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Desc() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }

  void set(cudnnBackendAttributeName_t a, cudnnBackendAttributeType_t t, int64_t n, const void* v) {
    FASTRES_CUDNN_CHECK(cudnnBackendSetAttribute(d_, a, t, n, v));
  }
  void set_i64(cudnnBackendAttributeName_t a, int64_t v) { set(a, CUDNN_TYPE_INT64, 1, &v); }
  void set_i64s(cudnnBackendAttributeName_t a, const std::vector<int64_t>& v) {
    set(a, CUDNN_TYPE_INT64, static_cast<int64_t>(v.size()), v.data());
  }
  void set_dtype(cudnnBackendAttributeName_t a, cudnnDataType_t v) {
    set(a, CUDNN_TYPE_DATA_TYPE, 1, &v);
  }
  void set_bool(cudnnBackendAttributeName_t a, bool b) {
    bool v = b;
    set(a, CUDNN_TYPE_BOOLEAN, 1, &v);
  }
  void set_desc(cudnnBackendAttributeName_t a, const Desc& d) {
    cudnnBackendDescriptor_t v = d.get();
    set(a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
  }
  void set_handle(cudnnBackendAttributeName_t a, cudnnHandle_t h) {
    set(a, CUDNN_TYPE_HANDLE, 1, &h);
  }
  void finalize() { FASTRES_CUDNN_CHECK(cudnnBackendFinalize(d_)); }
  bool try_finalize() { return cudnnBackendFinalize(d_) == CUDNN_STATUS_SUCCESS; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};
using DescP = std::shared_ptr<Desc>;

cudnnDataType_t cudnn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDNN_DATA_FLOAT;
    case at::kHalf: return CUDNN_DATA_HALF;
    case at::kBFloat16: return CUDNN_DATA_BFLOAT16;
    default: break;
  }
  TORCH_CHECK(false, "fastres cudnn: unsupported dtype ", t, " (float32, float16, bfloat16)");
  return CUDNN_DATA_FLOAT;
}

int64_t alignment_of(const void* p) {
  auto v = reinterpret_cast<std::uintptr_t>(p);
  int64_t a = 1;
  while (a < 16 && (v % static_cast<std::uintptr_t>(a * 2)) == 0) a *= 2;
  return a;
}

// Builds the operations of one graph; keeps every descriptor alive with the plan.
struct Graph {
  std::vector<DescP> keep;
  std::vector<cudnnBackendDescriptor_t> ops;
  std::vector<int64_t> io_uids;  // non-virtual tensors, in variant-pack order

  DescP tensor(int64_t uid, cudnnDataType_t dt, std::vector<int64_t> dims,
               std::vector<int64_t> strides, bool is_virtual, int64_t align) {
    auto t = std::make_shared<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t->set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dt);
    t->set_i64s(CUDNN_ATTR_TENSOR_DIMENSIONS, dims);
    t->set_i64s(CUDNN_ATTR_TENSOR_STRIDES, strides);
    t->set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid);
    t->set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, align);
    t->set_bool(CUDNN_ATTR_TENSOR_IS_VIRTUAL, is_virtual);
    t->finalize();
    keep.push_back(t);
    if (!is_virtual) io_uids.push_back(uid);
    return t;
  }

  // Finalizes one operation and appends it to the graph (kept alive with the plan).
  void add_op(const DescP& op) {
    op->finalize();
    keep.push_back(op);
    ops.push_back(op->get());
  }

  DescP conv_desc(const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                  const std::vector<int64_t>& dilation) {
    auto conv = std::make_shared<Desc>(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
    conv->set_i64(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, 2);
    conv->set_dtype(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_DATA_FLOAT);
    cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
    conv->set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
    conv->set_i64s(CUDNN_ATTR_CONVOLUTION_DILATIONS, dilation);
    conv->set_i64s(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, stride);
    conv->set_i64s(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, padding);
    conv->set_i64s(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, padding);
    conv->finalize();
    keep.push_back(conv);
    return conv;
  }

  // The backend attributes of one convolution operation kind: its descriptor type, the
  // conv-descriptor / alpha / beta attributes and its two inputs and one output.
  struct ConvKind {
    cudnnBackendDescriptorType_t type;
    cudnnBackendAttributeName_t conv, alpha, beta, in0, in1, out;
  };
  // y = fprop(x, w); dx = dgrad(dy, w); dw = wgrad(dy, x)
  static constexpr ConvKind kFprop = {
      CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
      CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
      CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
      CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y};
  static constexpr ConvKind kDgrad = {
      CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX};
  static constexpr ConvKind kWgrad = {
      CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW};

  // out = kind(in0, in1) with alpha 1, beta 0.
  void conv(const ConvKind& kind, const DescP& in0, const DescP& in1, const DescP& out,
            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
            const std::vector<int64_t>& dilation) {
    auto desc = conv_desc(stride, padding, dilation);
    auto op = std::make_shared<Desc>(kind.type);
    op->set_desc(kind.in0, *in0);
    op->set_desc(kind.in1, *in1);
    op->set_desc(kind.out, *out);
    op->set_desc(kind.conv, *desc);
    float alpha = 1.0f, beta = 0.0f;
    op->set(kind.alpha, CUDNN_TYPE_FLOAT, 1, &alpha);
    op->set(kind.beta, CUDNN_TYPE_FLOAT, 1, &beta);
    add_op(op);
  }

  // BN backward weights: dscale = sum dy*(x-mean)*invstd, dbias = sum dy, and the
  // three "equivalent" coefficients of the full BN backward (fp32, [1,C,1,1] each).
  void bn_bwd_weights(const DescP& x, const DescP& dy, const DescP& mean, const DescP& invstd,
                      const DescP& scale, const DescP& dscale, const DescP& dbias, const DescP& eq_dy,
                      const DescP& eq_x, const DescP& eq_bias) {
    auto op = std::make_shared<Desc>(CUDNN_BACKEND_OPERATION_BN_BWD_WEIGHTS_DESCRIPTOR);
    op->set_dtype(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MATH_PREC, CUDNN_DATA_FLOAT);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_X_DESC, *x);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DY_DESC, *dy);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MEAN_DESC, *mean);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_INVSTD_DESC, *invstd);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_BN_SCALE_DESC, *scale);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_SCALE_DESC, *dscale);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_BIAS_DESC, *dbias);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_DY_SCALE_DESC, *eq_dy);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_X_SCALE_DESC, *eq_x);
    op->set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_BIAS, *eq_bias);
    add_op(op);
  }

  // y = mode(x [, b]) in fp32. For RELU_BWD (an activation backward) b is dy and y is
  // dx: dx = dy where x > 0, else 0 (the mask from the forward input x).
  void pointwise(cudnnPointwiseMode_t mode, const DescP& x, const DescP& b, const DescP& y) {
    auto pw = std::make_shared<Desc>(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    pw->set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_DATA_FLOAT);
    pw->finalize();
    keep.push_back(pw);

    const bool bwd = mode == CUDNN_POINTWISE_RELU_BWD;
    auto op = std::make_shared<Desc>(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, *pw);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, *x);
    if (b) op->set_desc(bwd ? CUDNN_ATTR_OPERATION_POINTWISE_DYDESC : CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    op->set_desc(bwd ? CUDNN_ATTR_OPERATION_POINTWISE_DXDESC : CUDNN_ATTR_OPERATION_POINTWISE_YDESC, *y);
    add_op(op);
  }

  void genstats(const DescP& x, const DescP& sum, const DescP& sumsq) {
    auto op = std::make_shared<Desc>(CUDNN_BACKEND_OPERATION_GEN_STATS_DESCRIPTOR);
    cudnnGenStatsMode_t mode = CUDNN_GENSTATS_SUM_SQSUM;
    op->set(CUDNN_ATTR_OPERATION_GENSTATS_MODE, CUDNN_TYPE_GENSTATS_MODE, 1, &mode);
    op->set_dtype(CUDNN_ATTR_OPERATION_GENSTATS_MATH_PREC, CUDNN_DATA_FLOAT);
    op->set_desc(CUDNN_ATTR_OPERATION_GENSTATS_XDESC, *x);
    op->set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SUMDESC, *sum);
    op->set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SQSUMDESC, *sumsq);
    add_op(op);
  }
};

struct Plan {
  std::vector<DescP> keep;  // the graph's descriptors, the op graph, the plan
  DescP plan;
  std::vector<int64_t> uids;
  int64_t workspace = 0;
};

// Per-call execution: a variant pack of the data pointers (same order as uids).
void execute(cudnnHandle_t handle, const Plan& p, const std::vector<void*>& ptrs,
             const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(ptrs.size() == p.uids.size());
  at::Tensor ws;
  void* ws_ptr = nullptr;
  if (p.workspace > 0) {
    ws = at::empty({p.workspace}, like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
    ws_ptr = ws.data_ptr();
  }
  Desc vp(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  vp.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(p.uids.size()),
         p.uids.data());
  vp.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(ptrs.size()),
         ptrs.data());
  vp.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws_ptr);
  vp.finalize();
  FASTRES_CUDNN_CHECK(cudnnBackendExecute(handle, p.plan->get(), vp.get()));
}

bool engine_allowed(const Desc& cfg, bool fp32_io) {
  if (!fp32_io || at::globalContext().allowTF32CuDNN()) return true;
  // fp32 without TF32 permission: no engine that down-converts its inputs.
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  cudnnBackendDescriptor_t e = engine.get();
  int64_t n = 0;
  if (cudnnBackendGetAttribute(cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                               &n, &e) != CUDNN_STATUS_SUCCESS) {
    return true;
  }
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  int64_t count = 0;
  if (cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &count, notes) != CUDNN_STATUS_SUCCESS) {
    return true;
  }
  for (int64_t i = 0; i < count; ++i) {
    if (notes[i] == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS || notes[i] == CUDNN_NUMERICAL_NOTE_TENSOR_CORE) {
      return false;
    }
  }
  return true;
}

bool autotune_enabled() {
  const char* v = std::getenv("FASTRES_CUDNN_AUTOTUNE");
  return v != nullptr && (std::string(v) == "1" || std::string(v) == "true");
}

// Op graph -> heuristics (mode A, then FALLBACK) -> the first plan that finalizes
// (or, with FASTRES_CUDNN_AUTOTUNE=1 and not capturing, the fastest of them).
std::shared_ptr<Plan> build_plan(Graph&& g, cudnnHandle_t handle, bool fp32_io,
                                 const std::vector<void*>& ptrs, const at::Tensor& like) {
  auto plan = std::make_shared<Plan>();
  auto opg = std::make_shared<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  opg->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(g.ops.size()),
           g.ops.data());
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  opg->set_handle(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle);
#pragma GCC diagnostic pop
  if (!opg->try_finalize()) {
    TORCH_CHECK(false, kNoEngine, " (the operation graph was rejected)");
  }

  const bool tune = autotune_enabled() &&
                    c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  std::vector<DescP> candidates;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *opg);
    heur.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (!heur.try_finalize()) continue;
    int64_t count = 0;
    if (cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                 &count, nullptr) != CUDNN_STATUS_SUCCESS || count <= 0) {
      continue;
    }
    std::vector<DescP> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.push_back(std::make_shared<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw.push_back(cfgs.back()->get());
    }
    int64_t got = 0;
    if (cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                 &got, raw.data()) != CUDNN_STATUS_SUCCESS) {
      continue;
    }
    for (int64_t i = 0; i < got && i < count; ++i) {
      if (!engine_allowed(*cfgs[i], fp32_io)) continue;
      auto ep = std::make_shared<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      ep->set_handle(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle);
#pragma GCC diagnostic pop
      ep->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *cfgs[i]);
      if (!ep->try_finalize()) continue;
      candidates.push_back(ep);
      plan->keep.push_back(cfgs[i]);
      if (!tune) break;
      if (candidates.size() >= 8) break;
    }
    if (!candidates.empty()) break;
  }
  TORCH_CHECK(!candidates.empty(), kNoEngine, " (no engine config of heuristics mode A or FALLBACK "
              "could be finalized)");

  plan->keep.insert(plan->keep.end(), g.keep.begin(), g.keep.end());
  plan->keep.push_back(opg);
  plan->uids = g.io_uids;

  auto workspace_of = [](const DescP& ep) {
    int64_t ws = 0, n = 0;
    FASTRES_CUDNN_CHECK(cudnnBackendGetAttribute(ep->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                 CUDNN_TYPE_INT64, 1, &n, &ws));
    return ws;
  };

  size_t best = 0;
  if (candidates.size() > 1) {
    // First-use timing: 1 warm-up + 3 timed runs per candidate on the current stream.
    float best_ms = -1.0f;
    for (size_t i = 0; i < candidates.size(); ++i) {
      Plan trial;
      trial.plan = candidates[i];
      trial.uids = plan->uids;
      trial.workspace = workspace_of(candidates[i]);
      try {
        execute(handle, trial, ptrs, like);
        at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
        auto stream = at::cuda::getCurrentCUDAStream();
        start.record(stream);
        for (int r = 0; r < 3; ++r) execute(handle, trial, ptrs, like);
        stop.record(stream);
        stop.synchronize();
        const float ms = start.elapsed_time(stop);
        if (best_ms < 0.0f || ms < best_ms) {
          best_ms = ms;
          best = i;
        }
      } catch (const c10::Error&) {
        continue;  // an engine that fails to run is not a candidate
      }
    }
  }
  plan->plan = candidates[best];
  plan->keep.push_back(candidates[best]);
  plan->workspace = workspace_of(plan->plan);
  return plan;
}

struct Cache {
  std::mutex mu;
  std::map<std::vector<int64_t>, std::shared_ptr<Plan>> plans;
};
Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: plans may outlive static teardown order
  return *c;
}

void push_tensor_key(std::vector<int64_t>& key, const at::Tensor& t) {
  if (!t.defined()) {
    key.push_back(-1);
    return;
  }
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  for (auto s : t.sizes()) key.push_back(s);
  for (auto s : t.strides()) key.push_back(s);
  key.push_back(alignment_of(t.data_ptr()));
}

std::vector<int64_t> dims4(const at::Tensor& t) { return t.sizes().vec(); }
// (K) per-channel vector as a [1, K, 1, 1] tensor.
std::vector<int64_t> chan_dims(int64_t k) { return {1, k, 1, 1}; }
std::vector<int64_t> chan_strides(int64_t k) { return {k, 1, k, k}; }
// The canonical NHWC strides of dims [N, C, H, W]: for every (dense channels_last)
// I/O tensor and the fp32 intermediates. torch's strides of size-1 dimensions can be
// anything (a 1x1 filter made channels_last keeps [C, 1, 1, 1]); cuDNN infers the
// layout from the strides, so they are normalised here (same memory, same addresses).
std::vector<int64_t> nhwc_strides(const std::vector<int64_t>& d) {
  return {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
}
std::vector<int64_t> strides4(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast));
  return nhwc_strides(t.sizes().vec());
}

// x and the weight's shape against the conv parameters (shared by every op).
void check_conv_geometry(const at::Tensor& x, at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, const char* op) {
  TORCH_CHECK(x.is_cuda(), "fastres::", op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "fastres::", op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(w.size() == 4, "fastres::", op, ": weight must be 4-D (K, C/groups, R, S), got shape ", w);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "fastres::", op,
              ": stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(groups >= 1 && x.size(1) == w[1] * groups && w[0] % groups == 0, "fastres::", op,
              ": weight of shape ", w, " with groups=", groups, " does not match x of shape ", x.sizes());
  cudnn_dtype(x.scalar_type());
}

void check_conv_args(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const char* op) {
  check_conv_geometry(x, w.sizes(), stride, padding, dilation, groups, op);
  TORCH_CHECK(w.device() == x.device(), "fastres::", op, ": weight is on ", w.device(), ", expected ",
              x.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "fastres::", op, ": weight has dtype ", w.scalar_type(),
              ", expected ", x.scalar_type());
}

// x's memory format, dtype (torch's and cuDNN's), and x, w made channels_last (cuDNN's
// fusion engines want NHWC; the output returns in x's memory format).
std::tuple<at::MemoryFormat, at::ScalarType, cudnnDataType_t, at::Tensor, at::Tensor> channels_last_inputs(
    const at::Tensor& x, const at::Tensor& w) {
  return {memory_format_of(x), x.scalar_type(), cudnn_dtype(x.scalar_type()),
          x.contiguous(at::MemoryFormat::ChannelsLast), w.contiguous(at::MemoryFormat::ChannelsLast)};
}

// A tensor of the conv output's shape (residual, dy), x's dtype and device; channels_last.
at::Tensor output_like(const at::Tensor& t, const char* name, const std::vector<int64_t>& ys, const at::Tensor& x,
                       const char* op) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(ys), "fastres::", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", at::IntArrayRef(ys));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres::", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(), ", expected ",
              x.device());
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

std::vector<int64_t> out_shape(const at::Tensor& x, at::IntArrayRef w, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> s = {x.size(0), w[0], 0, 0};
  for (int i = 0; i < 2; ++i) {
    s[2 + i] = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) / stride[i] + 1;
  }
  TORCH_CHECK(s[2] > 0 && s[3] > 0, "fastres cudnn: empty convolution output ", s);
  return s;
}

// A per-channel parameter of length n, in dtype dt, dense.
at::Tensor chan_param(const std::optional<at::Tensor>& p, int64_t n, at::ScalarType dt, const at::Tensor& x,
                      const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->numel() == n, "fastres::", op, ": ", name, " must have ", n, " elements, got ", p->numel());
  TORCH_CHECK(p->device() == x.device(), "fastres::", op, ": ", name, " is on ", p->device(), ", expected ",
              x.device());
  return p->to(dt).contiguous().view({n});
}

std::shared_ptr<Plan> lookup(const std::vector<int64_t>& key) {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  auto it = c.plans.find(key);
  return it == c.plans.end() ? nullptr : it->second;
}

void store(const std::vector<int64_t>& key, std::shared_ptr<Plan> p) {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  c.plans.emplace(key, std::move(p));
}

enum Pattern : int64_t { kConvBiasAct = 1, kConvActStats = 2, kDgradDreluDbn = 3, kScaleShiftReluWgrad = 4 };
enum Uid : int64_t {
  kX = 1, kW, kY, kBias, kRes, kScale, kShift, kSum, kSumSq, kDY, kDV, kDW, kMean, kInvStd, kDScale, kDShift,
  kEqDy, kEqX, kEqBias,
  kVConv = 100, kVBias, kVRes, kVScaled, kVShifted, kVAct, kVDgrad, kVCentered, kVNormed
};

// The input prologue x -> [MUL scale] -> [ADD shift] -> [RELU_FWD] of the training
// graphs (the previous BatchNorm, folded, and its ReLU). Its per-channel tensors are
// declared (in this order: scale, shift) by declare_prologue, the chain by apply_prologue
// with virtual intermediates of dtype `vdt`.
struct Prologue {
  DescP scale, shift;
};

Prologue declare_prologue(Graph& g, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          cudnnDataType_t pdt) {
  const int64_t C = x.size(1);
  auto chan = [&](int64_t uid, const at::Tensor& t) {
    return t.defined() ? g.tensor(uid, pdt, chan_dims(C), chan_strides(C), false, alignment_of(t.data_ptr()))
                       : DescP();
  };
  Prologue p;
  p.scale = chan(kScale, scale);
  p.shift = chan(kShift, shift);
  return p;
}

DescP apply_prologue(Graph& g, DescP cur, const Prologue& p, const std::vector<int64_t>& xd, bool relu,
                     cudnnDataType_t vdt) {
  if (p.scale) {
    auto o = g.tensor(kVScaled, vdt, xd, nhwc_strides(xd), true, 16);
    g.pointwise(CUDNN_POINTWISE_MUL, cur, p.scale, o);
    cur = o;
  }
  if (p.shift) {
    auto o = g.tensor(kVShifted, vdt, xd, nhwc_strides(xd), true, 16);
    g.pointwise(CUDNN_POINTWISE_ADD, cur, p.shift, o);
    cur = o;
  }
  if (relu) {
    auto o = g.tensor(kVAct, vdt, xd, nhwc_strides(xd), true, 16);
    g.pointwise(CUDNN_POINTWISE_RELU_FWD, cur, nullptr, o);
    cur = o;
  }
  return cur;
}


// The start of a plan key: pattern, handle (plans are built for one handle, as torch's
// own cuDNN v8 plan cache is thread-local), device, conv parameters, flags, TF32.
std::vector<int64_t> base_key(Pattern pattern, cudnnHandle_t handle, const at::Tensor& x, int64_t groups,
                              int64_t flags, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  std::vector<int64_t> key = {pattern, reinterpret_cast<int64_t>(handle), x.get_device(), groups, flags,
                              at::globalContext().allowTF32CuDNN() ? 1 : 0};
  for (auto v : {stride, padding, dilation}) key.insert(key.end(), v.begin(), v.end());
  return key;
}

// The cached plan of `key` (built by `build` on a miss), executed on `ptrs`.
template <class Build>
void run_cached(const std::vector<int64_t>& key, cudnnHandle_t handle, bool fp32_io, const std::vector<void*>& ptrs,
                const at::Tensor& like, Build&& build) {
  auto plan = lookup(key);
  if (!plan) {
    Graph g;
    build(g);
    // io_uids were pushed in declaration order, which every caller keeps equal to ptrs'
    plan = build_plan(std::move(g), handle, fp32_io, ptrs, like);
    store(key, plan);
  }
  execute(handle, *plan, ptrs, like);
}

}  // namespace

at::Tensor cudnn_conv_bias_act(const at::Tensor& x_in, const at::Tensor& w_in,
                               const std::optional<at::Tensor>& bias_in,
                               const std::optional<at::Tensor>& residual_in, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = "cudnn_conv_bias_act";
  check_conv_args(x_in, w_in, stride, padding, dilation, groups, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::MemoryFormat fmt; at::ScalarType dt; cudnnDataType_t cdt; at::Tensor x, w;  // NOLINT (lambdas capture them)
  std::tie(fmt, dt, cdt, x, w) = channels_last_inputs(x_in, w_in);
  const auto pdt = dt == at::kFloat ? at::kFloat : dt;  // per-channel operand dtype (see top)
  const auto ys = out_shape(x, w.sizes(), stride, padding, dilation);
  const int64_t K = ys[1];
  at::Tensor bias = chan_param(bias_in, K, pdt, x, op, "bias");
  at::Tensor res;
  if (residual_in.has_value() && residual_in->defined()) {
    res = output_like(*residual_in, "residual", ys, x, op);
  }
  at::Tensor y = at::empty(ys, x.options().memory_format(at::MemoryFormat::ChannelsLast));

  cudnnHandle_t handle = at::native::getCudnnHandle();  // this thread's, set to the current stream
  auto key = base_key(kConvBiasAct, handle, x, groups, relu ? 1 : 0, stride, padding, dilation);
  for (const auto* t : {&x, &w, &bias, &res, &y}) push_tensor_key(key, *t);

  // pointers in the order the graph declares its I/O tensors
  std::vector<void*> ptrs = {x.data_ptr(), w.data_ptr()};
  if (bias.defined()) ptrs.push_back(bias.data_ptr());
  if (res.defined()) ptrs.push_back(res.data_ptr());
  ptrs.push_back(y.data_ptr());

  run_cached(key, handle, dt == at::kFloat, ptrs, x, [&](Graph& g) {
    auto tx = g.tensor(kX, cdt, dims4(x), strides4(x), false, alignment_of(x.data_ptr()));
    auto tw = g.tensor(kW, cdt, dims4(w), strides4(w), false, alignment_of(w.data_ptr()));
    DescP tb, tr;
    if (bias.defined()) tb = g.tensor(kBias, cudnn_dtype(pdt), chan_dims(K), chan_strides(K), false,
                                      alignment_of(bias.data_ptr()));
    if (res.defined()) tr = g.tensor(kRes, cdt, dims4(res), strides4(res), false, alignment_of(res.data_ptr()));
    const int n_pw = (bias.defined() ? 1 : 0) + (res.defined() ? 1 : 0) + (relu ? 1 : 0);
    int left = n_pw;
    // the tensor produced by the next op: y itself for the last op, else a virtual fp32
    auto next = [&](int64_t vuid) {
      if (left == 0) return g.tensor(kY, cdt, ys, nhwc_strides(ys), false, alignment_of(y.data_ptr()));
      return g.tensor(vuid, CUDNN_DATA_FLOAT, ys, nhwc_strides(ys), true, 16);
    };
    DescP cur = next(kVConv);
    g.conv(Graph::kFprop, tx, tw, cur, stride.vec(), padding.vec(), dilation.vec());
    if (bias.defined()) {
      --left;
      auto o = next(kVBias);
      g.pointwise(CUDNN_POINTWISE_ADD, cur, tb, o);
      cur = o;
    }
    if (res.defined()) {
      --left;
      auto o = next(kVRes);
      g.pointwise(CUDNN_POINTWISE_ADD, cur, tr, o);
      cur = o;
    }
    if (relu) {
      --left;
      auto o = next(kVAct);
      g.pointwise(CUDNN_POINTWISE_RELU_FWD, cur, nullptr, o);
      cur = o;
    }
    // declared: x, w, [bias], [res], y — as ptrs
  });
  return fmt == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_conv_act_stats(
    const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& shift_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool in_relu) {
  const char* op = "cudnn_conv_act_stats";
  check_conv_args(x_in, w_in, stride, padding, dilation, groups, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::MemoryFormat fmt; at::ScalarType dt; cudnnDataType_t cdt; at::Tensor x, w;  // NOLINT (lambdas capture them)
  std::tie(fmt, dt, cdt, x, w) = channels_last_inputs(x_in, w_in);
  const auto pdt = dt == at::kFloat ? at::kFloat : dt;  // per-channel operand dtype (see top)
  const int64_t C = x.size(1);
  at::Tensor scale = chan_param(scale_in, C, pdt, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, pdt, x, op, "shift");
  const auto ys = out_shape(x, w.sizes(), stride, padding, dilation);
  const int64_t K = ys[1];
  at::Tensor y = at::empty(ys, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor sum = at::empty({1, K, 1, 1}, x.options().dtype(at::kFloat));
  at::Tensor sumsq = at::empty({1, K, 1, 1}, x.options().dtype(at::kFloat));

  cudnnHandle_t handle = at::native::getCudnnHandle();  // this thread's, set to the current stream
  auto key = base_key(kConvActStats, handle, x, groups, in_relu ? 1 : 0, stride, padding, dilation);
  for (const auto* t : {&x, &w, &scale, &shift, &y, &sum, &sumsq}) push_tensor_key(key, *t);

  std::vector<void*> ptrs = {x.data_ptr()};
  if (scale.defined()) ptrs.push_back(scale.data_ptr());
  if (shift.defined()) ptrs.push_back(shift.data_ptr());
  ptrs.push_back(w.data_ptr());
  ptrs.push_back(y.data_ptr());
  ptrs.push_back(sum.data_ptr());
  ptrs.push_back(sumsq.data_ptr());

  run_cached(key, handle, dt == at::kFloat, ptrs, x, [&](Graph& g) {
    auto tx = g.tensor(kX, cdt, dims4(x), strides4(x), false, alignment_of(x.data_ptr()));
    auto pro = declare_prologue(g, x, scale, shift, cudnn_dtype(pdt));
    auto tw = g.tensor(kW, cdt, dims4(w), strides4(w), false, alignment_of(w.data_ptr()));
    DescP cur = apply_prologue(g, tx, pro, dims4(x), in_relu, CUDNN_DATA_FLOAT);
    auto ty = g.tensor(kY, cdt, ys, nhwc_strides(ys), false, alignment_of(y.data_ptr()));
    g.conv(Graph::kFprop, cur, tw, ty, stride.vec(), padding.vec(), dilation.vec());
    auto tsum = g.tensor(kSum, CUDNN_DATA_FLOAT, chan_dims(K), chan_strides(K), false,
                         alignment_of(sum.data_ptr()));
    auto tsq = g.tensor(kSumSq, CUDNN_DATA_FLOAT, chan_dims(K), chan_strides(K), false,
                        alignment_of(sumsq.data_ptr()));
    g.genstats(ty, tsum, tsq);
  });
  return {fmt == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt), sum.view({K}), sumsq.view({K})};
}

// Training backward, data gradient ("DgradDreluBNBwdWeight"): for a conv whose input
// u = relu(x*scale + shift) is the previous BatchNorm (folded) + ReLU,
//   dv = relu_bwd(conv_dgrad(dy, w), x*scale + shift)         (x's dtype, x's shape)
//   dscale = sum dv*x,  dshift = sum dv                         (fp32, [C])
// cuDNN's pattern is written with the BN's own mean/invstd/gamma/beta; the folded form
// is the same graph with mean 0 and invstd 1 (then x̂ = x, bn(x) = x*scale + shift and
// the DBN-weight outputs dscale/dbias are Σdv·x and Σdv). Its "equivalent" dBN
// coefficients are required outputs of the operation and are discarded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_dgrad_drelu_dbn(
    const at::Tensor& dy_in, const at::Tensor& w_in, const at::Tensor& x_in, const at::Tensor& scale_in,
    const at::Tensor& shift_in, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const char* op = "cudnn_dgrad_drelu_dbn";
  check_conv_args(x_in, w_in, stride, padding, dilation, groups, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::MemoryFormat fmt; at::ScalarType dt; cudnnDataType_t cdt; at::Tensor x, w;  // NOLINT (lambdas capture them)
  std::tie(fmt, dt, cdt, x, w) = channels_last_inputs(x_in, w_in);
  const auto ys = out_shape(x, w.sizes(), stride, padding, dilation);
  at::Tensor dy = output_like(dy_in, "dy", ys, x, op);
  const int64_t C = x.size(1);
  at::Tensor scale = chan_param(scale_in, C, at::kFloat, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, at::kFloat, x, op, "shift");
  TORCH_CHECK(scale.defined() && shift.defined(), "fastres::", op, ": scale and shift are required");
  at::Tensor mean = at::zeros({C}, x.options().dtype(at::kFloat));
  at::Tensor invstd = at::ones({C}, x.options().dtype(at::kFloat));
  at::Tensor dv = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto per_c = [&] { return at::empty({C}, x.options().dtype(at::kFloat)); };
  at::Tensor dscale = per_c(), dshift = per_c(), eq_dy = per_c(), eq_x = per_c(), eq_bias = per_c();

  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto key = base_key(kDgradDreluDbn, handle, x, groups, 0, stride, padding, dilation);
  for (const auto* t : {&dy, &w, &x, &mean, &invstd, &scale, &shift, &dv, &dscale, &dshift, &eq_dy, &eq_x, &eq_bias}) {
    push_tensor_key(key, *t);
  }
  std::vector<void*> ptrs;
  for (const auto* t : {&dy, &w, &x, &mean, &invstd, &scale, &shift, &dv, &dscale, &dshift, &eq_dy, &eq_x, &eq_bias}) {
    ptrs.push_back(t->data_ptr());
  }
  run_cached(key, handle, dt == at::kFloat, ptrs, x, [&](Graph& g) {
    const auto xd = dims4(x);
    auto chan = [&](int64_t uid, const at::Tensor& t) {
      return g.tensor(uid, CUDNN_DATA_FLOAT, chan_dims(C), chan_strides(C), false, alignment_of(t.data_ptr()));
    };
    auto tdy = g.tensor(kDY, cdt, ys, nhwc_strides(ys), false, alignment_of(dy.data_ptr()));
    auto tw = g.tensor(kW, cdt, dims4(w), strides4(w), false, alignment_of(w.data_ptr()));
    auto tx = g.tensor(kX, cdt, xd, strides4(x), false, alignment_of(x.data_ptr()));
    auto tm = chan(kMean, mean);
    auto tv = chan(kInvStd, invstd);
    auto ts = chan(kScale, scale);
    auto tb = chan(kShift, shift);
    auto tdv = g.tensor(kDV, cdt, xd, nhwc_strides(xd), false, alignment_of(dv.data_ptr()));
    auto tds = chan(kDScale, dscale);
    auto tdb = chan(kDShift, dshift);
    auto teq_dy = chan(kEqDy, eq_dy);
    auto teq_x = chan(kEqX, eq_x);
    auto teq_b = chan(kEqBias, eq_bias);
    // declared: dy, w, x, mean, invstd, scale, shift, dv, dscale, dshift, eq_dy, eq_x, eq_bias — as ptrs
    auto dgrad = g.tensor(kVDgrad, CUDNN_DATA_FLOAT, xd, nhwc_strides(xd), true, 16);
    g.conv(Graph::kDgrad, tdy, tw, dgrad, stride.vec(), padding.vec(), dilation.vec());
    auto centered = g.tensor(kVCentered, CUDNN_DATA_FLOAT, xd, nhwc_strides(xd), true, 16);
    g.pointwise(CUDNN_POINTWISE_SUB, tx, tm, centered);
    auto normed = g.tensor(kVNormed, CUDNN_DATA_FLOAT, xd, nhwc_strides(xd), true, 16);
    g.pointwise(CUDNN_POINTWISE_MUL, centered, tv, normed);
    auto pre = apply_prologue(g, normed, Prologue{ts, tb}, xd, false, CUDNN_DATA_FLOAT);
    g.pointwise(CUDNN_POINTWISE_RELU_BWD, pre, dgrad, tdv);
    g.bn_bwd_weights(tx, tdv, tm, tv, ts, tds, tdb, teq_dy, teq_x, teq_b);
  });
  return {fmt == at::MemoryFormat::ChannelsLast ? dv : dv.contiguous(fmt), dscale, dshift};
}

// Training backward, weight gradient ("scale-bias-relu-wgrad", ConvBNwgrad):
//   dw = conv_wgrad(dy, [relu]([x*scale] [+ shift]))   (the prologue recomputed as x is
// loaded, never stored; intermediates in x's dtype: u is rounded to x's dtype in the
// forward too). dw in x's dtype, contiguous.
at::Tensor cudnn_wgrad_scale_shift_relu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                        const std::optional<at::Tensor>& scale_in,
                                        const std::optional<at::Tensor>& shift_in, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, bool in_relu) {
  const char* op = "cudnn_wgrad_scale_shift_relu";
  check_conv_geometry(x_in, weight_size, stride, padding, dilation, groups, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto dt = x_in.scalar_type();
  const auto cdt = cudnn_dtype(dt);
  at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto ys = out_shape(x, weight_size, stride, padding, dilation);
  at::Tensor dy = output_like(dy_in, "dy", ys, x, op);
  const int64_t C = x.size(1);
  at::Tensor scale = chan_param(scale_in, C, dt, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, dt, x, op, "shift");
  at::Tensor dw = at::empty(weight_size, x.options().memory_format(at::MemoryFormat::ChannelsLast));

  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto key = base_key(kScaleShiftReluWgrad, handle, x, groups, in_relu ? 1 : 0, stride, padding, dilation);
  for (const auto* t : {&dy, &x, &scale, &shift, &dw}) push_tensor_key(key, *t);
  std::vector<void*> ptrs = {x.data_ptr()};
  if (scale.defined()) ptrs.push_back(scale.data_ptr());
  if (shift.defined()) ptrs.push_back(shift.data_ptr());
  ptrs.push_back(dy.data_ptr());
  ptrs.push_back(dw.data_ptr());
  run_cached(key, handle, dt == at::kFloat, ptrs, x, [&](Graph& g) {
    const auto xd = dims4(x);
    auto tx = g.tensor(kX, cdt, xd, strides4(x), false, alignment_of(x.data_ptr()));
    auto pro = declare_prologue(g, x, scale, shift, cdt);
    auto tdy = g.tensor(kDY, cdt, ys, nhwc_strides(ys), false, alignment_of(dy.data_ptr()));
    auto tdw = g.tensor(kDW, cdt, dims4(dw), strides4(dw), false, alignment_of(dw.data_ptr()));
    // declared: x, [scale], [shift], dy, dw — as ptrs
    auto u = apply_prologue(g, tx, pro, xd, in_relu, dt == at::kFloat ? CUDNN_DATA_FLOAT : cdt);
    g.conv(Graph::kWgrad, tdy, u, tdw, stride.vec(), padding.vec(), dilation.vec());
  });
  return dw.contiguous();
}

std::string cudnn_version_string() {
  const size_t v = cudnnGetVersion();
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

}  // namespace cudnn_graph
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("cudnn_conv_bias_act", &fastres::cudnn_graph::cudnn_conv_bias_act);
  m.impl("cudnn_conv_act_stats", &fastres::cudnn_graph::cudnn_conv_act_stats);
  m.impl("cudnn_dgrad_drelu_dbn", &fastres::cudnn_graph::cudnn_dgrad_drelu_dbn);
  m.impl("cudnn_wgrad_scale_shift_relu", &fastres::cudnn_graph::cudnn_wgrad_scale_shift_relu);
}

#endif  // FASTRES_WITH_CUDNN
