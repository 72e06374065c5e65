// Python bindings of the emulated CUDA entry points (see cuda_emulation.h). Built by
// tests/test_cuda_emulation.py with torch.utils.cpp_extension.load, together with
// csrc/ops.cpp, csrc/factor_cores.cpp, csrc/conv.cpp and each csrc/cuda/*.cu compiled as C++.
#include <torch/extension.h>

#include "cuda/cuda_common.cuh"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_linear", &ssa::lowrank_linear_cuda);
  m.def("dfa_project", &ssa::dfa_project_cuda);
  m.def("svd_factor_grads", &ssa::svd_factor_grads_cuda);
  m.def("svd_conv_factor_grads", &ssa::svd_conv_factor_grads_cuda);
  m.def("set_sm_count", [](int n) { emu::sm_count = n; }, "SMs the launch heuristics see");
  m.def("launches", [] { return emu::launches; });
}
