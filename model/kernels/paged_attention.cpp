// Paged attention for CPU, one query row at a time: the same arithmetic for every row whatever the batch.
//
// out[i, h] = softmax(q[i, h] . K[0..pos_i] * scale) V[0..pos_i], keys read in place from the paged
// cache through the token's block table. Each (token, K/V head) is one work item: its query heads
// share every key and value row it loads. Keys are folded in chunks of KEY_CHUNK aligned to absolute
// positions (0, 16, 32, ...) with the online softmax, in position order, so a row's result depends on
// its own query, its own keys and its position only: not on the other rows of the step, on how the
// prompt was chunked, on prefix-cache hits or on the thread count (work is split over items, never
// over keys). The dot products and the value sums keep one fixed order; expf is the C library's.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KV_AVX2 1
#endif

namespace {

constexpr int64_t KEY_CHUNK = 16;
constexpr int64_t MAX_HEAD_DIM = 256;
constexpr int64_t MAX_GROUP = 32;

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Row `src` (D elements of T) as float32 into dst.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
}

#ifdef KV_AVX2
inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);                   // lanes (0+4, 1+5, 2+6, 3+7)
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));          // (0+4+2+6, 1+5+3+7, ...)
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));   // + the second
  return _mm_cvtss_f32(s);
}
#endif

// q . k over D floats, in one fixed order (8 lanes, then a fixed horizontal sum).
inline float dot(const float* q, const float* k, int64_t D) {
#ifdef KV_AVX2
  if (D % 8 == 0) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int64_t d = 8; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    return hsum8(acc);
  }
#endif
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc = std::fma(q[d], k[d], acc);
  return acc;
}

// acc = acc * alpha (alpha != 1 only), then acc += p * v, over D floats.
inline void scale_add(float* acc, float alpha, float p, const float* v, int64_t D) {
#ifdef KV_AVX2
  if (D % 8 == 0) {
    __m256 a = _mm256_set1_ps(alpha), w = _mm256_set1_ps(p);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 x = _mm256_loadu_ps(acc + d);
      if (alpha != 1.f) x = _mm256_mul_ps(x, a);
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + d), x));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(p, v[d], alpha != 1.f ? acc[d] * alpha : acc[d]);
}

template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* seq_of,
            const int64_t* positions, float* out, int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
            int64_t table_width, float scale) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, N * Hkv, 1, [&](int64_t begin, int64_t end) {
    float qf[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];
    float kf[KEY_CHUNK * MAX_HEAD_DIM], vf[KEY_CHUNK * MAX_HEAD_DIM];
    float scores[MAX_GROUP * KEY_CHUNK], m[MAX_GROUP], l[MAX_GROUP];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / Hkv, h = item % Hkv;
      const int64_t pos = positions[i];
      const int64_t* table = tables + seq_of[i] * table_width;
      for (int64_t g = 0; g < G; ++g) {
        load_row(q + (i * Hq + h * G + g) * D, qf + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
        for (int64_t d = 0; d < D; ++d) acc[g * D + d] = 0.f;
      }
      for (int64_t c0 = 0; c0 <= pos; c0 += KEY_CHUNK) {
        const int64_t n = std::min(KEY_CHUNK, pos + 1 - c0);  // keys of this chunk the row sees
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = c0 + j;
          const int64_t row = ((table[key / bs] * Hkv + h) * bs + key % bs) * D;
          load_row(k_cache + row, kf + j * D, D);
          load_row(v_cache + row, vf + j * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores + g * KEY_CHUNK;
          float chunk_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < n; ++j) {
            s[j] = dot(qf + g * D, kf + j * D, D);
            chunk_max = std::max(chunk_max, s[j]);
          }
          const float m_new = std::max(m[g], chunk_max);
          float alpha = m[g] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[g] - m_new);
          if (m[g] == m_new) alpha = 1.f;
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) {
            const float p = std::exp(s[j] - m_new);
            sum += p;
            scale_add(acc + g * D, j == 0 ? alpha : 1.f, p, vf + j * D, D);
          }
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
