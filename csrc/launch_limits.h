// The launch grid's limits on every CUDA GPU oni builds for. A kernel whose work can outgrow
// them launches at most this many blocks along an axis and loops over the rest (grid-stride).
// The emulation build (tests/cuda_emu/build.py) lowers the limits so that its tests run
// those loops on small shapes; on a GPU they need over 2^31 walks or 16.7 million columns.
#pragma once

#include <algorithm>
#include <cstdint>

#ifndef ONI_MAX_GRID_X
#define ONI_MAX_GRID_X 2147483647
#endif
#ifndef ONI_MAX_GRID_Y
#define ONI_MAX_GRID_Y 65535
#endif

namespace oni {

constexpr int64_t kMaxGridX = ONI_MAX_GRID_X;
constexpr int64_t kMaxGridY = ONI_MAX_GRID_Y;

// Blocks along x (y) for `blocks` blocks of work: at least one, at most the limit.
inline unsigned grid_x(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGridX));
}

inline unsigned grid_y(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGridY));
}

}  // namespace oni
