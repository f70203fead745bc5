// The per-step scalars of oni::adam_step_bf16, shared by the CPU and CUDA kernels so both
// round them the same way: bias corrections in float64 (as torch.optim.Adam), then float32.
#pragma once
#include <cmath>
#include <cstdint>

namespace oni {

struct AdamScalars {
  float lerp_weight, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
      weight_decay, flush_below;
};

inline AdamScalars adam_scalars(int64_t step, double lr, double beta1, double beta2, double eps,
                                double weight_decay, double flush_below) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return AdamScalars{static_cast<float>(1.0 - beta1),
                     static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2),
                     static_cast<float>(lr / bias_correction1),
                     static_cast<float>(std::sqrt(bias_correction2)),
                     static_cast<float>(eps),
                     static_cast<float>(weight_decay),
                     static_cast<float>(flush_below)};
}

}  // namespace oni
