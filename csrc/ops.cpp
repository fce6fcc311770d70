// fastres._C: op schemas (docs/DESIGN.md) and build information.
//
// The CPU kernels are registered in cpu/ops_cpu.cpp, the CUDA kernels in
// cuda/ops_cuda.cu (only when built with -DFASTRES_WITH_CUDA). When built by
// setup.py (TORCH_EXTENSION_NAME defined) this file also provides the Python
// module init, so `import fastres._C` loads the library and registers
// torch.ops.fastres.*; the CMake build produces a plain shared library for
// torch.ops.load_library().
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "schemas.h"

#define FASTRES_STR2(...) #__VA_ARGS__
#define FASTRES_STR(...) FASTRES_STR2(__VA_ARGS__)

#ifndef FASTRES_VERSION
#define FASTRES_VERSION 0.1.0
#endif

namespace fastres {
namespace cpu {
const Kernels& active_kernels();
}
#if defined(FASTRES_WITH_CUDNN)
namespace cudnn_graph {
std::string cudnn_version_string();  // csrc/cudnn/conv_graph.cpp
}
#endif

// "key=value;..." e.g.
// "version=0.1.0;cpu=1;cpu_isa=DEFAULT,AVX2,AVX512;cpu_active=AVX512;cuda=1;cuda_archs=sm_80,sm_90"
std::string build_info() {
  std::string s = "version=" FASTRES_STR(FASTRES_VERSION) ";cpu=1;cpu_isa=";
#if defined(FASTRES_CPU_X86) && defined(__GNUC__) && !defined(__clang__)
  s += "DEFAULT,AVX2,AVX512";
#else
  s += "DEFAULT";
#endif
  s += ";cpu_active=";
  s += cpu::active_kernels().isa;
#if defined(FASTRES_WITH_CUDA)
  s += ";cuda=1";
#if defined(FASTRES_CUDA_ARCHS)
  s += ";cuda_archs=" FASTRES_STR(FASTRES_CUDA_ARCHS);
#endif
#else
  s += ";cuda=0";
#endif
#if defined(FASTRES_WITH_CUDNN)
  s += ";cudnn=1;cudnn_version=" + cudnn_graph::cudnn_version_string();
#else
  s += ";cudnn=0";
#endif
  return s;
}

bool with_cuda() {
#if defined(FASTRES_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

bool with_cudnn() {
#if defined(FASTRES_WITH_CUDNN)
  return true;
#else
  return false;
#endif
}

}  // namespace fastres

TORCH_LIBRARY(fastres, m) {
  m.def(FASTRES_SCHEMA_BN_ACT_TRAIN);
  m.def(FASTRES_SCHEMA_BN_ACT_TRAIN_BACKWARD);
  m.def(FASTRES_SCHEMA_AFFINE_ACT);
  m.def(FASTRES_SCHEMA_AFFINE_ACT_BACKWARD);
  // Always defined (fake kernels on every build); CUDA kernels only with cuDNN.
  m.def(FASTRES_SCHEMA_CUDNN_CONV_BIAS_ACT);
  m.def(FASTRES_SCHEMA_CUDNN_CONV_ACT_STATS);
  m.def(FASTRES_SCHEMA_CUDNN_DGRAD_DRELU_DBN);
  m.def(FASTRES_SCHEMA_CUDNN_WGRAD_SCALE_SHIFT_RELU);
  // No tensor arguments: a catch-all kernel.
  m.def("_build_info() -> str", &fastres::build_info);
}

#if defined(TORCH_EXTENSION_NAME)
// Python module `fastres._C` (setup.py build). Plain CPython API: no pybind11
// needed. Importing it is what registers the ops above.
#include <Python.h>

#define FASTRES_CONCAT2(a, b) a##b
#define FASTRES_CONCAT(a, b) FASTRES_CONCAT2(a, b)

namespace {
PyObject* py_build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastres::build_info().c_str());
}

PyMethodDef fastres_methods[] = {
    {"build_info", py_build_info, METH_NOARGS,
     "Build information: 'key=value;...' (same as torch.ops.fastres._build_info())."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef fastres_module = {PyModuleDef_HEAD_INIT, "fastres._C",
                              "fastres C++/CUDA kernels; importing registers torch.ops.fastres.*",
                              -1, fastres_methods};
}  // namespace

PyMODINIT_FUNC FASTRES_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&fastres_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddObject(m, "WITH_CUDA", PyBool_FromLong(fastres::with_cuda() ? 1 : 0)) < 0 ||
      PyModule_AddObject(m, "WITH_CUDNN", PyBool_FromLong(fastres::with_cudnn() ? 1 : 0)) < 0 ||
      PyModule_AddStringConstant(m, "__version__", FASTRES_STR(FASTRES_VERSION)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
