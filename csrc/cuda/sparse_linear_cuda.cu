// CUDA kernels of the batched linear layer with mostly-zero inputs (schemas in csrc/ops.cpp,
// spec in oni/reference.py, CPU twin in csrc/cpu/sparse_linear_cpu.cpp). One thread per
// output element (past the launch limits, a thread takes several in turn); a block's threads
// share one input row (forward) or one input column (weight gradient) at a time, so the test
// for a zero is uniform across the block and the weight or gradient rows are read coalesced.
// Every output sums its non-zeros in the CPU kernel's order (ascending j, ascending b); nvcc
// fuses each multiply-add (FMA), so the sums match the CPU's to rounding, not bit for bit.
// The shadow trainer uses cuBLAS on the GPU; these serve the op on every device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../launch_limits.h"

namespace oni {
namespace {

constexpr int kThreads = 256;

// out[r, h] = bias[k, h] + sum_j x[r, j] * weight_t[k, j, h], r = k * B + b < rows. Grids
// stop at the launch limits: a block takes rows blockIdx.x + i * gridDim.x and, in each,
// columns blockIdx.y * blockDim.x + threadIdx.x + i * gridDim.y * blockDim.x.
template <typename T>
__global__ void sparse_input_linear_kernel(const T* __restrict__ x, const T* __restrict__ weight_t,
                                           const T* __restrict__ bias, T* __restrict__ out,
                                           int64_t rows, int64_t B, int64_t d, int64_t H) {
  const int64_t column_stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t k = r / B;
    const T* row = x + r * d;
    for (int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; h < H;
         h += column_stride) {
      const T* table = weight_t + k * d * H + h;
      T acc = bias ? bias[k * H + h] : T(0);
      for (int64_t j = 0; j < d; ++j) {
        const T v = row[j];
        if (v != T(0)) acc += v * table[j * H];
      }
      out[r * H + h] = acc;
    }
  }
}

// out[k, j, h] = sum_b x[k, b, j] * grad[k, b, h], over rows kj = k * d + j < rows, strided
// as above.
template <typename T>
__global__ void sparse_input_weight_grad_kernel(const T* __restrict__ x, const T* __restrict__ grad,
                                                T* __restrict__ out, int64_t rows, int64_t B,
                                                int64_t d, int64_t H) {
  const int64_t column_stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t kj = blockIdx.x; kj < rows; kj += gridDim.x) {
    const int64_t k = kj / d, j = kj % d;
    const T* column = x + k * B * d + j;
    for (int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; h < H;
         h += column_stride) {
      const T* g = grad + k * B * H + h;
      T acc = T(0);
      for (int64_t b = 0; b < B; ++b) {
        const T v = column[b * d];
        if (v != T(0)) acc += v * g[b * H];
      }
      out[kj * H + h] = acc;
    }
  }
}

dim3 grid_for(int64_t rows, int64_t H) {
  return dim3(grid_x(rows), grid_y((H + kThreads - 1) / kThreads));
}

at::Tensor sparse_input_linear_cuda(const at::Tensor& x, const at::Tensor& weight_t,
                                    const c10::optional<at::Tensor>& bias) {
  check_sparse_linear_inputs(x, weight_t, bias);
  TORCH_CHECK(x.device().is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(0), B = x.size(1), d = x.size(2), H = weight_t.size(2);
  auto out = at::empty({K, B, H}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), wc = weight_t.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const dim3 grid = grid_for(K * B, H);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kFloat) {
    sparse_input_linear_kernel<float><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<float>(), wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
        out.data_ptr<float>(), K * B, B, d, H);
  } else {
    sparse_input_linear_kernel<double><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<double>(), wc.data_ptr<double>(),
        bc.defined() ? bc.data_ptr<double>() : nullptr, out.data_ptr<double>(), K * B, B, d, H);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void sparse_input_weight_grad_cuda(const at::Tensor& x, const at::Tensor& grad,
                                   const at::Tensor& out) {
  check_sparse_weight_grad_inputs(x, grad, out);
  TORCH_CHECK(x.device().is_cuda(), "x must be a CUDA tensor, got ", x.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(0), B = x.size(1), d = x.size(2), H = grad.size(2);
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  const dim3 grid = grid_for(K * d, H);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kFloat) {
    sparse_input_weight_grad_kernel<float><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<float>(), gc.data_ptr<float>(), out.data_ptr<float>(), K * d, B, d, H);
  } else {
    sparse_input_weight_grad_kernel<double><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<double>(), gc.data_ptr<double>(), out.data_ptr<double>(), K * d, B, d, H);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CUDA, m) {
  m.impl("sparse_input_linear", &sparse_input_linear_cuda);
  m.impl("sparse_input_weight_grad", &sparse_input_weight_grad_cuda);
}

}  // namespace oni
