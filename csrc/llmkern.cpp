// The one torch-facing translation unit: op schemas (TORCH_LIBRARY llmkern), argument checks,
// and the CPU / CUDA implementations that hand raw pointers to the kernels. Kernels live in
// cpu/*.cpp and cuda/*.cu without torch headers so that they compile fast.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef LLMKERN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>

#include "sampling.h"

namespace llmkern {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "llmkern: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Per-row parameter: a contiguous [B] tensor of the given dtype on the logits' device.
at::Tensor row_param(const at::Tensor& t, at::ScalarType st, int64_t B, const at::Tensor& like,
                     const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "llmkern: ", name, " must have shape [", B, "]");
  if (t.scalar_type() == st && t.device() == like.device() && t.is_contiguous()) return t;  // no dispatch
  return t.to(like.device(), st).contiguous();
}

// Optional [V] or [B, V] side input; returns (contiguous tensor, row stride).
std::pair<at::Tensor, int64_t> row_side(const c10::optional<at::Tensor>& t, at::ScalarType st,
                                        int64_t B, int64_t V, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return {at::Tensor(), 0};
  TORCH_CHECK((t->dim() == 1 && t->size(0) == V) || (t->dim() == 2 && t->size(0) == B && t->size(1) == V),
              "llmkern: ", name, " must have shape [", V, "] or [", B, ", ", V, "]");
  at::Tensor c = t->to(like.device(), st).contiguous();
  return {c, c.dim() == 2 ? V : 0};
}

#ifdef LLMKERN_WITH_CUDA
// Zeroed scratch for the CUDA kernels' split prepass when the batch is too small to fill the GPU
// (see split_slices_for in sampling.h); LLMKERN_SAMPLE_SPLIT=0 turns it off. Returns the slices.
int split_scratch(const at::Tensor& logits, at::Tensor* buf, uint64_t** ptr) {
  const char* env = std::getenv("LLMKERN_SAMPLE_SPLIT");
  if (env && std::strcmp(env, "0") == 0) return 0;
  const int64_t B = logits.size(0), V = logits.size(1);
  const int slices = split_slices_for(B, V, cuda_sm_count());
  if (slices == 0) return 0;
  *buf = at::zeros({split_words(B)}, logits.options().dtype(at::kLong));
  *ptr = reinterpret_cast<uint64_t*>(buf->data_ptr<int64_t>());
  return slices;
}
#endif

at::Tensor logits_2d(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "llmkern: logits must be [batch, vocab]");
  TORCH_CHECK(logits.size(1) >= 1, "llmkern: vocab must be non-empty");
  // each token's weight is up to 2^40 in the kernels' 64-bit fixed-point mass sums: 2^24 tied tokens wrap to 0
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 24), "llmkern: vocab must be below 2^24 (fixed-point mass sums)");
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_impl(
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& allowed, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& position) {
  at::Tensor logits = logits_2d(logits_in);
  const int64_t B = logits.size(0), V = logits.size(1);
  auto t = row_param(temperature, at::kFloat, B, logits, "temperature");
  auto k = row_param(top_k, at::kLong, B, logits, "top_k");
  auto p = row_param(top_p, at::kFloat, B, logits, "top_p");
  auto mp = row_param(min_p, at::kFloat, B, logits, "min_p");
  auto sd = row_param(seed, at::kLong, B, logits, "seed");
  auto pos = row_param(position, at::kLong, B, logits, "position");
  auto [b, b_stride] = row_side(bias, at::kFloat, B, V, logits, "logit_bias");
  auto [al, al_stride] = row_side(allowed, at::kBool, B, V, logits, "allowed_tokens");
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  auto valid = at::empty({B}, logits.options().dtype(at::kBool));
  SampleArgs a;
  a.logits = logits.data_ptr();
  a.dtype = dtype_of(logits);
  a.B = B;
  a.V = V;
  a.logits_stride = logits.stride(0);
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.bias_stride = b_stride;
  a.allowed = al.defined() ? reinterpret_cast<const uint8_t*>(al.data_ptr<bool>()) : nullptr;
  a.allowed_stride = al_stride;
  a.temperature = t.data_ptr<float>();
  a.top_k = k.data_ptr<int64_t>();
  a.top_p = p.data_ptr<float>();
  a.min_p = mp.data_ptr<float>();
  a.seed = sd.data_ptr<int64_t>();
  a.position = pos.data_ptr<int64_t>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  a.valid = valid.data_ptr<bool>();
  if (B > 0) {
    if (logits.is_cuda()) {
#ifdef LLMKERN_WITH_CUDA
      c10::cuda::CUDAGuard guard(logits.device());
      at::Tensor split;
      a.split_slices = split_scratch(logits, &split, &a.split);
      sample_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
#endif
    } else {
      sample_cpu(a);
    }
  }
  return {tokens, logprobs, valid};
}

at::Tensor filter_impl(const at::Tensor& logits_in, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, double filter_value) {
  at::Tensor logits = logits_2d(logits_in);
  const int64_t B = logits.size(0), V = logits.size(1);
  auto k = row_param(top_k, at::kLong, B, logits, "top_k");
  auto p = row_param(top_p, at::kFloat, B, logits, "top_p");
  auto mp = row_param(min_p, at::kFloat, B, logits, "min_p");
  auto out = at::empty({B, V}, logits.options());
  FilterArgs a;
  a.logits = logits.data_ptr();
  a.out = out.data_ptr();
  a.dtype = dtype_of(logits);
  a.B = B;
  a.V = V;
  a.logits_stride = logits.stride(0);
  a.top_k = k.data_ptr<int64_t>();
  a.top_p = p.data_ptr<float>();
  a.min_p = mp.data_ptr<float>();
  a.filter_value = (float)filter_value;
  if (a.dtype != DType::F32) {
    at::Tensor fv = at::full({1}, filter_value, at::TensorOptions().dtype(logits.scalar_type()));
    a.filter_bits16 = *reinterpret_cast<const uint16_t*>(fv.data_ptr());
  }
  if (B > 0) {
    if (logits.is_cuda()) {
#ifdef LLMKERN_WITH_CUDA
      c10::cuda::CUDAGuard guard(logits.device());
      at::Tensor split;
      a.split_slices = split_scratch(logits, &split, &a.split);
      filter_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
#endif
    } else {
      filter_cpu(a);
    }
  }
  return out;
}

// llmkern.top_logprobs on CPU (no CUDA kernel: on GPUs the Python op composes torch ops).
// Returns (ids [B, n], logprobs [B, n], token_logprobs, token_ranks); the last two are [B] with
// tokens and empty without.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_impl(
    const at::Tensor& logits_in, int64_t n, const at::Tensor& temperature,
    const c10::optional<at::Tensor>& tokens) {
  at::Tensor logits = logits_2d(logits_in);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(n >= 0 && n <= V, "llmkern: n must be in [0, ", V, "], got ", n);
  auto t = row_param(temperature, at::kFloat, B, logits, "temperature");
  at::Tensor tok;
  if (tokens.has_value()) {
    tok = row_param(*tokens, at::kLong, B, logits, "tokens");
    const int64_t* p = tok.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r)  // an id out of range would read outside the row
      TORCH_CHECK(p[r] >= 0 && p[r] < V, "llmkern: tokens must be in [0, ", V, "), got ", p[r]);
  }
  auto ids = at::empty({B, n}, logits.options().dtype(at::kLong));
  auto lps = at::empty({B, n}, logits.options().dtype(at::kFloat));
  const int64_t nt = tok.defined() ? B : 0;
  auto tok_lp = at::empty({nt}, logits.options().dtype(at::kFloat));
  auto tok_rank = at::empty({nt}, logits.options().dtype(at::kLong));
  LogprobArgs a;
  a.logits = logits.data_ptr();
  a.dtype = dtype_of(logits);
  a.B = B;
  a.V = V;
  a.logits_stride = logits.stride(0);
  a.temperature = t.data_ptr<float>();
  a.n = n;
  a.tokens = tok.defined() ? tok.data_ptr<int64_t>() : nullptr;
  a.top_ids = ids.data_ptr<int64_t>();
  a.top_logprobs = lps.data_ptr<float>();
  a.token_logprobs = tok_lp.data_ptr<float>();
  a.token_ranks = tok_rank.data_ptr<int64_t>();
  if (B > 0) logprobs_cpu(a);
  return {ids, lps, tok_lp, tok_rank};
}

}  // namespace
}  // namespace llmkern

TORCH_LIBRARY(llmkern, m) {
  m.def(
      "sample(Tensor logits, Tensor? logit_bias, Tensor? allowed, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, Tensor seed, Tensor position) -> (Tensor, Tensor, Tensor)");
  m.def("top_k_top_p_filter(Tensor logits, Tensor top_k, Tensor top_p, Tensor min_p, float filter_value) -> Tensor");
  m.def("top_logprobs(Tensor logits, int n, Tensor temperature, Tensor? tokens) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmkern, CPU, m) {
  m.impl("sample", &llmkern::sample_impl);
  m.impl("top_k_top_p_filter", &llmkern::filter_impl);
  m.impl("top_logprobs", &llmkern::logprobs_impl);
}

#ifdef LLMKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(llmkern, CUDA, m) {
  m.impl("sample", &llmkern::sample_impl);
  m.impl("top_k_top_p_filter", &llmkern::filter_impl);
}
#endif

// A plain Python module: importing llmkern._C loads the library and runs the registrations above.
static struct PyModuleDef llmkern_module = {PyModuleDef_HEAD_INIT, "_C", "llmkern C++/CUDA ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&llmkern_module); }
