// CPU matmul without bias, forward and backward, on one cache-blocked, register-tiled GEMM core.
// Invariant: every output element is the sum over k = 0..K-1 in index order, started from zero in one thread,
// then written (forward) or added once (backward) into the destination; tiles of the output are the only unit
// of parallel work, so results are bitwise identical whatever the thread count or tile sizes.
#include <algorithm>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moba::cpu {
namespace {

// Tile sizes: a micro-tile (kMicroRows x kMicroCols) of sums lives in registers; a thread tile
// (kTileRows x kTileCols) of sums lives in a private buffer while depth blocks of kDepth are packed and swept.
constexpr int kMicroRows = 4;
constexpr int kMicroCols = 8;   // two SSE vectors
constexpr int kTileRows = 128;  // multiple of kMicroRows
constexpr int kTileCols = 256;  // multiple of kMicroCols
constexpr int kDepth = 512;     // buffers per thread: a 256 KB + b 512 KB + sums 128 KB, in L2

constexpr int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Read-only matrix view: element (r, c) is data[r * row_stride + c * col_stride], so a transpose is free.
struct MatrixView {
  const float* data;
  int64_t row_stride;
  int64_t col_stride;
  float at(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

// sums (kMicroRows, kMicroCols; row stride sums_stride) += a (depth, kMicroRows) ^T @ b (depth, kMicroCols),
// both packed; each sum runs over k in order.
inline void micro_kernel(float* sums, int sums_stride, const float* a, const float* b, int depth) {
  float acc[kMicroRows][kMicroCols];
  for (int r = 0; r < kMicroRows; ++r)
    for (int j = 0; j < kMicroCols; ++j) acc[r][j] = sums[r * sums_stride + j];
  for (int k = 0; k < depth; ++k) {
    const float* a_k = a + k * kMicroRows;
    const float* b_k = b + k * kMicroCols;
    for (int r = 0; r < kMicroRows; ++r)
      for (int j = 0; j < kMicroCols; ++j) acc[r][j] += a_k[r] * b_k[j];
  }
  for (int r = 0; r < kMicroRows; ++r)
    for (int j = 0; j < kMicroCols; ++j) sums[r * sums_stride + j] = acc[r][j];
}

// packed (ceil(rows / kMicroRows), depth, kMicroRows) <- A[r0 : r0 + rows, k0 : k0 + depth], zero-padded rows.
void pack_a(float* packed, const MatrixView& A, int64_t r0, int rows, int64_t k0, int depth) {
  for (int p = 0; p * kMicroRows < rows; ++p) {
    float* panel = packed + static_cast<int64_t>(p) * depth * kMicroRows;
    for (int r = 0; r < kMicroRows; ++r) {
      const int row = p * kMicroRows + r;
      for (int k = 0; k < depth; ++k) panel[k * kMicroRows + r] = row < rows ? A.at(r0 + row, k0 + k) : 0.0f;
    }
  }
}

// packed (ceil(cols / kMicroCols), depth, kMicroCols) <- B[k0 : k0 + depth, c0 : c0 + cols], zero-padded cols.
void pack_b(float* packed, const MatrixView& B, int64_t k0, int depth, int64_t c0, int cols) {
  for (int q = 0; q * kMicroCols < cols; ++q) {
    float* panel = packed + static_cast<int64_t>(q) * depth * kMicroCols;
    for (int j = 0; j < kMicroCols; ++j) {
      const int col = q * kMicroCols + j;
      for (int k = 0; k < depth; ++k) panel[k * kMicroCols + j] = col < cols ? B.at(k0 + k, c0 + col) : 0.0f;
    }
  }
}

// C (M, Ncols; row stride ldc) = or += A (M, K) @ B (K, Ncols).
void gemm(float* C, int64_t ldc, const MatrixView& A, const MatrixView& B, int64_t M, int64_t Ncols, int64_t K,
          bool accumulate) {
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (Ncols + kTileCols - 1) / kTileCols;
  // Buffers sized for the largest tile this call needs (small matrices allocate little).
  const int max_rows = static_cast<int>(round_up(std::min<int64_t>(kTileRows, M), kMicroRows));
  const int max_cols = static_cast<int>(round_up(std::min<int64_t>(kTileCols, Ncols), kMicroCols));
  const int max_depth = static_cast<int>(std::min<int64_t>(kDepth, K));
#pragma omp parallel
  {
    // a_packed (max_rows / kMicroRows, depth, kMicroRows), b_packed (max_cols / kMicroCols, depth, kMicroCols),
    // tile_sums (max_rows, max_cols): private to this thread.
    std::vector<float> a_packed(static_cast<size_t>(max_rows) * max_depth);
    std::vector<float> b_packed(static_cast<size_t>(max_cols) * max_depth);
    std::vector<float> tile_sums(static_cast<size_t>(max_rows) * max_cols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < row_tiles * col_tiles; ++tile) {
      const int64_t r0 = (tile / col_tiles) * kTileRows;
      const int64_t c0 = (tile % col_tiles) * kTileCols;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - r0));
      const int cols = static_cast<int>(std::min<int64_t>(kTileCols, Ncols - c0));
      std::fill(tile_sums.begin(), tile_sums.end(), 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int depth = static_cast<int>(std::min<int64_t>(kDepth, K - k0));
        pack_a(a_packed.data(), A, r0, rows, k0, depth);
        pack_b(b_packed.data(), B, k0, depth, c0, cols);
        for (int q = 0; q * kMicroCols < cols; ++q) {
          const float* b_panel = b_packed.data() + static_cast<int64_t>(q) * depth * kMicroCols;
          for (int p = 0; p * kMicroRows < rows; ++p) {
            micro_kernel(tile_sums.data() + p * kMicroRows * max_cols + q * kMicroCols, max_cols,
                         a_packed.data() + static_cast<int64_t>(p) * depth * kMicroRows, b_panel, depth);
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* c_row = C + (r0 + r) * ldc + c0;
        const float* s_row = tile_sums.data() + r * max_cols;
        if (accumulate) {
          for (int j = 0; j < cols; ++j) c_row[j] += s_row[j];
        } else {
          for (int j = 0; j < cols; ++j) c_row[j] = s_row[j];
        }
      }
    }
  }
}

}  // namespace

// out (N, OC) = inp (N, IC) @ weight (OC, IC)^T
void matmul_forward(float* out, const float* inp, const float* weight, int64_t N, int IC, int OC) {
  const MatrixView A{inp, IC, 1};     // (N, IC)
  const MatrixView B{weight, 1, IC};  // weight^T: (IC, OC)
  gemm(out, OC, A, B, N, OC, IC, /*accumulate=*/false);
}

// dinp (N, IC) += dout (N, OC) @ weight (OC, IC);  dweight (OC, IC) += dout^T (OC, N) @ inp (N, IC).
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                     int64_t N, int IC, int OC) {
  if (dinp != nullptr) {
    const MatrixView A{dout, OC, 1};    // (N, OC)
    const MatrixView B{weight, IC, 1};  // (OC, IC)
    gemm(dinp, IC, A, B, N, IC, OC, /*accumulate=*/true);
  }
  if (dweight != nullptr) {
    const MatrixView A{dout, 1, OC};  // dout^T: (OC, N)
    const MatrixView B{inp, IC, 1};   // (N, IC)
    gemm(dweight, IC, A, B, OC, IC, N, /*accumulate=*/true);
  }
}

}  // namespace moba::cpu
