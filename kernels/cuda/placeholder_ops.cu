// PLACEHOLDER for the dense op launchers until their kernels land; the helper implementing
// kernels/cuda/ops.h deletes this file. Each launcher throws a clear error.
#include "kernels/cuda/ops.h"

namespace moba::cuda {

void embedding_forward(const CudaContext& ctx, bf16* out, const int32_t* tokens, const bf16* wte, int64_t N, int C) {
  throw Error("cuda backend: embedding_forward is not implemented yet", "use backend: cpu");
}
void embedding_backward(const CudaContext& ctx, float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int C, int V) {
  throw Error("cuda backend: embedding_backward is not implemented yet", "use backend: cpu");
}
void rmsnorm_forward(const CudaContext& ctx, bf16* out, float* rstd, const bf16* inp, const bf16* weight, int64_t N, int C, float eps) {
  throw Error("cuda backend: rmsnorm_forward is not implemented yet", "use backend: cpu");
}
void rmsnorm_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp, const bf16* weight, const float* rstd, int64_t N, int C) {
  throw Error("cuda backend: rmsnorm_backward is not implemented yet", "use backend: cpu");
}
void matmul_forward(const CudaContext& ctx, bf16* out, const bf16* inp, const bf16* weight, int64_t N, int IC, int OC) {
  throw Error("cuda backend: matmul_forward is not implemented yet", "use backend: cpu");
}
void matmul_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp, const bf16* weight, int64_t N, int IC, int OC) {
  throw Error("cuda backend: matmul_backward is not implemented yet", "use backend: cpu");
}
void rope_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t in_row_stride, const int32_t* pos, int64_t N, int heads, int D, float theta) {
  throw Error("cuda backend: rope_forward is not implemented yet", "use backend: cpu");
}
void rope_backward(const CudaContext& ctx, bf16* dinp, int64_t din_row_stride, const bf16* dout, const int32_t* pos, int64_t N, int heads, int D, float theta) {
  throw Error("cuda backend: rope_backward is not implemented yet", "use backend: cpu");
}
void swiglu_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t N, int F) {
  throw Error("cuda backend: swiglu_forward is not implemented yet", "use backend: cpu");
}
void swiglu_backward(const CudaContext& ctx, bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int F) {
  throw Error("cuda backend: swiglu_backward is not implemented yet", "use backend: cpu");
}
void add_inplace(const CudaContext& ctx, bf16* dst, const bf16* src, int64_t n) {
  throw Error("cuda backend: add_inplace is not implemented yet", "use backend: cpu");
}
void copy_rows(const CudaContext& ctx, void* dst, int64_t dst_stride, const void* src, int64_t src_stride, int64_t rows, int64_t cols, int elem_bytes) {
  throw Error("cuda backend: copy_rows is not implemented yet", "use backend: cpu");
}
void convert(const CudaContext& ctx, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n) {
  throw Error("cuda backend: convert is not implemented yet", "use backend: cpu");
}
double cross_entropy_forward(const CudaContext& ctx, float* losses, const bf16* logits, const int32_t* targets, const uint8_t* mask, int64_t N, int V) {
  throw Error("cuda backend: cross_entropy_forward is not implemented yet", "use backend: cpu");
}
void cross_entropy_backward(const CudaContext& ctx, bf16* dlogits, const bf16* logits, const int32_t* targets, const uint8_t* mask, float grad_scale, int64_t N, int V) {
  throw Error("cuda backend: cross_entropy_backward is not implemented yet", "use backend: cpu");
}
void adamw_update(const CudaContext& ctx, float* param, bf16* param_working, const float* grad, float* m, float* v, int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step) {
  throw Error("cuda backend: adamw_update is not implemented yet", "use backend: cpu");
}
double sum_of_squares(const CudaContext& ctx, const float* x, int64_t n) {
  throw Error("cuda backend: sum_of_squares is not implemented yet", "use backend: cpu");
}
void scale(const CudaContext& ctx, float* x, int64_t n, float s) {
  throw Error("cuda backend: scale is not implemented yet", "use backend: cpu");
}

}  // namespace moba::cuda
