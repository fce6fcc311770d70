// cuDNN fused-convolution graphs (issue 11), through cuDNN's backend (graph) API.
//
//   fastres::cudnn_conv_bias_act   conv_fprop -> [+ residual] -> [+ bias] -> [ReLU]
//                                  (inference: the folded conv-BN, one cuDNN graph)
//   fastres::cudnn_conv_act_stats  [x*scale + shift -> ReLU] -> conv_fprop -> y,
//                                  genstats(y) -> per-channel sum, sum of squares (fp32)
//                                  (training forward: the "ConvBNfprop" pattern)
//   fastres::cudnn_dgrad_drelu_dbn conv_dgrad -> ReLU mask of x*scale + shift -> dv,
//                                  BN-backward weights -> Σdv·x, Σdv (fp32)
//                                  (training backward: "DgradDreluBNBwdWeight")
//   fastres::cudnn_wgrad_scale_shift_relu  [x*scale + shift -> ReLU] -> conv_wgrad -> dw
//                                  (training backward: "ConvBNwgrad")
//   fastres_cudnn::graph_check     deviceless: builds one of the graphs above for a device
//                                  described by cuDNN's device-property JSON (no GPU needed,
//                                  cuDNN >= 9.8) and reports whether heuristics find an
//                                  engine whose plan finalizes (docs/DESIGN.md).
//
// The schemas of the four ops are defined in ops.cpp (always, so the fake kernels of
// fastres/cudnn.py exist on every build); this file adds the CUDA kernels and is
// compiled only where the cuDNN headers were found (FASTRES_WITH_CUDNN, setup.py /
// CMakeLists.txt). It is a plain .cpp (host compiler): no device code here.
//
// One graph builder per pattern (build_*), shared by the run-time ops and graph_check,
// so that the deviceless check tests exactly the descriptors the ops use. Builders take
// shapes only; every I/O tensor is declared dense NHWC (canonical strides) with a 16-byte
// pointer alignment, and the ops make their inputs so (a copy where a pointer is not
// 16-byte aligned or the strides are not dense channels_last).
//
// Failures: everything before a plan's first successful execution (a descriptor that
// does not finalize, heuristics without a usable config, no plan that finalizes, the
// workspace allocation, the first cudnnBackendExecute) raises an error that starts with
// kNoEngine and names the descriptor / attribute / tensor and cuDNN's status and message;
// fastres/cudnn.py falls back (aten conv + fused kernels) and remembers the graph. A plan
// whose first execution fails is replaced by the next engine config heuristics return
// (up to kMaxConfigs) before that. A plan is cached only once it has run; after that a
// failure is a real error (same details, without kNoEngine). Running out of memory is
// never "no engine": c10::OutOfMemoryError propagates as itself (torch.OutOfMemoryError),
// and nothing is remembered. No plan is built while the current stream is being
// captured into a CUDA graph (heuristics, runtime compilation and the first-use
// execution do not belong in a graph): kNotInCapture, the Python side falls back for
// that call only.
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

#include <dlfcn.h>

#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

// CUDNN_ATTR_POINTWISE_NAN_PROPAGATION, CUDNN_TYPE_NAN_PROPOGATION, CUDNN_PROPAGATE_NAN and
// the handle attributes are marked deprecated in cuDNN 9.x headers but are still what the
// backend reads (ReLU: "Required only for comparison based pointwise modes"; the handle of
// an operation graph / plan when no device-property descriptor is given).
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace fastres {
namespace cudnn_graph {
namespace {

// The message the Python side recognises as "this graph has no engine here" (fall back).
constexpr const char* kNoEngine = "fastres cudnn: no engine supports this graph";
// ... and "this graph has no plan yet and the stream is being captured" (fall back, once).
constexpr const char* kNotInCapture = "fastres cudnn: no plan is built during CUDA graph capture";
// Engine configs tried, in heuristics order, when a plan finalizes but its first
// execution fails (without autotuning).
constexpr size_t kMaxConfigs = 3;

std::string status_text(cudnnStatus_t s) {
  char msg[1024] = {0};
  cudnnGetLastErrorString(msg, sizeof(msg));
  std::string out = cudnnGetErrorString(s);
  if (msg[0] != '\0') out += std::string(" (") + msg + ")";
  return out;
}

// A cuDNN call that failed while a graph or plan was built: the text names the call,
// the descriptor (type and role), the attribute, and cuDNN's status and message.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// RAII owner of one backend descriptor; `what` names it in error messages, e.g.
// "CUDNN_BACKEND_TENSOR_DESCRIPTOR 'x' (uid 1)".
class Desc {
 public:
  Desc(cudnnBackendDescriptorType_t type, const char* type_name, std::string role)
      : what_(std::string(type_name) + (role.empty() ? "" : " '" + role + "'")) {
    cudnnStatus_t s = cudnnBackendCreateDescriptor(type, &d_);
    if (s != CUDNN_STATUS_SUCCESS) throw Failure("cudnnBackendCreateDescriptor(" + what_ + "): " + status_text(s));
  }
  ~Desc() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  const std::string& what() const { return what_; }

  void set(cudnnBackendAttributeName_t a, const char* a_name, cudnnBackendAttributeType_t t, int64_t n,
           const void* v) {
    cudnnStatus_t s = cudnnBackendSetAttribute(d_, a, t, n, v);
    if (s != CUDNN_STATUS_SUCCESS) {
      throw Failure("cudnnBackendSetAttribute(" + what_ + ", " + a_name + "): " + status_text(s));
    }
  }
  void set_i64(cudnnBackendAttributeName_t a, const char* n, int64_t v) { set(a, n, CUDNN_TYPE_INT64, 1, &v); }
  void set_i64s(cudnnBackendAttributeName_t a, const char* n, const std::vector<int64_t>& v) {
    set(a, n, CUDNN_TYPE_INT64, static_cast<int64_t>(v.size()), v.data());
  }
  void set_dtype(cudnnBackendAttributeName_t a, const char* n, cudnnDataType_t v) {
    set(a, n, CUDNN_TYPE_DATA_TYPE, 1, &v);
  }
  void set_bool(cudnnBackendAttributeName_t a, const char* n, bool b) {
    bool v = b;
    set(a, n, CUDNN_TYPE_BOOLEAN, 1, &v);
  }
  void set_double(cudnnBackendAttributeName_t a, const char* n, double v) { set(a, n, CUDNN_TYPE_DOUBLE, 1, &v); }
  void set_desc(cudnnBackendAttributeName_t a, const char* n, const Desc& d) {
    cudnnBackendDescriptor_t v = d.get();
    set(a, n, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
  }
  void set_handle(cudnnBackendAttributeName_t a, const char* n, cudnnHandle_t h) {
    set(a, n, CUDNN_TYPE_HANDLE, 1, &h);
  }
  void finalize() {
    cudnnStatus_t s = cudnnBackendFinalize(d_);
    if (s != CUDNN_STATUS_SUCCESS) throw Failure("cudnnBackendFinalize(" + what_ + "): " + status_text(s));
  }
  // "" on success, else the failure text (for the candidates loop: a config whose plan
  // does not finalize is skipped, its reason kept for the message).
  std::string try_finalize() {
    cudnnStatus_t s = cudnnBackendFinalize(d_);
    return s == CUDNN_STATUS_SUCCESS ? std::string() : "cudnnBackendFinalize(" + what_ + "): " + status_text(s);
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
  std::string what_;
};
using DescP = std::shared_ptr<Desc>;

// DESC(TYPE, role) / A(ATTR): the enum and its name for the messages (A also names a
// descriptor type in the tables below).
#define FR_DESC(type, role) std::make_shared<Desc>(type, #type, role)
#define A(attr) attr, #attr

const char* dtype_name(cudnnDataType_t t) {
  switch (t) {
    case CUDNN_DATA_FLOAT: return "float32";
    case CUDNN_DATA_HALF: return "float16";
    case CUDNN_DATA_BFLOAT16: return "bfloat16";
    default: return "other";
  }
}

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

// Every I/O tensor is declared with this pointer alignment; the ops copy an input whose
// pointer is not aligned so (vectorised engines load 16 bytes at a time).
constexpr int64_t kAlign = 16;

// (K) per-channel vector as a [1, K, 1, 1] tensor (NHWC strides of that shape).
std::vector<int64_t> chan_dims(int64_t k) { return {1, k, 1, 1}; }
std::vector<int64_t> chan_strides(int64_t k) { return {k, 1, k, k}; }
// The canonical NHWC strides of dims [N, C, H, W]: for every I/O tensor (dense
// channels_last) and the fp32 intermediates. torch's strides of size-1 dimensions can be
// anything (a 1x1 filter made channels_last keeps [C, 1, 1, 1]); cuDNN infers the
// layout from the strides, so they are normalised here (same memory, same addresses).
std::vector<int64_t> nhwc_strides(const std::vector<int64_t>& d) {
  return {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
}

enum Pattern : int64_t { kConvBiasAct = 1, kConvActStats = 2, kDgradDreluDbn = 3, kScaleShiftReluWgrad = 4 };
const char* pattern_name(Pattern p) {
  switch (p) {
    case kConvBiasAct: return "conv_bias_add_relu";
    case kConvActStats: return "conv_genstats";
    case kDgradDreluDbn: return "dgrad_drelu_dbn";
    case kScaleShiftReluWgrad: return "scale_shift_relu_wgrad";
  }
  return "?";
}

// The three convolution operations: the descriptor type, its role in messages, and the
// attributes of its tensors (in Graph::conv's argument order), conv descriptor, alpha, beta.
template <class E>
struct Named {
  E id;
  const char* name;
};
struct ConvOpKind {
  Named<cudnnBackendDescriptorType_t> type;
  const char* role;
  Named<cudnnBackendAttributeName_t> tensor[3], conv_desc, alpha, beta;
};
// Row of the table: the descriptor CUDNN_BACKEND_OPERATION_CONVOLUTION_<TYPE>_DESCRIPTOR
// and its attributes CUDNN_ATTR_OPERATION_CONVOLUTION_<P>_<T0, T1, T2, CONV_DESC, ALPHA, BETA>.
#define FR_CONV_ATTR(P, NAME) {A(CUDNN_ATTR_OPERATION_CONVOLUTION_##P##_##NAME)}
#define FR_CONV_OP(TYPE, ROLE, P, T0, T1, T2)                                                   \
  {{A(CUDNN_BACKEND_OPERATION_CONVOLUTION_##TYPE##_DESCRIPTOR)},                                 \
   ROLE,                                                                                         \
   {FR_CONV_ATTR(P, T0), FR_CONV_ATTR(P, T1), FR_CONV_ATTR(P, T2)},                              \
   FR_CONV_ATTR(P, CONV_DESC),                                                                   \
   FR_CONV_ATTR(P, ALPHA),                                                                       \
   FR_CONV_ATTR(P, BETA)}
// y = fprop(x, w); dx = dgrad(dy, w); dw = wgrad(dy, x)
constexpr ConvOpKind kConvFprop = FR_CONV_OP(FORWARD, "conv_fprop", FORWARD, X, W, Y);
constexpr ConvOpKind kConvDgrad = FR_CONV_OP(BACKWARD_DATA, "conv_dgrad", BWD_DATA, DY, W, DX);
constexpr ConvOpKind kConvWgrad = FR_CONV_OP(BACKWARD_FILTER, "conv_wgrad", BWD_FILTER, DY, X, DW);
#undef FR_CONV_OP
#undef FR_CONV_ATTR

enum Uid : int64_t {
  kX = 1, kW, kY, kBias, kRes, kScale, kShift, kSum, kSumSq, kDY, kDV, kDW, kMean, kInvStd, kDScale, kDShift,
  kEqDy, kEqX, kEqBias,
  kVConv = 100, kVBias, kVRes, kVScaled, kVShifted, kVAct, kVDgrad, kVCentered, kVNormed
};

// Builds the operations of one graph; keeps every descriptor alive with the plan.
struct Graph {
  std::vector<DescP> keep;
  std::vector<cudnnBackendDescriptor_t> ops;
  std::vector<int64_t> io_uids;  // non-virtual tensors, in declaration order

  DescP tensor(int64_t uid, const char* name, cudnnDataType_t dt, const std::vector<int64_t>& dims,
               const std::vector<int64_t>& strides, bool is_virtual) {
    std::ostringstream role;
    role << name << (is_virtual ? " (virtual" : " (uid ") << (is_virtual ? ", uid " : "") << uid << ", "
         << dtype_name(dt) << ")";
    auto t = FR_DESC(CUDNN_BACKEND_TENSOR_DESCRIPTOR, role.str());
    t->set_dtype(A(CUDNN_ATTR_TENSOR_DATA_TYPE), dt);
    t->set_i64s(A(CUDNN_ATTR_TENSOR_DIMENSIONS), dims);
    t->set_i64s(A(CUDNN_ATTR_TENSOR_STRIDES), strides);
    t->set_i64(A(CUDNN_ATTR_TENSOR_UNIQUE_ID), uid);
    t->set_i64(A(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT), kAlign);
    t->set_bool(A(CUDNN_ATTR_TENSOR_IS_VIRTUAL), is_virtual);
    t->finalize();
    keep.push_back(t);
    if (!is_virtual) io_uids.push_back(uid);
    return t;
  }
  DescP nhwc(int64_t uid, const char* name, cudnnDataType_t dt, const std::vector<int64_t>& dims,
             bool is_virtual = false) {
    return tensor(uid, name, dt, dims, nhwc_strides(dims), is_virtual);
  }
  DescP chan(int64_t uid, const char* name, cudnnDataType_t dt, int64_t c) {
    return tensor(uid, name, dt, chan_dims(c), chan_strides(c), false);
  }

  // Finalizes one operation and appends it to the graph (kept alive with the plan).
  void add_op(const DescP& op) {
    op->finalize();
    keep.push_back(op);
    ops.push_back(op->get());
  }

  DescP conv_desc(const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                  const std::vector<int64_t>& dilation) {
    auto conv = FR_DESC(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, "conv");
    conv->set_i64(A(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS), 2);
    conv->set_dtype(A(CUDNN_ATTR_CONVOLUTION_COMP_TYPE), CUDNN_DATA_FLOAT);
    cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
    conv->set(A(CUDNN_ATTR_CONVOLUTION_CONV_MODE), CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
    conv->set_i64s(A(CUDNN_ATTR_CONVOLUTION_DILATIONS), dilation);
    conv->set_i64s(A(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES), stride);
    conv->set_i64s(A(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS), padding);
    conv->set_i64s(A(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS), padding);
    conv->finalize();
    keep.push_back(conv);
    return conv;
  }

  // One convolution operation of kind `k` (kConvFprop, kConvDgrad, kConvWgrad) on the
  // tensors a, b, out in the order of k.tensor: alpha 1, beta 0 (fp32).
  void conv(const ConvOpKind& k, const DescP& a, const DescP& b, const DescP& out, const std::vector<int64_t>& stride,
            const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
    auto desc = conv_desc(stride, padding, dilation);
    auto op = std::make_shared<Desc>(k.type.id, k.type.name, k.role);
    const Desc* io[3] = {a.get(), b.get(), out.get()};
    for (int i = 0; i < 3; ++i) op->set_desc(k.tensor[i].id, k.tensor[i].name, *io[i]);
    op->set_desc(k.conv_desc.id, k.conv_desc.name, *desc);
    float alpha = 1.0f, beta = 0.0f;
    op->set(k.alpha.id, k.alpha.name, CUDNN_TYPE_FLOAT, 1, &alpha);
    op->set(k.beta.id, k.beta.name, CUDNN_TYPE_FLOAT, 1, &beta);
    add_op(op);
  }

  // BN backward weights: dscale = sum dy*(x-mean)*invstd, dbias = sum dy, and the
  // three "equivalent" coefficients of the full BN backward (fp32, [1,C,1,1] each).
  void bn_bwd_weights(const DescP& x, const DescP& dy, const DescP& mean, const DescP& invstd,
                      const DescP& scale, const DescP& dscale, const DescP& dbias, const DescP& eq_dy,
                      const DescP& eq_x, const DescP& eq_bias) {
    auto op = FR_DESC(CUDNN_BACKEND_OPERATION_BN_BWD_WEIGHTS_DESCRIPTOR, "bn_bwd_weights");
    op->set_dtype(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MATH_PREC), CUDNN_DATA_FLOAT);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_X_DESC), *x);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DY_DESC), *dy);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MEAN_DESC), *mean);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_INVSTD_DESC), *invstd);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_BN_SCALE_DESC), *scale);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_SCALE_DESC), *dscale);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_BIAS_DESC), *dbias);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_DY_SCALE_DESC), *eq_dy);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_X_SCALE_DESC), *eq_x);
    op->set_desc(A(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_BIAS), *eq_bias);
    add_op(op);
  }

  // y = mode(x [, b]) in fp32. For RELU_BWD (an activation backward) b is dy and y is
  // dx: dx = dy where x > 0, else 0 (the mask from the forward input x).
  void pointwise(cudnnPointwiseMode_t mode, const char* name, const DescP& x, const DescP& b, const DescP& y) {
    auto pw = FR_DESC(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, name);
    pw->set(A(CUDNN_ATTR_POINTWISE_MODE), CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    pw->set_dtype(A(CUDNN_ATTR_POINTWISE_MATH_PREC), CUDNN_DATA_FLOAT);
    const bool relu = mode == CUDNN_POINTWISE_RELU_FWD || mode == CUDNN_POINTWISE_RELU_BWD;
    if (relu) {
      // Comparison-based modes: the header documents NaN propagation as required for
      // them (only CUDNN_PROPAGATE_NAN supported; the default NOT_PROPAGATE is not);
      // plain ReLU = lower clip 0, slope 0, upper clip the fp32 maximum (math precision fp32).
      cudnnNanPropagation_t nan = CUDNN_PROPAGATE_NAN;
      pw->set(A(CUDNN_ATTR_POINTWISE_NAN_PROPAGATION), CUDNN_TYPE_NAN_PROPOGATION, 1, &nan);
      pw->set_double(A(CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP), 0.0);
      pw->set_double(A(CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP), static_cast<double>(FLT_MAX));
      pw->set_double(A(CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE), 0.0);
    }
    pw->finalize();
    keep.push_back(pw);

    const bool bwd = mode == CUDNN_POINTWISE_RELU_BWD;
    auto op = FR_DESC(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, name);
    op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR), *pw);
    op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_XDESC), *x);
    if (b) {
      if (bwd) {
        op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_DYDESC), *b);
      } else {
        op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_BDESC), *b);
      }
    }
    if (bwd) {
      op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_DXDESC), *y);
    } else {
      op->set_desc(A(CUDNN_ATTR_OPERATION_POINTWISE_YDESC), *y);
    }
    add_op(op);
  }

  void genstats(const DescP& x, const DescP& sum, const DescP& sumsq) {
    auto op = FR_DESC(CUDNN_BACKEND_OPERATION_GEN_STATS_DESCRIPTOR, "genstats");
    cudnnGenStatsMode_t mode = CUDNN_GENSTATS_SUM_SQSUM;
    op->set(A(CUDNN_ATTR_OPERATION_GENSTATS_MODE), CUDNN_TYPE_GENSTATS_MODE, 1, &mode);
    op->set_dtype(A(CUDNN_ATTR_OPERATION_GENSTATS_MATH_PREC), CUDNN_DATA_FLOAT);
    op->set_desc(A(CUDNN_ATTR_OPERATION_GENSTATS_XDESC), *x);
    op->set_desc(A(CUDNN_ATTR_OPERATION_GENSTATS_SUMDESC), *sum);
    op->set_desc(A(CUDNN_ATTR_OPERATION_GENSTATS_SQSUMDESC), *sumsq);
    add_op(op);
  }
};

// ----------------------------------------------------------------------------- graph builders
// Shapes of one convolution: x [N, C, H, W], w [K, C/groups, R, S], y [N, K, P, Q].
struct ConvShape {
  std::vector<int64_t> x, w, y, stride, padding, dilation;
};

std::vector<int64_t> out_dims(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation) {
  std::vector<int64_t> s = {x[0], w[0], 0, 0};
  for (int i = 0; i < 2; ++i) {
    s[2 + i] = (x[2 + i] + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) / stride[i] + 1;
  }
  TORCH_CHECK(s[2] > 0 && s[3] > 0, "fastres cudnn: empty convolution output ", at::IntArrayRef(s));
  return s;
}

// The input prologue x -> [MUL scale] -> [ADD shift] -> [RELU_FWD] of the training
// graphs (the previous BatchNorm, folded, and its ReLU), intermediates of dtype vdt.
DescP apply_prologue(Graph& g, DescP cur, const DescP& scale, const DescP& shift, const std::vector<int64_t>& xd,
                     bool relu, cudnnDataType_t vdt) {
  if (scale) {
    auto o = g.nhwc(kVScaled, "x*scale", vdt, xd, true);
    g.pointwise(CUDNN_POINTWISE_MUL, "prologue MUL scale", cur, scale, o);
    cur = o;
  }
  if (shift) {
    auto o = g.nhwc(kVShifted, "x*scale+shift", vdt, xd, true);
    g.pointwise(CUDNN_POINTWISE_ADD, "prologue ADD shift", cur, shift, o);
    cur = o;
  }
  if (relu) {
    auto o = g.nhwc(kVAct, "relu(x*scale+shift)", vdt, xd, true);
    g.pointwise(CUDNN_POINTWISE_RELU_FWD, "prologue RELU_FWD", cur, nullptr, o);
    cur = o;
  }
  return cur;
}

// Inference: conv_fprop -> [ADD residual] -> [ADD bias] -> [RELU_FWD]; declared I/O:
// x, w, [bias], [residual], y. pdt: the dtype of bias (x's dtype for 16-bit, fp32 for fp32).
// The residual before the bias is the order of cuDNN's pre-compiled ConvBiasAct engines,
// act(conv + z + bias): with the bias first none serves conv3's graph (deviceless check).
void build_conv_bias_act(Graph& g, cudnnDataType_t io, cudnnDataType_t pdt, const ConvShape& s, bool bias,
                         bool res, bool relu) {
  auto tx = g.nhwc(kX, "x", io, s.x);
  auto tw = g.nhwc(kW, "w", io, s.w);
  const int64_t K = s.y[1];
  DescP tb, tr;
  if (bias) tb = g.chan(kBias, "bias", pdt, K);
  if (res) tr = g.nhwc(kRes, "residual", io, s.y);
  int left = (bias ? 1 : 0) + (res ? 1 : 0) + (relu ? 1 : 0);
  // the tensor produced by the next op: y itself for the last op, else a virtual fp32
  auto next = [&](int64_t vuid, const char* name) {
    if (left == 0) return g.nhwc(kY, "y", io, s.y);
    return g.nhwc(vuid, name, CUDNN_DATA_FLOAT, s.y, true);
  };
  DescP cur = next(kVConv, "conv(x, w)");
  g.conv(kConvFprop, tx, tw, cur, s.stride, s.padding, s.dilation);
  if (res) {
    --left;
    auto o = next(kVRes, "conv+residual");
    g.pointwise(CUDNN_POINTWISE_ADD, "epilogue ADD residual", cur, tr, o);
    cur = o;
  }
  if (bias) {
    --left;
    auto o = next(kVBias, "conv+residual+bias");
    g.pointwise(CUDNN_POINTWISE_ADD, "epilogue ADD bias", cur, tb, o);
    cur = o;
  }
  if (relu) {
    --left;
    auto o = next(kVAct, "relu(...)");
    g.pointwise(CUDNN_POINTWISE_RELU_FWD, "epilogue RELU_FWD", cur, nullptr, o);
  }
}

// Training forward: [x*scale + shift -> ReLU] -> conv_fprop -> y -> genstats; declared
// I/O: x, [scale], [shift], w, y, sum, sumsq.
void build_conv_act_stats(Graph& g, cudnnDataType_t io, cudnnDataType_t pdt, const ConvShape& s, bool scale,
                          bool shift, bool in_relu) {
  const int64_t C = s.x[1], K = s.y[1];
  auto tx = g.nhwc(kX, "x", io, s.x);
  DescP ts = scale ? g.chan(kScale, "scale", pdt, C) : DescP();
  DescP tt = shift ? g.chan(kShift, "shift", pdt, C) : DescP();
  auto tw = g.nhwc(kW, "w", io, s.w);
  DescP cur = apply_prologue(g, tx, ts, tt, s.x, in_relu, CUDNN_DATA_FLOAT);
  auto ty = g.nhwc(kY, "y", io, s.y);
  g.conv(kConvFprop, cur, tw, ty, s.stride, s.padding, s.dilation);
  auto tsum = g.chan(kSum, "sum", CUDNN_DATA_FLOAT, K);
  auto tsq = g.chan(kSumSq, "sumsq", CUDNN_DATA_FLOAT, K);
  g.genstats(ty, tsum, tsq);
}

// Training backward, data gradient ("DgradDreluBNBwdWeight"): declared I/O: dy, w, x,
// mean, invstd, scale, shift, dv, dscale, dshift, eq_dy, eq_x, eq_bias (per-channel fp32).
void build_dgrad_drelu_dbn(Graph& g, cudnnDataType_t io, const ConvShape& s) {
  const int64_t C = s.x[1];
  const auto& xd = s.x;
  auto tdy = g.nhwc(kDY, "dy", io, s.y);
  auto tw = g.nhwc(kW, "w", io, s.w);
  auto tx = g.nhwc(kX, "x", io, xd);
  auto tm = g.chan(kMean, "mean", CUDNN_DATA_FLOAT, C);
  auto tv = g.chan(kInvStd, "invstd", CUDNN_DATA_FLOAT, C);
  auto ts = g.chan(kScale, "scale", CUDNN_DATA_FLOAT, C);
  auto tb = g.chan(kShift, "shift", CUDNN_DATA_FLOAT, C);
  auto tdv = g.nhwc(kDV, "dv", io, xd);
  auto tds = g.chan(kDScale, "dscale", CUDNN_DATA_FLOAT, C);
  auto tdb = g.chan(kDShift, "dshift", CUDNN_DATA_FLOAT, C);
  auto teq_dy = g.chan(kEqDy, "eq_dy_scale", CUDNN_DATA_FLOAT, C);
  auto teq_x = g.chan(kEqX, "eq_x_scale", CUDNN_DATA_FLOAT, C);
  auto teq_b = g.chan(kEqBias, "eq_bias", CUDNN_DATA_FLOAT, C);
  auto dgrad = g.nhwc(kVDgrad, "dgrad(dy, w)", CUDNN_DATA_FLOAT, xd, true);
  g.conv(kConvDgrad, tdy, tw, dgrad, s.stride, s.padding, s.dilation);
  auto centered = g.nhwc(kVCentered, "x-mean", CUDNN_DATA_FLOAT, xd, true);
  g.pointwise(CUDNN_POINTWISE_SUB, "SUB mean", tx, tm, centered);
  auto normed = g.nhwc(kVNormed, "(x-mean)*invstd", CUDNN_DATA_FLOAT, xd, true);
  g.pointwise(CUDNN_POINTWISE_MUL, "MUL invstd", centered, tv, normed);
  auto pre = apply_prologue(g, normed, ts, tb, xd, false, CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_RELU_BWD, "RELU_BWD", pre, dgrad, tdv);
  g.bn_bwd_weights(tx, tdv, tm, tv, ts, tds, tdb, teq_dy, teq_x, teq_b);
}

// Training backward, weight gradient (ConvBNwgrad): declared I/O: x, [scale], [shift],
// dy, dw. Prologue intermediates in x's dtype (fp32 for fp32): u is rounded to x's
// dtype in the forward too, and cudnn-frontend's sample keeps them 16-bit.
void build_wgrad(Graph& g, cudnnDataType_t io, const ConvShape& s, bool scale, bool shift, bool in_relu) {
  const int64_t C = s.x[1];
  auto tx = g.nhwc(kX, "x", io, s.x);
  DescP ts = scale ? g.chan(kScale, "scale", io, C) : DescP();
  DescP tt = shift ? g.chan(kShift, "shift", io, C) : DescP();
  auto tdy = g.nhwc(kDY, "dy", io, s.y);
  auto tdw = g.nhwc(kDW, "dw", io, s.w);
  auto u = apply_prologue(g, tx, ts, tt, s.x, in_relu, io);
  g.conv(kConvWgrad, tdy, u, tdw, s.stride, s.padding, s.dilation);
}

// ----------------------------------------------------------------------------- plans
struct Options {
  bool fp32_io = false;
  bool allow_tf32 = true;
  bool deterministic = false;
  bool autotune = false;
};

// Where a plan is built: a handle (run time) or a device-property descriptor (deviceless).
struct Target {
  cudnnHandle_t handle = nullptr;
  const Desc* devprop = nullptr;
};

struct Plan {
  std::vector<DescP> keep;  // the graph's descriptors, the op graph, the configs, the plan
  DescP plan;
  std::vector<int64_t> uids;
  int64_t workspace = 0;
  Pattern pattern = kConvBiasAct;
};

// Why an engine config is not acceptable under `o` ("" = acceptable): determinism
// (CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) and fp32 without TF32 permission
// (TENSOR_CORE / DOWN_CONVERT_INPUTS, as torch's own cuDNN v8 filter). Notes that cannot
// be read reject the engine whenever a filter applies.
std::string engine_rejection(const Desc& cfg, const Options& o) {
  const bool tf32_filter = o.fp32_io && !o.allow_tf32;
  if (!o.deterministic && !tf32_filter) return "";
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR, "CUDNN_BACKEND_ENGINE_DESCRIPTOR", "of a heuristics config");
  cudnnBackendDescriptor_t e = engine.get();
  int64_t n = 0;
  cudnnStatus_t s = cudnnBackendGetAttribute(cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                             1, &n, &e);
  if (s != CUDNN_STATUS_SUCCESS) return "CUDNN_ATTR_ENGINECFG_ENGINE unreadable: " + status_text(s);
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  int64_t count = 0;
  s = cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &count, notes);
  if (s != CUDNN_STATUS_SUCCESS) return "CUDNN_ATTR_ENGINE_NUMERICAL_NOTE unreadable: " + status_text(s);
  for (int64_t i = 0; i < count; ++i) {
    if (o.deterministic && notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) {
      return "CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC under torch.use_deterministic_algorithms";
    }
    if (tf32_filter && (notes[i] == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS ||
                        notes[i] == CUDNN_NUMERICAL_NOTE_TENSOR_CORE)) {
      return "TENSOR_CORE/DOWN_CONVERT_INPUTS note on fp32 without torch.backends.cudnn.allow_tf32";
    }
  }
  return "";
}

// The op graph of `g` and up to `max_plans` finalized plans: heuristics mode A, then
// FALLBACK. Throws Failure (with what was tried) when there is none.
struct Found {
  DescP opg;
  std::vector<DescP> cfgs, plans;
  int64_t configs = 0;  // configs heuristics returned (all modes tried)
};

Found find_plans(Graph& g, const Target& t, const Options& o, size_t max_plans) {
  Found f;
  f.opg = FR_DESC(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
  f.opg->set(A(CUDNN_ATTR_OPERATIONGRAPH_OPS), CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(g.ops.size()),
             g.ops.data());
  if (t.handle != nullptr) f.opg->set_handle(A(CUDNN_ATTR_OPERATIONGRAPH_HANDLE), t.handle);
  f.opg->finalize();

  std::ostringstream tried;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    const char* mname = mode == CUDNN_HEUR_MODE_A ? "CUDNN_HEUR_MODE_A" : "CUDNN_HEUR_MODE_FALLBACK";
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR", mname);
    heur.set_desc(A(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH), *f.opg);
    heur.set(A(CUDNN_ATTR_ENGINEHEUR_MODE), CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (t.devprop != nullptr) heur.set_desc(A(CUDNN_ATTR_ENGINEHEUR_DEVICEPROP), *t.devprop);
    std::string err = heur.try_finalize();
    if (!err.empty()) {
      tried << mname << ": " << err << "; ";
      continue;
    }
    int64_t count = 0;
    cudnnStatus_t s = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                               CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr);
    if (s != CUDNN_STATUS_SUCCESS || count <= 0) {
      tried << mname << ": 0 engine configs" << (s != CUDNN_STATUS_SUCCESS ? " (" + status_text(s) + ")" : "")
            << "; ";
      continue;
    }
    std::vector<DescP> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.push_back(FR_DESC(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, std::string(mname) + " #" + std::to_string(i)));
      raw.push_back(cfgs.back()->get());
    }
    int64_t got = 0;
    s = cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                 &got, raw.data());
    if (s != CUDNN_STATUS_SUCCESS) {
      tried << mname << ": CUDNN_ATTR_ENGINEHEUR_RESULTS: " << status_text(s) << "; ";
      continue;
    }
    f.configs += got;
    int rejected = 0, failed = 0;
    std::string first_reject, first_fail;
    for (int64_t i = 0; i < got && i < count && f.plans.size() < max_plans; ++i) {
      std::string why = engine_rejection(*cfgs[i], o);
      if (!why.empty()) {
        if (rejected++ == 0) first_reject = why;
        continue;
      }
      auto ep = FR_DESC(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, std::string("plan of ") + mname + " #" +
                                                                    std::to_string(i));
      if (t.handle != nullptr) ep->set_handle(A(CUDNN_ATTR_EXECUTION_PLAN_HANDLE), t.handle);
      if (t.devprop != nullptr) ep->set_desc(A(CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP), *t.devprop);
      ep->set_desc(A(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG), *cfgs[i]);
      err = ep->try_finalize();
      if (!err.empty()) {
        if (failed++ == 0) first_fail = err;
        continue;
      }
      f.plans.push_back(ep);
      f.cfgs.push_back(cfgs[i]);
    }
    tried << mname << ": " << got << " engine configs";
    if (rejected) tried << ", " << rejected << " rejected (" << first_reject << ")";
    if (failed) tried << ", " << failed << " plans did not finalize (first: " << first_fail << ")";
    tried << "; ";
    if (!f.plans.empty()) break;
  }
  if (f.plans.empty()) throw Failure("no usable engine config: " + tried.str());
  return f;
}

int64_t workspace_of(const DescP& ep) {
  int64_t ws = 0, n = 0;
  cudnnStatus_t s = cudnnBackendGetAttribute(ep->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64,
                                             1, &n, &ws);
  if (s != CUDNN_STATUS_SUCCESS) {
    throw Failure("cudnnBackendGetAttribute(" + ep->what() + ", CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE): " +
                  status_text(s));
  }
  return ws;
}

// Pointers for the variant pack: uid -> device pointer.
using Ptrs = std::vector<std::pair<int64_t, void*>>;

// One cudnnBackendExecute of `ep` ("" = success, else the failure text). A workspace
// allocation that fails for another reason than out-of-memory is reported the same way;
// out of memory propagates (c10::OutOfMemoryError).
std::string execute_once(cudnnHandle_t handle, const Desc& ep, const std::vector<int64_t>& uids, int64_t workspace,
                         const Ptrs& ptrs, const at::Tensor& like) {
  std::vector<void*> data;
  for (int64_t uid : uids) {
    void* p = nullptr;
    for (const auto& kv : ptrs) {
      if (kv.first == uid) p = kv.second;
    }
    TORCH_INTERNAL_ASSERT(p != nullptr, "fastres cudnn: no data pointer for tensor uid ", uid);
    data.push_back(p);
  }
  at::Tensor ws;
  void* ws_ptr = nullptr;
  if (workspace > 0) {
    try {
      ws = at::empty({workspace}, like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
    } catch (const c10::OutOfMemoryError&) {
      throw;  // torch.OutOfMemoryError for the caller (retry, smaller batch), never "no engine"
    } catch (const c10::Error& e) {
      return "allocating the plan's workspace of " + std::to_string(workspace) + " bytes failed: " + e.what_without_backtrace();
    }
    ws_ptr = ws.data_ptr();
  }
  try {
    Desc vp(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR", "");
    vp.set(A(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS), CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()), uids.data());
    vp.set(A(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS), CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(data.size()),
           data.data());
    vp.set(A(CUDNN_ATTR_VARIANT_PACK_WORKSPACE), CUDNN_TYPE_VOID_PTR, 1, &ws_ptr);
    vp.finalize();
    cudnnStatus_t s = cudnnBackendExecute(handle, ep.get(), vp.get());
    if (s != CUDNN_STATUS_SUCCESS) return "cudnnBackendExecute(" + ep.what() + "): " + status_text(s);
  } catch (const Failure& e) {
    return e.what();
  }
  return "";
}

bool autotune_enabled() {
  const char* v = std::getenv("FASTRES_CUDNN_AUTOTUNE");
  return v != nullptr && (std::string(v) == "1" || std::string(v) == "true");
}

// Graph -> plan: the (skip+1)-th plan that finalizes, or with autotune the fastest of up
// to 8. Timing runs the candidates on the op's own buffers; the outputs an engine may
// accumulate into (`accumulating`, zeroed by the caller) are zeroed again afterwards.
std::shared_ptr<Plan> build_plan(Pattern pattern, Graph&& g, cudnnHandle_t handle, const Options& o,
                                 const Ptrs& ptrs, const at::Tensor& like,
                                 const std::vector<at::Tensor>& accumulating, size_t skip) {
  auto plan = std::make_shared<Plan>();
  plan->pattern = pattern;
  Target t;
  t.handle = handle;
  Found f = find_plans(g, t, o, o.autotune ? 8 : skip + 1);
  if (!o.autotune && f.plans.size() <= skip) {
    throw Failure("no further engine config finalizes (" + std::to_string(f.plans.size()) + " did)");
  }
  plan->keep.insert(plan->keep.end(), g.keep.begin(), g.keep.end());
  plan->keep.push_back(f.opg);
  plan->keep.insert(plan->keep.end(), f.cfgs.begin(), f.cfgs.end());
  plan->uids = g.io_uids;
  size_t best = 0;
  if (f.plans.size() > 1) {
    // First-use timing: 1 warm-up + 3 timed runs per candidate on the current stream.
    float best_ms = -1.0f;
    for (size_t i = 0; i < f.plans.size(); ++i) {
      const int64_t ws = workspace_of(f.plans[i]);
      if (!execute_once(handle, *f.plans[i], plan->uids, ws, ptrs, like).empty()) continue;
      at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
      auto stream = at::cuda::getCurrentCUDAStream();
      start.record(stream);
      bool ok = true;
      for (int r = 0; r < 3 && ok; ++r) ok = execute_once(handle, *f.plans[i], plan->uids, ws, ptrs, like).empty();
      stop.record(stream);
      stop.synchronize();
      if (!ok) continue;
      const float ms = start.elapsed_time(stop);
      if (best_ms < 0.0f || ms < best_ms) {
        best_ms = ms;
        best = i;
      }
    }
    for (const auto& t : accumulating) t.zero_();  // the timed runs wrote there
  } else if (!o.autotune) {
    best = skip;
  }
  plan->plan = f.plans[best];
  plan->keep.push_back(f.plans[best]);
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

Options current_options(bool fp32_io) {
  Options o;
  o.fp32_io = fp32_io;
  o.allow_tf32 = at::globalContext().allowTF32CuDNN();
  o.deterministic = at::globalContext().deterministicAlgorithms() || at::globalContext().deterministicCuDNN();
  o.autotune = autotune_enabled() &&
               c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  return o;
}

// The start of a plan key: pattern, handle (plans are built for one handle, as torch's
// own cuDNN v8 plan cache is thread-local), device, conv parameters, flags, TF32
// permission, deterministic mode.
std::vector<int64_t> base_key(Pattern pattern, cudnnHandle_t handle, const at::Tensor& x, int64_t groups,
                              int64_t flags, const Options& o, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  std::vector<int64_t> key = {pattern, reinterpret_cast<int64_t>(handle), x.get_device(), groups, flags,
                              o.allow_tf32 ? 1 : 0, o.deterministic ? 1 : 0};
  for (auto v : {stride, padding, dilation}) key.insert(key.end(), v.begin(), v.end());
  return key;
}

// Every I/O tensor is dense channels_last with a 16-byte-aligned pointer, so only its
// presence, dtype and sizes enter the key (undefined: -1).
void push_tensor_key(std::vector<int64_t>& key, const at::Tensor& t) {
  if (!t.defined()) {
    key.push_back(-1);
    return;
  }
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  for (auto s : t.sizes()) key.push_back(s);
}

// The cached plan of `key` (built by `build` on a miss), executed on `ptrs`. On a miss
// (never during a capture: kNotInCapture) the plan is built and executed; if that first
// execution fails, the next engine config is tried (up to kMaxConfigs, the outputs in
// `accumulating` zeroed again in between); if none runs, kNoEngine + the details (the
// Python side falls back). A plan is cached once it has run; a later failure is a real
// error with the same details.
template <class Build>
void run_cached(Pattern pattern, const std::vector<int64_t>& key, cudnnHandle_t handle, const Options& o,
                const Ptrs& ptrs, const at::Tensor& like, const std::vector<at::Tensor>& accumulating,
                Build&& build) {
  if (auto plan = lookup(key)) {
    const std::string err = execute_once(handle, *plan->plan, plan->uids, plan->workspace, ptrs, like);
    TORCH_CHECK(err.empty(), "fastres cudnn: the ", pattern_name(pattern),
                " plan failed after it had run successfully before: ", err);
    return;
  }
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, kNotInCapture,
              " (", pattern_name(pattern), " graph): run the model once outside the capture first (a warm-up), "
              "so that the plan is built and cached before it is recorded");
  std::string first_err;
  const size_t attempts = o.autotune ? 1 : kMaxConfigs;
  for (size_t attempt = 0; attempt < attempts; ++attempt) {
    std::shared_ptr<Plan> plan;
    try {
      Graph g;
      build(g);
      plan = build_plan(pattern, std::move(g), handle, o, ptrs, like, accumulating, attempt);
    } catch (const Failure& e) {
      TORCH_CHECK(attempt > 0, kNoEngine, " (", pattern_name(pattern), " graph, cuDNN ", cudnnGetVersion(), "): ",
                  e.what());
      break;  // no further config: report the first one's execution failure
    }
    const std::string err = execute_once(handle, *plan->plan, plan->uids, plan->workspace, ptrs, like);
    if (err.empty()) {
      store(key, plan);
      return;
    }
    if (attempt == 0) first_err = err;
    for (const auto& t : accumulating) t.zero_();  // a failed run may have written
  }
  TORCH_CHECK(false, kNoEngine, " (", pattern_name(pattern), " graph, cuDNN ", cudnnGetVersion(),
              "): its first execution failed: ", first_err);
}

// ----------------------------------------------------------------------------- argument checks
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

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % static_cast<std::uintptr_t>(kAlign) == 0;
}

// t as the graphs declare it: dense channels_last (a copy of a view with other strides)
// with a 16-byte-aligned pointer (a fresh copy of a dense tensor that is not aligned so,
// e.g. a view at an odd storage offset).
at::Tensor nhwc_input(const at::Tensor& t) {
  at::Tensor c = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (!aligned(c)) c = c.clone(at::MemoryFormat::ChannelsLast);
  return c;
}

// A per-channel parameter of length n, in dtype dt, dense, 16-byte aligned.
at::Tensor chan_param(const std::optional<at::Tensor>& p, int64_t n, at::ScalarType dt, const at::Tensor& x,
                      const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->numel() == n, "fastres::", op, ": ", name, " must have ", n, " elements, got ", p->numel());
  TORCH_CHECK(p->device() == x.device(), "fastres::", op, ": ", name, " is on ", p->device(), ", expected ",
              x.device());
  at::Tensor c = p->to(dt).contiguous().view({n});
  if (!aligned(c)) c = c.clone();
  return c;
}

// A tensor of the conv output's shape (residual, dy), x's dtype and device; as nhwc_input.
at::Tensor output_like(const at::Tensor& t, const char* name, const std::vector<int64_t>& ys, const at::Tensor& x,
                       const char* op) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(ys), "fastres::", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", at::IntArrayRef(ys));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres::", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(), ", expected ",
              x.device());
  return nhwc_input(t);
}

ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation) {
  ConvShape s;
  s.x = x.sizes().vec();
  s.w = w.vec();
  s.stride = stride.vec();
  s.padding = padding.vec();
  s.dilation = dilation.vec();
  s.y = out_dims(s.x, s.w, s.stride, s.padding, s.dilation);
  return s;
}

at::Tensor nhwc_empty(const std::vector<int64_t>& sizes, const at::Tensor& like) {
  return at::empty(sizes, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace

// ----------------------------------------------------------------------------- the ops
at::Tensor cudnn_conv_bias_act(const at::Tensor& x_in, const at::Tensor& w_in,
                               const std::optional<at::Tensor>& bias_in,
                               const std::optional<at::Tensor>& residual_in, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = "cudnn_conv_bias_act";
  check_conv_args(x_in, w_in, stride, padding, dilation, groups, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = memory_format_of(x_in);
  const auto dt = x_in.scalar_type();
  const auto cdt = cudnn_dtype(dt);
  at::Tensor x = nhwc_input(x_in), w = nhwc_input(w_in);
  const ConvShape s = conv_shape(x, w.sizes(), stride, padding, dilation);
  const int64_t K = s.y[1];
  at::Tensor bias = chan_param(bias_in, K, dt, x, op, "bias");  // x's dtype (fp32 for fp32)
  at::Tensor res;
  if (residual_in.has_value() && residual_in->defined()) res = output_like(*residual_in, "residual", s.y, x, op);
  at::Tensor y = nhwc_empty(s.y, x);

  cudnnHandle_t handle = at::native::getCudnnHandle();  // this thread's, set to the current stream
  const Options o = current_options(dt == at::kFloat);
  auto key = base_key(kConvBiasAct, handle, x, groups, relu ? 1 : 0, o, stride, padding, dilation);
  for (const auto* t : {&x, &w, &bias, &res, &y}) push_tensor_key(key, *t);
  Ptrs ptrs = {{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()}};
  if (bias.defined()) ptrs.emplace_back(kBias, bias.data_ptr());
  if (res.defined()) ptrs.emplace_back(kRes, res.data_ptr());
  run_cached(kConvBiasAct, key, handle, o, ptrs, x, {}, [&](Graph& g) {
    build_conv_bias_act(g, cdt, cdt, s, bias.defined(), res.defined(), relu);
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
  const auto fmt = memory_format_of(x_in);
  const auto dt = x_in.scalar_type();
  const auto cdt = cudnn_dtype(dt);
  at::Tensor x = nhwc_input(x_in), w = nhwc_input(w_in);
  const ConvShape s = conv_shape(x, w.sizes(), stride, padding, dilation);
  const int64_t C = s.x[1], K = s.y[1];
  at::Tensor scale = chan_param(scale_in, C, dt, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, dt, x, op, "shift");
  at::Tensor y = nhwc_empty(s.y, x);
  // zeroed before every run: an engine may accumulate the statistics into them
  at::Tensor sum = at::zeros({1, K, 1, 1}, x.options().dtype(at::kFloat));
  at::Tensor sumsq = at::zeros({1, K, 1, 1}, x.options().dtype(at::kFloat));

  cudnnHandle_t handle = at::native::getCudnnHandle();
  const Options o = current_options(dt == at::kFloat);
  auto key = base_key(kConvActStats, handle, x, groups, in_relu ? 1 : 0, o, stride, padding, dilation);
  for (const auto* t : {&x, &w, &scale, &shift, &y}) push_tensor_key(key, *t);
  Ptrs ptrs = {{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()}, {kSum, sum.data_ptr()},
               {kSumSq, sumsq.data_ptr()}};
  if (scale.defined()) ptrs.emplace_back(kScale, scale.data_ptr());
  if (shift.defined()) ptrs.emplace_back(kShift, shift.data_ptr());
  run_cached(kConvActStats, key, handle, o, ptrs, x, {sum, sumsq}, [&](Graph& g) {
    build_conv_act_stats(g, cdt, cdt, s, scale.defined(), shift.defined(), in_relu);
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
  const auto fmt = memory_format_of(x_in);
  const auto dt = x_in.scalar_type();
  const auto cdt = cudnn_dtype(dt);
  at::Tensor x = nhwc_input(x_in), w = nhwc_input(w_in);
  const ConvShape s = conv_shape(x, w.sizes(), stride, padding, dilation);
  at::Tensor dy = output_like(dy_in, "dy", s.y, x, op);
  const int64_t C = s.x[1];
  at::Tensor scale = chan_param(scale_in, C, at::kFloat, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, at::kFloat, x, op, "shift");
  TORCH_CHECK(scale.defined() && shift.defined(), "fastres::", op, ": scale and shift are required");
  at::Tensor mean = at::zeros({C}, x.options().dtype(at::kFloat));
  at::Tensor invstd = at::ones({C}, x.options().dtype(at::kFloat));
  at::Tensor dv = nhwc_empty(s.x, x);
  // zeroed before every run: the BN-backward reductions may accumulate into them
  auto per_c = [&] { return at::zeros({C}, x.options().dtype(at::kFloat)); };
  at::Tensor dscale = per_c(), dshift = per_c(), eq_dy = per_c(), eq_x = per_c(), eq_bias = per_c();

  cudnnHandle_t handle = at::native::getCudnnHandle();
  const Options o = current_options(dt == at::kFloat);
  auto key = base_key(kDgradDreluDbn, handle, x, groups, 0, o, stride, padding, dilation);
  for (const auto* t : {&dy, &w, &x}) push_tensor_key(key, *t);
  Ptrs ptrs = {{kDY, dy.data_ptr()},        {kW, w.data_ptr()},           {kX, x.data_ptr()},
               {kMean, mean.data_ptr()},    {kInvStd, invstd.data_ptr()}, {kScale, scale.data_ptr()},
               {kShift, shift.data_ptr()},  {kDV, dv.data_ptr()},         {kDScale, dscale.data_ptr()},
               {kDShift, dshift.data_ptr()}, {kEqDy, eq_dy.data_ptr()},   {kEqX, eq_x.data_ptr()},
               {kEqBias, eq_bias.data_ptr()}};
  run_cached(kDgradDreluDbn, key, handle, o, ptrs, x, {dscale, dshift, eq_dy, eq_x, eq_bias},
             [&](Graph& g) { build_dgrad_drelu_dbn(g, cdt, s); });
  return {fmt == at::MemoryFormat::ChannelsLast ? dv : dv.contiguous(fmt), dscale, dshift};
}

// Training backward, weight gradient ("scale-bias-relu-wgrad", ConvBNwgrad):
//   dw = conv_wgrad(dy, [relu]([x*scale] [+ shift]))   (the prologue recomputed as x is
// loaded, never stored). dw in x's dtype, contiguous.
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
  at::Tensor x = nhwc_input(x_in);
  const ConvShape s = conv_shape(x, weight_size, stride, padding, dilation);
  at::Tensor dy = output_like(dy_in, "dy", s.y, x, op);
  const int64_t C = s.x[1];
  at::Tensor scale = chan_param(scale_in, C, dt, x, op, "scale");
  at::Tensor shift = chan_param(shift_in, C, dt, x, op, "shift");
  at::Tensor dw = nhwc_empty(s.w, x);

  cudnnHandle_t handle = at::native::getCudnnHandle();
  const Options o = current_options(dt == at::kFloat);
  auto key = base_key(kScaleShiftReluWgrad, handle, x, groups, in_relu ? 1 : 0, o, stride, padding, dilation);
  for (const auto* t : {&dy, &x, &scale, &shift, &dw}) push_tensor_key(key, *t);
  Ptrs ptrs = {{kX, x.data_ptr()}, {kDY, dy.data_ptr()}, {kDW, dw.data_ptr()}};
  if (scale.defined()) ptrs.emplace_back(kScale, scale.data_ptr());
  if (shift.defined()) ptrs.emplace_back(kShift, shift.data_ptr());
  run_cached(kScaleShiftReluWgrad, key, handle, o, ptrs, x, {}, [&](Graph& g) {
    build_wgrad(g, cdt, s, scale.defined(), shift.defined(), in_relu);
  });
  return dw.contiguous();
}

std::string cudnn_version_string() {
  const size_t v = cudnnGetVersion();
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

// ----------------------------------------------------------------------------- deviceless check
// cuDNN's runtime-compiled (runtime fusion) engines load the CUDA driver library to
// compile; where it cannot be loaded (a machine without the NVIDIA driver) heuristics
// leave them out (CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING) and only the
// pre-compiled engines are checked.
bool driver_library_loadable() {
  for (const char* name : {"libcuda.so.1", "libcuda.so"}) {
    void* h = dlopen(name, RTLD_LAZY | RTLD_LOCAL);
    if (h != nullptr) {
      dlclose(h);
      return true;
    }
  }
  return false;
}

// fastres_cudnn::graph_check(pattern, dtype, device_json, x, w, stride, padding, dilation,
//                            options, deterministic, allow_tf32)
//   -> (ok, detail, configs, plans, runtime_compiled)
// Builds the graph of `pattern` (the builders above) for the device described by
// `device_json` (cuDNN's CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION; cuDNN >= 9.8), without
// a handle or a GPU, asks heuristics (mode A, then FALLBACK) and finalizes plans until
// one does. options: "bias", "residual", "relu" (conv_bias_add_relu), "scale", "shift",
// "in_relu" (the prologue of conv_genstats and scale_shift_relu_wgrad). ok=False with
// the reason where a descriptor, the heuristics or every plan failed. runtime_compiled:
// whether runtime-compiled engines could be considered here (driver_library_loadable);
// where not, ok=False says only that no pre-compiled engine supports the graph.
std::tuple<bool, std::string, int64_t, int64_t, bool> graph_check(
    const std::string& pattern, const std::string& dtype, const std::string& device_json, at::IntArrayRef x,
    at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::vector<std::string>& options, bool deterministic, bool allow_tf32) {
  TORCH_CHECK(x.size() == 4 && w.size() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastres_cudnn::graph_check: x and w must have 4 dims, stride/padding/dilation 2");
  cudnnDataType_t io;
  if (dtype == "float32") {
    io = CUDNN_DATA_FLOAT;
  } else if (dtype == "float16") {
    io = CUDNN_DATA_HALF;
  } else if (dtype == "bfloat16") {
    io = CUDNN_DATA_BFLOAT16;
  } else {
    TORCH_CHECK(false, "fastres_cudnn::graph_check: dtype must be float32, float16 or bfloat16, got '", dtype, "'");
  }
  auto has = [&](const char* o) {
    for (const auto& s : options) {
      if (s == o) return true;
    }
    return false;
  };
  for (const auto& s : options) {
    TORCH_CHECK(s == "bias" || s == "residual" || s == "relu" || s == "scale" || s == "shift" || s == "in_relu",
                "fastres_cudnn::graph_check: unknown option '", s, "'");
  }
  TORCH_CHECK(cudnnGetVersion() >= 90800, "fastres_cudnn::graph_check: deviceless plans need cuDNN >= 9.8, found ",
              cudnn_version_string());
  Pattern p;
  if (pattern == "conv_bias_add_relu") {
    p = kConvBiasAct;
  } else if (pattern == "conv_genstats" || pattern == "scale_shift_relu_conv_genstats") {
    p = kConvActStats;
  } else if (pattern == "dgrad_drelu_dbn") {
    p = kDgradDreluDbn;
  } else if (pattern == "scale_shift_relu_wgrad") {
    p = kScaleShiftReluWgrad;
  } else {
    TORCH_CHECK(false, "fastres_cudnn::graph_check: unknown pattern '", pattern, "'");
  }
  ConvShape s;
  s.x = x.vec();
  s.w = w.vec();
  s.stride = stride.vec();
  s.padding = padding.vec();
  s.dilation = dilation.vec();
  s.y = out_dims(s.x, s.w, s.stride, s.padding, s.dilation);
  Options o;
  o.fp32_io = io == CUDNN_DATA_FLOAT;
  o.allow_tf32 = allow_tf32;
  o.deterministic = deterministic;
  const bool rtc = driver_library_loadable();
  try {
    Desc dev(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, "CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR", "target device");
    dev.set(A(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION), CUDNN_TYPE_CHAR, static_cast<int64_t>(device_json.size()),
            device_json.data());
    dev.finalize();
    Graph g;
    switch (p) {
      case kConvBiasAct: build_conv_bias_act(g, io, io, s, has("bias"), has("residual"), has("relu")); break;
      case kConvActStats: build_conv_act_stats(g, io, io, s, has("scale"), has("shift"), has("in_relu")); break;
      case kDgradDreluDbn: build_dgrad_drelu_dbn(g, io, s); break;
      case kScaleShiftReluWgrad: build_wgrad(g, io, s, has("scale"), has("shift"), has("in_relu")); break;
    }
    Target t;
    t.devprop = &dev;
    Found f = find_plans(g, t, o, 1);
    return {true, "plan finalized (" + f.plans[0]->what() + ")", f.configs, static_cast<int64_t>(f.plans.size()),
            rtc};
  } catch (const Failure& e) {
    std::string why = e.what();
    if (!rtc) why += " [runtime-compiled engines not considered: libcuda.so.1 cannot be loaded here]";
    return {false, why, 0, 0, rtc};
  }
}

// fastres_cudnn::device_json(device) -> str: cuDNN's own device-property JSON of a CUDA
// device (needs that GPU): what DEVICE_PROPS in fastres/cudnn.py is checked against.
std::string device_json(int64_t device) {
  TORCH_CHECK(cudnnGetVersion() >= 90800, "fastres_cudnn::device_json: needs cuDNN >= 9.8, found ",
              cudnn_version_string());
  try {
    Desc dev(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, "CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR", "cuda:" + std::to_string(device));
    int32_t id = static_cast<int32_t>(device);
    dev.set(A(CUDNN_ATTR_DEVICEPROP_DEVICE_ID), CUDNN_TYPE_INT32, 1, &id);
    dev.finalize();
    int64_t n = 0;
    cudnnStatus_t s = cudnnBackendGetAttribute(dev.get(), CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR,
                                               0, &n, nullptr);
    if (s != CUDNN_STATUS_SUCCESS) throw Failure("CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION size: " + status_text(s));
    std::string out(static_cast<size_t>(n), '\0');
    s = cudnnBackendGetAttribute(dev.get(), CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR, n, &n,
                                 out.data());
    if (s != CUDNN_STATUS_SUCCESS) throw Failure("CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION: " + status_text(s));
    while (!out.empty() && out.back() == '\0') out.pop_back();
    return out;
  } catch (const Failure& e) {
    TORCH_CHECK(false, "fastres_cudnn::device_json: ", e.what());
  }
  return "";
}

}  // namespace cudnn_graph
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("cudnn_conv_bias_act", &fastres::cudnn_graph::cudnn_conv_bias_act);
  m.impl("cudnn_conv_act_stats", &fastres::cudnn_graph::cudnn_conv_act_stats);
  m.impl("cudnn_dgrad_drelu_dbn", &fastres::cudnn_graph::cudnn_dgrad_drelu_dbn);
  m.impl("cudnn_wgrad_scale_shift_relu", &fastres::cudnn_graph::cudnn_wgrad_scale_shift_relu);
}

// No tensor arguments: a catch-all kernel (runs without a GPU).
TORCH_LIBRARY(fastres_cudnn, m) {
  m.def("graph_check(str pattern, str dtype, str device_json, int[] x, int[] w, int[] stride, int[] padding, "
        "int[] dilation, str[] options, bool deterministic, bool allow_tf32) "
        "-> (bool ok, str detail, int configs, int plans, bool runtime_compiled)",
        &fastres::cudnn_graph::graph_check);
  m.def("device_json(int device) -> str", &fastres::cudnn_graph::device_json);
}

#endif  // FASTRES_WITH_CUDNN
