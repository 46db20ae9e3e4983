// RMSNorm on the GPU, one warp per row: out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps) (f32);
// the residual form first adds the residual stream in place (resid += residual, rounded to bf16) and normalises
// the rounded sum, so it is bitwise add_inplace followed by rmsnorm_forward with one pass less over the row.
// Invariant: statistics in f32, rows independent in the forward. The backward's dweight is summed per block (CTA) in
// a fixed order, then either added to global memory with f32 atomics (block order varies run to run: f32 rounding)
// or, deterministic, written as one partial row per block to scratch slot 2 and summed per column in block order by
// a second kernel: bitwise reproducible for a given N, C and GPU (the grid depends on the SM count).
// Layout follows llm.c's layernorm kernels (a warp per row, a block-level partial for the weight gradient).
#include <algorithm>

#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps, 8 rows at a time per block
constexpr int kWarps = kThreads / 32;

// out (N, C) = rmsnorm(x), rstd (N); lane l of a warp handles columns l*kVec + 32*kVec*j. kResidual: x (N, C) +=
// residual first, rounded to bf16 and stored, and the norm is taken of the stored sum - the same arithmetic as
// add_bf16_kernel followed by the plain kernel, with the row read twice from memory instead of four times.
template <int kVec, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(bf16* out, float* rstd, bf16* x, const bf16* residual, const bf16* weight, int64_t N, int C,
                           float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  bf16* x_row = x + row * C;
  float sum_squares = 0.0f;
  for (int c = lane * kVec; c < C; c += 32 * kVec) {
    float v[kVec];
    load_bf16<kVec>(v, x_row + c);
    if constexpr (kResidual) {
      float r[kVec];
      load_bf16<kVec>(r, residual + row * C + c);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = __bfloat162float(__float2bfloat16_rn(v[k] + r[k]));  // as stored
      store_bf16<kVec>(x_row + c, v);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum_squares += v[k] * v[k];
  }
  sum_squares = warp_sum(sum_squares);
  const float rs = 1.0f / sqrtf(sum_squares / C + eps);
  bf16* y_row = out + row * C;
  for (int c = lane * kVec; c < C; c += 32 * kVec) {  // re-reads (from L1/L2) only the columns this lane wrote
    float v[kVec], w[kVec], y[kVec];
    load_bf16<kVec>(v, x_row + c);
    load_bf16<kVec>(w, weight + c);
#pragma unroll
    for (int k = 0; k < kVec; ++k) y[k] = (v[k] * rs) * w[k];
    store_bf16<kVec>(y_row + c, y);
  }
  if (lane == 0) rstd[row] = rs;
}

// How a block sums its rows' dweight contributions: per_warp = each warp owns a (C) row of partials in dynamic shared
// memory (its lanes own distinct columns, so plain adds suffice; the rows are summed in warp order at the end);
// shared_atomic = one (C) row per block with shared atomics (run-dependent order), for widths whose per-warp rows
// would not fit; column_owner = no shared partials: after the rows, each thread sums its columns over the block's
// rows in row order (re-reads them: the deterministic form for those widths).
enum class BlockPartial { per_warp, shared_atomic, column_owner };

// dinp_j += r * (dout_j w_j - x_j * r^2 * sum_c(dout_c w_c x_c) / C);  dweight_c += sum_t dout_tc x_tc r_t.
// Grid-stride over rows, a warp per row; block b owns rows b * kWarps + w + k * gridDim.x * kWarps. The block's
// dweight sum is added into dweight with global atomics, or with block_partials (blocks, C) stored in row b.
// Measured on an H200 at N=32768, C=1792: the shared-atomic form took ~0.48 ms, 4x its memory floor, from warps
// colliding on columns.
template <int kVec, BlockPartial kForm>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_kernel(bf16* dinp, float* dweight, float* block_partials, const bf16* dout, const bf16* inp,
                            const bf16* weight, const float* rstd, int64_t N, int C) {
  extern __shared__ float dweight_partial[];  // per_warp: (kWarps, C); shared_atomic: (C); column_owner: none
  constexpr bool kPerWarp = kForm == BlockPartial::per_warp;
  const int partial_rows = kPerWarp ? kWarps : 1;
  if constexpr (kForm != BlockPartial::column_owner) {
    for (int c = threadIdx.x; c < partial_rows * C; c += blockDim.x) dweight_partial[c] = 0.0f;
    __syncthreads();
  }
  float* my_partial = dweight_partial + (kPerWarp ? (threadIdx.x / 32) * C : 0);
  const int lane = threadIdx.x % 32;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < N; row += row_stride) {
    const bf16* x_row = inp + row * C;
    const bf16* dy_row = dout + row * C;
    float dot = 0.0f;
    for (int c = lane * kVec; c < C; c += 32 * kVec) {
      float x[kVec], dy[kVec], w[kVec];
      load_bf16<kVec>(x, x_row + c);
      load_bf16<kVec>(dy, dy_row + c);
      load_bf16<kVec>(w, weight + c);
#pragma unroll
      for (int k = 0; k < kVec; ++k) dot += dy[k] * w[k] * x[k];
    }
    dot = warp_sum(dot);
    const float r = rstd[row];
    const float coeff = r * r * dot / C;
    bf16* dx_row = dinp + row * C;
    for (int c = lane * kVec; c < C; c += 32 * kVec) {
      float x[kVec], dy[kVec], w[kVec], dx[kVec];
      load_bf16<kVec>(x, x_row + c);
      load_bf16<kVec>(dy, dy_row + c);
      load_bf16<kVec>(w, weight + c);
      load_bf16<kVec>(dx, dx_row + c);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        dx[k] += r * (dy[k] * w[k] - x[k] * coeff);
        if constexpr (kPerWarp) my_partial[c + k] += dy[k] * x[k] * r;
        else if constexpr (kForm == BlockPartial::shared_atomic) atomicAdd(&my_partial[c + k], dy[k] * x[k] * r);
      }
      store_bf16<kVec>(dx_row + c, dx);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float sum = 0.0f;
    if constexpr (kForm == BlockPartial::column_owner) {
      for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWarps; row0 < N; row0 += row_stride)
        for (int64_t row = row0; row < row0 + kWarps && row < N; ++row)
          sum += __bfloat162float(dout[row * C + c]) * __bfloat162float(inp[row * C + c]) * rstd[row];
    } else {
      for (int w = 0; w < partial_rows; ++w) sum += dweight_partial[w * C + c];
    }
    if (block_partials != nullptr) block_partials[static_cast<int64_t>(blockIdx.x) * C + c] = sum;
    else atomicAdd(dweight + c, sum);
  }
}

// dweight (C) += the column sums of partials (n_rows, C), in row order: warp w of a block sums rows w, w + 8, ...
// of its 32 columns (lanes read 128 contiguous bytes), then the 8 warp sums are added in warp order.
__global__ void __launch_bounds__(kThreads)
    add_column_sums_kernel(float* dweight, const float* partials, int n_rows, int C) {
  __shared__ float warp_sums[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.x * 32 + lane;
  float sum = 0.0f;
  if (c < C)
    for (int r = warp; r < n_rows; r += kWarps) sum += partials[static_cast<int64_t>(r) * C + c];
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && c < C) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][lane];
    dweight[c] += total;
  }
}

// block_partials == nullptr: the atomic forms (per_warp when kWarps rows of C floats fit 160 KB of shared memory,
// else shared_atomic); otherwise per_warp or column_owner, then add_column_sums_kernel.
template <int kVec>
void launch_rmsnorm_backward(const CudaContext& ctx, unsigned blocks, bf16* dinp, float* dweight,
                             float* block_partials, const bf16* dout, const bf16* inp, const bf16* weight,
                             const float* rstd, int64_t N, int C) {
  const size_t per_warp_bytes = sizeof(float) * static_cast<size_t>(C) * kWarps;
  if (per_warp_bytes <= 160 * 1024) {
    auto kernel = rmsnorm_backward_kernel<kVec, BlockPartial::per_warp>;
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(per_warp_bytes)));
    kernel<<<blocks, kThreads, per_warp_bytes, ctx.stream>>>(dinp, dweight, block_partials, dout, inp, weight, rstd,
                                                             N, C);
  } else if (block_partials == nullptr) {
    rmsnorm_backward_kernel<kVec, BlockPartial::shared_atomic>
        <<<blocks, kThreads, sizeof(float) * static_cast<size_t>(C), ctx.stream>>>(dinp, dweight, nullptr, dout, inp,
                                                                                   weight, rstd, N, C);
  } else {
    rmsnorm_backward_kernel<kVec, BlockPartial::column_owner>
        <<<blocks, kThreads, 0, ctx.stream>>>(dinp, dweight, block_partials, dout, inp, weight, rstd, N, C);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
  if (block_partials != nullptr) {
    add_column_sums_kernel<<<static_cast<unsigned>((C + 31) / 32), kThreads, 0, ctx.stream>>>(
        dweight, block_partials, static_cast<int>(blocks), C);
  }
}

template <bool kResidual>
void launch_rmsnorm_forward(const CudaContext& ctx, bf16* out, float* rstd, bf16* x, const bf16* residual,
                            const bf16* weight, int64_t N, int C, float eps) {
  if (N == 0) return;
  const unsigned blocks = static_cast<unsigned>((N + kWarps - 1) / kWarps);
  if (C % 8 == 0 && aligned_16({out, x, weight}) && (!kResidual || aligned_16({residual}))) {
    rmsnorm_forward_kernel<8, kResidual><<<blocks, kThreads, 0, ctx.stream>>>(out, rstd, x, residual, weight, N, C, eps);
  } else {
    rmsnorm_forward_kernel<1, kResidual><<<blocks, kThreads, 0, ctx.stream>>>(out, rstd, x, residual, weight, N, C, eps);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

// The backward's grid: four blocks (32 warps) per multiprocessor keep the loads in flight; more would only add
// global atomics (or partial rows). Fixed for a given N and GPU, so the deterministic sums are.
unsigned backward_blocks(const CudaContext& ctx, int64_t N) {
  const int64_t row_blocks = (N + kWarps - 1) / kWarps;
  const int64_t max_blocks = 4 * static_cast<int64_t>(std::max(ctx.sm_count, 1));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(row_blocks, max_blocks)));
}

}  // namespace

// out (N, C) bf16, rstd (N) f32, inp (N, C) bf16, weight (C) bf16
void rmsnorm_forward(const CudaContext& ctx, bf16* out, float* rstd, const bf16* inp, const bf16* weight, int64_t N,
                     int C, float eps) {
  // The plain kernel only reads x.
  launch_rmsnorm_forward<false>(ctx, out, rstd, const_cast<bf16*>(inp), nullptr, weight, N, C, eps);
}

// resid (N, C) bf16 += residual (N, C); out (N, C) bf16 = rmsnorm(resid); rstd (N) f32
void residual_rmsnorm_forward(const CudaContext& ctx, bf16* resid, bf16* out, float* rstd, const bf16* residual,
                              const bf16* weight, int64_t N, int C, float eps) {
  launch_rmsnorm_forward<true>(ctx, out, rstd, resid, residual, weight, N, C, eps);
}

size_t rmsnorm_backward_scratch_bytes(const CudaContext& ctx, int64_t N, int C) {
  return sizeof(float) * backward_blocks(ctx, N) * static_cast<size_t>(C);  // (blocks, C) f32
}

// dinp (N, C) bf16 +=, dweight (C) f32 +=; deterministic: dweight through scratch slot 2, (blocks, C) f32
void rmsnorm_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int64_t N, int C, bool deterministic) {
  if (N == 0) return;
  const size_t shared_bytes = sizeof(float) * static_cast<size_t>(C);
  MOBA_CHECK(shared_bytes <= 48 * 1024, cat("rmsnorm_backward: C = ", C, " exceeds the 12288 channels supported"),
             "use a model width of at most 12288");
  const unsigned blocks = backward_blocks(ctx, N);
  float* block_partials =
      deterministic ? static_cast<float*>(ctx.scratch(2, rmsnorm_backward_scratch_bytes(ctx, N, C))) : nullptr;
  if (C % 8 == 0 && aligned_16({dinp, dout, inp, weight})) {
    launch_rmsnorm_backward<8>(ctx, blocks, dinp, dweight, block_partials, dout, inp, weight, rstd, N, C);
  } else {
    launch_rmsnorm_backward<1>(ctx, blocks, dinp, dweight, block_partials, dout, inp, weight, rstd, N, C);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
