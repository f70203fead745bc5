// Kernels that check the emulation itself (tests/test_cuda_emu.py): correct ones whose answer
// is known, and broken ones that a GPU would reject or leave undefined, which the emulation
// must report. Built only into the emulation library (tests/cuda_emu/build.py), never by nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Correct: per warp, an xor butterfly sum, a shfl_down sum (in lane 0) and a block-wide
// __syncthreads_or; then a shared-memory reversal across the block. Block b writes
// out[b, 4, blockDim.x].
__global__ void collectives_kernel(int64_t* out) {
  __shared__ int64_t s_values[1024];
  const int t = threadIdx.x, lane = t & 31;
  const int64_t n = blockDim.x;
  int64_t* mine = out + blockIdx.x * 4 * n;
  int64_t butterfly = t;
  for (int off = 16; off > 0; off >>= 1) butterfly += __shfl_xor_sync(kFullMask, butterfly, off);
  int64_t down = t;
  for (int off = 16; off > 0; off >>= 1) down += __shfl_down_sync(kFullMask, down, off);
  const int any = __syncthreads_or(t == static_cast<int>(blockIdx.x));
  s_values[t] = t;
  __syncthreads();
  mine[t] = butterfly;
  mine[n + t] = lane == 0 ? down : -1;
  mine[2 * n + t] = any;
  mine[3 * n + t] = s_values[n - 1 - t];
}

// Broken: half the block waits at one __syncthreads, half at another.
__global__ void divergent_barrier_kernel(int64_t* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Broken: lane 31 skips a full-mask shuffle and exits.
__global__ void missing_lane_kernel(int64_t* out) {
  int64_t v = threadIdx.x;
  if (threadIdx.x < 31) v = __shfl_xor_sync(kFullMask, v, 1);
  out[threadIdx.x] = v;
}

// Broken: half a warp waits at __syncthreads while the other half waits at a shuffle.
__global__ void deadlock_kernel(int64_t* out) {
  int64_t v = threadIdx.x;
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(kFullMask, v, 1);
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Broken (a race on a GPU): two block-wide sums, of 1 and of 100 per thread, through one
// shared buffer with no __syncthreads between the first sum's reads and the second's writes.
// A warp that runs ahead writes its partial of the second while another warp still reads the
// first's: only ONI_CUDA_EMU_ORDER=warps runs a warp ahead like that (warp 0 here: after
// the first __syncthreads the turns go first to last). out[0, t]: the first sum as thread t
// read it, out[1, t]: the second.
__global__ void reused_partials_kernel(int64_t* out) {
  __shared__ int64_t s_partial[32];
  const int t = threadIdx.x, lane = t & 31, warp = t / 32, n_warps = blockDim.x / 32;
  for (int round = 0; round < 2; ++round) {
    int64_t v = round == 0 ? 1 : 100;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) s_partial[warp] = v;  // (a correct kernel syncs before this write)
    __syncthreads();
    int64_t total = 0;
    for (int w = 0; w < n_warps; ++w) total += s_partial[w];
    out[round * blockDim.x + t] = total;
  }
}

// Broken (a race on a GPU): thread 0 broadcasts each round's warp sum through one shared
// value with no __syncthreads before the next round's write. Warp 0 can run ahead into the
// next round and overwrite it while warp 1 still reads this round's. out[r, t]: round r's
// value as thread t read it.
__global__ void overwritten_broadcast_kernel(int64_t* out) {
  __shared__ int64_t s_total;
  const int t = threadIdx.x;
  for (int round = 0; round < 2; ++round) {
    int64_t v = round == 0 ? 1 : 100;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    if (t == 0) s_total = v;  // (a correct kernel syncs before this write)
    __syncthreads();
    out[round * blockDim.x + t] = s_total;
  }
}

__global__ void __launch_bounds__(64) bounded_kernel(int64_t* out) { out[threadIdx.x] = 1; }

__global__ void dynamic_shared_kernel(int64_t* out) {
  extern __shared__ int64_t s_dynamic[];
  out[threadIdx.x] = s_dynamic[threadIdx.x];  // unwritten: the poison pattern
}

at::Tensor run_case(const std::string& name, int64_t blocks, int64_t threads) {
  auto out = at::zeros({4 * blocks * threads}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  const auto b = static_cast<unsigned>(blocks);
  const auto t = static_cast<unsigned>(threads);
  if (name == "collectives") {
    collectives_kernel<<<b, t>>>(p);
  } else if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<b, t>>>(p);
  } else if (name == "missing_lane") {
    missing_lane_kernel<<<b, t>>>(p);
  } else if (name == "deadlock") {
    deadlock_kernel<<<b, t>>>(p);
  } else if (name == "reused_partials") {
    reused_partials_kernel<<<b, t>>>(p);
  } else if (name == "overwritten_broadcast") {
    overwritten_broadcast_kernel<<<b, t>>>(p);
  } else if (name == "bounded") {
    bounded_kernel<<<b, t>>>(p);
  } else if (name == "dynamic_shared") {
    dynamic_shared_kernel<<<b, t, threads * sizeof(int64_t)>>>(p);
  } else if (name == "too_much_shared") {
    dynamic_shared_kernel<<<b, t, 48 * 1024 + 8>>>(p);
  } else {
    TORCH_CHECK(false, "unknown case ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(oni_emu_selftest, m) {
  m.def("run(str name, int blocks, int threads) -> Tensor", &run_case);
  m.def("launch_counts() -> str", [] { return ::oni_emu::launch_counts(); });
}
