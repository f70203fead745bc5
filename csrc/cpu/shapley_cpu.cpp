// CPU kernels for the Shapley ops (schemas in csrc/ops.cpp, spec in oni/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "vector.h"

namespace oni {
namespace {

// Validates n_active and the active prefix of every walk, returns per-input first step rows.
// Walk values must be distinct feature indices in [0, d), identical as sets across walks.
std::vector<int64_t> validate_walks(const at::Tensor& perm, const at::Tensor& n_active,
                                    int64_t n_features, int64_t n_refs) {
  const int64_t N = perm.size(0), P = perm.size(1), L = perm.size(2);
  auto perm_a = perm.accessor<int64_t, 3>();
  auto act_a = n_active.accessor<int64_t, 1>();
  std::vector<int64_t> row_offset(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t a = act_a[n];
    TORCH_CHECK(a >= 0 && a <= L, "n_active[", n, "] = ", a, " must lie in [0, L = ", L, "]");
    row_offset[n + 1] = row_offset[n] + P * n_refs * std::max<int64_t>(a - 1, 0);
  }
  std::atomic<int64_t> bad_row{N};  // the smallest bad row, whatever the thread timing
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // stamp[i] == 2*walk+1 marks "seen in this walk"; row_mark[i] == 1 marks "in walk 0".
    std::vector<int64_t> stamp(n_features, -1);
    std::vector<char> row_mark(n_features, 0);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t a = act_a[n];
      bool ok = true;
      for (int64_t p = 0; p < P && ok; ++p) {
        for (int64_t k = 0; k < a; ++k) {
          const int64_t i = perm_a[n][p][k];
          if (i < 0 || i >= n_features || stamp[i] == n * P + p) { ok = false; break; }
          stamp[i] = n * P + p;
          if (p == 0) row_mark[i] = 1;
          else if (!row_mark[i]) { ok = false; break; }
        }
      }
      if (!ok) {
        int64_t seen = bad_row.load();
        while (n < seen && !bad_row.compare_exchange_weak(seen, n)) {}
        return;
      }
      // unmark walk 0's features only: a fill of all n_features per input would cost
      // O(N * n_features) on wide inputs
      for (int64_t k = 0; k < a; ++k) row_mark[perm_a[n][0][k]] = 0;
    }
  });
  TORCH_CHECK(bad_row.load() == N, "perm row ", bad_row.load(),
              ": the first n_active entries of every walk must be distinct feature indices in "
              "[0, ", n_features, ") forming the same set in every walk");
  return row_offset;
}

// Stores a walk value: as it is, or as the bits of its bfloat16 rounding.
ONI_INLINE void store(float* dst, float value) { *dst = value; }
ONI_INLINE void store(double* dst, double value) { *dst = value; }
ONI_INLINE void store(uint16_t* dst, float value) { *dst = float_to_bf16_bits(value); }

// One walk step: acc += col * delta, then dst = acc rounded to scalar_t (with Relu, negatives
// of it set to +0; -0 and NaN pass), stored as out_t. Element-wise, and built with
// -ffp-contract=off (setup.py): for double, col * delta + acc is one precision, and the v4
// clone fused it into an FMA. So every ISA's clone below gives the same bits.
template <typename scalar_t, typename out_t, bool Relu>
ONI_INLINE void step_and_store_impl(
    double* __restrict__ acc, const scalar_t* __restrict__ col, scalar_t delta,
    out_t* __restrict__ dst, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    acc[h] += static_cast<double>(col[h] * delta);
    const scalar_t value = static_cast<scalar_t>(acc[h]);
    // The ReLU acts on the rounded value, as torch.relu on the twin's output. Written as a
    // select on scalar_t so gcc vectorises it: std::max(acc[h], 0.0) compiled to a branch on
    // the sign, which mispredicts on every other unit of a real layer (20x slower).
    store(dst + h, Relu ? (value < scalar_t(0) ? scalar_t(0) : value) : value);
  }
}

// One vectorised entry point per (input, output) type: target_clones takes no templates.
#define ONI_WALK_STEP(scalar_t, out_t)                                                      \
  ONI_VECTOR_CLONES_V4 void step_and_store(double* __restrict__ acc,                        \
                                           const scalar_t* __restrict__ col, scalar_t delta, \
                                           out_t* __restrict__ dst, int64_t H, bool relu) {  \
    if (relu) step_and_store_impl<scalar_t, out_t, true>(acc, col, delta, dst, H);          \
    else step_and_store_impl<scalar_t, out_t, false>(acc, col, delta, dst, H);              \
  }
ONI_WALK_STEP(float, float)
ONI_WALK_STEP(double, double)
ONI_WALK_STEP(float, uint16_t)
#undef ONI_WALK_STEP

void check_total_steps(const std::vector<int64_t>& row_offset, int64_t total_steps,
                       const char* what) {
  TORCH_CHECK(row_offset.back() == total_steps, what, ": total_steps = ", total_steps,
              " but the walks have sum_n P * B * max(n_active[n] - 1, 0) = ", row_offset.back(),
              " interior steps");
}

at::Tensor permutation_walk_linear_cpu(const at::Tensor& x, const at::Tensor& baseline,
                                       const at::Tensor& perm, const at::Tensor& n_active,
                                       const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       int64_t total_steps, bool relu,
                                       c10::optional<at::ScalarType> out_dtype) {
  check_walk_inputs(x, baseline, perm, n_active);
  check_linear_inputs(x, weight, bias);
  const at::ScalarType dtype = walk_out_dtype(x, out_dtype);
  const int64_t N = x.size(0), d = x.size(1), B = baseline.size(1), P = perm.size(1);
  const int64_t H = weight.size(0);
  const auto perm_c = perm.contiguous();
  const auto act_c = n_active.contiguous();
  const auto row_offset = validate_walks(perm_c, act_c, d, B);
  check_total_steps(row_offset, total_steps, "permutation_walk_linear");

  auto out = at::empty({total_steps, H}, x.options().dtype(dtype));
  if (total_steps == 0) return out;
  const auto x_c = x.contiguous();
  // A background set shared by every input (an expanded view, stride 0 over N) is read in
  // place and its walk origins W r + bias are computed once, not N times.
  const bool shared = N > 0 && baseline.stride(0) == 0;
  const auto base_c = shared ? baseline[0].contiguous() : baseline.contiguous();  // [(N,) B, d]
  const int64_t base_stride = shared ? 0 : B * d;
  // Columns of W as contiguous rows, and the walk origins W r + bias for every reference.
  const auto weight_t = weight.t().contiguous();  // [d, H]; free for a column-major weight
  // not autocast's to recast: under a caller's autocast the origins were bfloat16
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto origin = at::matmul(base_c, weight_t);                           // [(N,) B, H]
  if (bias.has_value()) origin.add_(*bias);
  origin = origin.contiguous();
  const int64_t origin_stride = shared ? 0 : B * H;

  // scalar_t from the tag, out_t from the output pointer: a bfloat16 output exists for
  // float32 x only (walk_out_dtype), so only that step loop is compiled for it
  auto walks = [&](auto scalar_tag, auto* outp) {
    using scalar_t = decltype(scalar_tag);
    using out_t = std::remove_pointer_t<decltype(outp)>;
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    const scalar_t* rp = base_c.data_ptr<scalar_t>();
    const scalar_t* wt = weight_t.data_ptr<scalar_t>();
    const scalar_t* op = origin.data_ptr<scalar_t>();
    const int64_t* pp = perm_c.data_ptr<int64_t>();
    const int64_t* ap = act_c.data_ptr<int64_t>();
    const int64_t L = perm.size(2);
    at::parallel_for(0, N * P * B, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(H);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t n = w / (P * B), p = (w / B) % P, b = w % B;
        const int64_t a = ap[n];
        if (a <= 1) continue;
        const scalar_t* xr = xp + n * d;
        const scalar_t* rr = rp + n * base_stride + b * d;
        const scalar_t* orig = op + n * origin_stride + b * H;
        const int64_t* walk = pp + (n * P + p) * L;
        out_t* dst = outp + (row_offset[n] + (p * B + b) * (a - 1)) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] = orig[h];
        for (int64_t k = 0; k < a - 1; ++k, dst += H) {
          const int64_t i = walk[k];
          const scalar_t delta = xr[i] - rr[i];
          step_and_store(acc.data(), wt + i * H, delta, dst, H, relu);
        }
      }
    });
  };
  if (dtype == at::kBFloat16) {
    walks(float{}, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "permutation_walk_linear_cpu",
                               [&] { walks(scalar_t{}, out.data_ptr<scalar_t>()); });
  }
  return out;
}

at::Tensor permutation_walk_masked_cpu(const at::Tensor& x, const at::Tensor& baseline,
                                       const at::Tensor& perm, const at::Tensor& n_active,
                                       int64_t total_steps) {
  check_walk_inputs(x, baseline, perm, n_active);
  const int64_t N = x.size(0), d = x.size(1), B = baseline.size(1), P = perm.size(1);
  const auto perm_c = perm.contiguous();
  const auto act_c = n_active.contiguous();
  const auto row_offset = validate_walks(perm_c, act_c, d, B);
  check_total_steps(row_offset, total_steps, "permutation_walk_masked");

  auto out = at::empty({total_steps, d}, x.options());
  if (total_steps == 0) return out;
  const auto x_c = x.contiguous();
  const bool shared = N > 0 && baseline.stride(0) == 0;  // see permutation_walk_linear_cpu
  const auto base_c = shared ? baseline[0].contiguous() : baseline.contiguous();
  const int64_t base_stride = shared ? 0 : B * d;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "permutation_walk_masked_cpu", [&] {
    const scalar_t* xp = x_c.data_ptr<scalar_t>();
    const scalar_t* rp = base_c.data_ptr<scalar_t>();
    const int64_t* pp = perm_c.data_ptr<int64_t>();
    const int64_t* ap = act_c.data_ptr<int64_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t L = perm.size(2);
    at::parallel_for(0, N * P * B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t n = w / (P * B), p = (w / B) % P, b = w % B;
        const int64_t a = ap[n];
        if (a <= 1) continue;
        const scalar_t* xr = xp + n * d;
        const scalar_t* prev = rp + n * base_stride + b * d;
        const int64_t* walk = pp + (n * P + p) * L;
        scalar_t* dst = outp + (row_offset[n] + (p * B + b) * (a - 1)) * d;
        // Each prefix is the previous one with one more feature taken from x.
        for (int64_t k = 0; k < a - 1; ++k, dst += d) {
          std::copy(prev, prev + d, dst);
          dst[walk[k]] = xr[walk[k]];
          prev = dst;
        }
      }
    });
  });
  return out;
}

// Explained-class value of one output row: softmax probability of class c, or the raw output.
// Class c's exp is kept from the sum, not computed again (k + 1 exps were a third more at k = 2).
template <typename scalar_t>
inline double class_value(const scalar_t* row, int64_t k, int64_t c, bool softmax) {
  if (!softmax) return static_cast<double>(row[c]);
  double mx = -INFINITY;
  for (int64_t j = 0; j < k; ++j) mx = std::max(mx, static_cast<double>(row[j]));
  double denom = 0.0, e_c = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const double e = std::exp(static_cast<double>(row[j]) - mx);
    denom += e;
    if (j == c) e_c = e;
  }
  return e_c / denom;
}

std::tuple<at::Tensor, at::Tensor> shapley_accumulate_cpu(
    const at::Tensor& step_logits, const at::Tensor& start_logits, const at::Tensor& end_logits,
    const at::Tensor& target, const at::Tensor& perm, const at::Tensor& n_active,
    int64_t n_features, int64_t walks_per_sample, bool softmax) {
  check_accumulate_inputs(step_logits, start_logits, end_logits, target, perm, n_active,
                          n_features, walks_per_sample);
  const int64_t N = end_logits.size(0), k = end_logits.size(1), B = start_logits.size(1);
  const int64_t P = perm.size(1), L = perm.size(2);
  const auto perm_c = perm.contiguous();
  const auto act_c = n_active.contiguous();
  const auto target_c = target.contiguous();
  // the outputs first: an n_features too large for memory gets the allocator's error, which
  // names the size, before the walk check allocates its per-thread tables of that length
  auto opts = end_logits.options().dtype(at::kDouble);
  auto mean = at::zeros({N, n_features}, opts);
  auto m2 = at::zeros({N, n_features}, opts);
  const auto row_offset = validate_walks(perm_c, act_c, n_features, B);
  TORCH_CHECK(row_offset.back() == step_logits.size(0), "shapley_accumulate: step_logits has ",
              step_logits.size(0), " rows but the walks have ", row_offset.back(),
              " interior steps");
  const int64_t* tp = target_c.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(tp[n] >= 0 && tp[n] < k, "target[", n, "] = ", tp[n], " is not a class index in [0, ",
                k, ")");

  const auto steps_c = step_logits.contiguous();
  const auto start_c = start_logits.contiguous();
  const auto end_c = end_logits.contiguous();
  const int64_t n_samples = P / walks_per_sample;

  AT_DISPATCH_FLOATING_TYPES(end_logits.scalar_type(), "shapley_accumulate_cpu", [&] {
    const scalar_t* sp = steps_c.data_ptr<scalar_t>();
    const scalar_t* st = start_c.data_ptr<scalar_t>();
    const scalar_t* en = end_c.data_ptr<scalar_t>();
    const int64_t* pp = perm_c.data_ptr<int64_t>();
    const int64_t* ap = act_c.data_ptr<int64_t>();
    double* meanp = mean.data_ptr<double>();
    double* m2p = m2.data_ptr<double>();
    // The explained-class value of every step row first, in parallel over the rows: a chunk
    // of long walks often holds one input, and the loop below, parallel over inputs, then
    // ran the softmaxes (most of its time) on one thread. Same values, same sums after.
    const int64_t S = step_logits.size(0);
    std::vector<double> step_value(S);
    at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = std::upper_bound(row_offset.begin(), row_offset.end(), r) -
                          row_offset.begin() - 1;
        step_value[r] = class_value(sp + r * k, k, tp[n], softmax);
      }
    });
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> sample(n_features, 0.0);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t a = ap[n], c = tp[n];
        if (a == 0) continue;
        double v_start = 0.0;
        for (int64_t b = 0; b < B; ++b) v_start += class_value(st + (n * B + b) * k, k, c, softmax);
        v_start /= static_cast<double>(B);
        const double v_end = class_value(en + n * k, k, c, softmax);
        const int64_t* walk0 = pp + n * P * L;
        double* mrow = meanp + n * n_features;
        double* m2row = m2p + n * n_features;
        for (int64_t s = 0; s < n_samples; ++s) {
          for (int64_t j = 0; j < a; ++j) sample[walk0[j]] = 0.0;
          for (int64_t q = 0; q < walks_per_sample; ++q) {
            const int64_t p = s * walks_per_sample + q;
            const int64_t* walk = pp + (n * P + p) * L;
            const double* values = step_value.data() + row_offset[n] + p * B * (a - 1);
            double prev = v_start;
            for (int64_t j = 0; j < a; ++j) {
              double cur = v_end;
              if (j < a - 1) {
                cur = 0.0;
                for (int64_t b = 0; b < B; ++b) cur += values[b * (a - 1) + j];
                cur /= static_cast<double>(B);
              }
              sample[walk[j]] += cur - prev;
              prev = cur;
            }
          }
          // Welford update over samples (one sample = the mean of walks_per_sample walks).
          const double count = static_cast<double>(s + 1);
          for (int64_t j = 0; j < a; ++j) {
            const int64_t i = walk0[j];
            const double value = sample[i] / static_cast<double>(walks_per_sample);
            const double delta = value - mrow[i];
            mrow[i] += delta / count;
            m2row[i] += delta * (value - mrow[i]);
          }
        }
        // a non-finite contribution (NaN or infinite logits with the identity link) leaves
        // inf or NaN depending on the order of the sums: one rule, NaN, on every device
        for (int64_t j = 0; j < a; ++j) {
          const int64_t i = walk0[j];
          if (!(std::isfinite(mrow[i]) && std::isfinite(m2row[i])))
            mrow[i] = m2row[i] = std::numeric_limits<double>::quiet_NaN();
        }
      }
    });
  });
  return {mean, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CPU, m) {
  m.impl("permutation_walk_linear", &permutation_walk_linear_cpu);
  m.impl("permutation_walk_masked", &permutation_walk_masked_cpu);
  m.impl("shapley_accumulate", &shapley_accumulate_cpu);
}

}  // namespace oni
