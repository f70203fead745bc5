// CPU kernels for the noise-solver ops (schemas in csrc/ops.cpp, spec in oni/reference.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace oni {
namespace {

std::tuple<at::Tensor, at::Tensor> entropy_and_grad_cpu(const at::Tensor& logits) {
  check_entropy_inputs(logits);
  const int64_t N = logits.size(0), k = logits.size(1);
  const auto z = logits.contiguous();
  auto entropy = at::empty({N}, logits.options());
  auto grad = at::empty({N, k}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "entropy_and_grad_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* hp = entropy.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> logp(k);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = zp + n * k;
        double mx = -INFINITY;
        for (int64_t j = 0; j < k; ++j) mx = std::max(mx, static_cast<double>(row[j]));
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
        const double log_sum = std::log(sum);  // kept apart from mx: mx + log_sum loses it
                                                // at huge |logits| (1e17 + log 3 == 1e17)
        double h = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          logp[j] = (static_cast<double>(row[j]) - mx) - log_sum;
          const double p = std::exp(logp[j]);
          if (p != 0.0) h -= p * logp[j];  // p log p -> 0 as p -> 0; a NaN propagates
        }
        hp[n] = static_cast<scalar_t>(h);
        for (int64_t j = 0; j < k; ++j) {
          const double p = std::exp(logp[j]);
          gp[n * k + j] = static_cast<scalar_t>(p != 0.0 ? -p * (logp[j] + h) : 0.0);
        }
      }
    });
  });
  return {entropy, grad};
}

// std::clamp(z, -u, u) by value: std::clamp returns a reference, which gcc compiles to
// branches on the sign and size of every feature; this form becomes selects.
inline double clip(double z, double u) { return z < -u ? -u : (u < z ? u : z); }

// Exact projection of z onto {|e_i| <= u_i} ∩ {||e|| <= rho}, in place. With t = 1/(1+lambda),
// ||clip(t z, -u, u)||^2 = A(t) t^2 + C(t) grows with t and is piecewise quadratic between
// the breakpoints t_i = u_i / |z_i| where feature i starts to clip: walk the sorted
// breakpoints to the segment that reaches rho^2, then solve t^2 = (rho^2 - C) / A there.
// Only breakpoints t_i <= 1 can be reached (t <= 1), so only those are sorted: on the noise
// solver's rows that is 0.5 of 600 features on average, where sorting all of them was most
// of the op's time.
void project_row(double* z, const double* u, double rho, int64_t d, std::vector<double>& knot,
                 std::vector<int64_t>& order, std::vector<double>& free_mass) {
  double norm2 = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double c = clip(z[i], u[i]);
    norm2 += c * c;
  }
  const double rho2 = rho * rho;
  if (norm2 <= rho2) {  // lambda = 0: the box alone
    for (int64_t i = 0; i < d; ++i) z[i] = clip(z[i], u[i]);
    return;
  }
  if (!(rho > 0.0)) {
    std::fill(z, z + d, 0.0);
    return;
  }
  // features that may clip (t_i <= 1) in `order`; the mass of the others, free for every
  // t <= 1, in one sum
  int64_t m = 0;
  double never_clipped = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double tk = z[i] != 0.0 ? u[i] / std::abs(z[i]) : INFINITY;
    if (tk <= 1.0) {
      knot[i] = tk;
      order[m++] = i;
    } else {
      never_clipped += z[i] * z[i];
    }
  }
  // ties broken by index, so the order (and the rounding of the sums) is fixed
  std::sort(order.begin(), order.begin() + m, [&](int64_t a, int64_t b) {
    return knot[a] < knot[b] || (knot[a] == knot[b] && a < b);
  });
  // free_mass[j] = the never-clipped mass plus z^2 over order[j..m-1], summed from the far
  // end: subtracting the clipped features from the total instead loses the small ones next
  // to a large one
  free_mass[m] = never_clipped;
  for (int64_t j = m - 1; j >= 0; --j) free_mass[j] = free_mass[j + 1] + z[order[j]] * z[order[j]];
  if (!std::isfinite(free_mass[0])) {  // |z| beyond ~1e154: the masses overflow, no answer
    std::fill(z, z + d, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  // g at the left end of segment j (t = knot[order[j]], features order[0..j-1] clipped)
  // is increasing in j; find the last j whose left end is still <= rho^2.
  double clipped = 0.0, free_z2 = free_mass[0], t = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = order[j];
    const double tk = knot[i];
    if (free_z2 * tk * tk + clipped > rho2) break;  // the crossing lies before this knot
    clipped += u[i] * u[i];
    free_z2 = free_mass[j + 1];
  }
  t = free_z2 > 0.0 ? std::sqrt(std::max(rho2 - clipped, 0.0) / free_z2) : 1.0;
  t = std::min(t, 1.0);
  double out2 = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    z[i] = clip(t * z[i], u[i]);
    out2 += z[i] * z[i];
  }
  // rounding can leave the norm a hair above rho: pull it back onto the ball
  if (out2 > rho2) {
    const double s = rho / std::sqrt(out2);
    for (int64_t i = 0; i < d; ++i) z[i] *= s;
  }
}

at::Tensor ascend_and_project_cpu(const at::Tensor& eta, const at::Tensor& direction,
                                  const at::Tensor& step, const at::Tensor& budget,
                                  const at::Tensor& radius, const at::Tensor& active,
                                  bool /*check_values: scanned always, see ops.cpp*/) {
  check_project_inputs(eta, direction, step, budget, radius, active);
  const int64_t N = eta.size(0), d = eta.size(1);
  auto out = eta.contiguous().clone();
  const auto dir = direction.contiguous();
  const auto u = budget.contiguous();
  const auto st = step.contiguous();
  const auto rad = radius.contiguous();
  const auto act = active.contiguous();
  AT_DISPATCH_FLOATING_TYPES(eta.scalar_type(), "ascend_and_project_cpu", [&] {
    // value checks: a negative budget or radius has an empty feasible set
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* rp = rad.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(rp[n] >= 0, "radius[", n, "] = ", rp[n], " must be >= 0 (NaN is not allowed)");
    }
    // one branch-free pass; the loop that names the first bad entry runs only on a failure
    bool budget_ok = true;
    for (int64_t e = 0; e < N * d; ++e)
      budget_ok &= (up[e] >= scalar_t(0)) & (up[e] <= std::numeric_limits<scalar_t>::max());
    for (int64_t e = 0; !budget_ok && e < N * d; ++e) {
      TORCH_CHECK(up[e] >= 0 && std::isfinite(static_cast<double>(up[e])), "budget[", e / d,
                  ", ", e % d, "] = ", up[e], " must be finite and >= 0");
    }
    const scalar_t* dp = dir.data_ptr<scalar_t>();
    const scalar_t* sp = st.data_ptr<scalar_t>();
    const bool* ap = act.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<double> z(d), uu(d), knot(d), free_mass(d + 1);
      std::vector<int64_t> order(d);
      for (int64_t n = begin; n < end; ++n) {
        if (!ap[n]) continue;
        bool finite = true;
        for (int64_t i = 0; i < d; ++i) {
          z[i] = static_cast<double>(op[n * d + i]) +
                 static_cast<double>(sp[n]) * static_cast<double>(dp[n * d + i]);
          uu[i] = static_cast<double>(up[n * d + i]);
          finite &= std::isfinite(z[i]);
        }
        if (!finite) {  // no projection of a NaN or infinite point: the row is NaN
          std::fill(op + n * d, op + (n + 1) * d, std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        project_row(z.data(), uu.data(), static_cast<double>(rp[n]), d, knot, order,
                    free_mass);
        for (int64_t i = 0; i < d; ++i) op[n * d + i] = static_cast<scalar_t>(z[i]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CPU, m) {
  m.impl("entropy_and_grad", &entropy_and_grad_cpu);
  m.impl("ascend_and_project", &ascend_and_project_cpu);
}

}  // namespace oni
