// The op schemas of docs/DESIGN.md, shared by every registration site
// (ops.cpp, and the CPU emulation build of cuda/ops_cuda.cu used in tests).
#pragma once

#define FASTRES_SCHEMA_BN_ACT_TRAIN                                                  \
  "bn_act_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "          \
  "float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)"
#define FASTRES_SCHEMA_BN_ACT_TRAIN_BACKWARD                                         \
  "bn_act_train_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? weight, "        \
  "Tensor mean, Tensor var, float eps, bool relu, bool need_grad_z) "                \
  "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_z)"
#define FASTRES_SCHEMA_AFFINE_ACT                                                    \
  "affine_act(Tensor x, Tensor? scale, Tensor? shift, Tensor? residual, bool relu) " \
  "-> Tensor y"
#define FASTRES_SCHEMA_AFFINE_ACT_BACKWARD                                           \
  "affine_act_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? scale, bool relu, " \
  "bool need_grad_z, bool need_param_grads) "                                        \
  "-> (Tensor grad_x, Tensor grad_z, Tensor grad_scale, Tensor grad_shift)"
// cuDNN fused-convolution graphs (csrc/cudnn/conv_graph.cpp; CUDA kernels only where
// built with cuDNN, fake kernels in fastres/cudnn.py).
#define FASTRES_SCHEMA_CUDNN_CONV_BIAS_ACT                                           \
  "cudnn_conv_bias_act(Tensor x, Tensor w, Tensor? bias, Tensor? residual, "         \
  "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor"
#define FASTRES_SCHEMA_CUDNN_CONV_ACT_STATS                                          \
  "cudnn_conv_act_stats(Tensor x, Tensor w, Tensor? scale, Tensor? shift, "          \
  "int[] stride, int[] padding, int[] dilation, int groups, bool in_relu) "          \
  "-> (Tensor y, Tensor sum, Tensor sumsq)"
#define FASTRES_SCHEMA_CUDNN_DGRAD_DRELU_DBN                                         \
  "cudnn_dgrad_drelu_dbn(Tensor dy, Tensor w, Tensor x, Tensor scale, Tensor shift, " \
  "int[] stride, int[] padding, int[] dilation, int groups) "                        \
  "-> (Tensor dv, Tensor dscale, Tensor dshift)"
#define FASTRES_SCHEMA_CUDNN_WGRAD_SCALE_SHIFT_RELU                                  \
  "cudnn_wgrad_scale_shift_relu(Tensor dy, Tensor x, Tensor? scale, Tensor? shift, " \
  "int[] weight_size, int[] stride, int[] padding, int[] dilation, int groups, "     \
  "bool in_relu) -> Tensor dw"
