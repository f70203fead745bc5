// Shared by the CPU kernels' inner loops: run-time ISA selection and bfloat16 bit patterns.
#pragma once
#include <cstdint>
#include <cstring>

// The extension is built for the baseline x86-64 ISA; a loop marked ONI_VECTOR_CLONES is also
// compiled for AVX2 and AVX-512 and the best version is picked at load time (16 float lanes
// instead of 4).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ONI_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONI_VECTOR_CLONES
#endif

// The same with an x86-64-v4 clone (AVX-512 F/BW/DQ/VL) first: narrowing float32 to bfloat16
// bits needs AVX-512's 16-bit lanes to vectorise (measured on the walk kernel: 2x slower
// stores under plain avx512f). Both macros rely on -ffp-contract=off (setup.py): avx512f and
// v4 have FMA, and without it gcc fuses a * b + c there but not in the other clones, so the
// bits would depend on the machine.
// (gcc names the x86-64-v4 level from gcc 11; 12 is the oldest built here)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define ONI_VECTOR_CLONES_V4 \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ONI_VECTOR_CLONES_V4 ONI_VECTOR_CLONES
#endif

// Inlined into each clone (a helper called from a target_clones function is otherwise
// compiled once, for the baseline ISA).
#if defined(__GNUC__) || defined(__clang__)
#define ONI_INLINE inline __attribute__((always_inline))
#else
#define ONI_INLINE inline
#endif

namespace oni {

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet (c10::BFloat16's rounding), branch-free.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

}  // namespace oni
