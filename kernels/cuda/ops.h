// Launchers of the dense CUDA ops (one .cu file per family). Semantics match kernels/cpu/ops.h exactly;
// activations are bf16, statistics and weight gradients f32, accumulation in f32. Backward launchers
// ACCUMULATE (+=) into their gradients. Everything runs on ctx.stream and never synchronises, except the
// reductions that return a host value (cross_entropy_forward, sum, sum_of_squares).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/cuda_backend.h"

namespace moba::cuda {

using bf16 = __nv_bfloat16;

// out (N, C) = wte[tokens]; dwte (V, C) f32 += scatter of dout.
// out row i (row_bytes) = src row rows[i], N rows, any dtype (the embedding lookup, key reordering).
void gather_rows(const CudaContext& ctx, void* out, const int32_t* rows, const void* src, int64_t N, int64_t row_bytes);
// deterministic: a stable sort of the positions by token id (scratch slot 3), then each token's rows summed in
// position order in fixed pieces (bitwise reproducible); else f32 atomics (repeated ids add in run order).
void embedding_backward(const CudaContext& ctx, float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int C,
                        int V, bool deterministic = false);
// Bytes of scratch slot 3 the deterministic embedding_backward takes for N tokens, C channels, V ids.
size_t embedding_backward_scratch_bytes(int64_t N, int C, int V);
// out (N, C), rstd (N) f32, inp (N, C), weight (C); dinp (N, C) +=, dweight (C) f32 +=.
void rmsnorm_forward(const CudaContext& ctx, bf16* out, float* rstd, const bf16* inp, const bf16* weight, int64_t N,
                     int C, float eps);
// resid (N, C) += residual (rounded to bf16), then out = rmsnorm(resid) (bitwise add_inplace + rmsnorm_forward).
void residual_rmsnorm_forward(const CudaContext& ctx, bf16* resid, bf16* out, float* rstd, const bf16* residual,
                              const bf16* weight, int64_t N, int C, float eps);
// deterministic: dweight summed without atomics in a fixed order (bitwise reproducible for a given N, C and GPU),
// through scratch slot 2; else per-block sums added with f32 atomics.
void rmsnorm_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int64_t N, int C, bool deterministic = false);
// Bytes of scratch slot 2 the deterministic rmsnorm_backward takes for N rows of C channels.
size_t rmsnorm_backward_scratch_bytes(const CudaContext& ctx, int64_t N, int C);
// out (N, OC) = inp (N, IC) @ weight (OC, IC)^T via cuBLASLt (bf16 in, f32 accumulate).
// dinp (N, IC) += dout @ weight (= when !accumulate); dweight (OC, IC) f32 += dout^T @ inp. Either may be nullptr.
void matmul_forward(const CudaContext& ctx, bf16* out, const bf16* inp, const bf16* weight, int64_t N, int IC, int OC);
void matmul_backward(const CudaContext& ctx, bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                     const bf16* weight, int64_t N, int IC, int OC, bool accumulate = true);
// Rotate-half RoPE; inp rows strided by in_row_stride elements; out (N, heads, D) contiguous.
void rope_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t in_row_stride, const int32_t* pos,
                  int64_t N, int heads, int D, float theta);
void rope_backward(const CudaContext& ctx, bf16* dinp, int64_t din_row_stride, const bf16* dout, const int32_t* pos,
                   int64_t N, int heads, int D, float theta);
// Forward: q (N, H, D), k (N, Hkv, D) = rope of qkv's q / k columns, v = its v columns (qkv rows of qkv_stride
// elements: [q heads | k heads | v heads]). Backward: qkv rows = [rope^-1(q) | rope^-1(k) | v], overwritten, with
// q / k / v holding the gradients. One thread computes a pair chunk's cos/sin once for every head of its row.
void qkv_rope(const CudaContext& ctx, bf16* q, bf16* k, bf16* v, bf16* qkv, int64_t qkv_stride, const int32_t* pos,
              int64_t N, int H, int Hkv, int D, float theta, bool backward);
// out (N, F) = silu(gate) * up with inp (N, 2F) = [gate | up]; dinp (N, 2F) += (= when !accumulate).
void swiglu_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t N, int F);
void swiglu_backward(const CudaContext& ctx, bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int F,
                     bool accumulate = true);
void add_inplace(const CudaContext& ctx, bf16* dst, const bf16* src, int64_t n);
// Strided row copy of elem_bytes-wide elements (any dtype).
void copy_rows(const CudaContext& ctx, void* dst, int64_t dst_stride, const void* src, int64_t src_stride,
               int64_t rows, int64_t cols, int elem_bytes);
// dst = src converted between f32 and bf16 (n elements; same dtype = copy).
void convert(const CudaContext& ctx, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n);
// losses (N) f32 = masked CE of logits (N, V); returns their sum (synchronises).
double cross_entropy_forward(const CudaContext& ctx, float* losses, const bf16* logits, const int32_t* targets,
                             const uint8_t* mask, int64_t N, int V);
// dlogits (N, V) += (softmax - onehot) * grad_scale * mask.
void cross_entropy_backward(const CudaContext& ctx, bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const uint8_t* mask, float grad_scale, int64_t N, int V);
// The fused loss head: losses (N) f32 = masked CE of logits (N, V); when grad_scale != 0 the logits are overwritten
// in place by dlogits = (softmax - onehot) * grad_scale * mask (masked rows: 0). Never synchronises.
void cross_entropy_fused(const CudaContext& ctx, float* losses, bf16* logits, const int32_t* targets,
                         const uint8_t* mask, float grad_scale, int64_t N, int V);
// Sum of x (n) f32 in double, in a fixed order (synchronises).
double sum(const CudaContext& ctx, const float* x, int64_t n);
// AdamW on f32 master weights (formula of kernels/cpu/ops.h); param_working (bf16, may be nullptr) gets the
// updated weights rounded, in the same pass.
void adamw_update(const CudaContext& ctx, float* param, bf16* param_working, const float* grad, float* m, float* v,
                  int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                  float grad_scale = 1.0f);
double sum_of_squares(const CudaContext& ctx, const float* x, int64_t n);  // synchronises
void scale(const CudaContext& ctx, float* x, int64_t n, float s);

}  // namespace moba::cuda
