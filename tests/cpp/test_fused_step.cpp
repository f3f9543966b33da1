// C++ test of the CPU fused step: direct call and dispatcher call against an ATen expression.
#include <ATen/core/dispatch/Dispatcher.h>

#include "ops.h"
#include "test_common.h"

namespace {

// new = kb*base + ks*stage + kx*xt + ko*out ; y = nx*xt + nn*new  (float64, per-sample rows)
std::tuple<at::Tensor, at::Tensor> expected(const at::Tensor& base, const at::Tensor& out,
                                            const at::Tensor& coef, const at::Tensor& xt,
                                            const at::Tensor& stage) {
  std::vector<int64_t> shape(base.dim(), 1);
  shape[0] = coef.dim() == 2 ? coef.size(0) : 1;
  auto col = [&](int j) { return coef.to(at::kDouble).select(-1, j).reshape(shape); };
  const at::Tensor b = base.to(at::kDouble), o = out.to(at::kDouble);
  at::Tensor nw = col(0) * b + col(3) * o;
  if (stage.defined()) nw = nw + col(1) * stage.to(at::kDouble);
  at::Tensor y = col(5) * nw;
  if (xt.defined()) {
    nw = nw + col(2) * xt.to(at::kDouble);
    y = col(5) * nw + col(4) * xt.to(at::kDouble);
  }
  return {nw, y};
}

void check_case(at::ScalarType dtype, at::IntArrayRef shape, bool per_sample, bool with_xt,
                bool with_stage) {
  const auto opt = at::TensorOptions().dtype(dtype);
  const at::Tensor base = at::randn(shape, opt), out = at::randn(shape, opt);
  const at::Tensor xt = with_xt ? at::randn(shape, opt) : at::Tensor();
  const at::Tensor stage = with_stage ? at::randn(shape, opt) : at::Tensor();
  const at::Tensor coef = per_sample ? at::randn({shape[0], 6}) : at::randn({6});
  auto opt_t = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  const auto [nw, y] = glass_fast::cpu::fused_step(base, out, coef, opt_t(xt), opt_t(stage));
  const auto [enw, ey] = expected(base, out, coef, xt, stage);
  const double tol = dtype == at::kFloat ? 1e-5 : dtype == at::kDouble ? 1e-12 : 1e-2;
  GF_EXPECT(nw.scalar_type() == dtype && y.scalar_type() == dtype);
  GF_EXPECT(close(nw, enw, tol, tol));
  GF_EXPECT(close(y, ey, tol, tol));

  // In place through the dispatcher, as Python's torch.ops.glass_fast.fused_step_ calls it.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("glass_fast::fused_step_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const at::Tensor&)>();
  const at::Tensor state = base.clone(), y_out = at::empty_like(out);
  op.call(state, out, coef, opt_t(xt), opt_t(stage), y_out);
  GF_EXPECT(close(state, enw, tol, tol));
  GF_EXPECT(close(y_out, ey, tol, tol));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    check_case(dtype, {3, 5, 7}, false, true, false);
    check_case(dtype, {1, 1001}, true, true, true);
    check_case(dtype, {4, 33}, true, false, true);
    check_case(dtype, {2, 3, 11}, false, false, false);
  }
  // In place with y_out one element past base in the same buffer: computed as if from copies (new,
  // then y_next written), not element by element over values already overwritten.
  {
    const at::Tensor buf = at::randn({2 * 301 + 1}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor out = at::randn({2, 301}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor coef = at::randn({2, 6});
    const at::Tensor want = buf.clone();
    const auto [enw, ey] = expected(want.narrow(0, 0, 602).view({2, 301}), out, coef, at::Tensor(), at::Tensor());
    want.narrow(0, 0, 602).copy_(enw.view({602}));
    want.narrow(0, 1, 602).copy_(ey.view({602}));
    glass_fast::cpu::fused_step_(buf.narrow(0, 0, 602).view({2, 301}), out, coef, std::nullopt, std::nullopt,
                                 buf.narrow(0, 1, 602).view({2, 301}));
    GF_EXPECT(close(buf, want, 1e-12, 1e-12));
  }
  // A bad coefficient shape is rejected with a message naming the argument.
  bool threw = false;
  try {
    glass_fast::cpu::fused_step(at::randn({3, 4}), at::randn({3, 4}), at::randn({5}), std::nullopt,
                                std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("coef has shape") != std::string::npos;
  }
  GF_EXPECT(threw);
  std::cout << "test_fused_step: ok\n";
  return 0;
}
