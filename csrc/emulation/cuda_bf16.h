// Host emulation of __nv_bfloat16 (see cuda_runtime.h here): the top half of a float32, round-to-nearest-even.
#pragma once

#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t b = uint32_t(h.bits) << 16;
  float out;
  memcpy(&out, &b, 4);
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return {uint16_t((b >> 16) | 0x40u)};  // quiet nan
  b += 0x7fffu + ((b >> 16) & 1u);
  return {uint16_t(b >> 16)};
}
