// Sorting-free top-k / top-p / min-p sampling: the algorithm shared by the CPU and CUDA kernels.
//
// Per row, with y = (logit + bias, masked, NaN -> -inf) / temperature and m = max(y):
//   e_i  = exp(y_i - m) in [0, 1]; its mass is kept as fixed point (e * 2^40, uint64) so that
//          sums are exact and independent of summation order (thread count, block shape).
//   key_i = an order-preserving uint32 image of y_i; every filter keeps an upper set of keys.
//   top-k : tau_k = k-th largest key (ties at the k-th value kept, as Hugging Face does).
//   top-p : over keys >= tau_k, tau_p = the key v with  mass(key > v) < p * Z_k <= mass(key >= v).
//   min-p : keep e_i >= min_p (e of the max is 1, so this is p_i >= min_p * p_max).
// No sort of the vocabulary. The thresholds end in a three-level radix walk over the keys
// (11 + 11 + 10 bits) of a few candidates (the CPU sorts them instead when they are 128 or fewer:
// the same answer); how the candidates are found differs by kernel:
//   CPU  small top-k: a running-threshold filter (k-th largest so far) over the row;
//        top-p alone: a pivot search on e with exact vectorised mass counts (3 pivots a pass, two
//        passes) brackets the threshold; large top-k: a level-1 count histogram over the row.
//   CUDA level-1 count / mass histograms in shared memory, then the boundary bucket's candidates;
//        at small batch the max and the histograms come from a prepass with several blocks per row.
// The draw is an inverse-CDF walk in token order with one uniform per row from Philox-4x32-10
// keyed by (seed, position): reproducible, independent of the batch.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace llmkern {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct SampleArgs {
  const void* logits = nullptr;  // [B, V], row stride logits_stride (elements), unit column stride
  DType dtype = DType::F32;
  int64_t B = 0, V = 0, logits_stride = 0;
  const float* bias = nullptr;  // optional [B, V] (bias_stride = V) or [V] (bias_stride = 0)
  int64_t bias_stride = 0;
  const uint8_t* allowed = nullptr;  // optional bool [B, V] or [V]
  int64_t allowed_stride = 0;
  const float* temperature = nullptr;  // [B]; 0 = greedy
  const int64_t* top_k = nullptr;      // [B]; 0 = off
  const float* top_p = nullptr;        // [B]; 1 = off
  const float* min_p = nullptr;        // [B]; 0 = off
  const int64_t* seed = nullptr;       // [B]
  const int64_t* position = nullptr;   // [B]
  int64_t* tokens = nullptr;           // out [B]
  float* logprobs = nullptr;           // out [B]
  bool* valid = nullptr;               // out [B]
  uint64_t* split = nullptr;  // CUDA, small batch: zeroed scratch of split_words(B) words, or null
  int split_slices = 0;       // blocks per row of the split prepass (0: one block per row, no prepass)
};

struct FilterArgs {
  const void* logits = nullptr;  // [B, V]
  void* out = nullptr;           // [B, V] contiguous, same dtype
  DType dtype = DType::F32;
  int64_t B = 0, V = 0, logits_stride = 0;
  const int64_t* top_k = nullptr;
  const float* top_p = nullptr;
  const float* min_p = nullptr;
  float filter_value = 0.f;     // written for fp32 rows
  uint16_t filter_bits16 = 0;   // the same value's bits in fp16/bf16
  uint64_t* split = nullptr;    // as in SampleArgs
  int split_slices = 0;
};

// Log-probabilities as serving engines report them (llmkern.top_logprobs): per row, under
// softmax(logits / temperature) with NaN -> -inf, the n most likely tokens (descending, lowest id
// first on ties) and, with tokens, each token's logprob and rank (1 + #logits strictly larger).
// CPU only: on CUDA the Python op composes torch ops (see llmkern/ops/sampling.py).
struct LogprobArgs {
  const void* logits = nullptr;  // [B, V], row stride logits_stride (elements), unit column stride
  DType dtype = DType::F32;
  int64_t B = 0, V = 0, logits_stride = 0;
  const float* temperature = nullptr;  // [B], > 0
  int64_t n = 0;                       // 0 <= n <= V
  const int64_t* tokens = nullptr;     // optional [B], in [0, V)
  int64_t* top_ids = nullptr;          // out [B, n]
  float* top_logprobs = nullptr;       // out [B, n]
  float* token_logprobs = nullptr;     // out [B] (with tokens)
  int64_t* token_ranks = nullptr;      // out [B] (with tokens)
};

void sample_cpu(const SampleArgs& a);
void filter_cpu(const FilterArgs& a);
void logprobs_cpu(const LogprobArgs& a);
// CUDA launchers (csrc/cuda/sampling.cu); `stream` is a cudaStream_t.
void sample_cuda(const SampleArgs& a, void* stream);
void filter_cuda(const FilterArgs& a, void* stream);
int cuda_sm_count();  // of the current device

// ---- pieces shared by both kernels -------------------------------------------------------

constexpr int kBits1 = 11, kBits2 = 11, kBits3 = 10;  // radix digits, high to low
constexpr int kBins = 1 << 11;

// CUDA at small batch: the row passes that need no threshold yet (max and argmax; the level-1
// histograms) run as a prepass over `split_slices` blocks per row, so that a few rows still fill
// the GPU; the per-row kernel then starts from their merged (integer, order-free) results.
// Scratch layout, in 64-bit words: best[B], z[B], mass[B][kBins], cnt[B][kBins] (32-bit entries).
inline int64_t split_words(int64_t B) { return B * (2 + kBins + kBins / 2); }
// Blocks per row: about two blocks per SM over the whole batch, each slice at least 8K elements.
inline int split_slices_for(int64_t B, int64_t V, int sm_count) {
  if (B <= 0 || V < 16384 || 2 * B >= sm_count) return 0;
  const int64_t want = (2 * (int64_t)sm_count + B - 1) / B, cap = V / 8192;
  const int64_t s = want < cap ? want : cap;
  return s >= 2 ? (int)s : 0;
}
constexpr double kMassScale = 1099511627776.0;  // 2^40
constexpr float kMassScaleF = 1099511627776.0f;

LK_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } c;
  c.f = f;
  return c.u;
}

LK_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } c;
  c.u = u;
  return c.f;
}

// Order-preserving map float -> uint32 (NaN must have been replaced by -inf before).
LK_HD uint32_t order_key(float y) {
  uint32_t b = float_bits(y);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

LK_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    float f = (float)man * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -f : f;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

LK_HD float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

LK_HD float load_logit(const void* p, DType dt, int64_t i) {
  if (dt == DType::F32) return static_cast<const float*>(p)[i];
  if (dt == DType::F16) return half_to_float(static_cast<const uint16_t*>(p)[i]);
  return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// Philox-4x32-10 (Salmon et al., SC'11): counter (position) and key (seed) -> 4 random words.
LK_HD void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c[0];
    uint64_t p1 = (uint64_t)0xCD9E8D57u * c[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// One uniform double in [0, 1) with 53 random bits for the row keyed by (seed, position).
LK_HD double row_uniform(int64_t seed, int64_t position) {
  uint32_t c[4] = {(uint32_t)position, (uint32_t)((uint64_t)position >> 32), 0x5a4d504cu, 0u};
  philox4x32(c, (uint32_t)seed, (uint32_t)((uint64_t)seed >> 32));
  uint64_t hi = c[0] >> 5, lo = c[1] >> 6;  // 27 + 26 bits
  return (double)(hi * 67108864ull + lo) * (1.0 / 9007199254740992.0);
}

// The target of the inverse-CDF walk: an integer in [0, total).
LK_HD uint64_t draw_target(double u, uint64_t total) {
  uint64_t t = (uint64_t)(u * (double)total);
  return t >= total ? total - 1 : t;
}

}  // namespace llmkern
