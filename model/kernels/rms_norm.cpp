// RMSNorm for CPU in one op: y = x * w / sqrt(mean(x^2) + eps), each row on its own, in one order.
//
// torch 2.13's CPU rms_norm runs as five ops (pow, mean, add, rsqrt, mul) of a few microseconds each;
// a decode step calls it 61 times. Here a row's sum of squares is 8 lanes over the row (then a fixed
// lane sum and the tail in order), whatever the number of rows, and rows are split across threads
// only in blocks of 64, so a few rows never wake a second thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NORM_AVX2 1
#endif

namespace {

inline float sum_of_squares(const float* x, int64_t D) {
  int64_t d = 0;
  float total = 0.f;
#ifdef NORM_AVX2
  if (D >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) {
      const __m256 v = _mm256_loadu_ps(x + d);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  }
#endif
  for (; d < D; ++d) total = std::fma(x[d], x[d], total);
  return total;
}

template <typename T>
void norm_rows(const T* x, const float* w, T* out, int64_t M, int64_t D, float eps) {
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : D);
    for (int64_t r = begin; r < end; ++r) {
      const float* row;
      if constexpr (std::is_same_v<T, float>) {
        row = x + r * D;
      } else {
        for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(x[r * D + d]);
        row = buf.data();
      }
      const float inv = 1.f / std::sqrt(sum_of_squares(row, D) / static_cast<float>(D) + eps);
      T* o = out + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(row[d] * inv * w[d]);
    }
  });
}

}  // namespace

// x (..., D) float32 / bfloat16 / float16; weight (D,) -> x's shape and dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.size(-1) == weight.numel(), "rms_norm: CPU tensors, weight of x's last dim");
  const int64_t D = x.size(-1), M = D ? x.numel() / D : 0;
  auto xc = x.contiguous();
  auto w = weight.to(torch::kFloat).contiguous();
  auto out = torch::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), w.data_ptr<float>(), out.data_ptr<scalar_t>(), M, D,
                        static_cast<float>(eps));
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
}
