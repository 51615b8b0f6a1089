// Schemas of the compiled kernels, declared once.  The public ops (ntk::linchain, ...) are declared in
// Python (ntk_kernels/ops/*.py) so that they exist even when this extension failed to build; each
// backend's kernel is an op of its own namespace here: ntk_cpu (csrc/cpu), ntk_cuda (csrc/cuda).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(ntk_cpu, m) {
  m.def("linchain_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor? chain, Tensor lora_B, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("linchain_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor? chain, Tensor lora_B, "
        "Tensor u, float scaling, float dropout_p, int seed, bool[] needs) -> Tensor[]");
  // mode: 0 full, 1 diagonal, 2 trace (ntk_kernels/ops/ntk_gram.py MODES)
  m.def("gram_contract(Tensor a1, Tensor g1, Tensor a2, Tensor g2, int mode) -> Tensor");
  // forward-mode ops (ntk_kernels/ops/jvp.py): x, x_dot (N, L, d_in); returns (y, y_dot)
  m.def("linear_jvp(Tensor x, Tensor weight, Tensor? bias, Tensor? x_dot, Tensor? weight_dot, Tensor? bias_dot) "
        "-> (Tensor, Tensor)");
  m.def("layer_norm_jvp(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? x_dot, Tensor? weight_dot, "
        "Tensor? bias_dot, bool rms) -> (Tensor, Tensor)");
}

// Importing ntk_kernels._C runs the registrations above; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "ntk_kernels C++ CPU kernels (torch.ops.ntk_cpu)"; }
