// kvserve's CPU weight kernels: GGUF Q4_1 and Q8_0 weights times float32 activations, batch-invariant.
//
// As llama.cpp's ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0: each activation row is quantized
// per group of 32 to int8 (d_x = absmax / 127, q_x = round-half-even(x / d_x), s_x = d_x * sum q_x),
// then every output element is, over the groups g in order,
//     acc = fma(float(sum_k q_w * q_x), d_w * d_x, acc)      and for Q4_1 also   acc = fma(m_w, s_x, acc)
// The integer dot products are exact, so only those float operations round, in the same order for
// every row whatever M, the other rows, the thread count (threads split N, never K) or the code path
// (AVX2, AVX-VNNI / AVX512-VNNI, portable scalar): every path gives the same bits.
//
// Packed layout (built in Python, model/kernel_forms.py): N padded to blocks of 8 output rows; per
// block, per group, 8 fp16 d (and for Q4_1 8 fp16 m), then the codes as int32 lanes, one output row
// per lane, 4 consecutive k per lane:
//     Q4_1 (160 bytes): d[8] m[8], 4 x 32 bytes: vector j lane c byte b = q(c, 4j+b) | q(c, 16+4j+b) << 4
//     Q8_0 (272 bytes): d[8], 8 x 32 bytes: vector t lane c byte b = q(c, 4t+b)
// so one broadcast of 4 activation bytes meets 8 output rows, and no horizontal sum is ever needed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KV_SIMD 1
#endif

namespace {

constexpr int64_t GROUP = 32;
constexpr int64_t COLS = 8;          // output rows per packed block
constexpr int64_t Q4_BYTES = 160;    // one block-group of Q4_1
constexpr int64_t Q8_BYTES = 272;    // one block-group of Q8_0
constexpr int64_t ROW_TILE = 4;      // activation rows that share one unpacked weight block
constexpr int64_t PREFETCH = 1024;   // bytes ahead in the weight stream (one row: ~20% faster here)

// Activations quantized per group: q (M, K) int8, d and s (M, K / 32) float32.
struct QRows {
  std::unique_ptr<int8_t[]> q;  // not zeroed: every byte is written before it is read
  std::unique_ptr<float[]> d, s;
  int64_t k = 0, groups = 0;
  const int8_t* qs(int64_t row, int64_t g) const { return q.get() + row * k + g * GROUP; }
  float dx(int64_t row, int64_t g) const { return d[row * groups + g]; }
  float sx(int64_t row, int64_t g) const { return s[row * groups + g]; }
};

// ---- activation quantization (one row group); both versions give the same bits ----------------
// A group holding a NaN or an infinity gets d = s = NaN and codes 0: its row's outputs are NaN, on every path.
void mark_nan_group(int8_t* q, float* d, float* s) {
  std::memset(q, 0, GROUP);
  *d = *s = std::numeric_limits<float>::quiet_NaN();
}

void quantize_group_scalar(const float* x, int8_t* q, float* d, float* s) {
  float amax = 0.0f;
  for (int i = 0; i < GROUP; ++i) {
    if (!std::isfinite(x[i])) return mark_nan_group(q, d, s);
    amax = std::max(amax, std::fabs(x[i]));
  }
  const float dx = amax / 127.0f;
  const float inv = dx != 0.0f ? 1.0f / dx : 0.0f;
  int sum = 0;
  for (int i = 0; i < GROUP; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));  // round half to even
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *d = dx;
  *s = dx * static_cast<float>(sum);
}

#ifdef KV_SIMD
void quantize_group_simd(const float* x, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    const __m256 a = _mm256_andnot_ps(sign, v[i]);
    amax = _mm256_max_ps(amax, a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, largest, _CMP_NLE_UQ));  // inf or NaN
  }
  if (_mm256_movemask_ps(bad)) return mark_nan_group(q, d, s);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float dx = _mm_cvtss_f32(m4) / 127.0f;
  const __m256 inv = _mm256_set1_ps(dx != 0.0f ? 1.0f / dx : 0.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i)
    i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i total = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_hadd_epi32(t4, t4);
  t4 = _mm_hadd_epi32(t4, t4);
  // pack to int8 in order: packs works per 128-bit lane, so undo its lane interleave
  const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
  const __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  *d = dx;
  *s = dx * static_cast<float>(_mm_cvtsi128_si32(t4));
}
#endif

QRows quantize_rows(const at::Tensor& x, bool portable) {
  QRows out;
  const int64_t m = x.size(0);
  out.k = x.size(1);
  out.groups = out.k / GROUP;
  out.q.reset(new int8_t[m * out.k]);
  out.d.reset(new float[m * out.groups]);
  out.s.reset(new float[m * out.groups]);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < out.groups; ++g) {
        const float* src = xp + r * out.k + g * GROUP;
        int8_t* q = out.q.get() + r * out.k + g * GROUP;
        float* d = out.d.get() + r * out.groups + g;
        float* s = out.s.get() + r * out.groups + g;
#ifdef KV_SIMD
        if (!portable) { quantize_group_simd(src, q, d, s); continue; }
#endif
        quantize_group_scalar(src, q, d, s);
      }
  });
  return out;
}

inline float half_at(const uint8_t* p, int i) {
  c10::Half h;
  std::memcpy(&h, p + 2 * i, 2);
  return static_cast<float>(h);
}

inline int32_t x4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- portable scalar path: the reference every SIMD path must equal bit for bit ----------------
void q4_block_scalar(const uint8_t* blk, const QRows& a, int64_t row, float* acc) {
  for (int c = 0; c < COLS; ++c) acc[c] = 0.0f;
  for (int64_t g = 0; g < a.groups; ++g, blk += Q4_BYTES) {
    const int8_t* xq = a.qs(row, g);
    const float dx = a.dx(row, g), sx = a.sx(row, g);
    for (int c = 0; c < COLS; ++c) {
      int32_t isum = 0;
      for (int j = 0; j < 4; ++j)
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = blk[32 + 32 * j + 4 * c + b];
          isum += (byte & 0x0F) * xq[4 * j + b] + (byte >> 4) * xq[16 + 4 * j + b];
        }
      acc[c] = std::fma(static_cast<float>(isum), half_at(blk, c) * dx, acc[c]);
      acc[c] = std::fma(half_at(blk + 16, c), sx, acc[c]);
    }
  }
}

void q8_block_scalar(const uint8_t* blk, const QRows& a, int64_t row, float* acc) {
  for (int c = 0; c < COLS; ++c) acc[c] = 0.0f;
  for (int64_t g = 0; g < a.groups; ++g, blk += Q8_BYTES) {
    const int8_t* xq = a.qs(row, g);
    const int8_t* w = reinterpret_cast<const int8_t*>(blk + 16);
    const float dx = a.dx(row, g);
    for (int c = 0; c < COLS; ++c) {
      int32_t isum = 0;
      for (int t = 0; t < 8; ++t)
        for (int b = 0; b < 4; ++b) isum += w[32 * t + 4 * c + b] * xq[4 * t + b];
      acc[c] = std::fma(static_cast<float>(isum), half_at(blk, c) * dx, acc[c]);
    }
  }
}

#ifdef KV_SIMD
// sum over the 4 bytes of each int32 lane of u8 * s8, exact (no saturation for our ranges)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KV_PATH "avx512vnni"
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define KV_PATH "avxvnni"
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
#define KV_PATH "avx2"
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

// the weight stream runs on through the blocks of a thread's range, so a fixed distance ahead is
// where it will be read next (past the end it touches nothing that faults: a prefetch never does)
template <int64_t BYTES>
inline void prefetch(const uint8_t* blk) {
  for (int64_t line = 0; line < BYTES; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH + line), _MM_HINT_T0);
}

inline __m256i bcast4(const int8_t* p) { return _mm256_set1_epi32(x4(p)); }
inline __m256 halves(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// R activation rows against one block of 8 output rows: the codes are unpacked once per group and
// meet every row from registers. Each row's arithmetic is the same whatever R.
template <int R>
void q4_block_simd(const uint8_t* blk, const QRows& a, int64_t row, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < a.groups; ++g, blk += Q4_BYTES) {
    prefetch<Q4_BYTES>(blk);
    const __m256 dw = halves(blk), mw = halves(blk + 16);
    __m256i w[8];
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * j));
      w[j] = _mm256_and_si256(v, low);
      w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.qs(row + r, g);
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
      __m256i s0 = dot4(_mm256_setzero_si256(), w[0], bcast4(xq));
      __m256i s1 = dot4(_mm256_setzero_si256(), w[1], bcast4(xq + 4));
      for (int t = 2; t < 8; t += 2) {
        s0 = dot4(s0, w[t], bcast4(xq + 4 * (t & 3) + 16 * (t >> 2)));
        s1 = dot4(s1, w[t + 1], bcast4(xq + 4 * ((t + 1) & 3) + 16 * ((t + 1) >> 2)));
      }
      const __m256i isum = _mm256_add_epi32(s0, s1);
#else
      // codes <= 15 and |q_x| <= 127: 8 pairs of products stay below 2^15, so sum them in int16
      __m256i s16 = _mm256_maddubs_epi16(w[0], bcast4(xq));
      for (int t = 1; t < 8; ++t)
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[t], bcast4(xq + 4 * (t & 3) + 16 * (t >> 2))));
      const __m256i isum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.dx(row + r, g)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r]);
      acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.sx(row + r, g)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo, acc[r]);
}

template <int R>
void q8_block_simd(const uint8_t* blk, const QRows& a, int64_t row, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g, blk += Q8_BYTES) {
    prefetch<Q8_BYTES>(blk);
    const __m256 dw = halves(blk);
    __m256i w[8], aw[8];
    for (int t = 0; t < 8; ++t) {
      w[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * t));
      aw[t] = _mm256_abs_epi8(w[t]);  // |w| <= 128 as u8; the sign moves onto x (|q_x| <= 127)
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.qs(row + r, g);
      __m256i s0 = dot4(_mm256_setzero_si256(), aw[0], _mm256_sign_epi8(bcast4(xq), w[0]));
      __m256i s1 = dot4(_mm256_setzero_si256(), aw[1], _mm256_sign_epi8(bcast4(xq + 4), w[1]));
      for (int t = 2; t < 8; t += 2) {
        s0 = dot4(s0, aw[t], _mm256_sign_epi8(bcast4(xq + 4 * t), w[t]));
        s1 = dot4(s1, aw[t + 1], _mm256_sign_epi8(bcast4(xq + 4 * t + 4), w[t + 1]));
      }
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.dx(row + r, g)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo, acc[r]);
}
#else
#define KV_PATH "portable"
#endif

enum class Kind { Q4_1, Q8_0 };

// One block of 8 output rows for activation rows [0, m): full tiles of ROW_TILE, then single rows.
void run_block(Kind kind, const uint8_t* blk, const QRows& a, int64_t m, float* out, int64_t ldo, bool portable) {
  int64_t r = 0;
#ifdef KV_SIMD
  if (!portable) {
    for (; r + ROW_TILE <= m; r += ROW_TILE)
      kind == Kind::Q4_1 ? q4_block_simd<ROW_TILE>(blk, a, r, out + r * ldo, ldo)
                         : q8_block_simd<ROW_TILE>(blk, a, r, out + r * ldo, ldo);
    for (; r < m; ++r)
      kind == Kind::Q4_1 ? q4_block_simd<1>(blk, a, r, out + r * ldo, ldo) : q8_block_simd<1>(blk, a, r, out + r * ldo, ldo);
    return;
  }
#endif
  for (; r < m; ++r)
    kind == Kind::Q4_1 ? q4_block_scalar(blk, a, r, out + r * ldo) : q8_block_scalar(blk, a, r, out + r * ldo);
}

at::Tensor matmul(Kind kind, const at::Tensor& x_in, const at::Tensor& packed, int64_t n, bool portable) {
  const int64_t block_bytes = kind == Kind::Q4_1 ? Q4_BYTES : Q8_BYTES;
  TORCH_CHECK(x_in.dim() == 2, "activations must be (M, K), got ", x_in.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == block_bytes,
              "packed weight must be uint8 (N / 8, K / 32, ", block_bytes, "), got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t blocks = packed.size(0), groups = packed.size(1), k = groups * GROUP, m = x_in.size(0);
  TORCH_CHECK(x_in.size(1) == k, "activations have K=", x_in.size(1), ", the weight K=", k);
  TORCH_CHECK(n > (blocks - 1) * COLS && n <= blocks * COLS, "N=", n, " does not fit ", blocks, " blocks of ", COLS);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = packed.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const QRows a = quantize_rows(x, portable);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t full = n / COLS;  // blocks written straight into `out`
  float* op = out.data_ptr<float>();
  // enough blocks per task that a thread streams a few tens of KB per row
  const int64_t grain = std::max<int64_t>(1, 32768 / (groups * block_bytes * std::min<int64_t>(m, 8)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = wp + b * groups * block_bytes;
      if (b < full) {
        run_block(kind, blk, a, m, op + b * COLS, n, portable);
        continue;
      }
      std::unique_ptr<float[]> tail(new float[m * COLS]);  // the last, partial block: through a buffer
      run_block(kind, blk, a, m, tail.get(), COLS, portable);
      for (int64_t r = 0; r < m; ++r)
        std::copy(tail.get() + r * COLS, tail.get() + r * COLS + (n - b * COLS), op + r * n + b * COLS);
    }
  });
  return out;
}

at::Tensor q4_1_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n, bool portable) {
  return matmul(Kind::Q4_1, x, packed, n, portable);
}

at::Tensor q8_0_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n, bool portable) {
  return matmul(Kind::Q8_0, x, packed, n, portable);
}

std::string simd_path() { return KV_PATH; }

}  // namespace

TORCH_LIBRARY(kvserve, lib) {
  lib.def("q4_1_mm(Tensor x, Tensor packed, int n, bool portable=False) -> Tensor");
  lib.def("q8_0_mm(Tensor x, Tensor packed, int n, bool portable=False) -> Tensor");
  lib.def("simd_path() -> str", &simd_path);
}

TORCH_LIBRARY_IMPL(kvserve, CPU, lib) {
  lib.impl("q4_1_mm", &q4_1_mm);
  lib.impl("q8_0_mm", &q8_0_mm);
}
