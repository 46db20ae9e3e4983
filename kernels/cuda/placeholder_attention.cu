// PLACEHOLDER for the dense attention launchers until their kernels land; the helper implementing
// kernels/cuda/attention.h deletes this file. Each launcher throws a clear error.
#include "kernels/cuda/attention.h"

namespace moba::cuda {

void flash_attention_forward(const CudaContext& ctx, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, float softmax_scale) {
  throw Error("cuda backend: flash_attention_forward is not implemented yet", "use backend: cpu");
}
void flash_attention_backward(const CudaContext& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const bf16* out, const float* lse, const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, float softmax_scale) {
  throw Error("cuda backend: flash_attention_backward is not implemented yet", "use backend: cpu");
}

}  // namespace moba::cuda
