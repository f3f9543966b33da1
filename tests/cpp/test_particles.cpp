// C++ test of the CPU particle ops against hand-checked cases and ATen expressions.
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "test_common.h"

namespace gc = glass_fast::cpu;

namespace {

at::Tensor row(std::vector<double> v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).unsqueeze(0);
}

void expect_ancestors(const char* scheme, std::vector<double> lw, std::vector<double> u,
                      std::vector<int64_t> want) {
  const at::Tensor got = gc::resample_indices(row(lw), row(u), scheme);
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[0][i].item<int64_t>() != want[i]) {
      std::cerr << scheme << ": slot " << i << " got " << got[0][i].item<int64_t>() << " want "
                << want[i] << "\n";
      std::exit(1);
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const double inf = std::numeric_limits<double>::infinity();

  // normalize_log_weights against logsumexp; ess of equal weights is K.
  const at::Tensor lw = at::randn({5, 37}) * 3;
  const auto [norm, ess] = gc::normalize_log_weights(lw);
  GF_EXPECT(close(norm, lw - lw.logsumexp(1, true), 1e-5, 1e-5));
  GF_EXPECT(close(ess, 1.0 / norm.mul(2).exp().sum(1), 1e-5, 1e-5));
  const auto [n_eq, ess_eq] = gc::normalize_log_weights(at::zeros({2, 8}));
  GF_EXPECT(close(ess_eq, at::full({2}, 8.0), 1e-6, 1e-6));
  const auto [n_nan, ess_nan] = gc::normalize_log_weights(row({-inf, -inf}).to(at::kFloat));
  GF_EXPECT(std::isnan(ess_nan[0].item<float>()));

  // Resampling by hand (searchsorted right on the cdf with its last entry forced to 1).
  expect_ancestors("systematic", {0, 0, 0, 0, 0}, {0.37, 0, 0, 0, 0}, {0, 1, 2, 3, 4});
  expect_ancestors("stratified", {0, 0, 0, 0, 0}, {0.9, 0.1, 0.5, 0.01, 0.99}, {0, 1, 2, 3, 4});
  expect_ancestors("multinomial", {0, 0, 0, 0}, {0.1, 0.25, 0.74, 0.999999}, {0, 1, 2, 3});
  expect_ancestors("multinomial", {-inf, 0, -inf}, {0.0, 0.5, 0.99}, {1, 1, 1});
  expect_ancestors("systematic", {std::log(2.0), 0, 0, -inf}, {0, 0, 0, 0}, {0, 0, 1, 2});
  expect_ancestors("residual", {std::log(2.0), 0, 0, -inf}, {0.99, 0.99, 0.99, 0.99}, {0, 0, 1, 2});
  expect_ancestors("residual", {std::log(0.6), std::log(0.4), -inf, -inf}, {0.5, 0.5, 0.5, 0.3},
                   {0, 0, 1, 0});
  expect_ancestors("residual", {std::log(0.6), std::log(0.4), -inf, -inf}, {0.5, 0.5, 0.5, 0.7},
                   {0, 0, 1, 1});

  // Groups without valid weights (all -inf, NaN, +inf) keep their particles; their ess is NaN.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const char* scheme : {"multinomial", "stratified", "systematic", "residual"}) {
    expect_ancestors(scheme, {-inf, -inf, -inf}, {0.9, 0.5, 0.1}, {0, 1, 2});
    expect_ancestors(scheme, {0.0, nan, 1.0}, {0.9, 0.5, 0.1}, {0, 1, 2});
    expect_ancestors(scheme, {inf, 0.0, 1.0}, {0.9, 0.5, 0.1}, {0, 1, 2});
  }
  const auto [n_bad, ess_bad] = gc::normalize_log_weights(row({0.0, nan, 1.0}));
  GF_EXPECT(n_bad.isnan().all().item<bool>() && ess_bad.isnan().all().item<bool>());
  // Equal huge log-weights normalise exactly: (lw - max) - log(sum), not lw - (max + log(sum)).
  const auto [n_big, ess_big] = gc::normalize_log_weights(at::full({1, 4}, -1e30f));
  GF_EXPECT(close(n_big, at::full({1, 4}, -std::log(4.0)), 1e-6, 1e-6));
  GF_EXPECT(close(ess_big, at::full({1}, 4.0), 1e-6, 1e-6));

  // Multinomial equals searchsorted on ATen's cumsum away from ties.
  const at::Tensor u = at::rand({5, 37});
  const at::Tensor anc = gc::resample_indices(lw, u, "multinomial");
  at::Tensor cdf = at::softmax(lw, 1).cumsum(1);
  cdf.select(1, 36).fill_(1.0);
  const at::Tensor ref = at::searchsorted(cdf, u, /*out_int32=*/false, /*right=*/true).clamp_max(36);
  GF_EXPECT(anc.eq(ref).sum().item<int64_t>() >= 5 * 37 - 1);

  // Gather: out[b, k] = x[b, idx[b, k]], out of place and in place.
  const at::Tensor x = at::randn({3, 4, 5});
  const at::Tensor idx = at::randint(0, 4, {3, 4}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor g = gc::gather_particles(x, idx);
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t k = 0; k < 4; ++k) GF_EXPECT(g[b][k].equal(x[b][idx[b][k].item<int64_t>()]));
  const at::Tensor y = x.clone(), scratch = at::empty_like(x);
  gc::gather_particles_(y, idx, scratch);
  GF_EXPECT(y.equal(g));
  const at::Tensor z = x.clone();
  gc::gather_particles_(z, idx, z);  // scratch may be x itself
  GF_EXPECT(z.equal(g));
  bool range_threw = false;
  try {
    gc::gather_particles(x, at::full({3, 4}, 4, at::TensorOptions().dtype(at::kLong)));
  } catch (const c10::Error& e) {
    range_threw = std::string(e.what()).find("is out of range [0, 4)") != std::string::npos;
  }
  GF_EXPECT(range_threw);

  bool threw = false;
  try {
    gc::resample_indices(lw, u, "bogus");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("scheme='bogus'") != std::string::npos;
  }
  GF_EXPECT(threw);
  std::cout << "test_particles: ok\n";
  return 0;
}
