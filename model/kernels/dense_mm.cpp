// Dense y = x W^T for CPU with one reduction order per output element, whatever the row count.
//
// torch's float32 matmul picks a kernel by shape (gemv for one row, blocked gemm with shape-dependent
// K splits for more), so a row's result changes with the other rows of its batch. Here W is packed
// once into panels of PANEL output columns, K-major (panel, K, PANEL), and every output element is
// one chain of fused multiply-adds over k = 0..K-1 in order: a row alone, in a batch of 500 or on
// any thread count gives the same bits. Rows go ROWS at a time through the same per-element chain
// (the register tile only shares the panel's loads), columns are split across threads, K never is.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DENSE_AVX2 1
#endif

namespace {

constexpr int64_t PANEL = 16;  // output columns per packed panel (two 8-float vectors)
constexpr int64_t ROWS = 4;    // rows sharing one pass over a panel

// out[r, n0:n0+PANEL] for rows r0..r0+rows-1 (rows <= ROWS), accumulating over all of K in order.
void panel_rows(const float* x, int64_t ldx, const float* panel, int64_t K, float* out, int64_t ldo,
                int64_t rows, int64_t cols) {
#ifdef DENSE_AVX2
  __m256 acc[ROWS][2];
  for (int64_t r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * PANEL), b1 = _mm256_loadu_ps(panel + k * PANEL + 8);
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 a = _mm256_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    alignas(32) float tmp[PANEL];
    _mm256_store_ps(tmp, acc[r][0]);
    _mm256_store_ps(tmp + 8, acc[r][1]);
    for (int64_t c = 0; c < cols; ++c) out[r * ldo + c] = tmp[c];
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    float acc[PANEL] = {0};
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < PANEL; ++c) acc[c] = std::fma(x[r * ldx + k], panel[k * PANEL + c], acc[c]);
    for (int64_t c = 0; c < cols; ++c) out[r * ldo + c] = acc[c];
  }
#endif
}

}  // namespace

// w (N, K) any float dtype -> packed (ceil(N / PANEL), K, PANEL) float32, padding columns zero.
torch::Tensor dense_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "dense_pack: w must be (N, K)");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + PANEL - 1) / PANEL;
  auto padded = torch::zeros({panels * PANEL, K}, w.options().dtype(torch::kFloat));
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();
}

// x (M, K) any float dtype, packed from dense_pack, n = N -> (M, N) float32.
torch::Tensor dense_mm(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == PANEL, "dense_mm: bad shapes");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat && x.device().is_cpu(), "dense_mm: packed float32 on CPU");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && n <= panels * PANEL && n > (panels - 1) * PANEL, "dense_mm: K or N disagree");
  auto xf = x.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, n}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * PANEL, cols = std::min(PANEL, n - n0);
      for (int64_t r0 = 0; r0 < M; r0 += ROWS)
        panel_rows(xp + r0 * K, K, wp + p * K * PANEL, K, op + r0 * n + n0, n, std::min(ROWS, M - r0), cols);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("dense_pack(Tensor w) -> Tensor", &dense_pack);
  m.def("dense_mm(Tensor x, Tensor packed, int n) -> Tensor", &dense_mm);
}
