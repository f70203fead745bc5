// The block scheduler behind cuda_emu.h: one fiber per CUDA thread, one block at a time.
// A fiber starts once per launch (makecontext) and runs the kernel for every block in turn;
// switches use _setjmp / _longjmp, which save no signal mask (swapcontext makes two system
// calls per switch: with it, and fresh contexts per block, the emulated solver and Shapley
// tests took 763 s here; with this, 163 s).
#include <setjmp.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)  // ONI_CUDA_EMU_ASAN=1 (build.py): tell ASan about each switch
#include <sanitizer/common_interface_defs.h>
#define ONI_EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define ONI_EMU_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define ONI_EMU_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define ONI_EMU_FINISH_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#endif

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "launch_limits.h"

#include "cuda_emu.h"

namespace oni_emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr int kNotWaiting = 0, kAtBlockBarrier = 1, kAtWarpBarrier = 2;

struct Fiber {
  ucontext_t context;  // the entry, used once per launch
  jmp_buf resume;      // where it waits
  std::unique_ptr<char[]> stack;
  dim3 index;
  bool started = false;
  bool done = false;
  int waiting = kNotWaiting;
  int line = 0;          // source line of the barrier it waits at
  int* predicate = nullptr;  // __syncthreads_or: in/out
  uint64_t bits = 0;     // shuffle: value offered, then value received
  int src_lane = 0;
  unsigned mask = 0;
  void* asan_fake_stack = nullptr;
};

struct Block {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> shared;
  jmp_buf scheduler;
  int current = -1;
  void* asan_fake_stack = nullptr;  // the scheduler's (ASan builds)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
};

Block* g_block = nullptr;

// ONI_CUDA_EMU_ORDER=reverse: between two barriers the threads run last to first. A missing
// __syncthreads between one thread's write and another's read of shared memory gives the
// right answer in one of the two orders only, so running the tests in both catches it.
// ONI_CUDA_EMU_ORDER=warps: each warp runs alone through its shuffles until it waits at
// __syncthreads or exits, as a warp that races ahead of the others on a GPU; the warps take
// turns last to first, then first to last after each __syncthreads, so that over a loop of
// barriers every warp gets ahead of every other. Both other orders stop every thread at every
// shuffle, so a warp never gets past one while another is behind it; a shared buffer reused
// without a __syncthreads between two block-wide reductions (one warp writing the second's
// values while another still reads the first's) is seen only here.
enum class Order { kForward, kReverse, kWarps };
Order thread_order() {  // read at the first launch: a bad value is an error there, not an
  static const Order order = [] {  // abort while the library loads
    const char* value = std::getenv("ONI_CUDA_EMU_ORDER");
    const std::string name = value != nullptr ? value : "";
    if (name == "reverse") return Order::kReverse;
    if (name == "warps") return Order::kWarps;
    TORCH_CHECK(name.empty() || name == "forward", "ONI_CUDA_EMU_ORDER must be forward, "
                "reverse or warps, got '", name, "'");
    return Order::kForward;
  }();
  return order;
}

void yield_to_scheduler(Fiber& fiber) {
  if (_setjmp(fiber.resume) == 0) {
    ONI_EMU_START_SWITCH(&fiber.asan_fake_stack, g_block->scheduler_stack,
                         g_block->scheduler_stack_size);
    _longjmp(g_block->scheduler, 1);
  }
  ONI_EMU_FINISH_SWITCH(fiber.asan_fake_stack, &g_block->scheduler_stack,
                        &g_block->scheduler_stack_size);
}

void fiber_main() {
  ONI_EMU_FINISH_SWITCH(nullptr, &g_block->scheduler_stack, &g_block->scheduler_stack_size);
  for (;;) {  // one pass per block; the scheduler drops the fiber after the last one
    (*g_block->body)();
    Fiber& fiber = g_block->fibers[g_block->current];
    fiber.done = true;
    yield_to_scheduler(fiber);
  }
}

void resume(Block& block, Fiber& fiber) {
  if (_setjmp(block.scheduler) != 0) {  // the fiber yielded
    ONI_EMU_FINISH_SWITCH(block.asan_fake_stack, nullptr, nullptr);
    return;
  }
  ONI_EMU_START_SWITCH(&block.asan_fake_stack, fiber.stack.get(), kStackBytes);
  if (!fiber.started) {
    fiber.started = true;
    setcontext(&fiber.context);
  }
  _longjmp(fiber.resume, 1);
}

Fiber& running_fiber() {
  TORCH_CHECK(g_block != nullptr && g_block->current >= 0,
              "a CUDA device function ran outside an emulated kernel launch");
  return g_block->fibers[g_block->current];
}

void wait_here(Fiber& fiber, int kind, int line) {
  fiber.waiting = kind;
  fiber.line = line;
  yield_to_scheduler(fiber);
}

[[noreturn]] void fail(const Block& block, const std::string& what) {
  std::ostringstream message;
  message << "emulated CUDA kernel " << block.kernel << " (block " << blockIdx.x << ", "
          << blockIdx.y << ", " << blockIdx.z << "): " << what;
  TORCH_CHECK(false, message.str());
}

// Releases the warp of lanes [base, base + 32) if its live lanes all wait at one shuffle.
bool release_warp(Block& block, int base) {
  const int n = static_cast<int>(block.fibers.size());
  const int width = std::min(32, n - base);
  int waiting = 0, live = 0, line = -1;
  for (int lane = 0; lane < width; ++lane) {
    const Fiber& f = block.fibers[base + lane];
    if (f.done) continue;
    ++live;
    if (f.waiting != kAtWarpBarrier) continue;
    ++waiting;
    if (line >= 0 && f.line != line) {
      fail(block, "lanes of warp " + std::to_string(base / 32) + " shuffle on different lines (" +
                      std::to_string(line) + " and " + std::to_string(f.line) + ")");
    }
    line = f.line;
  }
  if (waiting == 0 || waiting != live) return false;
  std::vector<uint64_t> offered(32, 0);
  for (int lane = 0; lane < width; ++lane) offered[lane] = block.fibers[base + lane].bits;
  for (int lane = 0; lane < width; ++lane) {
    Fiber& f = block.fibers[base + lane];
    if (f.done) continue;
    for (int other = 0; other < 32; ++other) {
      if (!(f.mask >> other & 1u)) continue;
      if (other >= width || block.fibers[base + other].done) {
        fail(block, "shuffle on line " + std::to_string(line) + " names lane " +
                        std::to_string(other) + " of warp " + std::to_string(base / 32) +
                        " in its mask, but that lane " +
                        (other >= width ? "does not exist" : "has exited"));
      }
    }
    const int src = f.src_lane;
    if (src < 0 || src >= width || !(f.mask >> src & 1u) || block.fibers[base + src].done) {
      fail(block, "shuffle on line " + std::to_string(line) + " reads lane " +
                      std::to_string(src) + ", which does not take part");
    }
    f.bits = offered[src];
    f.waiting = kNotWaiting;
  }
  return true;
}

// Releases every warp whose live lanes all wait at one shuffle; true if any was released.
bool release_warps(Block& block) {
  bool released = false;
  for (int base = 0; base < static_cast<int>(block.fibers.size()); base += 32)
    released |= release_warp(block, base);
  return released;
}

bool release_block(Block& block) {
  int line = -1, any = 0;
  for (const Fiber& f : block.fibers) {
    if (f.done) continue;
    if (f.waiting != kAtBlockBarrier) return false;
    if (line >= 0 && f.line != line) {
      fail(block, "threads wait at __syncthreads on different lines (" + std::to_string(line) +
                      " and " + std::to_string(f.line) + "): a divergent barrier");
    }
    line = f.line;
    if (f.predicate != nullptr && *f.predicate != 0) any = 1;
  }
  if (line < 0) return false;
  for (Fiber& f : block.fibers) {
    if (f.done) continue;
    if (f.predicate != nullptr) *f.predicate = any;
    f.predicate = nullptr;
    f.waiting = kNotWaiting;
  }
  return true;
}

std::string describe_waits(const Block& block) {
  int done = 0, at_block = 0, at_warp = 0;
  for (const Fiber& f : block.fibers) {
    if (f.done) ++done;
    else if (f.waiting == kAtBlockBarrier) ++at_block;
    else if (f.waiting == kAtWarpBarrier) ++at_warp;
  }
  return std::to_string(at_block) + " threads at __syncthreads, " + std::to_string(at_warp) +
         " at a warp shuffle, " + std::to_string(done) + " exited";
}

void run_block(Block& block) {
  for (Fiber& f : block.fibers) {
    f.done = false;
    f.waiting = kNotWaiting;
  }
  // poisoned like uninitialised device memory: a kernel must write before it reads
  std::fill(block.shared.begin(), block.shared.end(), static_cast<unsigned char>(0xff));
  const int n = static_cast<int>(block.fibers.size());
  const auto run_lane = [&](int i) {
    Fiber& f = block.fibers[i];
    if (f.done || f.waiting != kNotWaiting) return;
    block.current = i;
    threadIdx = f.index;
    resume(block, f);
  };
  const Order order = thread_order();
  bool last_warp_first = true;  // warps: turned round at every __syncthreads
  for (;;) {
    if (order == Order::kWarps) {
      const int last = (n - 1) / 32 * 32;
      for (int k = 0; k <= last; k += 32) {
        const int base = last_warp_first ? last - k : k;
        do {  // this warp alone, through its shuffles
          for (int i = base; i < std::min(base + 32, n); ++i) run_lane(i);
        } while (release_warp(block, base));
      }
    } else {
      for (int step = 0; step < n; ++step)
        run_lane(order == Order::kReverse ? n - 1 - step : step);
    }
    block.current = -1;
    bool all_done = true;
    for (const Fiber& f : block.fibers) all_done = all_done && f.done;
    if (all_done) return;
    if (release_warps(block)) continue;
    if (release_block(block)) {
      last_warp_first = !last_warp_first;
      continue;
    }
    fail(block, "deadlock: " + describe_waits(block));
  }
}

void check_config(const char* kernel, const LaunchConfig& c, int launch_bound) {
  const auto where = [&] { return std::string("emulated launch of ") + kernel + ": "; };
  TORCH_CHECK(c.grid.x >= 1 && c.grid.y >= 1 && c.grid.z >= 1, where(), "grid (", c.grid.x, ", ",
              c.grid.y, ", ", c.grid.z, ") has a zero dimension (CUDA: invalid configuration)");
  // the limits this build emulates (lowered by build.py: a launch must go through grid_x/y)
  TORCH_CHECK(c.grid.x <= oni::kMaxGridX && c.grid.y <= oni::kMaxGridY && c.grid.z <= 65535u,
              where(), "grid (", c.grid.x, ", ", c.grid.y, ", ", c.grid.z, ") exceeds (",
              oni::kMaxGridX, ", ", oni::kMaxGridY, ", 65535)");
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && c.block.z <= 64, where(), "block (", c.block.x,
              ", ", c.block.y, ", ", c.block.z, ") must hold 1..1024 threads");
  TORCH_CHECK(launch_bound <= 0 || threads <= static_cast<uint64_t>(launch_bound), where(),
              threads, " threads exceed __launch_bounds__(", launch_bound, ")");
  TORCH_CHECK(c.shared_bytes <= kMaxDynamicShared, where(), c.shared_bytes,
              " bytes of dynamic shared memory exceed 48 KiB");
}

std::map<std::string, int64_t>& launches() {
  static std::map<std::string, int64_t> counts;
  return counts;
}

}  // namespace

std::string launch_counts() {
  std::string out;
  for (const auto& [name, count] : launches()) out += name + " " + std::to_string(count) + "\n";
  return out;
}

void run_kernel(const char* kernel, const LaunchConfig& config, int launch_bound,
                const std::function<void()>& body) {
  ++launches()[kernel];
  check_config(kernel, config, launch_bound);
  TORCH_CHECK(g_block == nullptr, "emulated kernel ", kernel, " launched from inside a kernel");
  Block block;
  block.kernel = kernel;
  block.body = &body;
  block.shared.resize(config.shared_bytes);
  const dim3 b = config.block;
  block.fibers.resize(static_cast<size_t>(b.x) * b.y * b.z);
  size_t i = 0;
  for (unsigned z = 0; z < b.z; ++z)
    for (unsigned y = 0; y < b.y; ++y)
      for (unsigned x = 0; x < b.x; ++x, ++i) {
        Fiber& f = block.fibers[i];
        f.index = dim3(x, y, z);
        f.stack.reset(new char[kStackBytes]);
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;  // fiber_main never returns
        makecontext(&f.context, fiber_main, 0);
      }
  blockDim = config.block;
  gridDim = config.grid;
  g_block = &block;
  try {
    for (unsigned z = 0; z < config.grid.z; ++z)
      for (unsigned y = 0; y < config.grid.y; ++y)
        for (unsigned x = 0; x < config.grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          run_block(block);
        }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

void* dynamic_shared() {
  TORCH_CHECK(g_block != nullptr, "extern __shared__ memory read outside a kernel launch");
  return g_block->shared.empty() ? nullptr : g_block->shared.data();
}

void block_sync(int line, int* predicate) {
  Fiber& fiber = running_fiber();
  fiber.predicate = predicate;
  wait_here(fiber, kAtBlockBarrier, line);
}

uint64_t warp_exchange(int line, uint64_t bits, int src_lane, unsigned mask) {
  Fiber& fiber = running_fiber();
  fiber.bits = bits;
  fiber.src_lane = src_lane;
  fiber.mask = mask;
  wait_here(fiber, kAtWarpBarrier, line);
  return fiber.bits;
}

}  // namespace oni_emu
