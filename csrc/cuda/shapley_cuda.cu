// CUDA kernels for the Shapley ops (schemas and layout in csrc/ops.cpp, spec in
// oni/reference.py, CPU twins in csrc/cpu/shapley_cpu.cpp).
//
// Every op first runs two small device passes over n_active / perm (per-input row offsets,
// value checks) and reads back one 5-int64 status: the only host sync. Inputs are read
// through their strides (no copies of non-contiguous or expanded views). Accumulators are
// float64 and every reduction runs in a fixed order, so results are bitwise reproducible.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../launch_limits.h"

namespace oni {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // "no bad row" in status
constexpr unsigned kFullMask = 0xffffffffu;

// status[]: the values one sync brings back to the host.
enum Status : int { kTotalSteps = 0, kTotalActive, kBadActive, kBadTarget, kBadPerm, kStatusSize };

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block for work spread over `width` items: a multiple of the warp size in
// [32, cap], no more than the items need.
inline int threads_for(int64_t width, int cap) {
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>(ceil_div(width, 32), cap / 32));
  return static_cast<int>(warps * 32);
}

// Lanes that share one softmax row: the power of two >= k, at most a warp.
inline int group_size_for(int64_t k) {
  int g = 1;
  while (g < k && g < 32) g <<= 1;
  return g;
}

// [N, P, L] int64 walk indices read through their strides.
struct PermView {
  const int64_t* data;
  int64_t s0, s1, s2;
  __device__ __forceinline__ int64_t operator()(int64_t n, int64_t p, int64_t j) const {
    return data[n * s0 + p * s1 + j * s2];
  }
};

PermView perm_view(const at::Tensor& perm) {
  return {perm.data_ptr<int64_t>(), perm.stride(0), perm.stride(1), perm.stride(2)};
}

__device__ __forceinline__ void atomic_min_row(unsigned long long* slot, int64_t row) {
  atomicMin(slot, static_cast<unsigned long long>(row));
}

// ----------------------------------------------------------------------------- walk plan

// One block. Exclusive scans of the interior steps P*B*max(a-1, 0) (row_offset) and of the
// active counts a (act_offset) per input, plus the first out-of-range n_active / target row.
constexpr int kPlanThreads = 1024;

__global__ void __launch_bounds__(kPlanThreads) walk_plan_kernel(
    const int64_t* __restrict__ n_active, int64_t act_stride, int64_t N, int64_t L,
    int64_t steps_per_prefix,  // P * B
    const int64_t* __restrict__ target, int64_t target_stride, int64_t n_classes,
    int64_t* __restrict__ row_offset,  // [N + 1]
    int64_t* __restrict__ act_offset,  // [N + 1]
    int64_t* __restrict__ status) {
  __shared__ int64_t s_steps[kPlanThreads];
  __shared__ int64_t s_act[kPlanThreads];
  __shared__ unsigned long long s_bad_active, s_bad_target;
  const int tid = threadIdx.x;
  if (tid == 0) {
    s_bad_active = static_cast<unsigned long long>(kNone);
    s_bad_target = static_cast<unsigned long long>(kNone);
  }
  const int64_t chunk = ceil_div(N, blockDim.x);
  const int64_t lo = std::min<int64_t>(N, tid * chunk), hi = std::min<int64_t>(N, lo + chunk);
  int64_t steps = 0, act = 0, bad_active = kNone, bad_target = kNone;
  for (int64_t n = lo; n < hi; ++n) {
    int64_t a = n_active[n * act_stride];
    if (a < 0 || a > L) {
      bad_active = std::min(bad_active, n);
      a = 0;  // contributes no rows: every kernel skips such an input
    }
    steps += steps_per_prefix * (a > 1 ? a - 1 : 0);
    act += a;
    if (target != nullptr) {
      const int64_t c = target[n * target_stride];
      if (c < 0 || c >= n_classes) bad_target = std::min(bad_target, n);
    }
  }
  s_steps[tid] = steps;
  s_act[tid] = act;
  __syncthreads();
  if (bad_active != kNone) atomic_min_row(&s_bad_active, bad_active);
  if (bad_target != kNone) atomic_min_row(&s_bad_target, bad_target);
  // Hillis-Steele inclusive scan over the per-thread sums.
  for (int off = 1; off < blockDim.x; off <<= 1) {
    const int64_t add_steps = tid >= off ? s_steps[tid - off] : 0;
    const int64_t add_act = tid >= off ? s_act[tid - off] : 0;
    __syncthreads();
    s_steps[tid] += add_steps;
    s_act[tid] += add_act;
    __syncthreads();
  }
  int64_t run_steps = s_steps[tid] - steps, run_act = s_act[tid] - act;
  for (int64_t n = lo; n < hi; ++n) {
    int64_t a = n_active[n * act_stride];
    if (a < 0 || a > L) a = 0;
    row_offset[n] = run_steps;
    act_offset[n] = run_act;
    run_steps += steps_per_prefix * (a > 1 ? a - 1 : 0);
    run_act += a;
  }
  if (tid == blockDim.x - 1) {
    row_offset[N] = s_steps[tid];
    act_offset[N] = s_act[tid];
    status[kTotalSteps] = s_steps[tid];
    status[kTotalActive] = s_act[tid];
  }
  if (tid == 0) {
    status[kBadActive] = static_cast<int64_t>(s_bad_active);
    status[kBadTarget] = static_cast<int64_t>(s_bad_target);
    status[kBadPerm] = kNone;
  }
}

// Block per walk (n, p) (grid-stride): the first a entries of walk p must be distinct indices
// in [0, n_features) and (p > 0) cover the first a entries of walk 0, which then makes the two
// sets equal (walk 0's own entries are checked by its block). The walk's set is a bitmask of
// n_features bits in shared memory, or in a per-block slice of `scratch` when too large; each
// walk clears the bits it set. Walks, not inputs, per block: an input's P walks checked one
// after another took P rounds of barriers in one block (100 at M = 100), and a chunk of a
// few large inputs (32 at d = 6170) left most of the GPU idle.
__global__ void validate_walks_kernel(PermView perm, const int64_t* __restrict__ n_active,
                                      int64_t act_stride, int64_t N, int64_t P, int64_t L,
                                      int64_t n_features, int64_t words,
                                      uint32_t* __restrict__ scratch,
                                      int64_t* __restrict__ status) {
  extern __shared__ uint32_t s_mask[];
  uint32_t* set = scratch != nullptr ? scratch + blockIdx.x * words : s_mask;
  if (scratch == nullptr)
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) set[w] = 0u;
  __syncthreads();
  for (int64_t walk = blockIdx.x; walk < N * P; walk += gridDim.x) {
    const int64_t n = walk / P, p = walk % P;
    const int64_t a = n_active[n * act_stride];
    if (a < 0 || a > L) continue;  // reported by walk_plan_kernel
    bool bad = false;              // this thread's verdict; walk_bad is the block's
    for (int64_t j = threadIdx.x; j < a; j += blockDim.x) {
      const int64_t i = perm(n, p, j);
      if (i < 0 || i >= n_features) { bad = true; continue; }
      const uint32_t bit = 1u << (i & 31);
      if (atomicOr(&set[i >> 5], bit) & bit) bad = true;
    }
    __syncthreads();
    if (p > 0)
      for (int64_t j = threadIdx.x; j < a; j += blockDim.x) {
        const int64_t i = perm(n, 0, j);
        if (i < 0 || i >= n_features || !(set[i >> 5] & (1u << (i & 31)))) bad = true;
      }
    const int walk_bad = __syncthreads_or(bad);
    for (int64_t j = threadIdx.x; j < a; j += blockDim.x) {
      const int64_t i = perm(n, p, j);
      if (i >= 0 && i < n_features) atomicAnd(&set[i >> 5], ~(1u << (i & 31)));
    }
    if (walk_bad && threadIdx.x == 0)
      atomic_min_row(reinterpret_cast<unsigned long long*>(status + kBadPerm), n);
    __syncthreads();
  }
}

struct WalkPlan {
  at::Tensor row_offset;  // [N + 1] int64, first step row of each input
  at::Tensor act_offset;  // [N + 1] int64, running sum of the active counts
  int64_t total_steps;
  int64_t total_active;
  int64_t bad_target;  // first row whose target is not a class index, kNone if none
};

// Offsets and value checks (same rules and messages as the CPU kernels); one host sync.
WalkPlan plan_walks(const at::Tensor& perm, const at::Tensor& n_active, int64_t n_features,
                    int64_t n_refs, const at::Tensor* target, int64_t n_classes,
                    cudaStream_t stream) {
  const int64_t N = perm.size(0), P = perm.size(1), L = perm.size(2);
  const auto i64 = n_active.options().dtype(at::kLong);
  auto offsets = at::empty({2, N + 1}, i64);
  auto status = at::empty({kStatusSize}, i64);
  walk_plan_kernel<<<1, kPlanThreads, 0, stream>>>(
      n_active.data_ptr<int64_t>(), n_active.stride(0), N, L, P * n_refs,
      target ? target->data_ptr<int64_t>() : nullptr, target ? target->stride(0) : 0, n_classes,
      offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + (N + 1),
      status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (N > 0 && P > 0 && L > 0) {
    const int64_t words = ceil_div(n_features, 32);
    const size_t mask_bytes = static_cast<size_t>(words) * sizeof(uint32_t);
    const bool in_shared = mask_bytes <= 48 * 1024;
    // in global scratch, a mask a block: at most 64 MiB of them, zeroed at every call
    const int64_t max_blocks =
        in_shared ? 4096
                  : std::clamp<int64_t>((int64_t{64} << 20) / static_cast<int64_t>(mask_bytes),
                                        1, 1024);
    const int64_t blocks = std::min<int64_t>(N * P, max_blocks);
    at::Tensor scratch;
    if (!in_shared) scratch = at::zeros({blocks * words}, n_active.options().dtype(at::kInt));
    validate_walks_kernel<<<grid_x(blocks), threads_for(L, 256),
                            in_shared ? mask_bytes : 0, stream>>>(
        perm_view(perm), n_active.data_ptr<int64_t>(), n_active.stride(0), N, P, L, n_features,
        words, in_shared ? nullptr : reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>()),
        status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto host = status.cpu();  // the one sync
  const int64_t* s = host.data_ptr<int64_t>();
  if (s[kBadActive] != kNone) {
    const int64_t n = s[kBadActive];
    TORCH_CHECK(false, "n_active[", n, "] = ", n_active.select(0, n).item<int64_t>(),
                " must lie in [0, L = ", L, "]");
  }
  TORCH_CHECK(s[kBadPerm] == kNone, "perm row ", s[kBadPerm],
              ": the first n_active entries of every walk must be distinct feature indices in "
              "[0, ", n_features, ") forming the same set in every walk");
  return {offsets.select(0, 0), offsets.select(0, 1), s[kTotalSteps], s[kTotalActive],
          s[kBadTarget]};
}

void check_total_steps(int64_t expected, int64_t total_steps, const char* what) {
  TORCH_CHECK(expected == total_steps, what, ": total_steps = ", total_steps,
              " but the walks have sum_n P * B * max(n_active[n] - 1, 0) = ", expected,
              " interior steps");
}

// ----------------------------------------------------------------------------- walk linear

// A product rounded on its own: nvcc would fuse a float64 product into the float64 sum that
// follows (an FMA, one rounding fewer than the CPU kernel's arithmetic).
__device__ __forceinline__ float product_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product_rn(double a, double b) { return __dmul_rn(a, b); }

// Block per walk (n, p, b) (grid-stride) x a slice of H per blockIdx.y; each thread owns one
// hidden unit h at a time and runs the walk's cumulative sum in a float64 register. The walk's
// feature indices and x - r deltas are staged through shared memory a tile at a time; loads
// of W^T rows and stores of output rows are coalesced over h.
constexpr int kLinearTile = 256;

// No __launch_bounds__ here and on the endpoints kernel: with them ptxas (CUDA 13, sm_90)
// caps registers low enough to spill.
template <typename scalar_t, typename out_t>
__global__ void walk_linear_kernel(
    const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1,            // [N, d]
    const scalar_t* __restrict__ base, int64_t bs0, int64_t bs1, int64_t bs2,  // [N, B, d]
    PermView perm, const int64_t* __restrict__ n_active, int64_t act_stride,
    const int64_t* __restrict__ row_offset,                              // [N + 1]
    const scalar_t* __restrict__ weight_t,                               // [d, H] contiguous
    const scalar_t* __restrict__ origin, int64_t os0, int64_t os1,       // [N, B, H], h stride 1
    out_t* __restrict__ out,                                             // [S, H]
    int64_t P, int64_t B, int64_t L, int64_t d, int64_t H, int64_t n_walks, bool relu) {
  __shared__ int64_t s_index[kLinearTile];
  __shared__ scalar_t s_delta[kLinearTile];
  for (int64_t walk = blockIdx.x; walk < n_walks; walk += gridDim.x) {
    const int64_t n = walk / (P * B), p = (walk / B) % P, b = walk % B;
    const int64_t a = n_active[n * act_stride];
    if (a <= 1 || a > L) continue;  // no interior prefix (or rejected input)
    const int64_t steps = a - 1;
    const scalar_t* xr = x + n * xs0;
    const scalar_t* rr = base + n * bs0 + b * bs1;
    const scalar_t* orig = origin + n * os0 + b * os1;
    out_t* dst0 = out + (row_offset[n] + (p * B + b) * steps) * H;
    for (int64_t h0 = static_cast<int64_t>(blockIdx.y) * blockDim.x; h0 < H;
         h0 += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      const int64_t h = h0 + threadIdx.x;
      const bool mine = h < H;
      double acc = mine ? static_cast<double>(orig[h]) : 0.0;
      const scalar_t* column = weight_t + h;  // W[h, :] as a strided row of W^T
      out_t* dst = dst0 + h;
      for (int64_t k0 = 0; k0 < steps; k0 += kLinearTile) {
        const int64_t tile = std::min<int64_t>(kLinearTile, steps - k0);
        __syncthreads();  // previous tile fully consumed
        for (int64_t t = threadIdx.x; t < tile; t += blockDim.x) {
          const int64_t i = perm(n, p, k0 + t);
          const bool ok = i >= 0 && i < d;  // out-of-range index: skipped, never read
          s_index[t] = ok ? i : 0;
          s_delta[t] = ok ? xr[i * xs1] - rr[i * bs2] : scalar_t(0);
        }
        __syncthreads();
        if (mine) {
#pragma unroll 4
          for (int64_t t = 0; t < tile; ++t) {
            // Same arithmetic as the CPU kernel: product in scalar_t, sum in float64,
            // ReLU of the rounded value (-0 and NaN pass).
            acc += static_cast<double>(product_rn(column[s_index[t] * H], s_delta[t]));
            const scalar_t value = static_cast<scalar_t>(acc);
            // bfloat16 output: rounded from the scalar_t value (c10's round-to-nearest-even)
            *dst = static_cast<out_t>(relu && value < scalar_t(0) ? scalar_t(0) : value);
            dst += H;
          }
        }
      }
    }
  }
}

at::Tensor permutation_walk_linear_cuda(const at::Tensor& x, const at::Tensor& baseline,
                                        const at::Tensor& perm, const at::Tensor& n_active,
                                        const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        int64_t total_steps, bool relu,
                                        c10::optional<at::ScalarType> out_dtype) {
  check_walk_inputs(x, baseline, perm, n_active);
  check_linear_inputs(x, weight, bias);
  const at::ScalarType dtype = walk_out_dtype(x, out_dtype);
  TORCH_CHECK(x.is_cuda(), "permutation_walk_linear (CUDA): x must be a CUDA tensor, got ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t N = x.size(0), d = x.size(1), B = baseline.size(1), P = perm.size(1);
  const int64_t L = perm.size(2), H = weight.size(0);
  const auto plan = plan_walks(perm, n_active, d, B, nullptr, 0, stream);
  check_total_steps(plan.total_steps, total_steps, "permutation_walk_linear");

  auto out = at::empty({total_steps, H}, x.options().dtype(dtype));
  if (total_steps == 0 || H == 0) return out;
  const auto weight_t = weight.t().contiguous();  // [d, H]: a walk step reads one row
  // Walk origins W r + bias; a reference set shared by every input (expanded over N, as the
  // public API passes it) is multiplied once.
  const bool shared_refs = baseline.stride(0) == 0;
  // not autocast's to recast: under a caller's autocast the origins were bfloat16
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto origin = at::matmul(shared_refs ? baseline.select(0, 0) : baseline, weight.t());
  if (bias.has_value()) origin.add_(*bias);
  origin = origin.contiguous();
  const int64_t os0 = shared_refs ? 0 : origin.stride(0);
  const int64_t os1 = origin.stride(origin.dim() - 2);

  const int64_t n_walks = N * P * B;
  const int threads = threads_for(H, 256);
  const dim3 grid(grid_x(n_walks), grid_y(ceil_div(H, threads)));
  // scalar_t from the tag, out_t from the output pointer: a bfloat16 output exists for
  // float32 x only (walk_out_dtype), so only that kernel is compiled for it
  auto launch = [&](auto scalar_tag, auto* out_ptr) {
    using scalar_t = decltype(scalar_tag);
    using out_t = std::remove_pointer_t<decltype(out_ptr)>;
    walk_linear_kernel<scalar_t, out_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), baseline.data_ptr<scalar_t>(),
        baseline.stride(0), baseline.stride(1), baseline.stride(2), perm_view(perm),
        n_active.data_ptr<int64_t>(), n_active.stride(0), plan.row_offset.data_ptr<int64_t>(),
        weight_t.data_ptr<scalar_t>(), origin.data_ptr<scalar_t>(), os0, os1, out_ptr, P, B, L,
        d, H, n_walks, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dtype == at::kBFloat16) {
    launch(float{}, out.data_ptr<at::BFloat16>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "permutation_walk_linear_cuda",
                               [&] { launch(scalar_t{}, out.data_ptr<scalar_t>()); });
  }
  return out;
}

// ----------------------------------------------------------------------------- walk masked

// Block per walk (n, p, b) (grid-stride) x a tile of features per blockIdx.y. The block
// scatters the walk into the position ("rank") of each feature of its tile, then every row k
// takes x where rank <= k and the reference elsewhere; row stores are coalesced over features.
constexpr int kMaskedItems = 4;
constexpr int kMaskedMaxTile = 256 * kMaskedItems;

template <typename scalar_t>
__global__ void __launch_bounds__(256) walk_masked_kernel(
    const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1,
    const scalar_t* __restrict__ base, int64_t bs0, int64_t bs1, int64_t bs2,
    PermView perm, const int64_t* __restrict__ n_active, int64_t act_stride,
    const int64_t* __restrict__ row_offset, scalar_t* __restrict__ out,  // [S, d]
    int64_t P, int64_t B, int64_t L, int64_t d, int64_t n_walks) {
  __shared__ int s_rank[kMaskedMaxTile];
  const int64_t tile_width = static_cast<int64_t>(blockDim.x) * kMaskedItems;
  for (int64_t walk = blockIdx.x; walk < n_walks; walk += gridDim.x) {
    const int64_t n = walk / (P * B), p = (walk / B) % P, b = walk % B;
    const int64_t a = n_active[n * act_stride];
    if (a <= 1 || a > L) continue;
    const int64_t steps = a - 1;
    const scalar_t* xr = x + n * xs0;
    const scalar_t* rr = base + n * bs0 + b * bs1;
    scalar_t* dst0 = out + (row_offset[n] + (p * B + b) * steps) * d;
    for (int64_t f0 = static_cast<int64_t>(blockIdx.y) * tile_width; f0 < d;
         f0 += static_cast<int64_t>(gridDim.y) * tile_width) {
      __syncthreads();  // previous tile's ranks fully consumed
      for (int64_t t = threadIdx.x; t < tile_width; t += blockDim.x) s_rank[t] = INT_MAX;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < a; j += blockDim.x) {
        const int64_t i = perm(n, p, j);
        // first position wins, as in the reference (scatter_reduce "amin")
        if (i >= f0 && i < f0 + tile_width && i < d)
          atomicMin(&s_rank[i - f0], static_cast<int>(j));
      }
      __syncthreads();
      scalar_t xv[kMaskedItems], rv[kMaskedItems];
      int rank[kMaskedItems];
#pragma unroll
      for (int u = 0; u < kMaskedItems; ++u) {
        const int64_t t = threadIdx.x + u * static_cast<int64_t>(blockDim.x);
        const int64_t f = f0 + t;
        const bool ok = f < d;
        xv[u] = ok ? xr[f * xs1] : scalar_t(0);
        rv[u] = ok ? rr[f * bs2] : scalar_t(0);
        rank[u] = ok ? s_rank[t] : INT_MAX;
      }
      scalar_t* dst = dst0 + f0 + threadIdx.x;
      for (int64_t k = 0; k < steps; ++k, dst += d) {
#pragma unroll
        for (int u = 0; u < kMaskedItems; ++u) {
          const int64_t f = f0 + threadIdx.x + u * static_cast<int64_t>(blockDim.x);
          if (f < d) dst[u * blockDim.x] = rank[u] <= k ? xv[u] : rv[u];
        }
      }
    }
  }
}

at::Tensor permutation_walk_masked_cuda(const at::Tensor& x, const at::Tensor& baseline,
                                        const at::Tensor& perm, const at::Tensor& n_active,
                                        int64_t total_steps) {
  check_walk_inputs(x, baseline, perm, n_active);
  TORCH_CHECK(x.is_cuda(), "permutation_walk_masked (CUDA): x must be a CUDA tensor, got ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t N = x.size(0), d = x.size(1), B = baseline.size(1), P = perm.size(1);
  const int64_t L = perm.size(2);
  const auto plan = plan_walks(perm, n_active, d, B, nullptr, 0, stream);
  check_total_steps(plan.total_steps, total_steps, "permutation_walk_masked");

  auto out = at::empty({total_steps, d}, x.options());
  if (total_steps == 0 || d == 0) return out;
  const int64_t n_walks = N * P * B;
  const int threads = threads_for(ceil_div(d, kMaskedItems), 256);
  const dim3 grid(grid_x(n_walks), grid_y(ceil_div(d, int64_t{threads} * kMaskedItems)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "permutation_walk_masked_cuda", [&] {
    walk_masked_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), baseline.data_ptr<scalar_t>(),
        baseline.stride(0), baseline.stride(1), baseline.stride(2), perm_view(perm),
        n_active.data_ptr<int64_t>(), n_active.stride(0), plan.row_offset.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), P, B, L, d, n_walks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ----------------------------------------------------------------------------- accumulate

// Explained-class value of one output row (softmax probability of class c, or the raw output)
// in float64, computed by a group of `width` lanes (a power of two <= 32) with the classes
// strided over the lanes: max and log-sum-exp by xor shuffles, fixed order. Every lane of the
// warp must call it together (lanes without a row pass valid = false). The value is returned
// on the group's lane c % width, the lane that computed exp(x_c - max) for the sum (so it is
// not computed twice: one exp of the 4-5 per lane at k = 100); other lanes get 0 in the
// softmax case.
template <typename scalar_t>
__device__ __forceinline__ double group_class_value(const scalar_t* row, int64_t col_stride,
                                                    int64_t k, int64_t c, bool softmax,
                                                    bool valid, int lane, int width) {
  if (!softmax) return valid ? static_cast<double>(row[c * col_stride]) : 0.0;
  double mx = -INFINITY;
  if (valid)
    for (int64_t j = lane; j < k; j += width)
      mx = fmax(mx, static_cast<double>(row[j * col_stride]));
  for (int off = width / 2; off > 0; off >>= 1) mx = fmax(mx, __shfl_xor_sync(kFullMask, mx, off));
  double sum = 0.0, e_c = 0.0;
  if (valid)
    for (int64_t j = lane; j < k; j += width) {
      const double e = exp(static_cast<double>(row[j * col_stride]) - mx);
      sum += e;
      if (j == c) e_c = e;
    }
  for (int off = width / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
  return valid ? e_c / sum : 0.0;
}

struct Logits3 {  // [N, B, k]
  int64_t s0, s1, s2;
};

// Block per input (grid-stride): v(empty) = mean over the B references (summed in order) and
// v(N) into ends[n] = {v_start, v_end}; scatters each active feature's position on walk 0
// into pos0[n, feature].
template <typename scalar_t>
__global__ void accumulate_endpoints_kernel(
    const scalar_t* __restrict__ start, Logits3 st,                       // [N, B, k]
    const scalar_t* __restrict__ end, int64_t es0, int64_t es1,           // [N, k]
    const int64_t* __restrict__ target, int64_t target_stride, PermView perm,
    const int64_t* __restrict__ n_active, int64_t act_stride, int64_t N, int64_t B, int64_t k,
    int64_t L, int64_t n_features, bool softmax, int width, double* __restrict__ ends,
    int32_t* __restrict__ pos0) {
  __shared__ double s_vals[128];
  const int groups = blockDim.x / width, g = threadIdx.x / width, lane = threadIdx.x % width;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t a = n_active[n * act_stride];
    if (a <= 0 || a > L) continue;
    const int64_t c = target[n * target_stride];
    const int owner = static_cast<int>(c % width);  // the lane that gets a group's value
    for (int64_t j = threadIdx.x; j < a; j += blockDim.x) {
      const int64_t i = perm(n, 0, j);
      if (i >= 0 && i < n_features) pos0[n * n_features + i] = static_cast<int32_t>(j);
    }
    double v_start = 0.0;  // meaningful in thread 0
    for (int64_t b0 = 0; b0 < B; b0 += groups) {
      const int64_t b = b0 + g;
      const bool valid = b < B;
      const double v = group_class_value(start + n * st.s0 + (valid ? b : 0) * st.s1, st.s2, k, c,
                                         softmax, valid, lane, width);
      if (lane == owner) s_vals[g] = v;
      __syncthreads();
      if (threadIdx.x == 0)
        for (int q = 0; q < groups && b0 + q < B; ++q) v_start += s_vals[q];
      __syncthreads();
    }
    if (threadIdx.x < 32) {  // warp 0; group 0 holds the row
      const double v_end = group_class_value(end + n * es0, es1, k, c, softmax,
                                             threadIdx.x < width, lane, width);
      if (threadIdx.x == 0) ends[2 * n] = v_start / static_cast<double>(B);
      if (threadIdx.x == owner) ends[2 * n + 1] = v_end;
    }
  }
}

// Block per walk (n, p) (grid-stride). The value after each prefix of the walk (interior:
// mean over the B references of the step rows, summed in order; last: v(N)) is computed a
// tile of positions at a time into shared memory by lane groups, then differenced along the
// walk; the marginal contribution of walk feature j lands in its walk-0 slot of
// contrib[P * act_offset[n] + p * a + pos0[feature]] (each slot written once: no atomics).
constexpr int kContribThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kContribThreads) accumulate_walks_kernel(
    const scalar_t* __restrict__ steps, int64_t ss0, int64_t ss1,         // [S, k]
    const int64_t* __restrict__ target, int64_t target_stride, PermView perm,
    const int64_t* __restrict__ n_active, int64_t act_stride,
    const int64_t* __restrict__ row_offset, const int64_t* __restrict__ act_offset,
    const double* __restrict__ ends, const int32_t* __restrict__ pos0,
    double* __restrict__ contrib, int64_t P, int64_t B, int64_t k, int64_t L,
    int64_t n_features, bool softmax, int width, int64_t n_walks) {
  __shared__ double s_cur[kContribThreads];
  const int groups = blockDim.x / width, g = threadIdx.x / width, lane = threadIdx.x % width;
  const int64_t tile = blockDim.x;
  for (int64_t walk = blockIdx.x; walk < n_walks; walk += gridDim.x) {
    const int64_t n = walk / P, p = walk % P;
    const int64_t a = n_active[n * act_stride];
    if (a <= 0 || a > L) continue;
    const int64_t c = target[n * target_stride];
    const int owner = static_cast<int>(c % width);  // the lane that gets a group's value
    const double v_end = ends[2 * n + 1];
    double carry = ends[2 * n];  // value before the tile's first position
    const scalar_t* rows = steps + (row_offset[n] + p * B * (a - 1)) * ss0;
    double* out = contrib + P * act_offset[n] + p * a;
    for (int64_t j0 = 0; j0 < a; j0 += tile) {
      const int64_t len = std::min<int64_t>(tile, a - j0);
      for (int64_t t0 = 0; t0 < len; t0 += groups) {
        const int64_t t = t0 + g, j = j0 + t;
        const bool interior = t < len && j < a - 1;
        double sum = 0.0;
        for (int64_t b = 0; b < B; ++b)
          sum += group_class_value(rows + (b * (a - 1) + (interior ? j : 0)) * ss0, ss1, k, c,
                                   softmax, interior, lane, width);
        if (lane == owner && t < len)
          s_cur[t] = interior ? sum / static_cast<double>(B) : v_end;
      }
      __syncthreads();
      if (threadIdx.x < len) {
        const int64_t t = threadIdx.x, j = j0 + t;
        const double prev = t == 0 ? carry : s_cur[t - 1];
        const int64_t i = perm(n, p, j);
        if (i >= 0 && i < n_features) {
          const int32_t slot = pos0[n * n_features + i];
          if (slot >= 0 && slot < a) out[slot] = s_cur[t] - prev;
        }
      }
      carry = s_cur[len - 1];
      __syncthreads();
    }
  }
}

// Thread per (input n, walk-0 position j): Welford over the samples in order, one sample =
// the mean of walks_per_sample consecutive walks (summed in order), as the CPU kernel.
__global__ void accumulate_welford_kernel(
    PermView perm, const int64_t* __restrict__ n_active, int64_t act_stride,
    const int64_t* __restrict__ act_offset, const double* __restrict__ contrib, int64_t N,
    int64_t P, int64_t L, int64_t n_features, int64_t walks_per_sample,
    double* __restrict__ mean, double* __restrict__ m2) {  // [N, n_features] contiguous
  const int64_t n_samples = P / walks_per_sample;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t a = n_active[n * act_stride];
    if (a <= 0 || a > L) continue;
    const double* src = contrib + P * act_offset[n];
    for (int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < a;
         j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      const int64_t i = perm(n, 0, j);
      if (i < 0 || i >= n_features) continue;
      double mu = 0.0, ss = 0.0;
      for (int64_t s = 0; s < n_samples; ++s) {
        double value = 0.0;
        for (int64_t q = 0; q < walks_per_sample; ++q)
          value += src[(s * walks_per_sample + q) * a + j];
        value /= static_cast<double>(walks_per_sample);
        const double delta = value - mu;
        mu += delta / static_cast<double>(s + 1);
        ss += product_rn(delta, value - mu);  // unfused, as in the CPU kernel
      }
      if (!(isfinite(mu) && isfinite(ss))) mu = ss = NAN;  // as the CPU kernel: one rule
      mean[n * n_features + i] = mu;
      m2[n * n_features + i] = ss;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> shapley_accumulate_cuda(
    const at::Tensor& step_logits, const at::Tensor& start_logits, const at::Tensor& end_logits,
    const at::Tensor& target, const at::Tensor& perm, const at::Tensor& n_active,
    int64_t n_features, int64_t walks_per_sample, bool softmax) {
  check_accumulate_inputs(step_logits, start_logits, end_logits, target, perm, n_active,
                          n_features, walks_per_sample);
  TORCH_CHECK(end_logits.is_cuda(), "shapley_accumulate (CUDA): end_logits must be a CUDA "
              "tensor, got ", end_logits.device());
  const c10::cuda::CUDAGuard guard(end_logits.device());
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(end_logits.device().index()).stream();
  const int64_t N = end_logits.size(0), k = end_logits.size(1), B = start_logits.size(1);
  const int64_t P = perm.size(1), L = perm.size(2);
  const auto plan = plan_walks(perm, n_active, n_features, B, &target, k, stream);
  TORCH_CHECK(plan.total_steps == step_logits.size(0), "shapley_accumulate: step_logits has ",
              step_logits.size(0), " rows but the walks have ", plan.total_steps,
              " interior steps");
  if (plan.bad_target != kNone) {  // checked in the plan's sync, reported in the CPU's order
    const int64_t n = plan.bad_target;
    TORCH_CHECK(false, "target[", n, "] = ", target.select(0, n).item<int64_t>(),
                " is not a class index in [0, ", k, ")");
  }

  const auto f64 = end_logits.options().dtype(at::kDouble);
  auto mean = at::zeros({N, n_features}, f64);
  auto m2 = at::zeros({N, n_features}, f64);
  if (N == 0 || P == 0 || plan.total_active == 0) return {mean, m2};

  auto ends = at::empty({N, 2}, f64);
  auto pos0 = at::empty({N, n_features}, end_logits.options().dtype(at::kInt));
  auto contrib = at::empty({P * plan.total_active}, f64);
  const int width = group_size_for(k);
  const Logits3 st{start_logits.stride(0), start_logits.stride(1), start_logits.stride(2)};
  AT_DISPATCH_FLOATING_TYPES(end_logits.scalar_type(), "shapley_accumulate_cuda", [&] {
    accumulate_endpoints_kernel<scalar_t><<<grid_x(N), 128, 0, stream>>>(
        start_logits.data_ptr<scalar_t>(), st, end_logits.data_ptr<scalar_t>(),
        end_logits.stride(0), end_logits.stride(1), target.data_ptr<int64_t>(), target.stride(0),
        perm_view(perm), n_active.data_ptr<int64_t>(), n_active.stride(0), N, B, k, L,
        n_features, softmax, width, ends.data_ptr<double>(), pos0.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    accumulate_walks_kernel<scalar_t><<<grid_x(N * P), kContribThreads, 0, stream>>>(
        step_logits.data_ptr<scalar_t>(), step_logits.stride(0), step_logits.stride(1),
        target.data_ptr<int64_t>(), target.stride(0), perm_view(perm),
        n_active.data_ptr<int64_t>(), n_active.stride(0), plan.row_offset.data_ptr<int64_t>(),
        plan.act_offset.data_ptr<int64_t>(), ends.data_ptr<double>(), pos0.data_ptr<int32_t>(),
        contrib.data_ptr<double>(), P, B, k, L, n_features, softmax, width, N * P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int threads = threads_for(L, 128);
  const dim3 grid(grid_x(N), grid_y(ceil_div(L, threads)));
  accumulate_welford_kernel<<<grid, threads, 0, stream>>>(
      perm_view(perm), n_active.data_ptr<int64_t>(), n_active.stride(0),
      plan.act_offset.data_ptr<int64_t>(), contrib.data_ptr<double>(), N, P, L, n_features,
      walks_per_sample, mean.data_ptr<double>(), m2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(oni, CUDA, m) {
  m.impl("permutation_walk_linear", &permutation_walk_linear_cuda);
  m.impl("permutation_walk_masked", &permutation_walk_masked_cuda);
  m.impl("shapley_accumulate", &shapley_accumulate_cuda);
}

}  // namespace oni
