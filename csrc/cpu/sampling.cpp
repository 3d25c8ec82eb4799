// CPU kernel of sorting-free top-k / top-p / min-p sampling and filtering (see sampling.h).
// Plain C++ + OpenMP, no torch headers: rows run in parallel when the batch fills the threads,
// otherwise each row's passes are split in chunks across the threads.
#include "sampling.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace llmkern {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (Cephes single-precision polynomial), branch-free so loops vectorise.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;  // also maps -inf to -87 (result ~1e-38, zero in fixed point)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t scale = ((int32_t)n + 127) << 23;
  float s;
  std::memcpy(&s, &scale, sizeof(s));
  return y * s;
}

inline uint64_t fixed_mass(float e) { return (uint64_t)(e * kMassScaleF); }

// Scratch reused across calls (one set per OpenMP thread).
struct Scratch {
  std::vector<float> y, e;
  std::vector<uint32_t> cand_key;
  std::vector<uint64_t> cand_mass;
  void reserve(int64_t V) {
    if ((int64_t)y.size() < V) {
      y.resize(V);
      e.resize(V);
    }
  }
};
thread_local Scratch tls_scratch;

struct Hist {
  uint64_t cnt[kBins];
  uint64_t mass[kBins];
  void clear() {
    std::memset(cnt, 0, sizeof(cnt));
    std::memset(mass, 0, sizeof(mass));
  }
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
  for (int64_t i = lo; i < hi; ++i) y[i] = load_logit(x, DT, i);
  if (bias)
    for (int64_t i = lo; i < hi; ++i) y[i] += bias[i];
  if (allowed)
    for (int64_t i = lo; i < hi; ++i) y[i] = allowed[i] ? y[i] : kNegInf;
  if (temperature > 0.f && temperature != 1.f)
    for (int64_t i = lo; i < hi; ++i) y[i] = y[i] / temperature;  // division, as HF does
  float m = kNegInf;
  for (int64_t i = lo; i < hi; ++i) {
    const float v = std::isnan(y[i]) ? kNegInf : y[i];
    y[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

float transform_dispatch(DType dt, const void* x, const float* bias, const uint8_t* allowed,
                         float t, float* y, int64_t lo, int64_t hi) {
  switch (dt) {
    case DType::F32: return transform_range<DType::F32>(x, bias, allowed, t, y, lo, hi);
    case DType::F16: return transform_range<DType::F16>(x, bias, allowed, t, y, lo, hi);
    default: return transform_range<DType::BF16>(x, bias, allowed, t, y, lo, hi);
  }
}

// ---- pass B: e = exp(y - m), total mass, level-1 histogram ----------------------------------

uint64_t exp_range(const float* y, float m, float* e, Hist* hist, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const float v = exp_nonpos(y[i] - m);
    e[i] = y[i] == m ? 1.0f : v;  // y == m covers m = +inf (inf - inf would be NaN)
  }
  uint64_t z = 0;
  if (hist) {
    for (int64_t i = lo; i < hi; ++i) {
      const uint64_t w = fixed_mass(e[i]);
      const uint32_t b = order_key(y[i]) >> (32 - kBits1);
      hist->cnt[b] += 1;
      hist->mass[b] += w;
      z += w;
    }
  } else {
    for (int64_t i = lo; i < hi; ++i) z += fixed_mass(e[i]);
  }
  return z;
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

// Refine the radix walk over candidates from `level` on. Weight is the count (by_mass false) or
// the fixed-point mass. Returns the exact key where the running weight reaches `target`.
uint32_t refine(std::vector<uint32_t>& key, std::vector<uint64_t>& mass, uint64_t target,
                bool by_mass, int level) {
  uint64_t w[kBins];
  for (; level <= 3; ++level) {
    const int bins = level == 3 ? (1 << kBits3) : kBins;
    std::fill(w, w + bins, 0);
    const size_t n = key.size();
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

// Gather (key, mass) of the elements with key >= min_key (and, if level1_bucket >= 0, whose
// level-1 digit equals it).
void gather(const float* y, const float* e, int64_t V, uint32_t min_key, int level1_bucket,
            std::vector<uint32_t>& key, std::vector<uint64_t>& mass) {
  key.clear();
  mass.clear();
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = order_key(y[i]);
    if (k < min_key) continue;
    if (level1_bucket >= 0 && (int)digit(k, 1) != level1_bucket) continue;
    key.push_back(k);
    mass.push_back(fixed_mass(e[i]));
  }
}

// The smallest kept key for top-k then top-p (0 keeps everything).
uint32_t find_threshold(const float* y, const float* e, int64_t V, const Hist& h, uint64_t z_all,
                        const RowParams& p, Scratch& s) {
  uint32_t tau = 0;
  uint64_t z_k = z_all;
  const bool use_k = p.top_k > 0 && p.top_k < V;
  const bool use_p = p.top_p < 1.f;
  if (use_k) {
    uint64_t above = 0;
    const int b = find_bucket(h.cnt, kBins, (uint64_t)p.top_k, &above);
    gather(y, e, V, 0, b, s.cand_key, s.cand_mass);
    tau = refine(s.cand_key, s.cand_mass, (uint64_t)p.top_k - above, false, 2);
  }
  if (!use_p) return tau;
  if (use_k) {  // top-p renormalises over the top-k survivors: work on all of them
    gather(y, e, V, tau, -1, s.cand_key, s.cand_mass);
    z_k = 0;
    for (uint64_t w : s.cand_mass) z_k += w;
    const uint64_t target = (uint64_t)std::ceil((double)p.top_p * (double)z_k);
    return refine(s.cand_key, s.cand_mass, std::max<uint64_t>(target, 1), true, 1);
  }
  const uint64_t target = std::max<uint64_t>((uint64_t)std::ceil((double)p.top_p * (double)z_k), 1);
  uint64_t above = 0;
  const int b = find_bucket(h.mass, kBins, target, &above);
  gather(y, e, V, 0, b, s.cand_key, s.cand_mass);
  return refine(s.cand_key, s.cand_mass, target - above, true, 2);
}

inline bool kept(float y, float e, uint32_t tau, float min_p) {
  return order_key(y) >= tau && e >= min_p;
}

uint64_t kept_mass_range(const float* y, const float* e, uint32_t tau, float min_p, int64_t lo,
                         int64_t hi) {
  uint64_t z = 0;
  for (int64_t i = lo; i < hi; ++i) z += kept(y[i], e[i], tau, min_p) ? fixed_mass(e[i]) : 0;
  return z;
}

// ---- one row ------------------------------------------------------------------------------

struct RowOut {
  int64_t token = 0;
  float logprob = kNegInf;
  bool valid = false;
  uint32_t tau = 0;  // for the filter op
  float min_p = 0.f;
};

// Processes one row with `nchunks` threads (1 inside a row-parallel region).
// `draw` false: compute the thresholds only (filter op).
RowOut process_row(const void* x, DType dt, int64_t V, const float* bias, const uint8_t* allowed,
                   const RowParams& p, bool draw, int64_t seed, int64_t position, int nchunks,
                   Scratch& s) {
  RowOut out;
  s.reserve(V);
  float* y = s.y.data();
  float* e = s.e.data();
  std::vector<float> part_max(nchunks, kNegInf);
#pragma omp parallel for num_threads(nchunks) if (nchunks > 1)
  for (int c = 0; c < nchunks; ++c) {
    int64_t lo, hi;
    chunk_range(V, nchunks, c, &lo, &hi);
    part_max[c] = transform_dispatch(dt, x, bias, allowed, p.temperature, y, lo, hi);
  }
  const float m = *std::max_element(part_max.begin(), part_max.end());
  if (m == kNegInf) return out;  // no finite logit: token 0, flagged invalid
  out.valid = true;

  const bool greedy = p.temperature == 0.f;
  const bool need_hist = !greedy && ((p.top_k > 0 && p.top_k < V) || p.top_p < 1.f);
  std::vector<Hist> hists(need_hist ? nchunks : 0);
  std::vector<uint64_t> part_z(nchunks, 0);
#pragma omp parallel for num_threads(nchunks) if (nchunks > 1)
  for (int c = 0; c < nchunks; ++c) {
    int64_t lo, hi;
    chunk_range(V, nchunks, c, &lo, &hi);
    Hist* h = need_hist ? &hists[c] : nullptr;
    if (h) h->clear();
    part_z[c] = exp_range(y, m, e, h, lo, hi);
  }
  uint64_t z_all = 0;
  for (uint64_t z : part_z) z_all += z;
  for (int c = 1; c < (int)hists.size(); ++c)
    for (int b = 0; b < kBins; ++b) {
      hists[0].cnt[b] += hists[c].cnt[b];
      hists[0].mass[b] += hists[c].mass[b];
    }

  if (greedy) {
    int64_t i = 0;
    while (y[i] != m) ++i;  // lowest index among the maxima
    out.token = i;
    out.logprob = -(float)std::log((double)z_all / kMassScale);
    return out;
  }
  out.tau = need_hist ? find_threshold(y, e, V, hists[0], z_all, p, s) : 0u;
  out.min_p = p.min_p;
  if (!draw) return out;

  std::vector<uint64_t> part_kept(nchunks, 0);
#pragma omp parallel for num_threads(nchunks) if (nchunks > 1)
  for (int c = 0; c < nchunks; ++c) {
    int64_t lo, hi;
    chunk_range(V, nchunks, c, &lo, &hi);
    part_kept[c] = kept_mass_range(y, e, out.tau, p.min_p, lo, hi);
  }
  uint64_t z_kept = 0;
  for (uint64_t z : part_kept) z_kept += z;
  uint64_t target = draw_target(row_uniform(seed, position), z_kept);
  int c = 0;
  while (c < nchunks - 1 && target >= part_kept[c]) target -= part_kept[c++];
  int64_t lo, hi;
  chunk_range(V, nchunks, c, &lo, &hi);
  uint64_t acc = 0;
  int64_t tok = -1;
  for (int64_t i = lo; i < hi; ++i) {
    if (!kept(y[i], e[i], out.tau, p.min_p)) continue;
    acc += fixed_mass(e[i]);
    tok = i;  // last kept so far: the answer if the target is never passed (cannot happen)
    if (acc > target) break;
  }
  out.token = tok < 0 ? 0 : tok;
  out.logprob = (y[out.token] - m) - (float)std::log((double)z_kept / kMassScale);
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
  const int inner = (B >= threads || V < 8192) ? 1 : threads;
  if (inner == 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r = 0; r < B; ++r) fn(r, 1);
  } else {
    for (int64_t r = 0; r < B; ++r) fn(r, inner);
  }
}

}  // namespace

void sample_cpu(const SampleArgs& a) {
  for_each_row(a.B, a.V, [&](int64_t r, int inner) {
    const char* x = static_cast<const char*>(a.logits) + r * a.logits_stride * elem_bytes(a.dtype);
    const float* bias = a.bias ? a.bias + r * a.bias_stride : nullptr;
    const uint8_t* allowed = a.allowed ? a.allowed + r * a.allowed_stride : nullptr;
    RowOut o = process_row(x, a.dtype, a.V, bias, allowed, row_params(a, r), true, a.seed[r],
                           a.position[r], inner, tls_scratch);
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
    Scratch& s = tls_scratch;
    RowOut o = process_row(x, a.dtype, a.V, nullptr, nullptr, p, false, 0, 0, inner, s);
    std::memcpy(out, x, a.V * eb);
    if (!o.valid) return;  // nothing finite: leave the row as it is
    const float* y = s.y.data();
    const float* e = s.e.data();
    for (int64_t i = 0; i < a.V; ++i) {
      if (kept(y[i], e[i], o.tau, o.min_p)) continue;
      if (a.dtype == DType::F32) reinterpret_cast<float*>(out)[i] = a.filter_value;
      else reinterpret_cast<uint16_t*>(out)[i] = a.filter_bits16;
    }
  });
}

}  // namespace llmkern
