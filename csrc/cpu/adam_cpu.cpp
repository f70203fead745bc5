// CPU kernel for the mixed-precision Adam step (schema in csrc/ops.cpp, spec in
// oni/reference.py). Memory-bound: one pass reads the bfloat16 gradient and the float32
// parameter and moments, and writes them back with the bfloat16 parameter copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../adam_scalars.h"
#include "../checks.h"
#include "vector.h"

namespace oni {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk (~0.9 MB of state)

// The update of elements [0, n) of the given pointers. The arithmetic, in float32 in this
// order, is torch.optim.Adam's (fused CPU kernel): lerp for exp_avg, v * beta2 + (1 - beta2)
// g^2, p - step_size * m / (sqrt(v) / sqrt(bc2) + eps).
ONI_VECTOR_CLONES
void adam_update(float* __restrict param, float* __restrict exp_avg,
                 float* __restrict exp_avg_sq, uint16_t* __restrict param_bf16,
                 const uint16_t* __restrict grad_bf16, int64_t n, AdamScalars s) {
  // as torch.optim.Adam, no decay term at all when weight_decay = 0: 0 * inf would be NaN
  const bool decay = s.weight_decay != 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float p = param[i];
    const float grad = bf16_bits_to_float(grad_bf16[i]);
    const float g = decay ? grad + s.weight_decay * p : grad;
    float m = exp_avg[i];
    m = m + s.lerp_weight * (g - m);
    float v = exp_avg_sq[i] * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = std::sqrt(v) / s.bias_correction2_sqrt + s.eps;
    const float updated = p - s.step_size * m / denom;
    // after the update, so this step is Adam's exactly; the next one starts flushed
    m = std::fabs(m) < s.flush_below ? 0.0f : m;
    v = v < s.flush_below ? 0.0f : v;
    param[i] = updated;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param_bf16[i] = float_to_bf16_bits(updated);
  }
}

void adam_step_bf16_cpu(const at::Tensor& param, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& param_bf16,
                        const at::Tensor& grad_bf16, int64_t step, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double flush_below) {
  check_adam_inputs(param, exp_avg, exp_avg_sq, param_bf16, grad_bf16, step, lr, beta1, beta2,
                    eps, weight_decay, flush_below);
  TORCH_CHECK(param.device().is_cpu(), "param must be a CPU tensor, got ", param.device());
  const AdamScalars s = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, flush_below);
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  auto* low = reinterpret_cast<uint16_t*>(param_bf16.data_ptr<at::BFloat16>());
  const auto* g = reinterpret_cast<const uint16_t*>(grad_bf16.data_ptr<at::BFloat16>());
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    adam_update(p + begin, m + begin, v + begin, low + begin, g + begin, end - begin, s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CPU, m) { m.impl("adam_step_bf16", &adam_step_bf16_cpu); }

}  // namespace oni
