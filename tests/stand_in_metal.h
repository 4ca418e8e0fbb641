// Stand-ins for the Metal built-ins our kernels use, so g++ can compile and run a kernel's text
// on machines without Metal (tests/metal_stand_in.py drives it; docs/metal-kernels.md).
// Only what the kernels need: a kernel using anything else fails to compile here, on purpose.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

// Metal's half: IEEE binary16, float -> half rounds to nearest even, as _Float16 does.
typedef _Float16 half;

// MLX's bfloat16_t conversions (mlx/types/bf16.h): round to nearest even, any nan -> 0x7FC0.
struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) {
      bits = 0x7FC0;
    } else {
      u += ((u >> 16) & 1) + 0x7FFF;
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

namespace metal {
// Metal's min on floats is fmin: a nan operand yields the other one.
inline float min(float a, float b) { return std::fmin(a, b); }

namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}  // namespace precise
}  // namespace metal

// Address-space qualifiers of the signature MLX generates; nothing on a CPU.
#define device
#define constant
