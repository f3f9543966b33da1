// Every op schema of the glass_fast library, in one place. CPU kernels live in cpu/, CUDA kernels in
// cuda/; Python registers the fake (meta) kernels in glass_fast/ops/_library.py so torch.compile can
// trace the ops without running them.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(glass_fast, m) {
  // new = k_base*base + k_stage*stage + k_xt*x_t + k_out*out ; y_next = n_xt*x_t + n_new*new
  m.def("fused_step(Tensor base, Tensor out, Tensor coef, Tensor? x_t, Tensor? stage)"
        " -> (Tensor, Tensor)");
  // Same, writing new into base and y_next into y_out (both may be static graph buffers).
  m.def("fused_step_(Tensor(a!) base, Tensor out, Tensor coef, Tensor? x_t, Tensor? stage,"
        " Tensor(b!) y_out) -> ()");
  // (log_w - logsumexp per group, ess per group)
  m.def("normalize_log_weights(Tensor log_w) -> (Tensor, Tensor)");
  // Ancestor indices [B, K] (int64) for scheme in multinomial | stratified | systematic | residual.
  m.def("resample_indices(Tensor log_w, Tensor uniforms, str scheme) -> Tensor");
  // out[b, k] = x[b, idx[b, k]]
  m.def("gather_particles(Tensor x, Tensor idx) -> Tensor");
  // x[b, k] <- x[b, idx[b, k]] through scratch (same shape and dtype as x).
  m.def("gather_particles_(Tensor(a!) x, Tensor idx, Tensor(b!) scratch) -> ()");
}

// The kernels have no derivative. Without an Autograd kernel PyTorch's global fallback only warns and
// backward leaves the inputs' gradients unset (silently missing); this one makes backward raise
// "derivative for glass_fast::<op> is not implemented" (the reference backend is differentiable).
TORCH_LIBRARY_IMPL(glass_fast, Autograd, m) {
  for (const char* name : {"fused_step", "fused_step_", "normalize_log_weights", "resample_indices",
                           "gather_particles", "gather_particles_"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}
