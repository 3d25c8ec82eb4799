// Portable SIMD for the CPU kernels: GCC/Clang vector extensions, 8 float lanes (one AVX2 register,
// two SSE2 / NEON registers). Hot loops are compiled twice (target_clones: AVX2 and baseline) and the
// loader picks the best for the machine. The vector and scalar paths compute bit-identical results
// (same operations in the same order, no FMA contraction: -ffp-contract=off).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LK_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define LK_MULTIVERSION
#endif

namespace llmkern {
namespace simd {

constexpr int W = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0: Cephes' single-precision polynomial, the same steps as the scalar version.
template <typename F, typename I>
inline F exp_nonpos_t(F x, F lo, F magic) {
  x = x < lo ? lo : x;  // also maps -inf to -87 (result ~1e-38: zero in fixed point)
  const F n = (x * 1.44269504088896341f + magic) - magic;  // round to nearest
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
  I bits;
  if constexpr (sizeof(F) == sizeof(float)) {
    bits = ((I)n + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float exp_nonpos(float x) { return exp_nonpos_t<float, int32_t>(x, -87.0f, 12582912.0f); }
inline vf exp_nonpos(vf x) { return exp_nonpos_t<vf, vi>(x, splat(-87.0f), splat(12582912.0f)); }

// floor(e * 2^40) for e in [0, 1] as two 20-bit halves (int32 conversions vectorise; int64 ones do
// not before AVX-512). Equal to the CUDA kernel's __float2ull_rz(e * 2^40).
inline uint64_t fixed_mass(float e) {
  const float s = e * 1048576.0f;  // exact: power-of-two scaling
  const int32_t hi = (int32_t)s;
  const int32_t lo = (int32_t)((s - (float)hi) * 1048576.0f);  // the fraction, exact
  return ((uint64_t)(uint32_t)hi << 20) + (uint64_t)(uint32_t)lo;
}

// fixed_mass of 8 lanes as (high 20 bits, low 20 bits).
inline void split_mass(vf e, vi& h, vi& l) {
  const vf s = e * 1048576.0f;
  h = __builtin_convertvector(s, vi);
  l = __builtin_convertvector((s - __builtin_convertvector(h, vf)) * 1048576.0f, vi);
}

// Lane-wise partial sums of fixed_mass: each half is < 2^21 per element, so uint32 lanes hold at
// least 2^11 additions before they must be flushed into a uint64.
struct MassAcc {
  vu hi = vu{}, lo = vu{};
  uint64_t total = 0;
  int pending = 0;
  inline void add(vf e) {
    vi h, l;
    split_mass(e, h, l);
    add_split(h, l);
  }
  // Adds masses already split by split_mass (lanes masked to zero are not counted).
  inline void add_split(vi h, vi l) {
    hi += (vu)h;
    lo += (vu)l;
    if (++pending == 2048) flush();
  }
  inline void flush() {
    for (int j = 0; j < W; ++j) total += ((uint64_t)hi[j] << 20) + (uint64_t)lo[j];
    hi = vu{};
    lo = vu{};
    pending = 0;
  }
  inline uint64_t sum() {
    flush();
    return total;
  }
};

// Bit j set when lane j of a comparison mask is set (movemask: SSE on x86, a loop elsewhere).
inline unsigned lane_bits(vi m) {
#if defined(__x86_64__) && defined(__GNUC__)
  typedef float v4f __attribute__((vector_size(16)));
  v4f lo, hi;
  std::memcpy(&lo, &m, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&m) + sizeof(lo), sizeof(hi));
  return (unsigned)__builtin_ia32_movmskps(lo) | ((unsigned)__builtin_ia32_movmskps(hi) << 4);
#else
  unsigned b = 0;
  for (int j = 0; j < W; ++j) b |= (unsigned)(m[j] < 0) << j;
  return b;
#endif
}

}  // namespace simd
}  // namespace llmkern
