// CUDA kernel for the mixed-precision Adam step (schema in csrc/ops.cpp, spec in
// oni/reference.py, CPU twin in csrc/cpu/adam_cpu.cpp): one thread per element, grid-stride,
// the CPU kernel's float32 arithmetic in the same order.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../adam_scalars.h"
#include "../checks.h"
#include "../launch_limits.h"

namespace oni {
namespace {

__global__ void adam_step_bf16_kernel(float* __restrict__ param, float* __restrict__ exp_avg,
                                      float* __restrict__ exp_avg_sq,
                                      __nv_bfloat16* __restrict__ param_bf16,
                                      const __nv_bfloat16* __restrict__ grad_bf16, int64_t n,
                                      AdamScalars s) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float p = param[i];
    const float grad = __bfloat162float(grad_bf16[i]);
    // as torch.optim.Adam, no decay term at all when weight_decay = 0: 0 * inf would be NaN
    const float g = s.weight_decay != 0.0f ? __fadd_rn(grad, __fmul_rn(s.weight_decay, p)) : grad;
    float m = exp_avg[i];
    m = __fadd_rn(m, __fmul_rn(s.lerp_weight, __fsub_rn(g, m)));
    float v = __fadd_rn(__fmul_rn(exp_avg_sq[i], s.beta2),
                        __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias_correction2_sqrt), s.eps);
    const float updated = __fsub_rn(p, __fdiv_rn(__fmul_rn(s.step_size, m), denom));
    param[i] = updated;
    exp_avg[i] = fabsf(m) < s.flush_below ? 0.0f : m;
    exp_avg_sq[i] = v < s.flush_below ? 0.0f : v;
    param_bf16[i] = __float2bfloat16_rn(updated);
  }
}

void adam_step_bf16_cuda(const at::Tensor& param, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& param_bf16,
                         const at::Tensor& grad_bf16, int64_t step, double lr, double beta1,
                         double beta2, double eps, double weight_decay, double flush_below) {
  check_adam_inputs(param, exp_avg, exp_avg_sq, param_bf16, grad_bf16, step, lr, beta1, beta2,
                    eps, weight_decay, flush_below);
  TORCH_CHECK(param.device().is_cuda(), "param must be a CUDA tensor, got ", param.device());
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const AdamScalars s = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, flush_below);
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  adam_step_bf16_kernel<<<grid_x(blocks), kThreads, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(
      param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
      reinterpret_cast<__nv_bfloat16*>(param_bf16.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(grad_bf16.data_ptr()), n, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CUDA, m) { m.impl("adam_step_bf16", &adam_step_bf16_cuda); }

}  // namespace oni
