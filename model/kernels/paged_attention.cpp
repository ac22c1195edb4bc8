// Paged attention for CPU, one query row at a time: the same arithmetic for every row whatever the batch.
//
// out[i, h] = softmax(q[i, h] . K[0..pos_i] * scale) V[0..pos_i], keys read in place from the paged
// cache through the token's block table. Each (token, K/V head) is one work item: its query heads
// share every key and value row it loads. Keys are folded in chunks of KEY_CHUNK aligned to absolute
// positions (0, 16, 32, ...) with the online softmax, in position order, so a row's result depends on
// its own query, its own keys and its position only: not on the other rows of the step, on how the
// prompt was chunked, on prefix-cache hits or on the thread count (work is split over items, never
// over keys). Each score is one fixed chain (8 lanes over head_dim, then a fixed lane sum), however
// many keys its chunk holds; exp is one polynomial per build (AVX2) or the C library's (portable).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KV_AVX2 1
#endif

namespace {

constexpr int64_t KEY_CHUNK = 16;
constexpr int64_t MAX_HEAD_DIM = 256;
constexpr int64_t MAX_GROUP = 32;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Row `src` of D elements as float32: itself for float caches, else converted into `buf`.
template <typename T>
inline const float* row_as_float(const T* src, float* buf, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = to_float(src[d]);
    return buf;
  }
}

#ifdef KV_AVX2
// exp(x) for 8 floats: Cephes' expf polynomial (range reduction by ln 2 in two parts), about 1 ulp.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The 8 dot products q . k[j] (D a multiple of 8): lane j of the result is key j's score.
inline __m256 dot8(const float* q, const float* const* k, int64_t D) {
  __m256 a[8];
  const __m256 q0 = _mm256_loadu_ps(q);
  for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(q0, _mm256_loadu_ps(k[j]));
  for (int64_t d = 8; d < D; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[j] + d), a[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// scores[j] = q . k[j] for j < n (n <= KEY_CHUNK); keys past n are not read.
inline void scores_of(const float* q, const float* const* k, int64_t n, int64_t D, const float* zero, float* scores) {
#ifdef KV_AVX2
  if (D % 8 == 0) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const float* rows[8];
      for (int64_t j = 0; j < 8; ++j) rows[j] = j0 + j < n ? k[j0 + j] : zero;  // a padding key reads zeros
      _mm256_storeu_ps(scores + j0, dot8(q, rows, D));
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc = std::fma(q[d], k[j][d], acc);
    scores[j] = acc;
  }
}

// p[j] = exp(s[j] - m) for j < n, 0 beyond (up to the next multiple of 8).
inline void exps(const float* s, float m, int64_t n, float* p) {
#ifdef KV_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j0), mv));
    const __m256 idx = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(j0)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    e = _mm256_and_ps(e, _mm256_cmp_ps(idx, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ));
    _mm256_storeu_ps(p + j0, e);
  }
  return;
#endif
  for (int64_t j = 0; j < n; ++j) p[j] = std::exp(s[j] - m);
}

// acc = acc * alpha + sum_j p[j] v[j], keys in order.
inline void fold_values(float* acc, float alpha, const float* p, const float* const* v, int64_t n, int64_t D) {
#ifdef KV_AVX2
  if (D % 8 == 0) {
    const __m256 a = _mm256_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(acc + d), a);
      for (int64_t j = 0; j < n; ++j) x = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v[j] + d), x);
      _mm256_storeu_ps(acc + d, x);
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) {
    float x = acc[d] * alpha;
    for (int64_t j = 0; j < n; ++j) x = std::fma(p[j], v[j][d], x);
    acc[d] = x;
  }
}

template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* seq_of,
            const int64_t* positions, float* out, int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
            int64_t table_width, float scale) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, N * Hkv, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float qf[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM], zero[MAX_HEAD_DIM] = {0};
    alignas(32) float kbuf[KEY_CHUNK * MAX_HEAD_DIM], vbuf[KEY_CHUNK * MAX_HEAD_DIM];
    alignas(32) float s[KEY_CHUNK], p[KEY_CHUNK];
    float m[MAX_GROUP], l[MAX_GROUP];
    const float* krow[KEY_CHUNK];
    const float* vrow[KEY_CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / Hkv, h = item % Hkv;
      const int64_t pos = positions[i];
      const int64_t* table = tables + seq_of[i] * table_width;
      for (int64_t g = 0; g < G; ++g) {
        const T* src = q + (i * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(src[d]) * scale;
        m[g] = NEG_INF;
        l[g] = 0.f;
        std::fill(acc + g * D, acc + (g + 1) * D, 0.f);
      }
      for (int64_t c0 = 0; c0 <= pos; c0 += KEY_CHUNK) {
        const int64_t n = std::min(KEY_CHUNK, pos + 1 - c0);  // keys of this chunk the row sees
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = c0 + j;
          const int64_t row = ((table[key / bs] * Hkv + h) * bs + key % bs) * D;
          krow[j] = row_as_float(k_cache + row, kbuf + j * D, D);
          vrow[j] = row_as_float(v_cache + row, vbuf + j * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          scores_of(qf + g * D, krow, n, D, zero, s);
          const float m_new = std::max(m[g], *std::max_element(s, s + n));
          const float alpha = m[g] == NEG_INF ? 0.f : std::exp(m[g] - m_new);
          exps(s, m_new, n, p);
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) sum += p[j];
          fold_values(acc + g * D, alpha, p, vrow, n, D);
          l[g] = l[g] * alpha + sum;
          m[g] = m_new;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (i * Hq + h * G + g) * D;
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
      }
    }
  });
}

}  // namespace
// q (N, Hq, D); caches (num_blocks, Hkv, block_size, D) of q's dtype; block_tables (S, W) int64;
// seq_of_token, positions (N,) int64. Returns (N, Hq, D) float32.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor seq_of_token, torch::Tensor positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_attention: bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "paged_attention: head shapes disagree");
  TORCH_CHECK(D <= MAX_HEAD_DIM && Hq / Hkv <= MAX_GROUP, "paged_attention: head_dim <= 256 and group <= 32");
  auto q_c = q.contiguous();
  auto k_c = k_cache.contiguous(), v_c = v_cache.contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto seq_of = seq_of_token.to(torch::kLong).contiguous();
  auto pos = positions.to(torch::kLong).contiguous();
  auto out = torch::empty({N, Hq, D}, q.options().dtype(torch::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    attend<scalar_t>(q_c.data_ptr<scalar_t>(), k_c.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(),
                     tables.data_ptr<int64_t>(), seq_of.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                     out.data_ptr<float>(), N, Hq, Hkv, D, bs, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_of_token, "
        "Tensor positions, float scale) -> Tensor", &paged_attention);
}
