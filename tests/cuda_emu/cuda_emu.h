// A CPU stand-in for the small part of CUDA that csrc/cuda/*.cu uses, so their kernels run
// (slowly, one block at a time) on a machine without a GPU. tests/cuda_emu/build.py rewrites
// each .cu file into C++ that includes this header; see tests/cuda_emu/README.md.
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread. Fibers run until
// they reach a barrier (__syncthreads, a warp shuffle) or return; the scheduler releases a
// barrier once every live thread of the block (or warp) waits on it, and reports, instead of
// hanging or guessing, what CUDA leaves undefined or refuses: barriers reached from different
// source lines, a full-mask shuffle that a lane of the warp never joins, and launch
// configurations a GPU would reject (a zero or too-large grid or block, more threads than
// __launch_bounds__, more than 48 KiB of dynamic shared memory).
//
// Not emulated: timing, memory ordering between blocks, and races (blocks run one after the
// other and fibers switch only at barriers, so a missing __syncthreads can go unnoticed).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ----------------------------------------------------------------------------- qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
// One block runs at a time and all its fibers share the process: a function-local static is
// exactly one block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in indices of the running fiber (set by the scheduler before it resumes one).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

using std::isfinite;
using std::isinf;
using std::isnan;

// ----------------------------------------------------------------------------- runtime

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    const cudaError_t oni_emu_status = (expr);                                            \
    TORCH_CHECK(oni_emu_status == cudaSuccess, "emulated CUDA call failed: " #expr); \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10

namespace oni_emu {

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  LaunchConfig(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
};

// Runs `body` once per thread of every block of the launch (blocks in order); throws a
// c10::Error naming the kernel on a launch or barrier error.
void run_kernel(const char* kernel, const LaunchConfig& config, int launch_bound,
                const std::function<void()>& body);

// The launch site `kernel<<<grid, block, shared, stream>>>(args...)`, rewritten by build.py.
// Arguments convert to the kernel's parameter types once, on the host, as CUDA copies them.
template <typename... Params, typename... Args>
void launch(const char* name, const LaunchConfig& config, int launch_bound,
            void (*kernel)(Params...), Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_kernel(name, config, launch_bound, [&] { std::apply(kernel, params); });
}

// "name count" lines, one per kernel launched in this process so far, by name.
std::string launch_counts();

void* dynamic_shared();
void block_sync(int line, int* predicate);
uint64_t warp_exchange(int line, uint64_t bits, int src_lane, unsigned mask);

template <typename T>
T shuffle(int line, unsigned mask, T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(line, bits, src_lane, mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline int lane_id() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

}  // namespace oni_emu

#define __syncthreads() ::oni_emu::block_sync(__LINE__, nullptr)

inline int oni_emu_syncthreads_or(int line, int predicate) {
  int value = predicate != 0;
  ::oni_emu::block_sync(line, &value);
  return value;
}
#define __syncthreads_or(predicate) oni_emu_syncthreads_or(__LINE__, (predicate))

// width = 32 only (the only width csrc uses); the source lane of xor / down stays in the warp.
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::oni_emu::shuffle(__LINE__, (mask), (value), ::oni_emu::lane_id() ^ (lane_mask))
#define __shfl_down_sync(mask, value, delta)                                            \
  ::oni_emu::shuffle(__LINE__, (mask), (value),                                        \
                     ::oni_emu::lane_id() + (delta) < 32 ? ::oni_emu::lane_id() + (delta) \
                                                         : ::oni_emu::lane_id())

// ----------------------------------------------------------------------------- atomics
// Fibers switch only at barriers, so a read-modify-write is atomic by construction.

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}
inline int atomicMin(int* address, int value) {
  const int old = *address;
  if (value < old) *address = value;
  return old;
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old | value;
  return old;
}
inline unsigned atomicAnd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old & value;
  return old;
}

// ----------------------------------------------------------------------------- intrinsics
// IEEE single precision, round to nearest: what the _rn intrinsics promise (build.py compiles
// with -ffp-contract=off, so no product is fused into a sum behind their back).

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __uint_as_float(unsigned bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return {static_cast<uint16_t>(bits >> 16)};
}
