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

// The n bf16 at p into L1, one 64-byte line at a time.
inline void prefetch(const bf16* p, int64_t n) {
  for (int64_t x = 0; x < n; x += 32)
    _mm_prefetch(reinterpret_cast<const char*>(p + x), _MM_HINT_T0);
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
  TORCH_CHECK(k_cache.size(3) == D && D % L == 0 && D <= 512,
              "head_dim must match the cache's, a multiple of 16 up to 512");
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

  // Tasks are (sequence, KV head) pairs; a thread's range is cut into runs of one
  // sequence's consecutive KV heads, which lie side by side in each cache row, so a run
  // reads its keys (then its values) as whole contiguous rows.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(Hq * D), probs(Hq * max_keys), accf(Hq * D);
    std::vector<int64_t> row(max_keys);  // offset of key s's run in either cache
    for (int64_t t = t0; t < t1;) {
      const int64_t b = t / Hkv, h0 = t % Hkv, h1 = std::min(Hkv, h0 + (t1 - t));
      t += h1 - h0;
      const int64_t nq = (h1 - h0) * G;  // query heads h0 * G .. h1 * G - 1
      const int64_t last = pos[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t S = last - first + 1;
      const bf16* qb = Q + (b * Hq + h0 * G) * D;
      for (int64_t i = 0; i < nq * nc; ++i) _mm512_storeu_ps(&qf[i * L], load16(qb + i * L));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t p = first + s;
        row[s] = ((tab[b * MB + p / bs] * bs + p % bs) * Hkv + h0) * D;
      }
      const int64_t run = (h1 - h0) * D;  // bf16 of one cache row this run reads
      for (int64_t s = 0; s < S; ++s) {
        if (s + 4 < S) prefetch(K + row[s + 4], run);
        for (int64_t hh = 0; hh < h1 - h0; ++hh) {
          const bf16* k = K + row[s] + hh * D;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t i = hh * G + g;
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; ++c)
              dot = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[i * D + c * L]), load16(k + c * L), dot);
            probs[i * S + s] = _mm512_reduce_add_ps(dot) * fscale;
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {  // softmax of each query's scores, in place
        float* pr = &probs[i * S];
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
        const float inv = 1.f / sum;
        for (s = 0; s < S; ++s) pr[s] *= inv;
      }
      std::fill(accf.begin(), accf.begin() + nq * D, 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (s + 4 < S) prefetch(V + row[s + 4], run);
        for (int64_t hh = 0; hh < h1 - h0; ++hh) {
          const bf16* v = V + row[s] + hh * D;
          for (int64_t c = 0; c < nc; ++c) {
            const __m512 vc = load16(v + c * L);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t i = hh * G + g;
              float* a = &accf[i * D + c * L];
              _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(probs[i * S + s]), vc,
                                                  _mm512_loadu_ps(a)));
            }
          }
        }
      }
      bf16* ob = O + (b * Hq + h0 * G) * D;
      for (int64_t i = 0; i < nq * nc; ++i) {
        const fVec r = fVec::loadu(&accf[i * L]);
        at::vec::convert_from_float<bf16>(r, r).store(ob + i * L, L);
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
