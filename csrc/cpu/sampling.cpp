// CPU kernel of sorting-free top-k / top-p / min-p sampling and filtering (see sampling.h).
// Plain C++ + OpenMP, no torch headers: rows run in parallel when the batch fills the threads,
// otherwise each row's passes are split in chunks across the threads.
#include "sampling.h"
#include "cpu/simd.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace llmkern {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using simd::exp_nonpos;
using simd::fixed_mass;

// The order key with -0 folded into +0, so that key order equals float order (y may be the caller's
// logits, which can hold -0).
inline uint32_t key_of(float y) { return order_key(y + 0.0f); }

// ---- vectorised loops (compiled for AVX2 and for the baseline ISA) --------------------------------

// y = src with NaN -> -inf and -0 -> +0 (so that float order equals key order); returns the max.
LK_MULTIVERSION float clean_max(const float* src, float* y, int64_t n) {
  const simd::vf ninf = simd::splat(kNegInf);
  simd::vf vm = ninf;
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    simd::vf v = simd::load(src + i);
    v = (v == v ? v : ninf) + 0.0f;
    simd::store(y + i, v);
    vm = v > vm ? v : vm;
  }
  float m = kNegInf;
  for (int j = 0; j < simd::W; ++j) m = vm[j] > m ? vm[j] : m;
  for (; i < n; ++i) {
    const float v = (src[i] != src[i] ? kNegInf : src[i]) + 0.0f;
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

// Max of x and whether x holds a NaN, without writing anything (fp32 logits used in place).
LK_MULTIVERSION float max_no_copy(const float* x, int64_t n, bool* has_nan) {
  const simd::vf ninf = simd::splat(kNegInf);
  simd::vf vm = ninf;
  simd::vi nan = simd::vi{};
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    const simd::vf v = simd::load(x + i);
    nan |= v != v;
    vm = v > vm ? v : vm;
  }
  float m = kNegInf;
  bool any_nan = false;
  for (int j = 0; j < simd::W; ++j) {
    m = vm[j] > m ? vm[j] : m;
    any_nan |= nan[j] != 0;
  }
  for (; i < n; ++i) {
    any_nan |= x[i] != x[i];
    m = x[i] > m ? x[i] : m;
  }
  *has_nan = any_nan;
  return m;
}

// e = exp(y - m) (stored when e is not null) and the total fixed-point mass. (Fusing the top-p
// pivot counts into this pass was measured slower than a separate pass: register pressure.)
LK_MULTIVERSION uint64_t exp_mass(const float* y, float m, float* e, int64_t n) {
  simd::MassAcc acc;
  const simd::vf vm = simd::splat(m), one = simd::splat(1.0f);
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    const simd::vf v = simd::load(y + i);
    const simd::vf ev = v == vm ? one : simd::exp_nonpos(v - vm);  // y == m covers m = +inf
    if (e) simd::store(e + i, ev);
    acc.add(ev);
  }
  uint64_t z = acc.sum();
  for (; i < n; ++i) {
    const float ev = y[i] == m ? 1.0f : exp_nonpos(y[i] - m);
    if (e) e[i] = ev;
    z += fixed_mass(ev);
  }
  return z;
}

// e = exp(y - m) stored, nothing else (the top-p path sums the mass in its first pivot pass, where
// the fixed-point split is done anyway).
LK_MULTIVERSION void exp_store(const float* y, float m, float* e, int64_t n) {
  const simd::vf vm = simd::splat(m), one = simd::splat(1.0f);
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    const simd::vf v = simd::load(y + i);
    simd::store(e + i, v == vm ? one : simd::exp_nonpos(v - vm));  // y == m covers m = +inf
  }
  for (; i < n; ++i) e[i] = y[i] == m ? 1.0f : exp_nonpos(y[i] - m);
}

// Mass of the kept tokens: y >= thr and e >= min_p.
LK_MULTIVERSION uint64_t kept_mass(const float* y, const float* e, float thr, float min_p, int64_t n) {
  simd::MassAcc acc;
  const simd::vf vt = simd::splat(thr), vp = simd::splat(min_p), zero = simd::splat(0.0f);
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    const simd::vf v = simd::load(y + i), ev = simd::load(e + i);
    acc.add((v >= vt) & (ev >= vp) ? ev : zero);
  }
  uint64_t z = acc.sum();
  for (; i < n; ++i) z += (y[i] >= thr && e[i] >= min_p) ? fixed_mass(e[i]) : 0;
  return z;
}

// Index of the first y[i] >= thr in [0, n), or n.
LK_MULTIVERSION int64_t first_ge(const float* y, int64_t n, float thr) {
  const simd::vf vt = simd::splat(thr);
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W)
    if (simd::lane_bits(simd::load(y + i) >= vt) != 0) break;
  for (; i < n; ++i)
    if (y[i] >= thr) return i;
  return n;
}

// Scratch reused across calls (one set per OpenMP thread).
struct Scratch {
  std::vector<float> y, e;
  std::vector<uint32_t> cand_key, tmp_key;
  std::vector<uint64_t> cand_mass, tmp_mass;
  std::vector<int64_t> cand_idx;  // candidates or kept tokens, in vocabulary order
  std::vector<std::vector<int64_t>> parts;  // per-chunk candidates
  std::vector<std::vector<int32_t>> found;  // per-chunk bracket members
  std::vector<float> tmp;
  void reserve(int64_t V) {
    if ((int64_t)y.size() < V) {
      y.resize(V);
      e.resize(V);
    }
  }
};
// Not inlined on purpose: when the thread-local's address is a visible constant, GCC re-derives it
// (a __tls_get_addr call) at every use inside the row loops.
__attribute__((noinline)) Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

struct Hist {  // counts per level-1 digit of the key
  uint64_t cnt[kBins];
  void clear() { std::memset(cnt, 0, sizeof(cnt)); }
};

struct RowParams {
  float temperature = 1.f;  // 0 = greedy
  int64_t top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
};

// Split [0, V) into n chunks.
inline void chunk_range(int64_t V, int n, int c, int64_t* lo, int64_t* hi) {
  const int64_t step = (V + n - 1) / n;
  *lo = std::min<int64_t>(V, step * c);
  *hi = std::min<int64_t>(V, *lo + step);
}

// ---- pass A: y = transform(logits); max -------------------------------------------------

template <DType DT>
float transform_range(const void* x, const float* bias, const uint8_t* allowed, float temperature,
                      float* y, int64_t lo, int64_t hi) {
  if (DT == DType::F32 && !bias && !allowed && (temperature == 1.f || temperature == 0.f))
    return clean_max(static_cast<const float*>(x) + lo, y + lo, hi - lo);  // one pass
  for (int64_t i = lo; i < hi; ++i) y[i] = load_logit(x, DT, i);
  if (bias)
    for (int64_t i = lo; i < hi; ++i) y[i] += bias[i];
  if (allowed)
    for (int64_t i = lo; i < hi; ++i) y[i] = allowed[i] ? y[i] : kNegInf;
  if (temperature > 0.f && temperature != 1.f)
    for (int64_t i = lo; i < hi; ++i) y[i] = y[i] / temperature;  // division, as HF does
  return clean_max(y + lo, y + lo, hi - lo);
}

float transform_dispatch(DType dt, const void* x, const float* bias, const uint8_t* allowed,
                         float t, float* y, int64_t lo, int64_t hi) {
  switch (dt) {
    case DType::F32: return transform_range<DType::F32>(x, bias, allowed, t, y, lo, hi);
    case DType::F16: return transform_range<DType::F16>(x, bias, allowed, t, y, lo, hi);
    default: return transform_range<DType::BF16>(x, bias, allowed, t, y, lo, hi);
  }
}

// ---- e = exp(y - m), masses, level-1 histogram --------------------------------------------------

constexpr int64_t kBlock = 2048;  // draw blocks: kept mass per block lets the walk skip ahead

// e over [lo, hi) and the total mass; hist (when given) gets counts and masses per level-1 digit.
// Order-preserving keys of 8 floats (see order_key).
inline simd::vu order_keys(simd::vf v) {
  v = v + 0.0f;  // -0 -> +0, as key_of
  simd::vu b;
  std::memcpy(&b, &v, sizeof(b));
  const simd::vu sign = simd::vu{} + 0x80000000u;
  return (b & sign) != 0 ? ~b : (b | sign);
}

// e = exp(y - m) stored, counts per level-1 digit of the key; returns the total mass.
uint64_t exp_hist(const float* y, float m, float* e, Hist* h, int64_t n) {
  const uint64_t z = exp_mass(y, m, e, n);
  for (int64_t i = 0; i < n; ++i) h->cnt[key_of(y[i]) >> (32 - kBits1)] += 1;
  return z;
}

// Index of the first element in [0, n) whose level-1 digit is `bucket`, or n.
LK_MULTIVERSION int64_t first_in_bucket(const float* y, int64_t n, uint32_t bucket) {
  const simd::vu vb = simd::vu{} + bucket;
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W)
    if (simd::lane_bits((order_keys(simd::load(y + i)) >> (32 - kBits1)) == vb) != 0) break;
  for (; i < n; ++i)
    if ((key_of(y[i]) >> (32 - kBits1)) == bucket) return i;
  return n;
}

// lane_index[b] lists the set bits of the 8-bit mask b, lowest first (padded with zeros).
struct LaneIndex {
  simd::vi of[256];
  LaneIndex() {
    for (int b = 0; b < 256; ++b) {
      of[b] = simd::vi{};
      int k = 0;
      for (int j = 0; j < simd::W; ++j)
        if ((b >> j) & 1) of[b][k++] = j;
    }
  }
};
const LaneIndex lane_index;

// Writes to out[0..] every i in [lo, hi) with lo_v <= v[i] < hi_v, in order; returns how many. `out`
// needs room for hi - lo + 8 entries. Without branches (a hit is rare and random, so a branch on it
// mispredicts): every 8 elements store the indices of the hits and advance by their count.
LK_MULTIVERSION int64_t collect_range(const float* v, int64_t lo, int64_t hi, float lo_v, float hi_v,
                                      int32_t* out) {
  const simd::vf vl = simd::splat(lo_v), vh = simd::splat(hi_v);
  int64_t n = 0, i = lo;
  for (; i + simd::W <= hi; i += simd::W) {
    const simd::vf x = simd::load(v + i);
    const unsigned bits = simd::lane_bits((x >= vl) & (x < vh));
    const simd::vi idx = lane_index.of[bits] + (int32_t)i;
    std::memcpy(out + n, &idx, sizeof(idx));
    n += __builtin_popcount(bits);
  }
  for (; i < hi; ++i)
    if (v[i] >= lo_v && v[i] < hi_v) out[n++] = (int32_t)i;
  return n;
}

// ---- threshold search -------------------------------------------------------------------------

// Walk buckets from the top: the bucket b with  above < target <= above + w[b].
int find_bucket(const uint64_t* w, int bins, uint64_t target, uint64_t* above) {
  uint64_t acc = 0;
  for (int b = bins - 1; b > 0; --b) {
    if (acc + w[b] >= target) {
      *above = acc;
      return b;
    }
    acc += w[b];
  }
  *above = acc;
  return 0;
}

// Digit of `key` at radix level 1..3.
inline uint32_t digit(uint32_t key, int level) {
  if (level == 1) return key >> (32 - kBits1);
  if (level == 2) return (key >> kBits3) & ((1u << kBits2) - 1);
  return key & ((1u << kBits3) - 1);
}

// refine() for a few candidates: sort them by key, largest first, and walk the groups of equal keys.
uint32_t refine_sorted(const std::vector<uint32_t>& key, const std::vector<uint64_t>& mass,
                       uint64_t target, bool by_mass) {
  std::vector<std::pair<uint32_t, uint64_t>> kw(key.size());
  for (size_t i = 0; i < key.size(); ++i) kw[i] = {key[i], by_mass ? mass[i] : 1};
  std::sort(kw.begin(), kw.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  uint64_t acc = 0;
  for (size_t i = 0; i < kw.size(); ++i) {
    acc += kw[i].second;
    const bool group_ends = i + 1 == kw.size() || kw[i + 1].first != kw[i].first;
    if (group_ends && acc >= target) return kw[i].first;
  }
  return kw.empty() ? 0u : kw.back().first;  // target above the total: cannot happen
}

// Radix walk over candidates from `level` on. Weight is the count (by_mass false) or the fixed-point
// mass. Returns the exact key at which the running weight, from the top, reaches `target`: the key v
// with weight(key > v) < target <= weight(key >= v).
uint32_t refine(std::vector<uint32_t>& key, std::vector<uint64_t>& mass, uint64_t target,
                bool by_mass, int level) {
  if (key.size() <= 128) return refine_sorted(key, mass, target, by_mass);  // cheaper than 2048 bins
  uint64_t w[kBins];
  for (; level <= 3; ++level) {
    const size_t n = key.size();
    if (n == 0) break;
    const uint32_t d0 = digit(key[0], level);
    size_t same = 1;
    while (same < n && digit(key[same], level) == d0) ++same;
    if (same == n) continue;  // one bucket holds every candidate: nothing to count at this level
    const int bins = level == 3 ? (1 << kBits3) : kBins;
    std::fill(w, w + bins, 0);
    for (size_t i = 0; i < n; ++i) w[digit(key[i], level)] += by_mass ? mass[i] : 1;
    uint64_t above = 0;
    const uint32_t b = (uint32_t)find_bucket(w, bins, target, &above);
    target -= above;
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
      if (digit(key[i], level) == b) {
        key[kept] = key[i];
        mass[kept] = mass[i];
        ++kept;
      }
    }
    key.resize(kept);
    mass.resize(kept);
  }
  return key.empty() ? 0u : key[0];
}

// (key, mass) of the elements whose level-1 digit is `bucket`.
void gather_bucket(const float* y, const float* e, int64_t V, int bucket, std::vector<uint32_t>& key,
                   std::vector<uint64_t>& mass) {
  key.clear();
  mass.clear();
  for (int64_t i = 0; i < V; ++i) {
    i += first_in_bucket(y + i, V - i, (uint32_t)bucket);
    if (i >= V) break;
    key.push_back(key_of(y[i]));
    mass.push_back(fixed_mass(e[i]));
  }
}

inline uint64_t top_p_target(float top_p, uint64_t z) {
  return std::max<uint64_t>((uint64_t)std::ceil((double)top_p * (double)z), 1);
}

// Large top-k (histogram of counts), then top-p over its survivors: the smallest kept key.
uint32_t find_threshold(const float* y, const float* e, int64_t V, const Hist& h, const RowParams& p,
                        Scratch& s) {
  uint32_t tau = 0;
  {
    uint64_t above = 0;
    const int b = find_bucket(h.cnt, kBins, (uint64_t)p.top_k, &above);
    gather_bucket(y, e, V, b, s.cand_key, s.cand_mass);
    tau = refine(s.cand_key, s.cand_mass, (uint64_t)p.top_k - above, false, 2);
  }
  if (p.top_p >= 1.f) return tau;
  // top-p renormalises over the top-k survivors: work on all of them
  s.cand_key.clear();
  s.cand_mass.clear();
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = key_of(y[i]);
    if (k < tau) continue;
    s.cand_key.push_back(k);
    s.cand_mass.push_back(fixed_mass(e[i]));
  }
  uint64_t z_k = 0;
  for (uint64_t w : s.cand_mass) z_k += w;
  return refine(s.cand_key, s.cand_mass, top_p_target(p.top_p, z_k), true, 1);
}

// The float whose key is `key` (key 0 = keep everything = -inf). y carries no NaN and keys fold
// -0 into +0, so `y >= key_float(tau)` is the same test as `key_of(y) >= tau`.
inline float key_float(uint32_t key) {
  if (key <= order_key(kNegInf)) return kNegInf;
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Masses of the elements with e >= piv[j], j = 0..2, in one pass over e; with `total`, also the
// mass of all elements.
LK_MULTIVERSION void masses_ge3(const float* e, int64_t n, const float* piv, uint64_t* mass,
                                uint64_t* total) {
  simd::MassAcc acc[3], all;
  const simd::vf p0 = simd::splat(piv[0]), p1 = simd::splat(piv[1]), p2 = simd::splat(piv[2]);
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) {
    const simd::vf ev = simd::load(e + i);
    simd::vi h, l;
    simd::split_mass(ev, h, l);
    if (total) all.add_split(h, l);
    simd::vi k = ev >= p0;
    acc[0].add_split(h & k, l & k);
    k = ev >= p1;
    acc[1].add_split(h & k, l & k);
    k = ev >= p2;
    acc[2].add_split(h & k, l & k);
  }
  for (int j = 0; j < 3; ++j) {
    mass[j] = acc[j].sum();
    for (int64_t t = i; t < n; ++t) mass[j] += e[t] >= piv[j] ? fixed_mass(e[t]) : 0;
  }
  if (total) {
    *total = all.sum();
    for (int64_t t = i; t < n; ++t) *total += fixed_mass(e[t]);
  }
}

// Top-p: a pivot search on e = exp(y - m) (three pivots per pass, exact vectorised mass counts)
// narrows a bracket [e_lo, e_hi) with mass(e >= e_lo) >= target > mass(e >= e_hi); a radix walk over
// the keys of y of the elements inside the bracket then finds the threshold exactly. This needs e
// to be non-decreasing in y, which simd::exp_nonpos is: tests/test_exp_monotone.py checks it on
// every float in [-88, 0]. Pivots are spread evenly over y - m in [-28, 0] (below -27.8, e * 2^40 < 1:
// no mass). Two rounds leave a bracket 28 / 16 = 1.75 wide in y - m: a few hundred to a few thousand
// elements on real vocabularies (always correct, only slower, when it holds more).

struct Bracket {
  float e_lo = 0.0f;     // mass(e >= e_lo) >= target
  float e_hi = 2.0f;     // mass(e >= e_hi) < target (2: above every e, nothing above the bracket)
  uint64_t mass_hi = 0;  // mass(e >= e_hi)
};

// The pivots of round r (0, 1) given the bracket so far in y - m.
inline void round_pivots(float t_lo, float t_hi, float* t, float* piv) {
  const float w = 0.25f * (t_hi - t_lo);
  for (int j = 0; j < 3; ++j) {
    t[j] = t_lo + (j + 1) * w;
    piv[j] = exp_nonpos(t[j]);
  }
}
constexpr float kRange[2] = {-28.0f, 0.0f};  // y - m over which the pivots are spread

// e = exp(y - m) over [lo, hi) and, in the same parallel region, round 0's masses plus the total
// mass (mass[0..3]), a few thousand elements at a time so that e is still in L1 when it is counted.
void exp_and_first_round(const float* y, float m, float* e, int64_t lo, int64_t hi, uint64_t* mass) {
  float t[3], piv[3];
  round_pivots(kRange[0], kRange[1], t, piv);
  constexpr int64_t kSub = 4096;
  for (int64_t b = lo; b < hi; b += kSub) {
    const int64_t n = std::min(kSub, hi - b);
    exp_store(y + b, m, e + b, n);
    uint64_t part[4];
    masses_ge3(e + b, n, piv, part, &part[3]);
    for (int j = 0; j < 4; ++j) mass[j] += part[j];
  }
}

// The pivot search. The bracket after a round: the highest pivot that still holds the target is
// the new floor, the next one up the new ceiling.
struct PivotSearch {
  Bracket br;
  uint64_t target = 0;
  float t_lo = kRange[0], t_hi = kRange[1];  // the bracket in y - m
  float t[3], piv[3];                        // this round's pivots
  PivotSearch() { round_pivots(t_lo, t_hi, t, piv); }
  void settle(const uint64_t* mass) {
    int j = 0;
    while (j < 3 && mass[j] >= target) ++j;
    if (j > 0) {
      br.e_lo = piv[j - 1];
      t_lo = t[j - 1];
    }
    if (j < 3) {
      br.e_hi = piv[j];
      br.mass_hi = mass[j];
      t_hi = t[j];
    }
    round_pivots(t_lo, t_hi, t, piv);  // the next round's
  }
};

// Sums per-chunk values: out[j] = sum over c of part[stride * c + j], j < n.
inline void sum_parts(const std::vector<uint64_t>& part, int stride, int n, int nchunks, uint64_t* out) {
  for (int j = 0; j < n; ++j) {
    out[j] = 0;
    for (int c = 0; c < nchunks; ++c) out[j] += part[stride * c + j];
  }
}

// The bracket of top-p's threshold and its members (into s.cand_idx, in token order), writing e on
// the way: exp with round 0, round 1, then the collection, each a pass over
// the row split in nchunks chunks. With several threads, the three passes share one parallel
// region (a barrier between passes, not a fork and join: waking threads costs microseconds at
// batch 1, where this runs).
void bracket_search(const float* y, float m, float* e, int64_t V, float top_p, int nchunks,
                    Scratch& s, PivotSearch* ps) {
  std::vector<uint64_t> part0(4 * nchunks, 0), part1(3 * nchunks, 0);
  std::vector<int64_t> count(nchunks, 0);
  s.found.resize(nchunks);
  auto after_round0 = [&] {
    uint64_t mass[4];
    sum_parts(part0, 4, 4, nchunks, mass);
    ps->target = top_p_target(top_p, mass[3]);
    ps->settle(mass);
  };
  auto after_round1 = [&] {
    uint64_t mass[3];
    sum_parts(part1, 3, 3, nchunks, mass);
    ps->settle(mass);
  };
  auto phase = [&](int which, int c) {
    int64_t lo, hi;
    chunk_range(V, nchunks, c, &lo, &hi);
    if (which == 0) {
      exp_and_first_round(y, m, e, lo, hi, &part0[4 * c]);
    } else if (which == 1) {
      masses_ge3(e + lo, hi - lo, ps->piv, &part1[3 * c], nullptr);
    } else {
      s.found[c].resize(hi - lo + simd::W);
      count[c] = collect_range(e, lo, hi, ps->br.e_lo, ps->br.e_hi, s.found[c].data());
    }
  };
  if (nchunks == 1) {
    phase(0, 0);
    after_round0();
    phase(1, 0);
    after_round1();
    phase(2, 0);
  } else {
#pragma omp parallel num_threads(nchunks)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      for (int c = tid; c < nchunks; c += nth) phase(0, c);
#pragma omp barrier
#pragma omp single
      after_round0();  // (the end of `single` is a barrier)
      for (int c = tid; c < nchunks; c += nth) phase(1, c);
#pragma omp barrier
#pragma omp single
      after_round1();
      for (int c = tid; c < nchunks; c += nth) phase(2, c);
    }
  }
  s.cand_idx.clear();
  for (int c = 0; c < nchunks; ++c)
    s.cand_idx.insert(s.cand_idx.end(), s.found[c].begin(), s.found[c].begin() + count[c]);
}

// Inverse-CDF draw over kept tokens listed in vocabulary order with their masses (the same token as
// the walk over the whole row would find).
int64_t draw_listed(const std::vector<int64_t>& idx, const std::vector<uint64_t>& mass, uint64_t z,
                    int64_t seed, int64_t position) {
  const uint64_t target = draw_target(row_uniform(seed, position), z);
  uint64_t acc = 0;
  size_t i = 0;
  for (; i + 1 < idx.size(); ++i) {
    acc += mass[i];
    if (acc > target) break;
  }
  return idx[i];
}

// ---- small top-k: candidate filter, no pass over the row with exp ---------------------------------

// The k-th largest value among y[idx] (selection, not a sort).
float kth_value(const float* y, const std::vector<int64_t>& idx, int64_t k, std::vector<float>& tmp) {
  tmp.resize(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) tmp[i] = y[idx[i]];
  std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<float>());
  return tmp[k - 1];
}

void keep_at_least(const float* y, std::vector<int64_t>& idx, float thr) {
  size_t n = 0;
  for (int64_t i : idx)
    if (y[i] >= thr) idx[n++] = i;
  idx.resize(n);
}

// Appends to `idx`, in order, every i in [lo, hi) with y[i] >= the k-th largest of y[lo:hi] (ties
// kept). A running threshold (the k-th largest so far) rejects almost every element after the first
// few blocks with one vectorised comparison per element.
void topk_candidates(const float* y, int64_t lo, int64_t hi, int64_t k, std::vector<int64_t>& idx,
                     std::vector<float>& tmp) {
  idx.clear();
  float thr = kNegInf;
  size_t limit = (size_t)std::max<int64_t>(4 * k, 512);
  for (int64_t i = lo; i < hi; ++i) {
    i += first_ge(y + i, hi - i, thr);  // skip the (many) elements below the running threshold
    if (i >= hi) break;
    idx.push_back(i);
    if (idx.size() > limit && (int64_t)idx.size() > k) {
      thr = kth_value(y, idx, k, tmp);
      keep_at_least(y, idx, thr);
      limit = std::max(limit, 2 * idx.size());  // ties can keep many: amortise the reselection
    }
  }
  if ((int64_t)idx.size() > k) keep_at_least(y, idx, kth_value(y, idx, k, tmp));
}

// ---- one row ------------------------------------------------------------------------------

struct RowOut {
  int64_t token = 0;
  float logprob = kNegInf;
  bool valid = false;
  float thr = kNegInf;  // kept: y >= thr && e >= min_p (histogram path)
  bool by_candidates = false;  // small top-k path: the kept tokens are s.cand_idx
  const float* y = nullptr;    // the processed logits (the input itself when it needed no change)
};

template <typename Fn>
void for_chunks(int nchunks, int64_t V, Fn fn) {
  if (nchunks == 1) {  // inside a row-parallel region: no nested OpenMP team
    fn(0, 0, V);
    return;
  }
#pragma omp parallel for num_threads(nchunks)
  for (int c = 0; c < nchunks; ++c) {
    int64_t lo, hi;
    chunk_range(V, nchunks, c, &lo, &hi);
    fn(c, lo, hi);
  }
}

// The draw by inverse CDF over the whole row in vocabulary order (kept: y >= thr && e >= min_p):
// whole blocks are skipped by their kept mass, then the token is found inside one block.
int64_t walk_draw(const float* y, const float* e, int64_t V, float thr, float min_p, uint64_t z_kept,
                  int64_t seed, int64_t position) {
  uint64_t target = draw_target(row_uniform(seed, position), z_kept);
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  int64_t b = 0;
  for (; b < nblocks - 1; ++b) {
    const int64_t lo = b * kBlock;
    const uint64_t bm = kept_mass(y + lo, e + lo, thr, min_p, std::min(V, lo + kBlock) - lo);
    if (target < bm) break;
    target -= bm;
  }
  const int64_t lo = b * kBlock, hi = std::min(V, lo + kBlock);
  uint64_t acc = 0;
  int64_t tok = -1;
  for (int64_t i = lo; i < hi; ++i) {
    if (!(y[i] >= thr && e[i] >= min_p)) continue;
    acc += fixed_mass(e[i]);
    tok = i;  // last kept so far: the answer if the target is never passed (cannot happen)
    if (acc > target) break;
  }
  return tok < 0 ? 0 : tok;
}

inline float token_logprob(float y_tok, float m, uint64_t z_kept) {
  const float d = y_tok == m ? 0.f : y_tok - m;  // 0 at the maximum, also when it is +inf (not NaN)
  return d - (float)std::log((double)z_kept / kMassScale);
}

// Small top-k: thresholds and the draw over the candidates only. Leaves the kept tokens in
// s.cand_idx (vocabulary order).
void small_topk_row(const float* y, float m, int64_t V, const RowParams& p, bool draw, int64_t seed,
                    int64_t position, int nchunks, Scratch& s, RowOut& out) {
  if (V < (1 << 17)) nchunks = 1;  // about one comparison per element: threads cost more than they save
  s.parts.resize(nchunks);
  for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
    std::vector<float> tmp;
    topk_candidates(y, lo, hi, p.top_k, s.parts[c], tmp);
  });
  std::vector<int64_t>& idx = s.cand_idx;
  idx.clear();
  for (int c = 0; c < nchunks; ++c) idx.insert(idx.end(), s.parts[c].begin(), s.parts[c].end());
  if ((int64_t)idx.size() > p.top_k) keep_at_least(y, idx, kth_value(y, idx, p.top_k, s.tmp));
  const size_t n = idx.size();
  std::vector<float> e(n);
  for (size_t i = 0; i < n; ++i) e[i] = y[idx[i]] == m ? 1.0f : exp_nonpos(y[idx[i]] - m);
  float thr = kNegInf;
  if (p.top_p < 1.f) {
    s.cand_key.resize(n);
    s.cand_mass.resize(n);
    uint64_t z_k = 0;
    for (size_t i = 0; i < n; ++i) {
      s.cand_key[i] = key_of(y[idx[i]]);
      s.cand_mass[i] = fixed_mass(e[i]);
      z_k += s.cand_mass[i];
    }
    thr = key_float(refine(s.cand_key, s.cand_mass, top_p_target(p.top_p, z_k), true, 1));
  }
  size_t kept = 0;
  uint64_t z_kept = 0;
  s.cand_mass.clear();
  for (size_t i = 0; i < n; ++i) {
    if (y[idx[i]] >= thr && e[i] >= p.min_p) {
      idx[kept++] = idx[i];
      s.cand_mass.push_back(fixed_mass(e[i]));
      z_kept += s.cand_mass.back();
    }
  }
  idx.resize(kept);
  out.by_candidates = true;
  if (!draw) return;
  out.token = draw_listed(idx, s.cand_mass, z_kept, seed, position);
  out.logprob = token_logprob(y[out.token], m, z_kept);
}

// Top-p without top-k (min-p optional): the bracket search (three passes), the exact threshold
// from the bracket's members, then the draw walks the row.
void top_p_row(const float* y, float* e, float m, int64_t V, const RowParams& p, bool draw,
               int64_t seed, int64_t position, int nchunks, Scratch& s, RowOut& out) {
  PivotSearch ps;
  bracket_search(y, m, e, V, p.top_p, nchunks, s, &ps);
  const Bracket& br = ps.br;
  const uint64_t target = ps.target;
  s.cand_key.clear();
  s.cand_mass.clear();
  for (int64_t i : s.cand_idx) {
    s.cand_key.push_back(key_of(y[i]));
    s.cand_mass.push_back(fixed_mass(e[i]));
  }
  const float thr = key_float(refine(s.cand_key, s.cand_mass, target - br.mass_hi, true, 1));
  out.thr = thr;
  if (!draw) return;
  uint64_t z_kept = br.mass_hi;  // everything above the bracket, plus the bracket's kept part
  for (int64_t i : s.cand_idx) z_kept += y[i] >= thr ? fixed_mass(e[i]) : 0;
  if (p.min_p > 0.f) {
    std::vector<uint64_t> part(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part[c] = kept_mass(y + lo, e + lo, thr, p.min_p, hi - lo);
    });
    z_kept = 0;
    for (uint64_t z : part) z_kept += z;
  }
  out.token = walk_draw(y, e, V, thr, p.min_p, z_kept, seed, position);
  out.logprob = token_logprob(y[out.token], m, z_kept);
}

// Histogram path (large top-k, min-p alone or no filter): the whole row.
void histogram_row(const float* y, float* e, float m, int64_t V, const RowParams& p, bool draw,
                   int64_t seed, int64_t position, int nchunks, Scratch& s, RowOut& out) {
  const bool need_hist = p.top_k > 0 && p.top_k < V;
  std::vector<Hist> hists(need_hist ? nchunks : 0);
  std::vector<uint64_t> part_z(nchunks, 0);
  for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
    if (need_hist) {
      hists[c].clear();
      part_z[c] = exp_hist(y + lo, m, e + lo, &hists[c], hi - lo);
    } else {
      part_z[c] = exp_mass(y + lo, m, e + lo, hi - lo);
    }
  });
  uint64_t z_all = 0;
  for (uint64_t z : part_z) z_all += z;
  for (int c = 1; c < (int)hists.size(); ++c)
    for (int b = 0; b < kBins; ++b) hists[0].cnt[b] += hists[c].cnt[b];
  if (need_hist) out.thr = key_float(find_threshold(y, e, V, hists[0], p, s));
  if (!draw) return;
  uint64_t z_kept = z_all;  // no filter at all: everything is kept
  if (need_hist || p.min_p > 0.f) {
    std::vector<uint64_t> part(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part[c] = kept_mass(y + lo, e + lo, out.thr, p.min_p, hi - lo);
    });
    z_kept = 0;
    for (uint64_t z : part) z_kept += z;
  }
  out.token = walk_draw(y, e, V, out.thr, p.min_p, z_kept, seed, position);
  out.logprob = token_logprob(y[out.token], m, z_kept);
}

inline bool use_small_topk(const RowParams& p, int64_t V) {
  return p.top_k > 0 && p.top_k < V && p.top_k <= 4096 && p.top_k * 8 <= V;
}

// Processes one row with `nchunks` threads (1 inside a row-parallel region).
// `draw` false: compute what is kept only (filter op).
RowOut process_row(const void* x, DType dt, int64_t V, const float* bias, const uint8_t* allowed,
                   const RowParams& p, bool draw, int64_t seed, int64_t position, int nchunks,
                   Scratch& s) {
  RowOut out;
  s.reserve(V);
  float* e = s.e.data();
  const float* y = s.y.data();
  std::vector<float> part_max(nchunks, kNegInf);
  bool in_place = dt == DType::F32 && !bias && !allowed && (p.temperature == 1.f || p.temperature == 0.f);
  if (in_place) {  // y is x itself unless x holds a NaN
    std::vector<char> nan(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      bool has_nan = false;
      part_max[c] = max_no_copy(static_cast<const float*>(x) + lo, hi - lo, &has_nan);
      nan[c] = has_nan;
    });
    in_place = std::find(nan.begin(), nan.end(), 1) == nan.end();
    if (in_place) y = static_cast<const float*>(x);
  }
  if (!in_place) {
    float* ybuf = s.y.data();
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part_max[c] = transform_dispatch(dt, x, bias, allowed, p.temperature, ybuf, lo, hi);
    });
  }
  const float m = *std::max_element(part_max.begin(), part_max.end());
  out.y = y;
  if (m == kNegInf) return out;  // no finite logit: token 0, flagged invalid
  out.valid = true;

  if (p.temperature == 0.f) {  // greedy: lowest index among the maxima
    std::vector<uint64_t> part_z(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part_z[c] = exp_mass(y + lo, m, nullptr, hi - lo);
    });
    uint64_t z_all = 0;
    for (uint64_t z : part_z) z_all += z;
    out.token = first_ge(y, V, m);
    out.logprob = -(float)std::log((double)z_all / kMassScale);
    return out;
  }
  if (use_small_topk(p, V)) {
    small_topk_row(y, m, V, p, draw, seed, position, nchunks, s, out);
  } else if (p.top_p < 1.f && !(p.top_k > 0 && p.top_k < V)) {
    top_p_row(y, e, m, V, p, draw, seed, position, nchunks, s, out);
  } else {
    histogram_row(y, e, m, V, p, draw, seed, position, nchunks, s, out);
  }
  return out;
}

RowParams row_params(const SampleArgs& a, int64_t r) {
  RowParams p;
  p.temperature = a.temperature[r];
  p.top_k = a.top_k[r];
  p.top_p = a.top_p[r];
  p.min_p = a.min_p[r];
  return p;
}

inline int64_t elem_bytes(DType dt) { return dt == DType::F32 ? 4 : 2; }

template <typename RowFn>
void for_each_row(int64_t B, int64_t V, RowFn fn) {
  const int threads = omp_get_max_threads();
  // Row-parallel when the batch fills the threads; otherwise split each row across them.
  // (Splitting pays only for long rows: a parallel region costs a few microseconds.)
  const int inner = (B >= threads || V < (1 << 14)) ? 1 : (int)std::min<int64_t>(threads, V >> 13);
  if (inner == 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r = 0; r < B; ++r) fn(r, 1);
  } else {
    for (int64_t r = 0; r < B; ++r) fn(r, inner);
  }
}

template <typename T>
void write_filtered(const T* x, T* out, int64_t V, const float* y, const float* e, const RowOut& o,
                    float min_p, const std::vector<int64_t>& kept_idx, T filter) {
  if (o.by_candidates) {
    for (int64_t i = 0; i < V; ++i) out[i] = filter;
    for (int64_t i : kept_idx) out[i] = x[i];
    return;
  }
  const float thr = o.thr;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) out[i] = (y[i] >= thr && e[i] >= min_p) ? x[i] : filter;
}

// ---- log-probabilities (llmkern.top_logprobs) ---------------------------------------------------

// Sum of exp((y - m) * inv_t) over n elements: float lanes over blocks of 2048 elements (256 terms
// per lane, each in [0, 1]), blocks summed in double - about 1e-7 relative, and about 1.5x faster
// than the sampler's exact fixed-point mass, which a reported logprob does not need.
LK_MULTIVERSION double exp_sum_scaled(const float* y, float m, float inv_t, int64_t n) {
  const simd::vf vm = simd::splat(m), one = simd::splat(1.0f), vt = simd::splat(inv_t);
  double total = 0.0;
  int64_t i = 0;
  while (i + simd::W <= n) {
    simd::vf acc = simd::splat(0.0f);
    const int64_t end = std::min(n, i + 2048);
    for (; i + simd::W <= end; i += simd::W) {
      const simd::vf v = simd::load(y + i);
      acc += v == vm ? one : simd::exp_nonpos((v - vm) * vt);  // y == m covers m = +inf
    }
    for (int j = 0; j < simd::W; ++j) total += acc[j];
  }
  for (; i < n; ++i) total += y[i] == m ? 1.0f : exp_nonpos((y[i] - m) * inv_t);
  return total;
}

// How many of y[0, n) are strictly greater than v (a token's rank is 1 + this).
LK_MULTIVERSION int64_t count_greater(const float* y, float v, int64_t n) {
  const simd::vf vv = simd::splat(v);
  simd::vi cnt = simd::vi{};
  int64_t i = 0;
  for (; i + simd::W <= n; i += simd::W) cnt -= simd::load(y + i) > vv;  // true lanes are -1
  int64_t c = 0;
  for (int j = 0; j < simd::W; ++j) c += cnt[j];
  for (; i < n; ++i) c += y[i] > v;
  return c;
}

// The row as NaN-free float32 (the fp32 input itself when it holds no NaN, else s.y) and its max.
const float* clean_row(const void* x, DType dt, int64_t V, int nchunks, Scratch& s, float* m) {
  s.reserve(V);
  std::vector<float> part_max(nchunks, kNegInf);
  const float* y = nullptr;
  if (dt == DType::F32) {
    std::vector<char> nan(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      bool has_nan = false;
      part_max[c] = max_no_copy(static_cast<const float*>(x) + lo, hi - lo, &has_nan);
      nan[c] = has_nan;
    });
    if (std::find(nan.begin(), nan.end(), 1) == nan.end()) y = static_cast<const float*>(x);
  }
  if (!y) {  // half precision (one row of float32 scratch, not [B, V]) or NaNs to replace
    float* ybuf = s.y.data();
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part_max[c] = transform_dispatch(dt, x, nullptr, nullptr, 1.f, ybuf, lo, hi);
    });
    y = ybuf;
  }
  *m = *std::max_element(part_max.begin(), part_max.end());
  return y;
}

// ids[0, n): the n largest of y, descending, lowest index first among equal values. Small n: the
// sampler's running-threshold filter leaves a few candidates per chunk, which are then sorted.
void top_n_ids(const float* y, int64_t V, int64_t n, int nchunks, Scratch& s, int64_t* ids) {
  std::vector<int64_t>& idx = s.cand_idx;
  if (n * 8 > V || n > 4096) {
    idx.resize(V);
    for (int64_t i = 0; i < V; ++i) idx[i] = i;
  } else {
    s.parts.resize(nchunks);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      std::vector<float> tmp;
      topk_candidates(y, lo, hi, n, s.parts[c], tmp);
    });
    idx.clear();
    for (int c = 0; c < nchunks; ++c) idx.insert(idx.end(), s.parts[c].begin(), s.parts[c].end());
  }
  auto before = [y](int64_t a, int64_t b) { return y[a] > y[b] || (y[a] == y[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), before);
  std::copy(idx.begin(), idx.begin() + n, ids);
}

void logprob_row(const LogprobArgs& a, int64_t r, int nchunks, Scratch& s) {
  const int64_t V = a.V, n = a.n, elem = a.dtype == DType::F32 ? 4 : 2;
  const void* x = static_cast<const char*>(a.logits) + r * a.logits_stride * elem;
  int64_t* ids = a.top_ids + r * n;
  float* lps = a.top_logprobs + r * n;
  float m;
  const float* y = clean_row(x, a.dtype, V, nchunks, s, &m);
  if (m == kNegInf) {  // nothing finite: every logprob -inf, ids 0..n-1, rank 1
    for (int64_t j = 0; j < n; ++j) {
      ids[j] = j;
      lps[j] = kNegInf;
    }
    if (a.tokens) {
      a.token_logprobs[r] = kNegInf;
      a.token_ranks[r] = 1;
    }
    return;
  }
  const float t = a.temperature[r];
  std::vector<double> part_z(nchunks, 0.0);
  for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
    part_z[c] = exp_sum_scaled(y + lo, m, 1.0f / t, hi - lo);
  });
  double z = 0.0;
  for (double p : part_z) z += p;  // >= 1: the maximum's term is exactly 1
  const double log_z = std::log(z);
  // (y == m: 0, not inf - inf when the maximum is +inf; the same division as the mass pass)
  auto logprob = [&](float v) { return (float)((v == m ? 0.0 : (double)((v - m) / t)) - log_z); };
  if (n > 0) {
    top_n_ids(y, V, n, V >= (1 << 17) ? nchunks : 1, s, ids);  // (as small_topk_row: threads cost more below)
    for (int64_t j = 0; j < n; ++j) lps[j] = logprob(y[ids[j]]);
  }
  if (a.tokens) {
    const float v = y[a.tokens[r]];
    std::vector<int64_t> part_c(nchunks, 0);
    for_chunks(nchunks, V, [&](int c, int64_t lo, int64_t hi) {
      part_c[c] = count_greater(y + lo, v, hi - lo);
    });
    int64_t above = 0;
    for (int64_t c : part_c) above += c;
    a.token_logprobs[r] = logprob(v);
    a.token_ranks[r] = 1 + above;
  }
}

}  // namespace

void sample_cpu(const SampleArgs& a) {
  for_each_row(a.B, a.V, [&](int64_t r, int inner) {
    const char* x = static_cast<const char*>(a.logits) + r * a.logits_stride * elem_bytes(a.dtype);
    const float* bias = a.bias ? a.bias + r * a.bias_stride : nullptr;
    const uint8_t* allowed = a.allowed ? a.allowed + r * a.allowed_stride : nullptr;
    RowOut o = process_row(x, a.dtype, a.V, bias, allowed, row_params(a, r), true, a.seed[r],
                           a.position[r], inner, thread_scratch());
    a.tokens[r] = o.token;
    a.logprobs[r] = o.logprob;
    a.valid[r] = o.valid;
  });
}

void filter_cpu(const FilterArgs& a) {
  const int64_t eb = elem_bytes(a.dtype);
  for_each_row(a.B, a.V, [&](int64_t r, int inner) {
    const char* x = static_cast<const char*>(a.logits) + r * a.logits_stride * eb;
    char* out = static_cast<char*>(a.out) + r * a.V * eb;
    RowParams p;
    p.top_k = a.top_k[r];
    p.top_p = a.top_p[r];
    p.min_p = a.min_p[r];
    Scratch& s = thread_scratch();
    RowOut o = process_row(x, a.dtype, a.V, nullptr, nullptr, p, false, 0, 0, inner, s);
    if (!o.valid) {  // nothing finite: leave the row as it is
      std::memcpy(out, x, a.V * eb);
      return;
    }
    if (a.dtype == DType::F32) {
      write_filtered(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), a.V, o.y,
                     s.e.data(), o, p.min_p, s.cand_idx, a.filter_value);
    } else {
      write_filtered(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(out), a.V,
                     o.y, s.e.data(), o, p.min_p, s.cand_idx, a.filter_bits16);
    }
  });
}

void logprobs_cpu(const LogprobArgs& a) {
  for_each_row(a.B, a.V, [&](int64_t r, int inner) { logprob_row(a, r, inner, thread_scratch()); });
}

}  // namespace llmkern
