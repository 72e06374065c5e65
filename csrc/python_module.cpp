// The Python module ssa_kernels._C: importing it loads this library, whose static
// initialisers register the CPU/CUDA kernels (TORCH_LIBRARY_IMPL). No pybind11 is
// needed; the module only reports how it was built.
#include <Python.h>

#ifdef SSA_WITH_CUDA
#define SSA_KERNELS_WITH_CUDA 1
#else
#define SSA_KERNELS_WITH_CUDA 0
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled CPU/CUDA kernels of ssa_kernels (registered with torch.library).",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", SSA_KERNELS_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
