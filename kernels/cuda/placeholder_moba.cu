// PLACEHOLDER for the MoBA launchers until their kernels land; the helper implementing
// kernels/cuda/moba.h deletes this file. Each launcher throws a clear error.
#include "kernels/cuda/moba.h"

namespace moba::cuda {

void moba_select_blocks(const CudaContext& ctx, int32_t* selected, const bf16* q, const bf16* k, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int block_size, int top_k) {
  throw Error("cuda backend: moba_select_blocks is not implemented yet", "use backend: cpu");
}
void moba_attention_forward(const CudaContext& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* selected, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int block_size, int top_k, float softmax_scale) {
  throw Error("cuda backend: moba_attention_forward is not implemented yet", "use backend: cpu");
}
void moba_attention_backward(const CudaContext& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* out, const float* lse, const int32_t* selected, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int block_size, int top_k, float softmax_scale, bool deterministic) {
  throw Error("cuda backend: moba_attention_backward is not implemented yet", "use backend: cpu");
}

}  // namespace moba::cuda
