// Routed experts of one MoE layer on CPU, bf16, with prepacked (VNNI) weights.
//
// The same arithmetic as elasticmoe.model.moe's batched path (gate/up matmul accumulated in
// fp32 and rounded to bf16, silu and the product each rounded to bf16, the down matmul
// rounded to bf16, the gate weight multiplied in bf16, and each token's pairs added in
// ascending expert order as the torch path adds them), but the matmuls are oneDNN brgemm
// micro-kernels (AMX where the CPU has it, through ATen's cpublas) over weights packed once,
// instead of torch.bmm, which repacks every expert's weights on every call. On a CPU
// with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake), where ATen's cpublas has no
// bf16 micro-kernel, the matmuls are this file's own (vdpbf16ps over the same packed layout).
//
// Built on first use by elasticmoe.model.kernels (torch.utils.cpp_extension).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t BN = 32;  // output columns per packed weight block
constexpr int64_t BM = 16;  // rows per micro-kernel call (one AMX tile's height)

using bf16 = at::BFloat16;
using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<bf16>;

// Which micro-kernel the matmuls run on: ATen's cpublas brgemm (oneDNN; AMX), this file's
// AVX512-BF16 one, or none (the extension is then off and torch's path runs; its name is "").
enum class Backend { kNone, kBrgemm, kAvx512Bf16 };

Backend backend_here() {
  static const Backend b = [] {
    if (at::native::cpublas::could_pack(at::kBFloat16)) return Backend::kBrgemm;
    if (__builtin_cpu_supports("avx512bf16")) return Backend::kAvx512Bf16;
    return Backend::kNone;
  }();
  return b;
}

std::string backend_name() {
  switch (backend_here()) {
    case Backend::kBrgemm: return "brgemm";
    case Backend::kAvx512Bf16: return "avx512_bf16";
    default: return "";
  }
}

// VNNI layout of one [K, BN] block of B (row-major, leading dimension ld): [K / 2, BN, 2],
// the pair (B[k][n], B[k + 1][n]) side by side, as vdpbf16ps reads it.
void pack_vnni(int64_t K, int64_t ld, const bf16* src, bf16* dst) {
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t n = 0; n < BN; ++n) {
      dst[k * BN + 2 * n] = src[k * ld + n];
      dst[k * BN + 2 * n + 1] = src[(k + 1) * ld + n];
    }
}

// C[ROWS, BN] (fp32, ld BN) = A[ROWS, K] (bf16, ld lda) x B (one pack_vnni block), each
// output summed over k in ascending pairs in one fp32 accumulator.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_rows(
    int64_t K, const bf16* A, int64_t lda, const bf16* B, float* C) {
  static_assert(BN == 32, "two 16-float accumulators per row");
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + k * BN);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + k * BN + 32);
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(C + r * BN, acc[r][0]);
    _mm512_storeu_ps(C + r * BN + 16, acc[r][1]);
  }
}

// C[rows, BN] = A[rows, K] x B: 8 rows at a time (16 accumulators, 2 B and 1 A register).
void dot_block(int64_t rows, int64_t K, const bf16* A, int64_t lda, const bf16* B, float* C) {
  for (int64_t r = 0; r < rows; r += 8) {
    const bf16* a = A + r * lda;
    float* c = C + r * BN;
    switch (std::min<int64_t>(8, rows - r)) {
      case 1: dot_rows<1>(K, a, lda, B, c); break;
      case 2: dot_rows<2>(K, a, lda, B, c); break;
      case 3: dot_rows<3>(K, a, lda, B, c); break;
      case 4: dot_rows<4>(K, a, lda, B, c); break;
      case 5: dot_rows<5>(K, a, lda, B, c); break;
      case 6: dot_rows<6>(K, a, lda, B, c); break;
      case 7: dot_rows<7>(K, a, lda, B, c); break;
      default: dot_rows<8>(K, a, lda, B, c); break;
    }
  }
}

// C[BM, BN] (rows past `rows` undefined) = A[BM, K] x one packed block of B, on this CPU's
// micro-kernel. A's rows past `rows` are zeros.
inline void matmul_block(Backend be, int64_t rows, int64_t K, const bf16* A, const bf16* B,
                         float* C) {
  if (be == Backend::kBrgemm)
    at::native::cpublas::brgemm(BM, BN, K, K, BN, BN, false, A, B, C);
  else
    dot_block(rows, K, A, K, B, C);
}

// w: [E, N, K] bf16 (each expert as nn.Linear stores it: out x in). Returns B = w[e]^T,
// VNNI-packed in blocks of BN output columns: [E, N / BN, K * BN].
at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kBFloat16,
              "pack_weight: w must be [E, N, K] bf16");
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  TORCH_CHECK(N % BN == 0 && K % 2 == 0, "pack_weight: N must be a multiple of ", BN,
              " and K even");
  auto wt = w.transpose(1, 2).contiguous();  // [E, K, N] row-major
  auto packed = at::empty({E, N / BN, K * BN}, w.options());
  const bf16* src = wt.data_ptr<bf16>();
  bf16* dst = packed.data_ptr<bf16>();
  const int64_t blocks = N / BN;
  const Backend be = backend_here();
  TORCH_CHECK(be != Backend::kNone, "pack_weight: no bf16 micro-kernel on this CPU");
  at::parallel_for(0, E * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = b / blocks, nb = b % blocks;
      const bf16* from = src + e * K * N + nb * BN;
      if (be == Backend::kBrgemm)
        at::native::cpublas::pack(K, BN, N, BN, at::kBFloat16, at::kBFloat16, from,
                                  dst + b * K * BN);
      else
        pack_vnni(K, N, from, dst + b * K * BN);
    }
  });
  return packed;
}

inline fVec round_bf16(const fVec& x) {
  // x rounded to bf16 and back (round to nearest even, as a bf16 tensor stores it)
  return std::get<0>(at::vec::convert_to_float<bf16>(at::vec::convert_from_float<bf16>(x, x)));
}

inline void store_bf16(const fVec& x, bf16* dst) {
  at::vec::convert_from_float<bf16>(x, x).store(dst, fVec::size());
}

// hidden [T, H] bf16; pairs (token_idx, expert_idx, weights) [P] (int64, int64, bf16), in
// any order (token_idx None: the gate's [T, k] layout flattened), at most one pair per
// (token, expert); w13p: pack_weight of [E, 2I, H] (gate rows then up rows); w2p:
// pack_weight of [E, H, I]. Returns [T, H] bf16: per token the sum
// of weight * expert(hidden[token]) over its pairs, added in ascending expert order, either
// rounded to bf16 after every add (fp32_sum false) or summed in fp32 and rounded once.
at::Tensor moe_pairs(const at::Tensor& hidden, const std::optional<at::Tensor>& token_idx,
                     const at::Tensor& expert_idx, const at::Tensor& weights,
                     const at::Tensor& w13p, const at::Tensor& w2p, bool fp32_sum) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kBFloat16,
              "hidden must be [T, H] bf16");
  TORCH_CHECK(expert_idx.scalar_type() == at::kLong, "expert_idx must be int64");
  TORCH_CHECK(weights.scalar_type() == at::kBFloat16, "weights must be bf16");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t P = expert_idx.numel();
  const int64_t E = w13p.size(0);
  const int64_t I = w13p.size(1) * BN / 2;
  TORCH_CHECK(weights.numel() == P, "pair tensors differ in length");
  TORCH_CHECK(w13p.size(2) == H * BN && w2p.size(0) == E && w2p.size(1) * BN == H &&
                  w2p.size(2) == I * BN,
              "packed weights do not match hidden size ", H);
  auto x = hidden.contiguous();
  // No token_idx: the gate's layout, pair p = (token p / k, slot p % k) for k = P / T.
  at::Tensor tok_t;
  std::vector<int64_t> gate_tokens;
  const int64_t* tok = nullptr;
  if (token_idx.has_value()) {
    TORCH_CHECK(token_idx->scalar_type() == at::kLong && token_idx->numel() == P,
                "token_idx must be int64, one per pair");
    tok_t = token_idx->contiguous();
    tok = tok_t.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(T > 0 ? P % T == 0 : P == 0, "without token_idx, pairs must be T x top_k");
    const int64_t k = T > 0 ? P / T : 1;
    gate_tokens.resize(P);
    for (int64_t p = 0; p < P; ++p) gate_tokens[p] = p / k;
    tok = gate_tokens.data();
  }
  auto eid_t = expert_idx.contiguous();
  auto wt_t = weights.contiguous();
  const int64_t* eid = eid_t.data_ptr<int64_t>();
  const bf16* pw = wt_t.data_ptr<bf16>();

  // Pairs sorted by expert (stable), then cut into blocks of BM rows within one expert.
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(eid[p] >= 0 && eid[p] < E && tok[p] >= 0 && tok[p] < T, "pair out of range");
    ++offsets[eid[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> order(P);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < P; ++p) order[fill[eid[p]]++] = p;
  }
  std::vector<int64_t> blk_start, blk_rows, first_blk(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    first_blk[e] = blk_start.size();
    for (int64_t m = offsets[e]; m < offsets[e + 1]; m += BM) {
      blk_start.push_back(m);
      blk_rows.push_back(std::min(BM, offsets[e + 1] - m));
    }
  }
  const int64_t nblk = blk_start.size();
  first_blk[E] = nblk;

  auto opts = hidden.options();
  auto a = at::zeros({nblk * BM, H}, opts);    // rows in expert order, blocks zero-padded
  auto act = at::zeros({nblk * BM, I}, opts);  // silu(gate) * up
  auto y = at::empty({std::max<int64_t>(P, 1), H}, opts);  // per sorted pair, weighted
  const bf16* X = x.data_ptr<bf16>();
  bf16* A = a.data_ptr<bf16>();
  bf16* ACT = act.data_ptr<bf16>();
  bf16* Y = y.data_ptr<bf16>();
  const bf16* W13 = w13p.data_ptr<bf16>();
  const bf16* W2 = w2p.data_ptr<bf16>();
  for (int64_t b = 0; b < nblk; ++b)
    for (int64_t r = 0; r < blk_rows[b]; ++r)
      std::memcpy(A + (b * BM + r) * H, X + tok[order[blk_start[b] + r]] * H, H * sizeof(bf16));

  // Gate/up: one task per (expert, column block), over all of the expert's row blocks, so a
  // weight block is read once per call.
  const int64_t nb13 = I / BN;
  const Backend be = backend_here();
  TORCH_CHECK(be != Backend::kNone, "moe_pairs: no bf16 micro-kernel on this CPU");
  at::parallel_for(0, E * nb13, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float cg[BM * BN];
    alignas(64) float cu[BM * BN];
    const fVec one(1.f);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / nb13, j = t % nb13;
      if (first_blk[e] == first_blk[e + 1]) continue;
      const bf16* bg = W13 + (e * 2 * nb13 + j) * H * BN;
      const bf16* bu = W13 + (e * 2 * nb13 + nb13 + j) * H * BN;
      for (int64_t b = first_blk[e]; b < first_blk[e + 1]; ++b) {
        matmul_block(be, blk_rows[b], H, A + b * BM * H, bg, cg);
        matmul_block(be, blk_rows[b], H, A + b * BM * H, bu, cu);
        for (int64_t r = 0; r < blk_rows[b]; ++r) {
          bf16* o = ACT + (b * BM + r) * I + j * BN;
          for (int64_t c = 0; c < BN; c += fVec::size()) {
            const fVec g = round_bf16(fVec::loadu(cg + r * BN + c));
            const fVec u = round_bf16(fVec::loadu(cu + r * BN + c));
            const fVec s = round_bf16(g / (one + g.neg().exp()));
            store_bf16(s * u, o + c);
          }
        }
      }
    }
    if (be == Backend::kBrgemm) at::native::cpublas::brgemm_release();
  });

  // Down projection, times the pair's gate weight (both rounded to bf16).
  const int64_t nb2 = H / BN;
  at::parallel_for(0, E * nb2, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float c2[BM * BN];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / nb2, j = t % nb2;
      if (first_blk[e] == first_blk[e + 1]) continue;
      const bf16* bw = W2 + (e * nb2 + j) * I * BN;
      for (int64_t b = first_blk[e]; b < first_blk[e + 1]; ++b) {
        matmul_block(be, blk_rows[b], I, ACT + b * BM * I, bw, c2);
        for (int64_t r = 0; r < blk_rows[b]; ++r) {
          const int64_t s = blk_start[b] + r;
          const fVec w(static_cast<float>(pw[order[s]]));
          bf16* o = Y + s * H + j * BN;
          for (int64_t c = 0; c < BN; c += fVec::size())
            store_bf16(round_bf16(fVec::loadu(c2 + r * BN + c)) * w, o + c);
        }
      }
    }
    if (be == Backend::kBrgemm) at::native::cpublas::brgemm_release();
  });

  // Combine: each token's pairs in ascending expert order (the sorted order), from zero.
  std::vector<int64_t> tok_offsets(T + 1, 0), by_token(P);
  for (int64_t s = 0; s < P; ++s) ++tok_offsets[tok[order[s]] + 1];
  for (int64_t t = 0; t < T; ++t) tok_offsets[t + 1] += tok_offsets[t];
  {
    std::vector<int64_t> fill(tok_offsets.begin(), tok_offsets.end() - 1);
    for (int64_t s = 0; s < P; ++s) by_token[fill[tok[order[s]]]++] = s;
  }
  auto out = at::zeros({T, H}, opts);
  bf16* OUT = out.data_ptr<bf16>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      bf16* o = OUT + t * H;
      const int64_t q0 = tok_offsets[t], q1 = tok_offsets[t + 1];
      if (q0 == q1) continue;
      if (fp32_sum) {  // as one index_add_ call sums on CPU: in fp32, one rounding at the end
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t q = q0; q < q1; ++q) {
          const bf16* v = Y + by_token[q] * H;
          for (int64_t c = 0; c < H; ++c) acc[c] += static_cast<float>(v[c]);
        }
        for (int64_t c = 0; c < H; ++c) o[c] = static_cast<bf16>(acc[c]);
        continue;
      }
      for (int64_t q = q0; q < q1; ++q) {  // one bf16 rounding per add, as `out += y_k` does
        const bf16* v = Y + by_token[q] * H;
        int64_t c = 0;
        for (; c + bVec::size() <= H; c += bVec::size()) {
          auto [o0, o1] = at::vec::convert_to_float<bf16>(bVec::loadu(o + c));
          auto [v0, v1] = at::vec::convert_to_float<bf16>(bVec::loadu(v + c));
          at::vec::convert_from_float<bf16>(o0 + v0, o1 + v1).store(o + c);
        }
        for (; c < H; ++c)
          o[c] = static_cast<bf16>(static_cast<float>(o[c]) + static_cast<float>(v[c]));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(elasticmoe_cpu, m) {
  m.def("backend() -> str", backend_name);
  m.def("pack_weight(Tensor w) -> Tensor");
  m.def(
      "moe_pairs(Tensor hidden, Tensor? token_idx, Tensor expert_idx, Tensor weights, "
      "Tensor w13p, Tensor w2p, bool fp32_sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(elasticmoe_cpu, CPU, m) {
  m.impl("pack_weight", pack_weight);
  m.impl("moe_pairs", moe_pairs);
}
