// CPU kernels of the batched linear layer with mostly-zero inputs (schemas in csrc/ops.cpp,
// spec in oni/reference.py). The binary tabular rows of the field (Purchase, Texas,
// Location) are 1-12% ones, so the first layer of the K shadow models is gathered from the
// rows of weight_t the active features select instead of multiplied densely. The work is cut
// into (model, 128-column block) tasks: a block of one model's weight_t (d x 128) stays in
// L2 while all B rows use it, and no two tasks write the same output (no atomics; every sum
// runs in a fixed order, so the result does not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "vector.h"

namespace oni {
namespace {

// The non-zeros of x viewed as [rows, d], row by row, columns ascending: row r's are
// cols/vals[begin(r), end(r)). Each row is followed by one spare slot, so the fill can be
// branch-free (random 0/1 rows would mispredict a branch on every tenth element) and rows
// filled in parallel never write each other's slots.
template <typename T>
struct RowNonzeros {
  std::vector<int64_t> offsets;  // [rows + 1]; row r owns [offsets[r], offsets[r + 1])
  std::vector<int64_t> cols;
  std::vector<T> vals;
  int64_t begin(int64_t r) const { return offsets[r]; }
  int64_t end(int64_t r) const { return offsets[r + 1] - 1; }  // the spare slot excluded
};

template <typename T>
RowNonzeros<T> row_nonzeros(const T* x, int64_t rows, int64_t d) {
  RowNonzeros<T> nz;
  nz.offsets.assign(rows + 1, 0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * d;
      int32_t count = 0;  // d < 2^31 (checked)
      for (int64_t j = 0; j < d; ++j) count += row[j] != T(0);
      nz.offsets[r + 1] = count + 1;
    }
  });
  for (int64_t r = 0; r < rows; ++r) nz.offsets[r + 1] += nz.offsets[r];
  nz.cols.resize(nz.offsets[rows]);
  nz.vals.resize(nz.offsets[rows]);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * d;
      int64_t at = nz.offsets[r];
      for (int64_t j = 0; j < d; ++j) {  // writes every j, keeps the non-zeros
        nz.cols[at] = j;
        nz.vals[at] = row[j];
        at += row[j] != T(0);
      }
    }
  });
  return nz;
}

// Eight 32-byte vectors of accumulators per task row (64 floats, 32 doubles): they stay in
// registers while a row's non-zeros stream their weight rows past them.
constexpr int kVectors = 8;

template <typename T>
struct Lanes {
  typedef T Vec __attribute__((vector_size(32), aligned(sizeof(T))));  // unaligned loads
  static constexpr int64_t kPerVector = 32 / sizeof(T);
  static constexpr int64_t kWidth = kVectors * kPerVector;
};

// out[k, b, h0:h0+w] = bias[k, h0:h0+w] + sum over row (k, b)'s non-zeros (j, v), in
// ascending j, of v * weight_t[k, j, h0:h0+w]; w <= Lanes<T>::kWidth. The block of weight_t
// is first copied into `packed` ([d, kWidth], contiguous): in place its rows sit H apart,
// and with H a multiple of 1024 they all fall into the same few cache sets.
template <typename T>
ONI_INLINE void forward_block(const RowNonzeros<T>& nz, const T* weight_t, const T* bias, T* out,
                              T* packed, int64_t k, int64_t B, int64_t d, int64_t H, int64_t h0,
                              int64_t w) {
  using Vec = typename Lanes<T>::Vec;
  constexpr int64_t L = Lanes<T>::kPerVector, W = Lanes<T>::kWidth;
  const T* table = weight_t + k * d * H + h0;
  for (int64_t j = 0; j < d; ++j) std::copy(table + j * H, table + j * H + w, packed + j * W);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = k * B + b;
    T* dst = out + r * H + h0;
    if (w == W) {
      Vec acc[kVectors];
      for (int q = 0; q < kVectors; ++q) {
        acc[q] = bias ? *reinterpret_cast<const Vec*>(bias + k * H + h0 + q * L) : Vec{};
      }
      for (int64_t i = nz.begin(r); i < nz.end(r); ++i) {
        const Vec* wrow = reinterpret_cast<const Vec*>(packed + nz.cols[i] * W);
        const T v = nz.vals[i];
        for (int q = 0; q < kVectors; ++q) acc[q] += v * wrow[q];
      }
      for (int q = 0; q < kVectors; ++q) *reinterpret_cast<Vec*>(dst + q * L) = acc[q];
    } else {  // the ragged last block
      T acc[W];
      for (int64_t t = 0; t < w; ++t) acc[t] = bias ? bias[k * H + h0 + t] : T(0);
      for (int64_t i = nz.begin(r); i < nz.end(r); ++i) {
        const T* wrow = packed + nz.cols[i] * W;
        const T v = nz.vals[i];
        for (int64_t t = 0; t < w; ++t) acc[t] += v * wrow[t];
      }
      for (int64_t t = 0; t < w; ++t) dst[t] = acc[t];
    }
  }
}

// out[k, :, h0:h0+w] = sum over rows b (ascending) and their non-zeros (j, v) of
// v * grad[k, b, h0:h0+w] added into row j; accumulated in `packed` ([d, kWidth]) for the
// reason forward_block gives, then copied out.
template <typename T>
ONI_INLINE void weight_grad_block(const RowNonzeros<T>& nz, const T* grad, T* out, T* packed,
                                  int64_t k, int64_t B, int64_t d, int64_t H, int64_t h0,
                                  int64_t w) {
  using Vec = typename Lanes<T>::Vec;
  constexpr int64_t W = Lanes<T>::kWidth;
  std::fill(packed, packed + d * W, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = k * B + b;
    const T* g = grad + r * H + h0;
    if (w == W) {
      Vec gv[kVectors];
      for (int q = 0; q < kVectors; ++q) gv[q] = reinterpret_cast<const Vec*>(g)[q];
      for (int64_t i = nz.begin(r); i < nz.end(r); ++i) {
        Vec* drow = reinterpret_cast<Vec*>(packed + nz.cols[i] * W);
        const T v = nz.vals[i];
        for (int q = 0; q < kVectors; ++q) drow[q] += v * gv[q];
      }
    } else {
      for (int64_t i = nz.begin(r); i < nz.end(r); ++i) {
        T* drow = packed + nz.cols[i] * W;
        const T v = nz.vals[i];
        for (int64_t t = 0; t < w; ++t) drow[t] += v * g[t];
      }
    }
  }
  T* table = out + k * d * H + h0;
  for (int64_t j = 0; j < d; ++j) std::copy(packed + j * W, packed + j * W + w, table + j * H);
}

template <typename T>
ONI_INLINE void forward_tasks_impl(const RowNonzeros<T>& nz, const T* wt, const T* bias, T* out,
                                   int64_t B, int64_t d, int64_t H, int64_t begin, int64_t end) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t n_blocks = (H + W - 1) / W;
  std::vector<T> packed(d * W);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t k = task / n_blocks, h0 = (task % n_blocks) * W;
    forward_block(nz, wt, bias, out, packed.data(), k, B, d, H, h0, std::min(W, H - h0));
  }
}

template <typename T>
ONI_INLINE void weight_grad_tasks_impl(const RowNonzeros<T>& nz, const T* grad, T* out, int64_t B,
                                       int64_t d, int64_t H, int64_t begin, int64_t end) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t n_blocks = (H + W - 1) / W;
  std::vector<T> packed(d * W);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t k = task / n_blocks, h0 = (task % n_blocks) * W;
    weight_grad_block(nz, grad, out, packed.data(), k, B, d, H, h0, std::min(W, H - h0));
  }
}

// One vectorised entry point per dtype and direction (target_clones does not take templates).
ONI_VECTOR_CLONES
void forward_tasks(const RowNonzeros<float>& nz, const float* wt, const float* bias, float* out,
                   int64_t B, int64_t d, int64_t H, int64_t begin, int64_t end) {
  forward_tasks_impl(nz, wt, bias, out, B, d, H, begin, end);
}

ONI_VECTOR_CLONES
void forward_tasks(const RowNonzeros<double>& nz, const double* wt, const double* bias,
                   double* out, int64_t B, int64_t d, int64_t H, int64_t begin, int64_t end) {
  forward_tasks_impl(nz, wt, bias, out, B, d, H, begin, end);
}

ONI_VECTOR_CLONES
void weight_grad_tasks(const RowNonzeros<float>& nz, const float* grad, float* out, int64_t B,
                       int64_t d, int64_t H, int64_t begin, int64_t end) {
  weight_grad_tasks_impl(nz, grad, out, B, d, H, begin, end);
}

ONI_VECTOR_CLONES
void weight_grad_tasks(const RowNonzeros<double>& nz, const double* grad, double* out, int64_t B,
                       int64_t d, int64_t H, int64_t begin, int64_t end) {
  weight_grad_tasks_impl(nz, grad, out, B, d, H, begin, end);
}

at::Tensor sparse_input_linear_cpu(const at::Tensor& x, const at::Tensor& weight_t,
                                   const c10::optional<at::Tensor>& bias) {
  check_sparse_linear_inputs(x, weight_t, bias);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  const int64_t K = x.size(0), B = x.size(1), d = x.size(2), H = weight_t.size(2);
  auto out = at::empty({K, B, H}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), wc = weight_t.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_linear_cpu", [&] {
    const auto nz = row_nonzeros(xc.data_ptr<scalar_t>(), K * B, d);
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int64_t W = Lanes<scalar_t>::kWidth;
    at::parallel_for(0, K * ((H + W - 1) / W), 1, [&](int64_t begin, int64_t end) {
      forward_tasks(nz, wp, bp, op, B, d, H, begin, end);
    });
  });
  return out;
}

void sparse_input_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad,
                                  const at::Tensor& out) {
  check_sparse_weight_grad_inputs(x, grad, out);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  const int64_t K = x.size(0), B = x.size(1), d = x.size(2), H = grad.size(2);
  if (out.numel() == 0) return;
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_weight_grad_cpu", [&] {
    const auto nz = row_nonzeros(xc.data_ptr<scalar_t>(), K * B, d);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int64_t W = Lanes<scalar_t>::kWidth;
    at::parallel_for(0, K * ((H + W - 1) / W), 1, [&](int64_t begin, int64_t end) {
      weight_grad_tasks(nz, gp, op, B, d, H, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CPU, m) {
  m.impl("sparse_input_linear", &sparse_input_linear_cpu);
  m.impl("sparse_input_weight_grad", &sparse_input_weight_grad_cpu);
}

}  // namespace oni
