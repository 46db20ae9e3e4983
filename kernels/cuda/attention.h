// Dense causal attention on the GPU (flash-attention style: tiled, online softmax, LSE saved, recompute in
// the backward), over packed segments (cu_seqlens on the device), GQA/MQA native. Semantics match
// kernels/cpu/attention.h: q (N, H, D), k/v (N, Hkv, D) bf16, out (N, H, D) bf16, lse (N, H) f32 natural log.
// The backward ACCUMULATES into dq/dk/dv (bf16). Scratch comes from ctx.scratch (no allocation per step).
#pragma once
#include "kernels/cuda/ops.h"

namespace moba::cuda {

void flash_attention_forward(const CudaContext& ctx, bf16* out, float* lse, const bf16* q, const bf16* k,
                             const bf16* v, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv,
                             int D, float softmax_scale);
void flash_attention_backward(const CudaContext& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                              const bf16* k, const bf16* v, const bf16* out, const float* lse,
                              const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D,
                              float softmax_scale);

}  // namespace moba::cuda
