// Rotary position embedding ("rotate-half", GPT-NeoX) on the GPU: forward rotation and, for the backward, the
// inverse rotation (angle -> -angle) added into the strided gradient.
// Invariant: each angle pos * theta^(-2i/D) and its cos/sin are computed in double and rounded once to f32, as the
// CPU reference does, so large positions lose no precision; one thread owns pairs (t, i..i+kVec) for every head.
#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;

// This thread's row t and first pair i0 (threads cover the D / 2 pairs of a row kVec at a time), and the cos and sin
// (negated when kInverse) of its pairs: angle = pos[t] * theta^(-2i/D) in double, rounded once to f32 (the CPU
// reference's arithmetic). False past the last row.
template <int kVec, bool kInverse>
__device__ __forceinline__ bool rope_thread_pairs(int64_t& t, int& i0, float (&cos_i)[kVec], float (&sin_i)[kVec],
                                                  const int32_t* pos, int64_t N, int D, float theta) {
  const int chunks = D / 2 / kVec;  // pair chunks per row
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * chunks) return false;
  t = idx / chunks;
  i0 = static_cast<int>(idx % chunks) * kVec;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const double inv_freq = pow(static_cast<double>(theta), -2.0 * (i0 + k) / D);
    double sin_d, cos_d;
    sincos(static_cast<double>(pos[t]) * inv_freq, &sin_d, &cos_d);
    cos_i[k] = static_cast<float>(cos_d);
    sin_i[k] = kInverse ? -static_cast<float>(sin_d) : static_cast<float>(sin_d);
  }
  return true;
}

// dst[i] = src[i] cos - src[i + D/2] sin;  dst[i + D/2] = src[i + D/2] cos + src[i] sin.  kInverse negates sin
// and adds into dst. src row t at src + t * src_stride, dst row t at dst + t * dst_stride, each (heads, D).
template <int kVec, bool kInverse>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(bf16* dst, int64_t dst_stride, const bf16* src, int64_t src_stride, const int32_t* pos, int64_t N,
                int heads, int D, float theta) {
  const int half = D / 2;
  int64_t t;
  int i0;
  float cos_i[kVec], sin_i[kVec];
  if (!rope_thread_pairs<kVec, kInverse>(t, i0, cos_i, sin_i, pos, N, D, theta)) return;
  for (int h = 0; h < heads; ++h) {
    const bf16* x = src + t * src_stride + static_cast<int64_t>(h) * D + i0;
    bf16* y = dst + t * dst_stride + static_cast<int64_t>(h) * D + i0;
    float lo[kVec], hi[kVec], y_lo[kVec], y_hi[kVec];
    load_bf16<kVec>(lo, x);
    load_bf16<kVec>(hi, x + half);
    if constexpr (kInverse) {
      load_bf16<kVec>(y_lo, y);
      load_bf16<kVec>(y_hi, y + half);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) y_lo[k] = y_hi[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      y_lo[k] += lo[k] * cos_i[k] - hi[k] * sin_i[k];
      y_hi[k] += hi[k] * cos_i[k] + lo[k] * sin_i[k];
    }
    store_bf16<kVec>(y, y_lo);
    store_bf16<kVec>(y + half, y_hi);
  }
}

// The qkv split with rope for every head of a row from one cos/sin computation: thread (t, i0..i0+kVec) rotates
// pairs i0.. of the H q heads and Hkv k heads and moves the same columns of the Hkv v heads. Forward reads qkv and
// writes q/k/v; kBackward reads q/k/v (the gradients) and overwrites qkv with the inverse rotation.
template <int kVec, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    qkv_rope_kernel(bf16* q, bf16* k, bf16* v, bf16* qkv, int64_t qkv_stride, const int32_t* pos, int64_t N, int H,
                    int Hkv, int D, float theta) {
  const int half = D / 2;
  int64_t t;
  int i0;
  float cos_i[kVec], sin_i[kVec];
  if (!rope_thread_pairs<kVec, kBackward>(t, i0, cos_i, sin_i, pos, N, D, theta)) return;
  bf16* packed_row = qkv + t * qkv_stride + i0;
  for (int h = 0; h < H + Hkv; ++h) {  // q heads, then k heads: contiguous in the packed row
    bf16* packed = packed_row + static_cast<int64_t>(h) * D;
    bf16* split = (h < H ? q + (t * H + h) * D : k + (t * Hkv + (h - H)) * D) + i0;
    const bf16* x = kBackward ? split : packed;
    bf16* y = kBackward ? packed : split;
    float lo[kVec], hi[kVec], y_lo[kVec], y_hi[kVec];
    load_bf16<kVec>(lo, x);
    load_bf16<kVec>(hi, x + half);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      y_lo[j] = lo[j] * cos_i[j] - hi[j] * sin_i[j];
      y_hi[j] = hi[j] * cos_i[j] + lo[j] * sin_i[j];
    }
    store_bf16<kVec>(y, y_lo);
    store_bf16<kVec>(y + half, y_hi);
  }
  for (int h = 0; h < Hkv; ++h) {  // v heads: moved as they are
    bf16* packed = packed_row + static_cast<int64_t>(H + Hkv + h) * D;
    bf16* split = v + (t * Hkv + h) * D + i0;
    const bf16* x = kBackward ? split : packed;
    bf16* y = kBackward ? packed : split;
    float lo[kVec], hi[kVec];
    load_bf16<kVec>(lo, x);
    load_bf16<kVec>(hi, x + half);
    store_bf16<kVec>(y, lo);
    store_bf16<kVec>(y + half, hi);
  }
}

// Forward: dst = rotate(src); inverse: dst += rotate^-1(src). 16-byte packs when every row and half-row is aligned.
template <bool kInverse>
void launch_rope(const CudaContext& ctx, bf16* dst, int64_t dst_stride, const bf16* src, int64_t src_stride,
                 const int32_t* pos, int64_t N, int heads, int D, float theta) {
  MOBA_CHECK(D % 2 == 0, cat("rope: head dimension D = ", D, " must be even"), "use an even head dimension");
  if (N == 0 || heads == 0) return;
  const int half = D / 2;
  const bool packed = half % 8 == 0 && dst_stride % 8 == 0 && src_stride % 8 == 0 && aligned_16({dst, src});
  const int64_t threads_total = N * (packed ? half / 8 : half);
  const unsigned blocks = static_cast<unsigned>((threads_total + kThreads - 1) / kThreads);
  if (packed) {
    rope_kernel<8, kInverse>
        <<<blocks, kThreads, 0, ctx.stream>>>(dst, dst_stride, src, src_stride, pos, N, heads, D, theta);
  } else {
    rope_kernel<1, kInverse>
        <<<blocks, kThreads, 0, ctx.stream>>>(dst, dst_stride, src, src_stride, pos, N, heads, D, theta);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// out (N, heads, D) contiguous; inp row t at inp + t * in_row_stride holding (heads, D); pos (N).
void rope_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t in_row_stride, const int32_t* pos,
                  int64_t N, int heads, int D, float theta) {
  launch_rope<false>(ctx, out, static_cast<int64_t>(heads) * D, inp, in_row_stride, pos, N, heads, D, theta);
}

// dinp (row stride din_row_stride) += inverse rotation of dout (N, heads, D).
void rope_backward(const CudaContext& ctx, bf16* dinp, int64_t din_row_stride, const bf16* dout, const int32_t* pos,
                   int64_t N, int heads, int D, float theta) {
  launch_rope<true>(ctx, dinp, din_row_stride, dout, static_cast<int64_t>(heads) * D, pos, N, heads, D, theta);
}

void qkv_rope(const CudaContext& ctx, bf16* q, bf16* k, bf16* v, bf16* qkv, int64_t qkv_stride, const int32_t* pos,
              int64_t N, int H, int Hkv, int D, float theta, bool backward) {
  MOBA_CHECK(D % 2 == 0, cat("rope: head dimension D = ", D, " must be even"), "use an even head dimension");
  if (N == 0) return;
  const int half = D / 2;
  const bool packed = half % 8 == 0 && qkv_stride % 8 == 0 && aligned_16({q, k, v, qkv});
  const int64_t threads_total = N * (packed ? half / 8 : half);
  const unsigned blocks = static_cast<unsigned>((threads_total + kThreads - 1) / kThreads);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, ctx.stream>>>(q, k, v, qkv, qkv_stride, pos, N, H, Hkv, D, theta);
  };
  if (packed) {
    backward ? launch(qkv_rope_kernel<8, true>) : launch(qkv_rope_kernel<8, false>);
  } else {
    backward ? launch(qkv_rope_kernel<1, true>) : launch(qkv_rope_kernel<1, false>);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
