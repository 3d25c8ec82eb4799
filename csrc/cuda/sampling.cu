// CUDA kernel of sorting-free top-k / top-p / min-p sampling and filtering (see sampling.h).
//
// The same algorithm as csrc/cpu/sampling.cpp, bit for bit: one thread block (512 threads) per
// row; every pass recomputes y = transform(logits) from the row with 16-byte loads (nothing of
// size V is stored). The row is split into one contiguous chunk per warp.
//
//   P1  transform, max (and the lowest-index argmax); the level-1 count histogram with top-k.
//   P2  (top-p without top-k) exp, total fixed-point mass, level-1 mass and count histograms.
//   G   gather into a shared-memory candidate list (key, index; kCandCap entries):
//       - when the keys of level-1 digit >= the boundary bucket's fit (their number is known
//         from the count histogram): all of them. Radix levels 2-3, the top-p step after top-k
//         (levels 1-3 over the top-k survivors) and the draw then run on the list: no further
//         pass over the row.
//       - otherwise the boundary bucket, plus the kept mass above it per warp chunk. A bucket
//         known to overflow the list gets its level-2 histogram in the same pass and a second
//         gather of its level-2 bucket; only when that overflows too (e.g. all-equal rows) does
//         level 3 run as a pass over the row.
//   P5  (only when the list does not hold the kept set) kept mass per warp chunk.
//   P6  the draw: the chunk holding the target is split over the block's threads; a block-wide
//       exclusive scan in token order finds the thread, which walks its few elements. When the
//       list holds all kept elements and they are few (<= 512), each thread takes one and sums
//       the masses of those before it in token order instead.
// Typical pass counts over the row: top-k and/or top-p with a small kept set 2 (P1, G; +P2 for
// top-p alone) plus 1/16 of a row for P6 when the kept set is large; greedy 2; min-p only 2.
// The filter op: P1, P2, G as above, then one read/write pass.
// Small batch (fewer rows than half the SMs): P1 and P2 run first as a split prepass, several
// blocks per row (split_max_kernel, split_exp_kernel), merged with integer atomics in a zeroed
// global scratch; the row's block then loads the max and the histograms instead of those passes.
//
// Determinism: all sums are integer (fixed-point masses, integer shared-memory atomics), so the
// result does not depend on thread scheduling. Bit-exactness with the CPU kernel: the build uses
// --use_fast_math (flush-to-zero, approximate division, FMA contraction), so every float
// operation whose rounding matters goes through inline PTX with IEEE rounding and no FTZ
// (f_add, f_mul, f_div, ...); comparisons go through order keys or non-FTZ setp.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "sampling.h"

namespace llmkern {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kCandCap = 6144;               // candidates (key, index) kept in shared memory
constexpr int kListDraw = kThreads;          // the draw runs on the list up to this many kept
constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf)
constexpr uint32_t kNegZeroKey = 0x7fffffffu;  // order_key(-0.0f)
constexpr uint32_t kPosZeroKey = 0x80000000u;  // order_key(+0.0f)

// ---- exact float arithmetic (IEEE round-to-nearest, no flush-to-zero, no contraction) -------

__device__ __forceinline__ float f_add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ bool f_ge(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.ge.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool f_gt(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool f_lt(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool f_eq(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.eq.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
// (uint64_t)x for x >= 0: truncation, no flush-to-zero.
__device__ __forceinline__ uint64_t f_to_u64(float a) {
  unsigned long long r;
  asm("cvt.rzi.u64.f32 %0, %1;" : "=l"(r) : "f"(a));
  return r;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ bool is_nan(float v) {
  return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}
// Inverse of order_key.
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// exp(x) for x <= 0: the CPU kernel's Cephes polynomial, operation for operation.
__device__ __forceinline__ float exp_nonpos(float x) {
  x = f_lt(x, -87.0f) ? -87.0f : x;
  const float n = f_sub(f_add(f_mul(x, 1.44269504088896341f), 12582912.0f), 12582912.0f);
  float r = f_sub(x, f_mul(n, 0.693359375f));
  r = f_sub(r, f_mul(n, -2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = f_add(f_mul(p, r), 1.3981999507e-3f);
  p = f_add(f_mul(p, r), 8.3334519073e-3f);
  p = f_add(f_mul(p, r), 4.1665795894e-2f);
  p = f_add(f_mul(p, r), 1.6666665459e-1f);
  p = f_add(f_mul(p, r), 5.0000001201e-1f);
  const float yv = f_add(f_add(f_mul(f_mul(p, r), r), r), 1.0f);
  const int32_t scale = ((int32_t)n + 127) << 23;
  return f_mul(yv, __int_as_float(scale));
}

// e = exp(y - m), exactly 1 at the maximum (covers m = +inf).
__device__ __forceinline__ float e_of(float y, float m) {
  return f_eq(y, m) ? 1.0f : exp_nonpos(f_sub(y, m));
}
__device__ __forceinline__ uint64_t mass_of(float e) { return f_to_u64(f_mul(e, kMassScaleF)); }
__device__ __forceinline__ uint64_t mass_of_key(uint32_t key, float m) {
  return mass_of(e_of(key_float(key), m));
}

__device__ __forceinline__ uint32_t digit(uint32_t key, int level) {
  if (level == 1) return key >> (32 - kBits1);
  if (level == 2) return (key >> kBits3) & ((1u << kBits2) - 1);
  return key & ((1u << kBits3) - 1);
}

// ---- loads ----------------------------------------------------------------------------------

template <DType DT>
__device__ __forceinline__ float load_x(const void* p, int i) {
  if constexpr (DT == DType::F32) {
    return __ldg(static_cast<const float*>(p) + i);
  } else {
    const uint16_t h = __ldg(static_cast<const unsigned short*>(p) + i);
    return DT == DType::F16 ? half_to_float(h) : bf16_to_float(h);
  }
}

// One row of the (transformed) logits.
struct Row {
  const void* x = nullptr;
  const float* bias = nullptr;
  const uint8_t* allowed = nullptr;
  float temperature = 1.f;
  bool divide = false;
};

// The transform of one loaded logit x_i: bias, mask, temperature, NaN -> -inf, -0 -> +0 (as the
// CPU's clean_max / key_of: -0 and +0 are one value, so every order key of y must fold them; -0
// comes from the input or from a division, e.g. any negative logit at temperature +inf).
// Plain: the row has no bias, no mask and no temperature division (checked once per pass by
// for_row), so the per-element tests and their branches drop out of the row loops.
template <bool Plain>
__device__ __forceinline__ float transform(const Row& R, float v, int i) {
  if constexpr (!Plain) {
    if (R.bias) v = f_add(v, __ldg(R.bias + i));
    if (R.allowed && !__ldg(R.allowed + i)) v = neg_inf();
    if (R.divide) v = f_div(v, R.temperature);  // division, as HF does
  }
  return is_nan(v) ? neg_inf() : f_add(v, 0.0f);  // (asm add: not folded away under fast math)
}
__device__ __forceinline__ bool plain_row(const Row& R) { return !R.bias && !R.allowed && !R.divide; }

template <DType DT, bool Plain = false>
__device__ __forceinline__ float row_y(const Row& R, int i) {
  return transform<Plain>(R, load_x<DT>(R.x, i), i);
}

// 16-byte loads of the logits: kVec elements each, kPer elements per lane and loop step.
template <DType DT>
constexpr int kVec = DT == DType::F32 ? 4 : 8;
constexpr int kPer = 8;

// The row is split into one contiguous chunk per warp. Chunk boundaries (but the first and the
// last) sit on 16-byte boundaries of the row, so each chunk is a scalar head (first chunk only,
// up to the first aligned element h), a body of 16-byte vectors and a scalar tail (last one).
struct Chunk {
  int lo, hi;    // [lo, hi)
  int a, be;     // the vector body [a, be)
};
template <DType DT>
__device__ __forceinline__ Chunk warp_chunk(const Row& R, int V, int w) {
  constexpr int eb = DT == DType::F32 ? 4 : 2;
  const int mis = (int)(reinterpret_cast<uintptr_t>(R.x) & 15);
  const int h = min(V, ((16 - mis) & 15) / eb);  // first 16-byte aligned element
  const int per = (V - h + kWarps - 1) / kWarps;
  const int c = (per + kVec<DT> - 1) / kVec<DT> * kVec<DT>;
  Chunk ch;
  ch.lo = w == 0 ? 0 : min(V, h + w * c);
  ch.hi = w == kWarps - 1 ? V : min(V, h + (w + 1) * c);
  ch.a = min(ch.hi, max(ch.lo, h));
  ch.be = ch.a + (ch.hi - ch.a) / kVec<DT> * kVec<DT>;
  return ch;
}

// The warp chunk holding element i (the inverse of warp_chunk).
template <DType DT>
__device__ __forceinline__ int chunk_of(const Row& R, int V, int i) {
  constexpr int eb = DT == DType::F32 ? 4 : 2;
  const int mis = (int)(reinterpret_cast<uintptr_t>(R.x) & 15);
  const int h = min(V, ((16 - mis) & 15) / eb);
  const int per = (V - h + kWarps - 1) / kWarps;
  const int c = (per + kVec<DT> - 1) / kVec<DT> * kVec<DT>;
  if (c == 0 || i < h + c) return 0;
  return min(kWarps - 1, (i - h) / c);
}

// Calls f(i, y, valid) for every element of this warp's chunk. The loop is uniform over the
// warp's lanes (all 32 lanes call f the same number of times, `valid` false where there is no
// element), with 16-byte loads, kPer elements per lane in flight.
template <DType DT, bool Plain, class F>
__device__ __forceinline__ void for_row_impl(const Row& R, int V, F&& f) {
  const int lane = threadIdx.x & 31;
  const Chunk ch = warp_chunk<DT>(R, V, threadIdx.x >> 5);
  {  // head [lo, a) on lanes 0..7, tail [be, hi) on lanes 8..15 (each under kVec elements)
    int i = -1;
    if (lane < ch.a - ch.lo) i = ch.lo + lane;
    else if (lane >= 8 && lane - 8 < ch.hi - ch.be) i = ch.be + lane - 8;
    const bool ok = i >= 0;
    const float y = ok ? row_y<DT, Plain>(R, i) : neg_inf();
    f(ok ? i : 0, y, ok);
  }
  constexpr int V1 = kVec<DT>;
  for (int base = ch.a; base < ch.be; base += 32 * kPer) {
    constexpr int NV = kPer / V1;  // 16-byte vectors per lane and step
    float y[kPer];
    bool ok[kPer];
    int idx[kPer];
    // Every vector's load is issued before any is used, so a lane has NV loads in flight
    // rather than one load's latency per vector.
    uint4 raw[NV];
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      const int vi = base + (q * 32 + lane) * V1;  // first element of this lane's vector
      raw[q] = make_uint4(0u, 0u, 0u, 0u);
      if (vi < ch.be)                              // (be - vi is a multiple of kVec)
        raw[q] = __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(R.x) + (size_t)vi * (16 / V1)));
    }
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      const int vi = base + (q * 32 + lane) * V1;
      const bool vok = vi < ch.be;
      float x[V1];
      const uint32_t w4[4] = {raw[q].x, raw[q].y, raw[q].z, raw[q].w};
      if constexpr (DT == DType::F32) {
#pragma unroll
        for (int t = 0; t < 4; ++t) x[t] = __uint_as_float(w4[t]);
      } else {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const uint16_t hbits = (uint16_t)(w4[t >> 1] >> ((t & 1) * 16));
          x[t] = DT == DType::F16 ? half_to_float(hbits) : bf16_to_float(hbits);
        }
      }
#pragma unroll
      for (int t = 0; t < V1; ++t) {
        const int u = q * V1 + t;
        idx[u] = vi + t;
        ok[u] = vok;
        y[u] = vok ? transform<Plain>(R, x[t], vi + t) : neg_inf();
      }
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) f(idx[u], y[u], ok[u]);
  }
}
template <DType DT, class F>
__device__ __forceinline__ void for_row(const Row& R, int V, F&& f) {
  if (plain_row(R)) for_row_impl<DT, true>(R, V, f);
  else for_row_impl<DT, false>(R, V, f);
}

// ---- shared memory and block-wide helpers -----------------------------------------------------

struct Smem {
  unsigned long long mass[kBins];  // mass histogram (fixed point)
  uint32_t cnt[kBins];             // count histogram
  uint32_t cand[kCandCap];         // candidate keys
  uint32_t cidx[kCandCap];         // their token indices
  unsigned long long wscr[kWarps][32];
  unsigned long long red[kWarps];
  unsigned long long wsum[kWarps];
  unsigned long long wdef[kWarps];
  unsigned long long above;
  int bucket;
  int ncand;
  int nkept;
  int token;
  float ytok;
};

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

__device__ unsigned long long block_sum(unsigned long long v, Smem& S) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) S.red[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int w = 0; w < kWarps; ++w) t += S.red[w];
  __syncthreads();
  return t;
}

__device__ unsigned long long block_max(unsigned long long v, Smem& S) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) S.red[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int w = 0; w < kWarps; ++w) t = S.red[w] > t ? S.red[w] : t;
  __syncthreads();
  return t;
}

// Exclusive prefix sum over the threads in thread order; *total gets the block's sum.
__device__ unsigned long long block_excl_scan(unsigned long long v, Smem& S,
                                              unsigned long long* total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  unsigned long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) S.red[w] = inc;
  __syncthreads();
  unsigned long long pre = 0, tot = 0;
  for (int j = 0; j < kWarps; ++j) {
    const unsigned long long s = S.red[j];
    pre += j < w ? s : 0ull;
    tot += s;
  }
  __syncthreads();
  *total = tot;
  return pre + inc - v;
}

// Warp-aggregated histogram update: lanes with the same bin combine before one atomic.
// Must be called by all 32 lanes of the warp together.
// mode 0: counts (S.cnt), 1: masses (S.mass), 2: both.
__device__ __forceinline__ void hist_add(bool ok, uint32_t bin, unsigned long long w, int mode,
                                         Smem& S) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned g = __match_any_sync(0xffffffffu, ok ? bin : 0xffffffffu);
  const bool leader = ok && lane == __ffs(g) - 1;
  if (mode != 1 && leader) atomicAdd(&S.cnt[bin], (uint32_t)__popc(g));
  if (mode != 0) {
    S.wscr[warp][lane] = w;
    __syncwarp();
    if (leader) {
      unsigned long long s = 0;
      for (unsigned mm = g; mm; mm &= mm - 1) s += S.wscr[warp][__ffs(mm) - 1];
      atomicAdd(&S.mass[bin], s);
    }
    __syncwarp();
  }
}

// The CPU's find_bucket, block-wide: the largest bucket b with (weight of buckets >= b) >= target
// (b = 0 if none); *above = the weight of the buckets above b. Weights in S.mass or S.cnt.
__device__ int find_bucket(Smem& S, bool by_mass, int bins, unsigned long long target,
                           unsigned long long* above) {
  const int per = bins / kThreads;
  const int lo = threadIdx.x * per;
  unsigned long long s = 0;
  for (int j = 0; j < per; ++j) s += by_mass ? S.mass[lo + j] : (unsigned long long)S.cnt[lo + j];
  unsigned long long tot;
  const unsigned long long excl = block_excl_scan(s, S, &tot);
  const unsigned long long suf = tot - excl - s;  // weight of the buckets above my range
  if (suf < target && target <= suf + s) {
    unsigned long long acc = suf;
    for (int b = lo + per - 1; b >= lo; --b) {
      const unsigned long long wb = by_mass ? S.mass[b] : (unsigned long long)S.cnt[b];
      if (acc + wb >= target) {
        S.bucket = b;
        S.above = acc;
        break;
      }
      acc += wb;
    }
  } else if (threadIdx.x == 0 && tot < target) {
    S.bucket = 0;
    S.above = tot - (by_mass ? S.mass[0] : (unsigned long long)S.cnt[0]);
  }
  __syncthreads();
  const int b = S.bucket;
  *above = S.above;
  __syncthreads();
  return b;
}

// Candidate predicates: level-1 digit == val (kind 0), key >= val (kind 1), or the level-1 and
// level-2 digits == val (kind 2).
constexpr int kDigit1 = 0, kAtLeast = 1, kDigit12 = 2;
__device__ __forceinline__ int pred_shift(int kind) { return kind == kDigit1 ? 32 - kBits1 : kBits3; }
__device__ __forceinline__ bool pred(uint32_t key, int kind, uint32_t val) {
  return kind == kAtLeast ? key >= val : (key >> pred_shift(kind)) == val;
}

__device__ __forceinline__ void clear_hist(Smem& S) {
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    S.cnt[b] = 0;
    S.mass[b] = 0;
  }
}

// Gathers the keys that satisfy the predicate into S.cand (up to kCandCap); returns their
// number. With `want_mass`, *z gets their total mass. With hist2 >= 0 (a kind-0 predicate that
// is known to overflow the list), the pass also builds the level-2 histogram of the hits
// (0: counts, 1: masses), so that the radix walk continues at level 3. With `def` (kinds 0
// and 2), S.wdef[w] gets the mass, per warp chunk, of the elements above the bucket (certainly
// kept: the threshold lies in the bucket) with e >= min_p.
template <DType DT>
__device__ int gather(const Row& R, int V, float m, int kind, uint32_t val, bool want_mass,
                      unsigned long long* z, Smem& S, int hist2 = -1, bool def = false,
                      float min_p = 0.f) {
  const bool want_def = def && kind != kAtLeast;
  unsigned long long dsum = 0;

  if (hist2 >= 0) {
    __syncthreads();  // the caller's reads of the histograms are done
    clear_hist(S);
  }
  if (threadIdx.x == 0) S.ncand = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  unsigned long long my = 0;
  for_row<DT>(R, V, [&](int i, float y, bool ok) {
    const uint32_t key = order_key(y);
    const bool hit = ok && pred(key, kind, val);
    if (want_def && ok && (key >> pred_shift(kind)) > val) {
      const float e = e_of(y, m);
      dsum += f_ge(e, min_p) ? mass_of(e) : 0ull;
    }
    const unsigned bal = __ballot_sync(0xffffffffu, hit);
    if (bal == 0) return;
    if (hist2 >= 0)
      hist_add(hit, digit(key, 2), (hist2 == 1 && hit) ? mass_of(e_of(y, m)) : 0ull, hist2, S);
    int base = 0;
    if (lane == 0) base = atomicAdd(&S.ncand, __popc(bal));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (hit) {
      const int slot = base + __popc(bal & ((1u << lane) - 1));
      if (slot < kCandCap) {
        S.cand[slot] = key;
        S.cidx[slot] = (uint32_t)i;
      }
      if (want_mass) my += mass_of(e_of(y, m));
    }
  });
  if (want_def) {
    dsum = warp_sum(dsum);
    if (lane == 0) S.wdef[threadIdx.x >> 5] = dsum;
  }
  __syncthreads();
  const int n = S.ncand;
  if (want_mass) *z = block_sum(my, S);
  __syncthreads();
  return n;
}

// The histogram of radix level `level` over the candidates (see refine).
template <DType DT>
__device__ void build_level_hist(const Row& R, int V, float m, int ncand, bool from_list, int kind,
                                 uint32_t val, int level, uint32_t prefix, bool by_mass, Smem& S) {
  const int bins = level == 3 ? (1 << kBits3) : kBins;
  const int shift = level == 2 ? (32 - kBits1) : kBits3;  // key >> shift == prefix
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (by_mass) S.mass[b] = 0;
    else S.cnt[b] = 0;
  }
  __syncthreads();
  auto add = [&](bool ok, uint32_t key) {
    ok = ok && pred(key, kind, val) && (level == 1 || (key >> shift) == prefix);
    const unsigned long long w = (ok && by_mass) ? mass_of_key(key, m) : 0ull;
    hist_add(ok, ok ? digit(key, level) : 0u, w, by_mass ? 1 : 0, S);
  };
  if (from_list) {
    for (int j0 = (threadIdx.x & ~31); j0 < ncand; j0 += kThreads) {
      const int j = j0 + (threadIdx.x & 31);
      const bool ok = j < ncand;
      add(ok, ok ? S.cand[j] : 0u);
    }
  } else {
    for_row<DT>(R, V, [&](int, float y, bool ok) { add(ok, order_key(y)); });
  }
  __syncthreads();
}

// Radix levels `level`..3 over the candidates (the list, or the row when it overflowed), among
// the keys that satisfy the predicate and match `prefix` on the digits above `level`. Returns
// the exact key where the running weight (count or mass, from the top) reaches `target`.
// `prebuilt`: the histogram of the first level is already in shared memory (see gather).
template <DType DT>
__device__ uint32_t refine(const Row& R, int V, float m, int ncand, int kind, uint32_t val,
                           int level, uint32_t prefix, unsigned long long target, bool by_mass,
                           Smem& S, bool prebuilt = false) {
  const bool from_list = ncand <= kCandCap;
  for (; level <= 3; ++level, prebuilt = false) {
    if (!prebuilt) build_level_hist<DT>(R, V, m, ncand, from_list, kind, val, level, prefix,
                                        by_mass, S);
    const int bins = level == 3 ? (1 << kBits3) : kBins;
    unsigned long long above = 0;
    const int b = find_bucket(S, by_mass, bins, target, &above);
    target -= above;
    prefix = (prefix << (level == 3 ? kBits3 : kBits2)) | (uint32_t)b;
  }
  return prefix;
}

// P1: y, max key (as a lowest-index argmax) and, with top-k, the level-1 count histogram.
// Returns the packed (key, ~index) maximum; 0 only for an empty row.
template <DType DT>
__device__ unsigned long long pass_max(const Row& R, int V, bool count_hist, Smem& S, int base = 0) {
  unsigned long long best = 0;
  for_row<DT>(R, V, [&](int i, float y, bool ok) {
    const uint32_t key = order_key(y);
    if (count_hist) hist_add(ok, key >> (32 - kBits1), 0ull, 0, S);
    const uint32_t akey = key == kNegZeroKey ? kPosZeroKey : key;  // -0 == +0
    const unsigned long long pk = ((unsigned long long)akey << 32) | (uint32_t)~(uint32_t)(base + i);
    if (ok && pk > best) best = pk;
  });
  return block_max(best, S);
}

// P2 over a row (or a slice of one): e, the total fixed-point mass (returned) and the level-1 mass
// and count histograms in S (cleared by the caller). Its final barrier ends the histograms.
template <DType DT>
__device__ unsigned long long p2_slice(const Row& R, int V, float m, Smem& S) {
  unsigned long long my = 0;
  for_row<DT>(R, V, [&](int, float y, bool ok) {
    const unsigned long long w = ok ? mass_of(e_of(y, m)) : 0ull;
    my += w;
    hist_add(ok, order_key(y) >> (32 - kBits1), w, 2, S);
  });
  return block_sum(my, S);
}

// Elements counted in the buckets >= b of the count histogram.
__device__ unsigned long long count_from(Smem& S, int b) {
  unsigned long long c = 0;
  for (int j = threadIdx.x; j < kBins; j += kThreads) c += j >= b ? S.cnt[j] : 0u;
  return block_sum(c, S);
}

// One row's part of the split prepass's scratch (see split_words in sampling.h).
struct SplitRow {
  unsigned long long* best;  // max over the row of (key << 32 | ~index); 0 = not written
  unsigned long long* z;     // total fixed-point mass (top-p rows)
  unsigned long long* mass;  // level-1 mass histogram [kBins] (top-p rows)
  uint32_t* cnt;             // level-1 count histogram [kBins]
};
__device__ __forceinline__ SplitRow split_row(uint64_t* buf, int64_t B, int64_t r) {
  unsigned long long* w = reinterpret_cast<unsigned long long*>(buf);
  SplitRow sr;
  sr.best = w + r;
  sr.z = w + B + r;
  sr.mass = w + 2 * B + r * kBins;
  sr.cnt = reinterpret_cast<uint32_t*>(w + 2 * B + B * kBins) + r * kBins;
  return sr;
}

// Loads the prepass's histograms into shared memory (masses too with `with_mass`).
__device__ void load_hist(const SplitRow& sr, bool with_mass, Smem& S) {
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    S.cnt[b] = sr.cnt[b];
    S.mass[b] = with_mass ? sr.mass[b] : 0ull;
  }
  __syncthreads();
}

// What the candidate list tells about the kept set once the threshold is known.
constexpr int kListNone = 0;      // nothing: the draw needs a pass over the row
constexpr int kListAll = 1;       // the list holds every kept element
constexpr int kListBoundary = 2;  // the list holds the threshold's bucket; S.wdef the mass above

// After a kind-0 gather of level-1 bucket b (n hits; with `over`, n > kCandCap and the gather
// built the level-2 histogram): radix levels 2 and 3. On overflow, the level-2 bucket is
// gathered in a second pass (kind 2); level 3 then runs on the list unless that overflows too.
template <DType DT>
__device__ uint32_t walk_bucket(const Row& R, int V, float m, uint32_t b, int n, bool over,
                                unsigned long long target, bool by_mass, bool def, float min_p,
                                Smem& S, int* list_n, int* mode) {
  if (!over) {
    *list_n = n;
    *mode = kListBoundary;
    return refine<DT>(R, V, m, n, kDigit1, b, 2, b, target, by_mass, S);
  }
  unsigned long long above = 0;
  const int b2 = find_bucket(S, by_mass, kBins, target, &above);
  const uint32_t prefix = (b << kBits2) | (uint32_t)b2;
  const int n2 = gather<DT>(R, V, m, kDigit12, prefix, false, nullptr, S, -1, def, min_p);
  *list_n = n2;
  *mode = n2 <= kCandCap ? kListBoundary : kListNone;
  return refine<DT>(R, V, m, n2, kDigit12, prefix, 3, prefix, target - above, by_mass, S);
}

// The CPU's find_threshold after P1 (which built the count histogram when top-k is on).
// The boundary bucket's gather takes every key of level-1 digit >= the bucket's when they fit
// in the list (their number is known from the count histogram): the top-p step after top-k then
// needs no pass over the row, and the draw can run on the list. Otherwise the gather takes the
// bucket and, with `def` (for the draw), the kept mass above it per warp chunk.
// *mode and *list_n say what the candidate list holds at the end (kList*).
template <DType DT>
__device__ uint32_t find_threshold(const Row& R, int V, float m, int64_t top_k, float top_p,
                                   float min_p, bool def, Smem& S, int* list_n, int* mode,
                                   const SplitRow* split) {
  const bool use_k = top_k > 0 && top_k < V;
  const bool use_p = f_lt(top_p, 1.f);
  *list_n = 0;
  *mode = kListNone;
  if (!use_k && !use_p) return 0u;
  unsigned long long above = 0, target = 0;
  int b = 0;
  bool wide = false, over = false;
  const bool by_mass = !use_k;
  def = def && !(use_k && use_p);  // with top-p after top-k, the mass above the top-k bucket is moot
  if (use_k) {
    target = (unsigned long long)top_k;
    b = find_bucket(S, false, kBins, target, &above);
    const uint32_t cb = S.cnt[b];
    wide = above + cb <= (unsigned long long)kCandCap;
    over = cb > (uint32_t)kCandCap;
  } else {
    // P2: exp, total mass, level-1 mass and count histograms (done by the prepass when split).
    unsigned long long z_all;
    if (split) {
      load_hist(*split, true, S);
      z_all = *split->z;
    } else {
      clear_hist(S);
      __syncthreads();
      z_all = p2_slice<DT>(R, V, m, S);
    }
    target = (unsigned long long)ceil((double)top_p * (double)z_all);
    target = target < 1 ? 1 : target;
    b = find_bucket(S, true, kBins, target, &above);
    wide = count_from(S, b) <= (unsigned long long)kCandCap;
    over = S.cnt[b] > (uint32_t)kCandCap;
  }
  uint32_t tau;
  int n;
  if (wide) {  // every key of digit >= b: the list holds every kept element
    n = gather<DT>(R, V, m, kAtLeast, (uint32_t)b << (32 - kBits1), false, nullptr, S);
    tau = refine<DT>(R, V, m, n, kDigit1, (uint32_t)b, 2, (uint32_t)b, target - above, by_mass, S);
    *list_n = n;
    *mode = kListAll;
  } else {
    n = gather<DT>(R, V, m, kDigit1, (uint32_t)b, false, nullptr, S, over ? (by_mass ? 1 : 0) : -1,
                   def, min_p);
    tau = walk_bucket<DT>(R, V, m, (uint32_t)b, n, over, target - above, by_mass, def, min_p, S,
                          list_n, mode);
    if (!def && *mode == kListBoundary) *mode = kListNone;
  }
  if (!(use_k && use_p)) return tau;

  // top-p renormalises over the top-k survivors (keys >= tau)
  unsigned long long zk = 0;
  if (wide) {  // they are all in the list
    unsigned long long my = 0;
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const uint32_t key = S.cand[j];
      my += key >= tau ? mass_of_key(key, m) : 0ull;
    }
    zk = block_sum(my, S);
  } else {
    n = gather<DT>(R, V, m, kAtLeast, tau, true, &zk, S);
  }
  unsigned long long tp = (unsigned long long)ceil((double)top_p * (double)zk);
  tp = tp < 1 ? 1 : tp;
  const uint32_t tau_p = refine<DT>(R, V, m, n, kAtLeast, tau, 1, 0u, tp, true, S);
  *list_n = n;
  *mode = n <= kCandCap ? kListAll : kListNone;
  return tau_p;
}

__device__ __forceinline__ bool kept(float y, float e, uint32_t tau, float min_p) {
  return order_key(y) >= tau && f_ge(e, min_p);
}

// ---- kernels ------------------------------------------------------------------------------

template <DType DT>
constexpr int64_t kElem = DT == DType::F32 ? 4 : 2;

// Row r of the sampler's or the filter's input, with the transform that applies to it.
template <DType DT>
__device__ Row make_row(const SampleArgs& a, int64_t r) {
  Row R;
  R.x = static_cast<const char*>(a.logits) + r * a.logits_stride * kElem<DT>;
  R.bias = a.bias ? a.bias + r * a.bias_stride : nullptr;
  R.allowed = a.allowed ? a.allowed + r * a.allowed_stride : nullptr;
  R.temperature = a.temperature[r];
  R.divide = f_gt(R.temperature, 0.f) && !f_eq(R.temperature, 1.f);
  return R;
}
template <DType DT>
__device__ Row make_row(const FilterArgs& a, int64_t r) {
  Row R;
  R.x = static_cast<const char*>(a.logits) + r * a.logits_stride * kElem<DT>;
  return R;
}
__device__ __forceinline__ bool row_greedy(const SampleArgs& a, int64_t r) { return f_eq(a.temperature[r], 0.f); }
__device__ __forceinline__ bool row_greedy(const FilterArgs&, int64_t) { return false; }

// Elements [lo, hi) of a row as a row of their own (indices from 0).
template <DType DT>
__device__ Row slice_of(Row R, int lo) {
  R.x = static_cast<const char*>(R.x) + lo * kElem<DT>;
  if (R.bias) R.bias += lo;
  if (R.allowed) R.allowed += lo;
  return R;
}
// Slice s of ns: boundaries on multiples of 64 elements.
__device__ __forceinline__ int slice_lo(int V, int ns, int s) {
  return s >= ns ? V : min(V, (int)(((int64_t)V * s / ns) & ~(int64_t)63));
}

// This prepass block's row and slice [lo, hi) (grid: slices x rows).
struct SliceJob {
  int64_t r;
  int V, lo, hi;
  __device__ explicit SliceJob(int64_t vocab)
      : r(blockIdx.y), V((int)vocab), lo(slice_lo(V, gridDim.x, blockIdx.x)),
        hi(slice_lo(V, gridDim.x, blockIdx.x + 1)) {}
};

// Split prepass, part 1 (grid: slices x rows): max and argmax, and for top-k rows the level-1
// count histogram, merged over the slices with integer atomics (order-free, so deterministic).
template <DType DT, class Args>
__global__ void __launch_bounds__(kThreads, 2) split_max_kernel(Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& S = *reinterpret_cast<Smem*>(smem_raw);
  const SliceJob j(a.V);
  const int64_t r = j.r;
  const int V = j.V, lo = j.lo, hi = j.hi;
  const SplitRow sr = split_row(a.split, a.B, r);
  const bool use_k = !row_greedy(a, r) && a.top_k[r] > 0 && a.top_k[r] < V;
  if (use_k) {
    clear_hist(S);
    __syncthreads();
  }
  const unsigned long long best = pass_max<DT>(slice_of<DT>(make_row<DT>(a, r), lo), hi - lo, use_k, S, lo);
  if (threadIdx.x == 0 && best != 0) atomicMax(sr.best, best);
  if (use_k)
    for (int b = threadIdx.x; b < kBins; b += kThreads)
      if (S.cnt[b]) atomicAdd(sr.cnt + b, S.cnt[b]);
}

// Split prepass, part 2 (after part 1; rows with top-p and no top-k): P2 on each slice, merged.
template <DType DT, class Args>
__global__ void __launch_bounds__(kThreads, 2) split_exp_kernel(Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& S = *reinterpret_cast<Smem*>(smem_raw);
  const SliceJob j(a.V);
  const int64_t r = j.r;
  const int V = j.V, lo = j.lo, hi = j.hi;
  const bool use_k = a.top_k[r] > 0 && a.top_k[r] < V;
  if (row_greedy(a, r) || use_k || !f_lt(a.top_p[r], 1.f)) return;
  const SplitRow sr = split_row(a.split, a.B, r);
  const unsigned long long best = *sr.best;
  const uint32_t mkey = (uint32_t)(best >> 32);
  if (best == 0 || mkey == kNegInfKey) return;  // no finite logit: the row kernel stops early
  clear_hist(S);
  __syncthreads();
  const unsigned long long z = p2_slice<DT>(slice_of<DT>(make_row<DT>(a, r), lo), hi - lo, key_float(mkey), S);
  if (threadIdx.x == 0) atomicAdd(sr.z, z);
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (S.cnt[b]) atomicAdd(sr.cnt + b, S.cnt[b]);
    if (S.mass[b]) atomicAdd(sr.mass + b, S.mass[b]);
  }
}

// The split prepass's results for row r, or null when the launch is not split.
template <class Args>
__device__ __forceinline__ const SplitRow* split_of(const Args& a, int64_t r, SplitRow* sr) {
  if (a.split_slices <= 0) return nullptr;
  *sr = split_row(a.split, a.B, r);
  return sr;
}

// P1 of a row: the packed max (key << 32 | ~argmax), and with `use_k` the level-1 count histogram
// in S; from the prepass when the launch is split.
template <DType DT, class Args>
__device__ unsigned long long row_max(const Args& a, int64_t r, const Row& R, int V, bool use_k,
                                      const SplitRow* split, Smem& S) {
  if (split) {
    if (use_k) load_hist(*split, false, S);
    return *split->best;
  }
  if (use_k) {
    clear_hist(S);
    __syncthreads();
  }
  return pass_max<DT>(R, V, use_k, S);
}

template <DType DT>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(SampleArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& S = *reinterpret_cast<Smem*>(smem_raw);
  const int64_t r = blockIdx.x;
  const int V = (int)a.V;
  const Row R = make_row<DT>(a, r);
  const int64_t top_k = a.top_k[r];
  const float top_p = a.top_p[r];
  const float min_p = a.min_p[r];
  const bool greedy = row_greedy(a, r);
  const bool use_k = !greedy && top_k > 0 && top_k < V;
  const bool need_hist = !greedy && (use_k || f_lt(top_p, 1.f));
  SplitRow sr;
  const SplitRow* split = split_of(a, r, &sr);

  const unsigned long long best = row_max<DT>(a, r, R, V, use_k, split, S);
  const uint32_t mkey = (uint32_t)(best >> 32);
  if (best == 0 || mkey == kNegInfKey) {  // no finite logit
    if (threadIdx.x == 0) {
      a.tokens[r] = 0;
      a.logprobs[r] = neg_inf();
      a.valid[r] = false;
    }
    return;
  }
  const float m = key_float(mkey);
  const int argmax = (int)~(uint32_t)best;

  if (greedy) {
    unsigned long long my = 0;
    for_row<DT>(R, V, [&](int, float y, bool ok) { my += ok ? mass_of(e_of(y, m)) : 0ull; });
    const unsigned long long z_all = block_sum(my, S);
    if (threadIdx.x == 0) {
      a.tokens[r] = argmax;
      a.logprobs[r] = -(float)log((double)z_all / kMassScale);
      a.valid[r] = true;
    }
    return;
  }

  int list_n = 0, mode = kListNone;
  const uint32_t tau =
      need_hist ? find_threshold<DT>(R, V, m, top_k, top_p, min_p, true, S, &list_n, &mode, split) : 0u;

  if (mode == kListAll) {
    // Every kept element is in the list: compact the kept ones (index, mass) into the (now free)
    // histogram arrays; when they are few, each thread takes one and sums the masses of those
    // before it in token order: no further pass over the row.
    if (threadIdx.x == 0) S.nkept = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int j0 = threadIdx.x & ~31; j0 < list_n; j0 += kThreads) {
      const int j = j0 + lane;
      const bool ok = j < list_n;
      const uint32_t key = ok ? S.cand[j] : kNegInfKey;
      const float y = key_float(key);
      const float e = e_of(y, m);
      const bool hit = ok && kept(y, e, tau, min_p);
      const unsigned bal = __ballot_sync(0xffffffffu, hit);
      if (bal == 0) continue;
      int base = 0;
      if (lane == 0) base = atomicAdd(&S.nkept, __popc(bal));
      base = __shfl_sync(0xffffffffu, base, 0);
      const int slot = base + __popc(bal & ((1u << lane) - 1));
      if (hit && slot < kBins) {
        S.cnt[slot] = S.cidx[j];
        S.mass[slot] = mass_of(e);
      }
    }
    __syncthreads();
    const int nk = S.nkept;
    if (nk <= kListDraw) {
      const bool mine = (int)threadIdx.x < nk;
      const uint32_t idx = mine ? S.cnt[threadIdx.x] : 0u;
      const unsigned long long w = mine ? S.mass[threadIdx.x] : 0ull;
      unsigned long long before = 0, z_kept = 0;
      for (int j = 0; j < nk; ++j) {
        const unsigned long long wj = S.mass[j];
        z_kept += wj;
        before += S.cnt[j] < idx ? wj : 0ull;
      }
      const unsigned long long target = draw_target(row_uniform(a.seed[r], a.position[r]), z_kept);
      if (threadIdx.x == 0) S.token = -1;
      __syncthreads();
      if (mine && before <= target && target < before + w) {
        S.token = (int)idx;
        S.ytok = row_y<DT>(R, (int)idx);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int tok = S.token;
        float ytok = S.ytok;
        if (tok < 0) {  // unreachable: the kept set always holds the maximum (mass 2^40)
          tok = argmax;
          ytok = m;
        }
        a.tokens[r] = tok;
        a.logprobs[r] = f_sub(f_eq(ytok, m) ? 0.f : f_sub(ytok, m), (float)log((double)z_kept / kMassScale));
        a.valid[r] = true;
      }
      return;
    }
  }

  if (mode != kListNone) {
    // Kept mass per warp chunk without a pass over the row: the kept elements of the list, plus
    // (kListBoundary) the mass above the list's bucket found by the gather.
    if (threadIdx.x < kWarps) S.wsum[threadIdx.x] = mode == kListBoundary ? S.wdef[threadIdx.x] : 0ull;
    __syncthreads();
    for (int j = threadIdx.x; j < list_n; j += kThreads) {
      const uint32_t key = S.cand[j];
      const float y = key_float(key);
      const float e = e_of(y, m);
      if (kept(y, e, tau, min_p)) atomicAdd(&S.wsum[chunk_of<DT>(R, V, (int)S.cidx[j])], mass_of(e));
    }
  } else {
    // P5: kept mass per warp chunk.
    unsigned long long my = 0;
    for_row<DT>(R, V, [&](int, float y, bool ok) {
      if (!ok) return;
      const float e = e_of(y, m);
      my += kept(y, e, tau, min_p) ? mass_of(e) : 0ull;
    });
    my = warp_sum(my);
    if ((threadIdx.x & 31) == 0) S.wsum[threadIdx.x >> 5] = my;
  }
  if (threadIdx.x == 0) S.token = -1;
  __syncthreads();
  unsigned long long z_kept = 0;
  for (int w = 0; w < kWarps; ++w) z_kept += S.wsum[w];
  unsigned long long target = draw_target(row_uniform(a.seed[r], a.position[r]), z_kept);
  int c = 0;
  while (c < kWarps - 1 && target >= S.wsum[c]) target -= S.wsum[c++];

  // P6: the chunk holding the target, split over the threads; scan in token order.
  const Chunk ch = warp_chunk<DT>(R, V, c);
  const int sub = (ch.hi - ch.lo + kThreads - 1) / kThreads;
  const int lo = min(ch.hi, ch.lo + (int)threadIdx.x * sub), hi = min(ch.hi, lo + sub);
  unsigned long long s = 0;
  for (int i = lo; i < hi; ++i) {
    const float y = row_y<DT>(R, i);
    const float e = e_of(y, m);
    s += kept(y, e, tau, min_p) ? mass_of(e) : 0ull;
  }
  unsigned long long tot;
  const unsigned long long excl = block_excl_scan(s, S, &tot);
  if (excl <= target && target < excl + s) {
    unsigned long long acc = excl;
    for (int i = lo; i < hi; ++i) {
      const float y = row_y<DT>(R, i);
      const float e = e_of(y, m);
      if (!kept(y, e, tau, min_p)) continue;
      acc += mass_of(e);
      if (acc > target) {
        S.token = i;
        S.ytok = y;
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int tok = S.token;
    float ytok = S.ytok;
    if (tok < 0) {  // unreachable: the kept set always holds the maximum (mass 2^40)
      tok = argmax;
      ytok = m;
    }
    a.tokens[r] = tok;
    a.logprobs[r] = f_sub(f_eq(ytok, m) ? 0.f : f_sub(ytok, m), (float)log((double)z_kept / kMassScale));
    a.valid[r] = true;
  }
}

template <DType DT>
__global__ void __launch_bounds__(kThreads, 2) filter_kernel(FilterArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& S = *reinterpret_cast<Smem*>(smem_raw);
  const int64_t r = blockIdx.x;
  const int V = (int)a.V;
  const int64_t eb = kElem<DT>;
  const Row R = make_row<DT>(a, r);
  const int64_t top_k = a.top_k[r];
  const float top_p = a.top_p[r];
  const float min_p = a.min_p[r];
  const bool use_k = top_k > 0 && top_k < V;
  const bool need_hist = use_k || f_lt(top_p, 1.f);
  SplitRow sr;
  const SplitRow* split = split_of(a, r, &sr);

  const unsigned long long best = row_max<DT>(a, r, R, V, use_k, split, S);
  const uint32_t mkey = (uint32_t)(best >> 32);
  const bool valid = !(best == 0 || mkey == kNegInfKey);
  const float m = key_float(mkey);
  int list_n = 0, mode = kListNone;
  const uint32_t tau = (valid && need_hist)
                           ? find_threshold<DT>(R, V, m, top_k, top_p, min_p, false, S, &list_n, &mode, split)
                           : 0u;

  char* out = static_cast<char*>(a.out) + r * a.V * eb;
  for (int i = threadIdx.x; i < V; i += kThreads) {
    bool keep = true;
    if (valid) {
      const float y = row_y<DT>(R, i);
      keep = kept(y, e_of(y, m), tau, min_p);
    }
    if constexpr (DT == DType::F32) {
      reinterpret_cast<float*>(out)[i] =
          keep ? static_cast<const float*>(R.x)[i] : a.filter_value;
    } else {
      reinterpret_cast<uint16_t*>(out)[i] =
          keep ? static_cast<const uint16_t*>(R.x)[i] : a.filter_bits16;
    }
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("llmkern: ") + what + ": " + cudaGetErrorString(e));
}

template <class Args>
void launch_one(void (*kern)(Args), dim3 grid, const Args& a, cudaStream_t stream, const char* what) {
  const size_t smem = sizeof(Smem);
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), what);
  kern<<<grid, kThreads, smem, stream>>>(a);
  check(cudaGetLastError(), what);
}

// The split prepass (when a.split_slices > 1), then one block per row.
template <DType DT, class Args>
void launch(void (*kern)(Args), const Args& a, void* stream, const char* what) {
  if (a.V >= (int64_t)1 << 31) throw std::runtime_error(std::string("llmkern: ") + what + ": vocab too large");
  if (a.B >= (int64_t)1 << 31) throw std::runtime_error(std::string("llmkern: ") + what + ": batch too large");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.split_slices > 1) {
    if (a.B > 65535 || a.split == nullptr) throw std::runtime_error(std::string("llmkern: ") + what + ": bad split");
    const dim3 grid((unsigned)a.split_slices, (unsigned)a.B);
    launch_one(split_max_kernel<DT, Args>, grid, a, st, what);
    launch_one(split_exp_kernel<DT, Args>, grid, a, st, what);
  }
  Args one = a;
  if (one.split_slices <= 1) one.split_slices = 0;
  launch_one(kern, dim3((unsigned)a.B), one, st, what);
}

}  // namespace

int cuda_sm_count() {
  int dev = 0, n = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return n;
}

void sample_cuda(const SampleArgs& a, void* stream) {
  if (a.B <= 0 || a.V <= 0) return;
  switch (a.dtype) {
    case DType::F32: launch<DType::F32>(sample_kernel<DType::F32>, a, stream, "sample"); break;
    case DType::F16: launch<DType::F16>(sample_kernel<DType::F16>, a, stream, "sample"); break;
    default: launch<DType::BF16>(sample_kernel<DType::BF16>, a, stream, "sample"); break;
  }
}

void filter_cuda(const FilterArgs& a, void* stream) {
  if (a.B <= 0 || a.V <= 0) return;
  switch (a.dtype) {
    case DType::F32: launch<DType::F32>(filter_kernel<DType::F32>, a, stream, "top_k_top_p_filter"); break;
    case DType::F16: launch<DType::F16>(filter_kernel<DType::F16>, a, stream, "top_k_top_p_filter"); break;
    default: launch<DType::BF16>(filter_kernel<DType::BF16>, a, stream, "top_k_top_p_filter"); break;
  }
}

}  // namespace llmkern
