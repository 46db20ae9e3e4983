// bf16 on the host: the 16 high bits of an fp32, rounded to nearest even. The one conversion the CPU reference
// (MoBA block means), the test-vector checker and the tests use to move values to and from bf16 tensors.
// Invariant: bf16_value(bf16_bits(x)) == round_to_bf16(x) for finite x; NaN and Inf keep their class.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace moba {

inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7F800000u) != 0x7F800000u) u += 0x7FFFu + ((u >> 16) & 1u);  // NaN / Inf: truncate
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline float round_to_bf16(float x) { return bf16_value(bf16_bits(x)); }

inline std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_bits(x[i]);
  return out;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_value(x[i]);
  return out;
}

}  // namespace moba
