// MoBA on the GPU, exactly as ../shared/docs/moba-spec.md and kernels/cpu/attention.h define it: routing
// (bf16-rounded block means, fp32 gate, top-(k-1) past blocks + the current block, ties to the lower index,
// per query head, GQA-native), attention over the union with one softmax, and the backward. Layouts as in
// attention.h; selected (N, H, top_k) int32 ascending, -1 padded, block indices relative to the segment.
// Any top_k >= 1 (top_k - 1 > 64 past blocks take an exact radix-select router: selections equal to the CPU's).
// No host synchronisation; scratch comes from ctx.scratch slots 4-7, bounded independently of top_k by query chunks
// (kEntryBudgetBytes in moba_common.cuh).
#pragma once
#include "kernels/cuda/ops.h"

namespace moba::cuda {

void moba_select_blocks(const CudaContext& ctx, int32_t* selected, const bf16* q, const bf16* k,
                        const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int block_size,
                        int top_k);
void moba_attention_forward(const CudaContext& ctx, bf16* out, float* lse, const bf16* q, const bf16* k,
                            const bf16* v, const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                            int64_t N, int H, int Hkv, int D, int block_size, int top_k, float softmax_scale);
// deterministic: dQ bitwise reproducible run to run (no float atomics on dQ).
void moba_attention_backward(const CudaContext& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                             const bf16* k, const bf16* v, const bf16* out, const float* lse,
                             const int32_t* selected, const int32_t* cu_seqlens, int n_segments, int64_t N, int H,
                             int Hkv, int D, int block_size, int top_k, float softmax_scale, bool deterministic);

}  // namespace moba::cuda
