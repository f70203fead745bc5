// CUDA kernels for the bfloat16 ReLU ops of shadow training (schemas in csrc/ops.cpp, spec in
// oni/reference.py, CPU kernels in csrc/cpu/relu_bf16_cpu.cpp): the same bit-pattern tests.
// relu_bf16_ is grid-stride elementwise; relu_backward_bf16_ gives each row one warp, whose
// lanes stride over the row and reduce the float32 bias sum with shuffles.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "../launch_limits.h"

namespace oni {
namespace {

constexpr uint16_t kPlusInf = 0x7f80;

__global__ void relu_bf16_kernel(uint16_t* __restrict__ x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const uint16_t v = x[i];
    // keep the non-negative patterns, -0 (as torch.relu) and every NaN; negatives become +0
    if (!(v <= 0x8000u || (v & 0x7fffu) > kPlusInf)) x[i] = 0;
  }
}

__global__ void relu_backward_bf16_kernel(uint16_t* __restrict__ grad,
                                          const uint16_t* __restrict__ output,
                                          __nv_bfloat16* __restrict__ bias_grad, int64_t rows,
                                          int64_t b) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(blockDim.x) * gridDim.x) >> 5;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
       r < rows; r += warps) {
    uint16_t* g = grad + r * b;
    const uint16_t* out = output + r * b;
    float sum = 0.0f;
    for (int64_t j = lane; j < b; j += 32) {
      // threshold_backward's test, !(output <= 0): positive (bits in [1, 0x7fff]) or NaN
      const uint16_t o = out[j];
      const bool passes = static_cast<uint16_t>(o - 1) < 0x7fffu || (o & 0x7fffu) > kPlusInf;
      const uint16_t v = passes ? g[j] : uint16_t(0);
      g[j] = v;
      sum += __uint_as_float(static_cast<unsigned>(v) << 16);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) bias_grad[r] = __float2bfloat16_rn(sum);
  }
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work) {
  return grid_x(std::min<int64_t>((work + kThreads - 1) / kThreads, 65535LL * 8));
}

void relu_bf16_cuda(const at::Tensor& x) {
  check_bf16_contiguous(x, "x");
  TORCH_CHECK(x.device().is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  relu_bf16_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint16_t*>(x.data_ptr()), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void relu_backward_bf16_cuda(const at::Tensor& grad, const at::Tensor& output,
                             const at::Tensor& bias_grad) {
  check_relu_backward_inputs(grad, output, bias_grad);
  TORCH_CHECK(grad.device().is_cuda(), "grad must be a CUDA tensor, got ", grad.device());
  const int64_t b = grad.size(-1);
  const int64_t rows = bias_grad.numel();
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  if (b == 0) {  // empty sums
    C10_CUDA_CHECK(cudaMemsetAsync(bias_grad.data_ptr(), 0, rows * sizeof(uint16_t),
                                   c10::cuda::getCurrentCUDAStream()));
    return;
  }
  relu_backward_bf16_kernel<<<blocks_for(rows * 32), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint16_t*>(grad.data_ptr()),
      reinterpret_cast<const uint16_t*>(output.data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(bias_grad.data_ptr()), rows, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CUDA, m) {
  m.impl("relu_bf16_", &relu_bf16_cuda);
  m.impl("relu_backward_bf16_", &relu_backward_bf16_cuda);
}

}  // namespace oni
