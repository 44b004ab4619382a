// Host emulation of __half (see cuda_runtime.h here): IEEE binary16 with round-to-nearest-even.
#pragma once

#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float out;
  if (exp == 0x1f) {  // inf / nan
    const uint32_t b = sign | 0x7f800000u | (man << 13);
    memcpy(&out, &b, 4);
  } else if (exp == 0) {  // zero / subnormal: man * 2^-24, exact in float
    out = float(man) * 5.9604644775390625e-08f;
    if (sign) out = -out;
  } else {
    const uint32_t b = sign | ((exp + 112u) << 23) | (man << 13);
    memcpy(&out, &b, 4);
  }
  return out;
}

inline __half __float2half_rn(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t exp = (b >> 23) & 0xffu;
  uint32_t man = b & 0x7fffffu;
  if (exp == 0xff) return {uint16_t(sign | 0x7c00u | (man ? 0x200u : 0u))};
  const int e = int(exp) - 127 + 15;
  if (e >= 0x1f) return {uint16_t(sign | 0x7c00u)};
  uint32_t full;   // the value as an integer multiple of 2^(shift) below the half's last bit
  int shift;
  if (e <= 0) {    // subnormal half (or zero)
    if (e < -10) return {sign};
    full = man | 0x800000u;
    shift = 14 - e;  // 13 + (1 - e)
  } else {
    full = man;
    shift = 13;
  }
  uint32_t q = full >> shift;
  const uint32_t rem = full & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  if (e <= 0) return {uint16_t(sign | q)};  // a carry into bit 10 yields the smallest normal, correctly
  return {uint16_t(sign | ((uint32_t(e) << 10) + q))};  // a carry into the exponent is correct too
}
