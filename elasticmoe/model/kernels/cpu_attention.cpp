// Decode attention over the paged K/V cache on CPU, bf16: one query per sequence.
//
// The torch path gathers every sequence's blocks into a padded [B, Hkv, S, D] copy and
// calls SDPA with an additive mask; on CPUs without AMX, SDPA's bf16 flash kernel runs its
// tiny per-(sequence, head) matmuls on a slow path. This reads each key and value row in
// place through the block table, once per (sequence, KV head), for all G query heads that
// share it: scores and softmax in fp32, the values summed in fp32, one rounding to bf16.
//
// Built with cpu_moe.cpp into one extension by elasticmoe.model.kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

using bf16 = at::BFloat16;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t L = 16;  // floats per AVX512 register

// 16 bf16 at p as 16 floats (bf16 is the top half of an fp32).
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// q [B, Hq, D] bf16, the decode rows; k_cache, v_cache [N, bs, Hkv, D] bf16; positions [B]
// int64, each query's position (it sees keys 0..pos, the last `window` of them when window
// > 0); block_tables [B, MB] int64. Returns [B, Hq, D] bf16.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& positions,
                            const at::Tensor& block_tables, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16, "q must be [B, Hq, D] bf16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kBFloat16,
              "caches must be [N, bs, Hkv, D] bf16, alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong,
              "positions and block tables must be int64");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % L == 0 && D <= 512, "head_dim must match, a multiple of 16");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(positions.numel() == B && block_tables.dim() == 2 && block_tables.size(0) == B,
              "one position and one block table per query");
  const int64_t G = Hq / Hkv, MB = block_tables.size(1), nc = D / L;
  auto qc = q.contiguous();
  auto pos_t = positions.contiguous();
  auto tab_t = block_tables.contiguous();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* tab = tab_t.data_ptr<int64_t>();
  int64_t max_keys = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < MB * bs, "position ", pos[b], " past the block table");
    for (int64_t j = 0; j <= pos[b] / bs; ++j)
      TORCH_CHECK(tab[b * MB + j] >= 0 && tab[b * MB + j] < N, "block id out of range");
    max_keys = std::max(max_keys, pos[b] + 1);
  }
  auto out = at::empty({B, Hq, D}, q.options());
  const bf16* Q = qc.data_ptr<bf16>();
  const bf16* K = k_cache.data_ptr<bf16>();
  const bf16* V = v_cache.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(G * D), probs(G * max_keys);
    std::vector<const bf16*> krow(max_keys), vrow(max_keys);
    __m512 acc[512 / L];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv;
      const int64_t last = pos[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t S = last - first + 1;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < nc; ++c)
          _mm512_storeu_ps(&qf[g * D + c * L], load16(Q + (b * Hq + h * G + g) * D + c * L));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t p = first + s;
        const int64_t row = (tab[b * MB + p / bs] * bs + p % bs) * Hkv + h;
        krow[s] = K + row * D;
        vrow[s] = V + row * D;
      }
      // scores: each key row read once for the G heads
      for (int64_t s = 0; s < S; ++s) {
        const bf16* k = krow[s];
        for (int64_t g = 0; g < G; ++g) {
          __m512 dot = _mm512_setzero_ps();
          for (int64_t c = 0; c < nc; ++c)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[g * D + c * L]), load16(k + c * L), dot);
          probs[g * S + s] = _mm512_reduce_add_ps(dot) * fscale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* pr = &probs[g * S];
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) mx = std::max(mx, pr[s]);
        const fVec vmx(mx);
        fVec vsum(0.f);
        int64_t s = 0;
        for (; s + L <= S; s += L) {
          const fVec e = (fVec::loadu(pr + s) - vmx).exp();
          e.store(pr + s);
          vsum = vsum + e;
        }
        float sum = _mm512_reduce_add_ps(vsum);
        for (; s < S; ++s) {
          pr[s] = std::exp(pr[s] - mx);
          sum += pr[s];
        }
        for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t s2 = 0; s2 < S; ++s2) {
          const __m512 w = _mm512_set1_ps(pr[s2]);
          const bf16* v = vrow[s2];
          for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_fmadd_ps(w, load16(v + c * L), acc[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.f / sum);
        bf16* o = O + (b * Hq + h * G + g) * D;
        for (int64_t c = 0; c < nc; ++c) {
          const fVec r(_mm512_mul_ps(acc[c], inv));
          at::vec::convert_from_float<bf16>(r, r).store(o + c * L, L);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elasticmoe_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, "
      "Tensor block_tables, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(elasticmoe_cpu, CPU, m) { m.impl("decode_attention", decode_attention); }
