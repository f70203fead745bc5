// Argument checks shared by the CPU and CUDA kernels: shapes, dtypes and devices only
// (value checks that need to read data live in each backend).
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <iterator>
#include <utility>

namespace oni {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// An op that writes `written` in place while it reads or writes `other` needs them apart: the
// kernels read through __restrict__ pointers, and an alias would be read after it was written.
inline void check_no_overlap(const at::Tensor& written, const char* written_name,
                             const at::Tensor& other, const char* other_name) {
  const auto status = at::get_overlap_status(written, other);
  // TooHard: a strided or expanded view, whose overlap torch does not compute; only one
  // that lies in the written tensor's storage can overlap it
  const bool apart = status == at::MemOverlapStatus::No ||
                     (status == at::MemOverlapStatus::TooHard &&
                      !(written.has_storage() && other.has_storage() &&
                        written.storage().is_alias_of(other.storage())));
  TORCH_CHECK(apart, written_name, " and ", other_name, " must not share memory (",
              written_name, " is written in place); pass separate tensors, e.g. ", other_name,
              ".clone()");
}

// The step rows S = sum_n P * B * max(n_active[n] - 1, 0) (n_active[n] <= L) are counted in
// int64, so their bound N * P * B * L must fit: an expanded baseline of 2^61 references made
// the count wrap to 0, and the op returned an empty result.
inline void check_step_count_fits(const at::Tensor& perm, int64_t B) {
  const int64_t factors[] = {perm.size(0), perm.size(1), B, perm.size(2)};
  // a zero factor: no steps at all
  if (std::find(std::begin(factors), std::end(factors), 0) != std::end(factors)) return;
  int64_t bound = 1;
  bool overflows = false;
  for (const int64_t f : factors) overflows = overflows || c10::mul_overflows(bound, f, &bound);
  TORCH_CHECK(!overflows, "the walks' step count may exceed int64: N * P * B * L = ", factors[0],
              " * ", factors[1], " * ", factors[2], " * ", factors[3],
              " (inputs, walks, references, walk length)");
}

// x [N, d], baseline [N, B, d], perm [N, P, L] int64, n_active [N] int64.
inline void check_walk_inputs(const at::Tensor& x, const at::Tensor& baseline,
                              const at::Tensor& perm, const at::Tensor& n_active) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, d], got ", x.dim(), "-D");
  check_floating(x, "x");
  TORCH_CHECK(baseline.dim() == 3, "baseline must be 3-D [N, B, d], got ", baseline.dim(), "-D");
  check_same(baseline, x, "baseline", "x");
  TORCH_CHECK(baseline.size(0) == x.size(0) && baseline.size(2) == x.size(1),
              "baseline must be [N, B, d] = [", x.size(0), ", B, ", x.size(1), "], got ",
              baseline.sizes());
  TORCH_CHECK(baseline.size(1) >= 1, "baseline needs at least one reference (B >= 1)");
  TORCH_CHECK(perm.dim() == 3, "perm must be 3-D [N, P, L], got ", perm.dim(), "-D");
  TORCH_CHECK(perm.scalar_type() == at::kLong, "perm must be int64, got ", perm.scalar_type());
  TORCH_CHECK(perm.device() == x.device(), "perm must be on x's device ", x.device(), ", got ",
              perm.device());
  TORCH_CHECK(perm.size(0) == x.size(0), "perm must have N = ", x.size(0), " rows, got ",
              perm.size(0));
  TORCH_CHECK(perm.size(2) <= x.size(1), "perm walk length L = ", perm.size(2),
              " exceeds the number of features d = ", x.size(1));
  TORCH_CHECK(n_active.dim() == 1 && n_active.size(0) == x.size(0),
              "n_active must be [N] = [", x.size(0), "], got ", n_active.sizes());
  TORCH_CHECK(n_active.scalar_type() == at::kLong, "n_active must be int64, got ",
              n_active.scalar_type());
  TORCH_CHECK(n_active.device() == x.device(), "n_active must be on x's device ", x.device(),
              ", got ", n_active.device());
  check_step_count_fits(perm, baseline.size(1));
}

inline void check_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be [H, d] with d = ", x.size(1), ", got ", weight.sizes());
  check_same(weight, x, "weight", "x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must be [H] = [", weight.size(0), "], got ", bias->sizes());
    check_same(*bias, x, "bias", "x");
  }
}

// The walk's output dtype: x's, or bfloat16 from float32 x (rounded from the float32 value, so
// the output equals the float32 one .to(bfloat16) bit for bit).
inline at::ScalarType walk_out_dtype(const at::Tensor& x,
                                     const c10::optional<at::ScalarType>& out_dtype) {
  const at::ScalarType dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(dtype == x.scalar_type() || (dtype == at::kBFloat16 && x.scalar_type() == at::kFloat),
              "out_dtype must be x's dtype ", x.scalar_type(), " or, for float32 x, bfloat16; got ",
              dtype);
  return dtype;
}

// step_logits [S, k], start_logits [N, B, k], end_logits [N, k], target [N] int64.
inline void check_accumulate_inputs(const at::Tensor& step_logits, const at::Tensor& start_logits,
                                    const at::Tensor& end_logits, const at::Tensor& target,
                                    const at::Tensor& perm, const at::Tensor& n_active,
                                    int64_t n_features, int64_t walks_per_sample) {
  TORCH_CHECK(end_logits.dim() == 2, "end_logits must be 2-D [N, k], got ", end_logits.dim(), "-D");
  check_floating(end_logits, "end_logits");
  const int64_t N = end_logits.size(0), k = end_logits.size(1);
  TORCH_CHECK(k >= 1, "end_logits must have at least one output column, got k = 0");
  TORCH_CHECK(step_logits.dim() == 2 && step_logits.size(1) == k,
              "step_logits must be [S, k] with k = ", k, ", got ", step_logits.sizes());
  check_same(step_logits, end_logits, "step_logits", "end_logits");
  TORCH_CHECK(start_logits.dim() == 3 && start_logits.size(0) == N && start_logits.size(2) == k &&
                  start_logits.size(1) >= 1,
              "start_logits must be [N, B, k] = [", N, ", B >= 1, ", k, "], got ",
              start_logits.sizes());
  check_same(start_logits, end_logits, "start_logits", "end_logits");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "target must be [N] = [", N, "], got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == end_logits.device(), "target must be on ", end_logits.device(),
              ", got ", target.device());
  TORCH_CHECK(perm.dim() == 3 && perm.size(0) == N, "perm must be [N, P, L] with N = ", N,
              ", got ", perm.sizes());
  TORCH_CHECK(perm.scalar_type() == at::kLong, "perm must be int64, got ", perm.scalar_type());
  TORCH_CHECK(perm.device() == end_logits.device(), "perm must be on ", end_logits.device(),
              ", got ", perm.device());
  TORCH_CHECK(n_active.dim() == 1 && n_active.size(0) == N && n_active.scalar_type() == at::kLong,
              "n_active must be int64 [N] = [", N, "], got ", n_active.scalar_type(), " ",
              n_active.sizes());
  TORCH_CHECK(n_active.device() == end_logits.device(), "n_active must be on ",
              end_logits.device(), ", got ", n_active.device());
  TORCH_CHECK(n_features >= perm.size(2) && n_features >= 1, "n_features = ", n_features,
              " must be >= 1 and >= the walk length L = ", perm.size(2));
  TORCH_CHECK(walks_per_sample >= 1, "walks_per_sample must be >= 1, got ", walks_per_sample);
  TORCH_CHECK(perm.size(1) % walks_per_sample == 0, "the number of walks P = ", perm.size(1),
              " must be a multiple of walks_per_sample = ", walks_per_sample);
  check_step_count_fits(perm, start_logits.size(1));
}

// logits [N, k], k >= 1.
inline void check_entropy_inputs(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [N, k], got ", logits.dim(), "-D");
  check_floating(logits, "logits");
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one class (k >= 1), got k = 0");
}

// eta, direction, budget [N, d]; step, radius [N] (eta's dtype); active [N] bool.
inline void check_project_inputs(const at::Tensor& eta, const at::Tensor& direction,
                                 const at::Tensor& step, const at::Tensor& budget,
                                 const at::Tensor& radius, const at::Tensor& active) {
  TORCH_CHECK(eta.dim() == 2, "eta must be 2-D [N, d], got ", eta.dim(), "-D");
  check_floating(eta, "eta");
  const int64_t N = eta.size(0), d = eta.size(1);
  TORCH_CHECK(direction.dim() == 2 && direction.size(0) == N && direction.size(1) == d,
              "direction must be [N, d] = [", N, ", ", d, "], got ", direction.sizes());
  check_same(direction, eta, "direction", "eta");
  TORCH_CHECK(budget.dim() == 2 && budget.size(0) == N && budget.size(1) == d,
              "budget must be [N, d] = [", N, ", ", d, "], got ", budget.sizes());
  check_same(budget, eta, "budget", "eta");
  TORCH_CHECK(step.dim() == 1 && step.size(0) == N, "step must be [N] = [", N, "], got ",
              step.sizes());
  check_same(step, eta, "step", "eta");
  TORCH_CHECK(radius.dim() == 1 && radius.size(0) == N, "radius must be [N] = [", N, "], got ",
              radius.sizes());
  check_same(radius, eta, "radius", "eta");
  TORCH_CHECK(active.dim() == 1 && active.size(0) == N, "active must be [N] = [", N, "], got ",
              active.sizes());
  TORCH_CHECK(active.scalar_type() == at::kBool, "active must be bool, got ", active.scalar_type());
  TORCH_CHECK(active.device() == eta.device(), "active must be on eta's device ", eta.device(),
              ", got ", active.device());
}

// adam_step_bf16: param, exp_avg, exp_avg_sq float32 and param_bf16, grad_bf16 bfloat16, all
// of param's shape and device and contiguous (the kernels write them in place, flat).
inline void check_adam_inputs(const at::Tensor& param, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, const at::Tensor& param_bf16,
                              const at::Tensor& grad_bf16, int64_t step, double lr, double beta1,
                              double beta2, double eps, double weight_decay, double flush_below) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, "param must be float32, got ",
              param.scalar_type());
  const std::pair<const at::Tensor*, const char*> state[] = {
      {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}, {&param_bf16, "param_bf16"},
      {&grad_bf16, "grad_bf16"}};
  for (const auto& [t, name] : state) {
    const auto want = t == &param_bf16 || t == &grad_bf16 ? at::kBFloat16 : at::kFloat;
    TORCH_CHECK(t->scalar_type() == want, name, " must be ", want, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == param.device(), name, " must be on param's device ",
                param.device(), ", got ", t->device());
    TORCH_CHECK(t->sizes() == param.sizes(), name, " must have param's shape ", param.sizes(),
                ", got ", t->sizes());
  }
  TORCH_CHECK(param.is_contiguous(), "param must be contiguous (it is updated in place)");
  for (const auto& [t, name] : state) {
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  }
  // the four written tensors, and the gradient, pairwise apart
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&param, "param"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"},
      {&param_bf16, "param_bf16"}, {&grad_bf16, "grad_bf16"}};
  for (size_t i = 0; i + 1 < std::size(all); ++i) {
    for (size_t j = i + 1; j < std::size(all); ++j) {
      check_no_overlap(*all[i].first, all[i].second, *all[j].first, all[j].second);
    }
  }
  TORCH_CHECK(step >= 1, "step must be >= 1 (the count including this step), got ", step);
  TORCH_CHECK(lr >= 0.0, "lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK(flush_below >= 0.0, "flush_below must be >= 0, got ", flush_below);
}

// x [K, B, d], weight_t [K, d, H], bias [K, H] (optional): one dtype and device.
inline void check_sparse_linear_inputs(const at::Tensor& x, const at::Tensor& weight_t,
                                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "x must be 3-D [K, B, d], got ", x.dim(), "-D");
  check_floating(x, "x");
  TORCH_CHECK(x.size(2) < (int64_t(1) << 31), "x must have d < 2^31 features, got ", x.size(2));
  TORCH_CHECK(weight_t.dim() == 3 && weight_t.size(0) == x.size(0) &&
                  weight_t.size(1) == x.size(2),
              "weight_t must be [K, d, H] = [", x.size(0), ", ", x.size(2), ", H], got ",
              weight_t.sizes());
  check_same(weight_t, x, "weight_t", "x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == x.size(0) &&
                    bias->size(1) == weight_t.size(2),
                "bias must be [K, H] = [", x.size(0), ", ", weight_t.size(2), "], got ",
                bias->sizes());
    check_same(*bias, x, "bias", "x");
  }
}

// x [K, B, d], grad [K, B, H], out [K, d, H] contiguous (written): one dtype and device.
inline void check_sparse_weight_grad_inputs(const at::Tensor& x, const at::Tensor& grad,
                                            const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3, "x must be 3-D [K, B, d], got ", x.dim(), "-D");
  check_floating(x, "x");
  TORCH_CHECK(x.size(2) < (int64_t(1) << 31), "x must have d < 2^31 features, got ", x.size(2));
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1),
              "grad must be [K, B, H] = [", x.size(0), ", ", x.size(1), ", H], got ",
              grad.sizes());
  check_same(grad, x, "grad", "x");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == x.size(0) && out.size(1) == x.size(2) &&
                  out.size(2) == grad.size(2),
              "out must be [K, d, H] = [", x.size(0), ", ", x.size(2), ", ", grad.size(2),
              "], got ", out.sizes());
  check_same(out, x, "out", "x");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous (it is written in place)");
  check_no_overlap(out, "out", x, "x");
  check_no_overlap(out, "out", grad, "grad");
}

// relu_bf16_ / relu_backward_bf16_: bfloat16, contiguous, one device and shape.
inline void check_bf16_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_relu_backward_inputs(const at::Tensor& grad, const at::Tensor& output,
                                       const at::Tensor& bias_grad) {
  TORCH_CHECK(grad.dim() >= 1, "grad must be at least 1-D [..., B], got 0-D");
  check_bf16_contiguous(grad, "grad");
  check_bf16_contiguous(output, "output");
  check_bf16_contiguous(bias_grad, "bias_grad");
  TORCH_CHECK(output.sizes() == grad.sizes(), "output must have grad's shape ", grad.sizes(),
              ", got ", output.sizes());
  const auto rows = grad.sizes().slice(0, grad.dim() - 1);
  TORCH_CHECK(bias_grad.sizes() == rows, "bias_grad must be grad's shape without its last dim ",
              rows, ", got ", bias_grad.sizes());
  TORCH_CHECK(output.device() == grad.device(), "output must be on grad's device ",
              grad.device(), ", got ", output.device());
  TORCH_CHECK(bias_grad.device() == grad.device(), "bias_grad must be on grad's device ",
              grad.device(), ", got ", bias_grad.device());
  check_no_overlap(grad, "grad", output, "output");
  check_no_overlap(bias_grad, "bias_grad", grad, "grad");
  check_no_overlap(bias_grad, "bias_grad", output, "output");
}

}  // namespace oni
