// The one schema list of the intro2llm operator library, and the Python module init for intro2llm._C.
//
// Every op the C++ (csrc/cpu) and CUDA (csrc/cuda) backends implement is declared here once; the
// implementations register with TORCH_LIBRARY_IMPL(intro2llm, CPU|CUDA, m) in their own files, and the
// Python side (intro2llm/ops/<op>.py) adds register_fake + register_autograd. Importing intro2llm._C runs the
// static registrations below; the module itself exports nothing.
#include <Python.h>
#include <torch/library.h>

// A bare module: loading the shared object is what registers the ops (no pybind11, which would double
// the compile time of every file). PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "intro2llm compiled ops (torch.ops.intro2llm)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(intro2llm, m) {
  // ---- rms_norm (csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu) -------------------------------------------
  // y = x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps) per row (last dim); rstd is saved for backward.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight)");

  // ---- apply_rope / swiglu / geglu (rope-swiglu owner) ---------------------------------------------------
  // BEGIN rope-swiglu schemas
  // END rope-swiglu schemas

  // ---- cross_entropy / fused_linear_cross_entropy (cross-entropy owner) --------------------------------------
  // BEGIN cross-entropy schemas
  // END cross-entropy schemas

  // ---- flash_attention (attention owner) --------------------------------------------------------------------
  // BEGIN flash-attention schemas
  // END flash-attention schemas

  // ---- tokenizer core (tokenizer owner) ---------------------------------------------------------------------
  // BEGIN tokenizer schemas
  // END tokenizer schemas
}
