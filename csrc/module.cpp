// The Python module glass_fast._C. It has no Python functions: importing it loads the shared library,
// whose static initialisers register the ops with the PyTorch dispatcher (torch.ops.glass_fast.*).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "glass_fast compiled ops (see torch.ops.glass_fast)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
