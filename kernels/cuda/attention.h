// The attention ops on the GPU, for the CUDA backend: dense causal flash attention (flash_attention_*.cu) and MoBA
// (moba_routing.cu, moba_forward.cu, moba_backward*.cu), all over one plain argument block per call, the raw device
// view of an AttentionCall (kernels/attention.h): query rows standing at ascending key rows (q_rows), packed
// documents of the key sequence (cu_seqlens), GQA/MQA native. q, k, v, out, dout, dq bf16; lse f32 natural log;
// dk/dv bf16 or f32. Backward ACCUMULATES into dq, dk, dv.
// Invariants: every launcher runs on ctx.stream and never synchronises the host; scratch comes only from the named
// buffers of `args.scratch` (a too small one is an Error naming it), sized by attention_scratch_sizes.
#pragma once
#include "kernels/attention.h"
#include "kernels/attention_views.h"
#include "kernels/cuda/ops.h"

namespace moba::cuda {

// One device buffer of the call's scratch.
struct ScratchBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// The call's raw device view (kernels/attention_views.h) plus what only the CUDA kernels take.
struct AttentionArgs : AttentionViews<bf16, void> {
  bool dkv_f32 = false;
  AttentionKernelSettings settings;
  struct {
    ScratchBuffer row_stats, partials, block_means, dispatch, chunk_dispatch, query_index;
  } scratch;
};

// Bytes of each scratch buffer the launchers below need for calls up to `shape`.
AttentionScratchSizes attention_scratch_sizes(const AttentionScratchShape& shape);

void flash_attention_forward(const CudaContext& ctx, const AttentionArgs& a);   // out, lse
void flash_attention_backward(const CudaContext& ctx, const AttentionArgs& a);  // dq, dk, dv +=
// MoBA, exactly as ../shared/docs/moba-spec.md and kernels/cpu/attention.h define it: routing (bf16-rounded block
// means of the whole key sequence, fp32 gate, top-(k-1) past blocks + the current block, ties to the lower index, per
// query head), attention over the union with one softmax, and the backward. Any top_k >= 1 (top_k - 1 > 64 past
// blocks take an exact radix-select router: selections equal to the CPU's).
void moba_select_blocks(const CudaContext& ctx, const AttentionArgs& a);       // selected
void moba_attention_forward(const CudaContext& ctx, const AttentionArgs& a);   // out, lse
void moba_attention_backward(const CudaContext& ctx, const AttentionArgs& a);  // dq, dk, dv +=
// dq += the full causal attention's dQ without atomics (query-major: MoBA's current-block dQ pass with one block
// spanning every document), bitwise reproducible; the deterministic flash_attention_backward's dQ. Uses scratch
// row_stats; head dims 8..128 in steps of 8.
void causal_dq_ordered(const CudaContext& ctx, const AttentionArgs& a);

}  // namespace moba::cuda
