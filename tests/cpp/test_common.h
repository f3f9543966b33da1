// Minimal assertion helpers for the C++ tests (no test framework is downloaded).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <iostream>

#define GF_EXPECT(cond)                                                                 \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expectation failed: " #cond "\n"; \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

// max |a - b| <= atol + rtol * max |b|, compared in float64.
inline bool close(const at::Tensor& a, const at::Tensor& b, double rtol, double atol) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  const double err = (x - y).abs().max().item<double>();
  const double scale = y.abs().max().item<double>();
  if (err > atol + rtol * scale) {
    std::cerr << "max error " << err << " exceeds " << atol + rtol * scale << "\n";
    return false;
  }
  return true;
}
