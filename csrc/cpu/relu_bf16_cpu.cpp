// CPU kernels for the bfloat16 ReLU ops of shadow training (schemas in csrc/ops.cpp, spec in
// oni/reference.py). Memory-bound passes done on the 16-bit patterns, read as uint16: x > 0
// exactly when the bits lie in [1, 0x7fff] (0x7f80 = +inf, above it the positive NaNs) and x
// is NaN when (bits & 0x7fff) > 0x7f80, so the masks are integer compares and only the bias
// sums widen to float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../checks.h"
#include "vector.h"

namespace oni {
namespace {

constexpr int64_t kLanes = 16;
typedef uint16_t u16x16 __attribute__((vector_size(2 * kLanes)));
typedef uint32_t u32x16 __attribute__((vector_size(4 * kLanes)));
typedef float f32x16 __attribute__((vector_size(4 * kLanes)));

constexpr uint16_t kPlusInf = 0x7f80;
constexpr uint16_t kSign = 0x8000;

// threshold_backward's test, !(output <= 0): positive or NaN
inline bool passes_gradient(uint16_t output) {
  return static_cast<uint16_t>(output - 1) < 0x7fff || (output & 0x7fff) > kPlusInf;
}

ONI_VECTOR_CLONES
void relu_span(uint16_t* __restrict x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    u16x16 v;
    std::memcpy(&v, x + i, sizeof v);
    // keep the non-negative patterns, -0 (as torch.relu) and every NaN; negatives become +0
    const u16x16 keep = (u16x16)((v <= kSign) | ((v & (uint16_t)0x7fff) > kPlusInf));
    v &= keep;
    std::memcpy(x + i, &v, sizeof v);
  }
  for (; i < n; ++i) {
    const uint16_t v = x[i];
    x[i] = (v <= kSign || (v & 0x7fff) > kPlusInf) ? v : uint16_t(0);
  }
}

// Rows [first, last) of length b: mask grad by output, bias_grad[r] = row sum.
ONI_VECTOR_CLONES
void relu_backward_rows(uint16_t* __restrict grad, const uint16_t* __restrict output,
                        uint16_t* __restrict bias_grad, int64_t first, int64_t last,
                        int64_t b) {
  for (int64_t r = first; r < last; ++r) {
    uint16_t* g = grad + r * b;
    const uint16_t* out = output + r * b;
    f32x16 lanes = {};
    int64_t j = 0;
    for (; j + kLanes <= b; j += kLanes) {
      u16x16 o, v;
      std::memcpy(&o, out + j, sizeof o);
      std::memcpy(&v, g + j, sizeof v);
      v &= (u16x16)(((o - (uint16_t)1) < (uint16_t)0x7fff) | ((o & (uint16_t)0x7fff) > kPlusInf));
      std::memcpy(g + j, &v, sizeof v);
      const u32x16 wide = __builtin_convertvector(v, u32x16) << 16;
      f32x16 f;
      std::memcpy(&f, &wide, sizeof f);
      lanes += f;
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
    for (; j < b; ++j) {
      const uint16_t v = passes_gradient(out[j]) ? g[j] : uint16_t(0);
      g[j] = v;
      sum += bf16_bits_to_float(v);
    }
    bias_grad[r] = float_to_bf16_bits(sum);
  }
}

inline uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void relu_bf16_cpu(const at::Tensor& x) {
  check_bf16_contiguous(x, "x");
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  uint16_t* data = bits(x);
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    relu_span(data + begin, end - begin);
  });
}

void relu_backward_bf16_cpu(const at::Tensor& grad, const at::Tensor& output,
                            const at::Tensor& bias_grad) {
  check_relu_backward_inputs(grad, output, bias_grad);
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor, got ", grad.device());
  const int64_t b = grad.size(-1);
  const int64_t rows = bias_grad.numel();
  if (rows == 0) return;
  if (b == 0) {  // empty sums
    bias_grad.zero_();
    return;
  }
  uint16_t* g = bits(grad);
  const uint16_t* out = bits(output);
  uint16_t* bias = bits(bias_grad);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / b);  // ~32 KB of grad per task
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    relu_backward_rows(g, out, bias, first, last, b);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CPU, m) {
  m.impl("relu_bf16_", &relu_bf16_cpu);
  m.impl("relu_backward_bf16_", &relu_backward_bf16_cpu);
}

}  // namespace oni
