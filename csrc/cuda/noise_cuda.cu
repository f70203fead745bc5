// CUDA kernels for the noise-solver ops (schemas in csrc/ops.cpp, spec in oni/reference.py,
// CPU twins in csrc/cpu/noise_cpu.cpp). Arithmetic in float64 like the CPU kernels; every
// reduction runs in a fixed order, so results are bitwise reproducible run to run.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../checks.h"
#include "../launch_limits.h"

namespace oni {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
constexpr int kRowsPerBlock = 8;  // entropy: one warp per row

// ----------------------------------------------------------------------------- entropy

__device__ __forceinline__ double warp_max(double v) {
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// One warp per row (grid-stride over rows): max, log-sum-exp, H, then dH/dz = -p (log p + H).
// log_sum is kept apart from the max (as on the CPU): mx + log_sum loses it at huge |logits|.
template <typename scalar_t>
__global__ void entropy_and_grad_kernel(const scalar_t* __restrict__ z, int64_t N, int64_t k,
                                        scalar_t* __restrict__ entropy,
                                        scalar_t* __restrict__ grad) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       n < N; n += warps) {
    const scalar_t* row = z + n * k;
    double mx = -INFINITY;
    for (int64_t j = lane; j < k; j += 32) mx = fmax(mx, static_cast<double>(row[j]));
    mx = warp_max(mx);
    double sum = 0.0;
    for (int64_t j = lane; j < k; j += 32) sum += exp(static_cast<double>(row[j]) - mx);
    const double log_sum = log(warp_sum(sum));
    double h = 0.0;
    for (int64_t j = lane; j < k; j += 32) {
      const double logp = (static_cast<double>(row[j]) - mx) - log_sum;
      const double p = exp(logp);
      if (p != 0.0) h -= p * logp;  // p log p -> 0 as p -> 0; a NaN propagates
    }
    h = warp_sum(h);
    if (lane == 0) entropy[n] = static_cast<scalar_t>(h);
    for (int64_t j = lane; j < k; j += 32) {
      const double logp = (static_cast<double>(row[j]) - mx) - log_sum;
      const double p = exp(logp);
      grad[n * k + j] = static_cast<scalar_t>(p != 0.0 ? -p * (logp + h) : 0.0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> entropy_and_grad_cuda(const at::Tensor& logits) {
  check_entropy_inputs(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const int64_t N = logits.size(0), k = logits.size(1);
  const auto z = logits.contiguous();
  auto entropy = at::empty({N}, logits.options());
  auto grad = at::empty({N, k}, logits.options());
  if (N == 0) return {entropy, grad};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "entropy_and_grad_cuda", [&] {
    entropy_and_grad_kernel<scalar_t><<<grid_x((N + kRowsPerBlock - 1) / kRowsPerBlock),
                                        32 * kRowsPerBlock, 0, stream>>>(
        z.data_ptr<scalar_t>(), N, k, entropy.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {entropy, grad};
}

// ----------------------------------------------------------------------------- projection

// Fixed-order block sum of one double per thread (blockDim.x a multiple of 32, <= 1024).
__device__ double block_sum(double v, double* s_partial) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, n_warps = blockDim.x / 32;
  __syncthreads();  // s_partial free from the previous call
  if (lane == 0) s_partial[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < n_warps; ++w) total += s_partial[w];  // same order in every thread
  return total;
}

// First out-of-range budget element and radius row (atomicMin over flat indices): the op
// raises with the same messages as the CPU kernel.
template <typename scalar_t>
__global__ void check_projection_values_kernel(const scalar_t* __restrict__ u,
                                               const scalar_t* __restrict__ rho, int64_t N,
                                               int64_t d, unsigned long long* status) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < N * d;
       e += stride) {
    const double v = static_cast<double>(u[e]);
    if (!(v >= 0.0 && isfinite(v))) atomicMin(status, static_cast<unsigned long long>(e));
  }
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride)
    if (!(static_cast<double>(rho[n]) >= 0.0))
      atomicMin(status + 1, static_cast<unsigned long long>(n));
}

// Block per row (grid-stride). z = eta + step * direction; e = clip(t z, -u, u) with
// t = 1 / (1 + lambda) in (0, 1], g(t) = ||e||^2 nondecreasing. t = 1 when the box alone
// is inside the ball; t = rho / ||z|| when no breakpoint u_i / |z_i| is <= 1; else a
// bisection in log t over [rho / ||z||, 1] narrows the segment between breakpoints that holds
// g(t) = rho^2, where g is A t^2 + C (A: free mass, C: clipped mass), solved in closed form.
// z is recomputed from global memory on every pass (L1/L2-resident for one row), so any d
// works without shared-memory limits.
template <typename scalar_t>
__global__ void ascend_and_project_kernel(
    const scalar_t* __restrict__ eta, const scalar_t* __restrict__ dir,
    const scalar_t* __restrict__ step, const scalar_t* __restrict__ u,
    const scalar_t* __restrict__ rho, const bool* __restrict__ active, int64_t N, int64_t d,
    int bisections, scalar_t* __restrict__ out) {
  __shared__ double s_partial[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    if (!active[n]) continue;  // out already holds eta
    const scalar_t* er = eta + n * d;
    const scalar_t* dr = dir + n * d;
    const scalar_t* ur = u + n * d;
    const double s = static_cast<double>(step[n]);
    const double r = static_cast<double>(rho[n]), r2 = r * r;
    auto z_at = [&](int64_t i) {
      return static_cast<double>(er[i]) + s * static_cast<double>(dr[i]);
    };
    auto clipped_norm2 = [&](double t) {
      double acc = 0.0;
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const double ui = static_cast<double>(ur[i]);
        const double c = fmin(fmax(t * z_at(i), -ui), ui);
        acc += c * c;
      }
      return block_sum(acc, s_partial);
    };
    // the box alone (t = 1), and whether z is finite: a NaN or infinite point has no
    // projection, and its row becomes NaN
    double box_acc = 0.0, z2_acc = 0.0;
    int not_finite = 0, may_clip = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const double zi = z_at(i), ui = static_cast<double>(ur[i]);
      not_finite |= !isfinite(zi);
      may_clip |= zi != 0.0 && ui <= fabs(zi);  // breakpoint u_i / |z_i| <= 1
      const double c = fmin(fmax(zi, -ui), ui);
      box_acc += c * c;
      z2_acc += zi * zi;
    }
    const bool any_not_finite = __syncthreads_or(not_finite);
    const bool any_may_clip = __syncthreads_or(may_clip);
    const double box2 = block_sum(box_acc, s_partial);
    const double z2 = block_sum(z2_acc, s_partial);
    // as the CPU kernel: when the ball binds and the squared norm of z overflows (|z| beyond
    // ~1e154), the masses of the closed form are not finite either, and the row is NaN
    if (any_not_finite || (box2 > r2 && r > 0.0 && !isfinite(z2))) {
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
        out[n * d + i] = static_cast<scalar_t>(NAN);
      continue;
    }
    double t = 1.0;
    if (box2 > r2) {
      if (!(r > 0.0)) {
        t = 0.0;
      } else if (!any_may_clip) {
        // no feature reaches its box face for t <= 1, so g(t) = t^2 ||z||^2 there and the
        // bisection's 64 passes are not needed: on the noise solver's rows (counted on the
        // CPU) 97% of the rows the ball binds on are like this. z2 = box2 > r2 > 0 here.
        t = sqrt(r2 / z2);
      } else {
        // g(t) <= t^2 ||z||^2, so g(lo) <= r2 < g(hi) from lo = rho / ||z||. The answer can
        // lie many decades below 1 (float32's largest z and rho = 1 put it near 1e-38), so
        // the bracket is halved in log t (geometric midpoints): 64 passes narrow it to a
        // relative width of ulps, where linear halving would stop at 2^-64 absolute.
        double lo = sqrt(r2 / z2), hi = 1.0;
        for (int it = 0; it < bisections; ++it) {
          const double mid = sqrt(lo * hi);
          if (!(mid > lo && mid < hi)) break;  // the bracket is down to adjacent doubles
          if (clipped_norm2(mid) > r2) hi = mid; else lo = mid;
        }
        // Closed form on the segment: features clipped at hi (|z_i| hi > u_i) are clipped on
        // the whole bracket once it is narrower than the gap between breakpoints.
        double free_acc = 0.0, clip_acc = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
          const double zi = z_at(i), ui = static_cast<double>(ur[i]);
          if (fabs(zi) * hi > ui) clip_acc += ui * ui; else free_acc += zi * zi;
        }
        const double free_z2 = block_sum(free_acc, s_partial);
        const double clipped = block_sum(clip_acc, s_partial);
        t = free_z2 > 0.0 ? sqrt(fmax(r2 - clipped, 0.0) / free_z2) : hi;
        t = fmin(fmax(t, lo), hi);
      }
    }
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const double ui = static_cast<double>(ur[i]);
      const double c = fmin(fmax(t * z_at(i), -ui), ui);
      acc += c * c;
    }
    const double out2 = block_sum(acc, s_partial);
    // rounding can leave the norm a hair above rho: pull it back onto the ball
    const double pull = out2 > r2 ? r / sqrt(out2) : 1.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const double ui = static_cast<double>(ur[i]);
      // t = 0 (rho = 0): +0 everywhere, as the CPU kernel; 0 * z_i would keep z_i's sign
      const double e = t > 0.0 ? fmin(fmax(t * z_at(i), -ui), ui) * pull : 0.0;
      out[n * d + i] = static_cast<scalar_t>(e);
    }
  }
}

at::Tensor ascend_and_project_cuda(const at::Tensor& eta, const at::Tensor& direction,
                                   const at::Tensor& step, const at::Tensor& budget,
                                   const at::Tensor& radius, const at::Tensor& active,
                                   bool check_values) {
  check_project_inputs(eta, direction, step, budget, radius, active);
  TORCH_CHECK(eta.is_cuda(), "ascend_and_project (CUDA): eta must be a CUDA tensor, got ",
              eta.device());
  const c10::cuda::CUDAGuard guard(eta.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(eta.device().index()).stream();
  const int64_t N = eta.size(0), d = eta.size(1);
  const auto eta_c = eta.contiguous();
  auto out = eta_c.clone();  // inactive rows keep eta
  if (N == 0) return out;
  const auto dir = direction.contiguous();
  const auto u = budget.contiguous();
  const auto st = step.contiguous();
  const auto rad = radius.contiguous();
  const auto act = active.contiguous();
  AT_DISPATCH_FLOATING_TYPES(eta.scalar_type(), "ascend_and_project_cuda", [&] {
    // value checks first (one 2-int64 readback, so a host sync): a negative budget or
    // radius has an empty feasible set. Skipped when the caller vouches for the values.
    if (check_values) {
      auto status = at::empty({2}, eta.options().dtype(at::kLong)).fill_(kNone);
      const int64_t items = std::max<int64_t>(N * d, N);
      check_projection_values_kernel<scalar_t>
          <<<grid_x(std::min<int64_t>((items + 255) / 256, 4096)), 256, 0, stream>>>(
              u.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(), N, d,
              reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto host = status.cpu();
      const int64_t bad_u = host.data_ptr<int64_t>()[0], bad_r = host.data_ptr<int64_t>()[1];
      if (bad_r != kNone) {
        TORCH_CHECK(false, "radius[", bad_r, "] = ", rad.select(0, bad_r).item<double>(),
                    " must be >= 0 (NaN is not allowed)");
      }
      if (bad_u != kNone) {
        TORCH_CHECK(false, "budget[", bad_u / d, ", ", bad_u % d, "] = ",
                    u.view(-1).select(0, bad_u).item<double>(), " must be finite and >= 0");
      }
    }
    if (d == 0) return;
    const int threads = d <= 1024 ? 128 : 256;
    ascend_and_project_kernel<scalar_t><<<grid_x(N), threads, 0, stream>>>(
        eta_c.data_ptr<scalar_t>(), dir.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(),
        u.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(), act.data_ptr<bool>(), N, d,
        /*bisections=*/64, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CUDA, m) {
  m.impl("entropy_and_grad", &entropy_and_grad_cuda);
  m.impl("ascend_and_project", &ascend_and_project_cuda);
}

}  // namespace oni
