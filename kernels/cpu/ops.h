// CPU reference implementations (fp32) of every dense op of the decoder, forward and backward.
// These are the test oracle for the CUDA backend, so they favour clarity and exactness over speed.
// Conventions (all functions):
//   - raw pointers, row-major, shapes in the comments; N = number of token rows (batch * seq flattened).
//   - backward functions ACCUMULATE (+=) into every gradient they produce (llm.c style); callers zero first.
//   - results are bitwise deterministic whatever the OpenMP thread count: no atomics, and every reduction
//     runs in a fixed order inside one thread (parallelise over independent outputs, never over a sum).
#pragma once
#include <cstdint>

namespace moba::cpu {

// ---- embedding --------------------------------------------------------------------------------------------
// out (N, C) = wte[tokens[t]]; wte (V, C). Token ids are validated by the data layer, not here.
// out row i (row_bytes) = src row rows[i], for N rows (the embedding lookup, context parallelism's key reordering).
void gather_rows(void* out, const int32_t* rows, const void* src, int64_t N, int64_t row_bytes);
// dwte (V, C) += scatter of dout (N, C) by tokens. Deterministic: rows with equal ids add in order of t.
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int C, int V);

// ---- RMSNorm: out = inp * rstd * weight, rstd = 1/sqrt(mean(inp^2) + eps) --------------------------------
// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps);
// dinp (N, C) +=, dweight (C) +=.
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C);

// ---- matmul without bias: out (N, OC) = inp (N, IC) @ weight (OC, IC)^T -----------------------------------
void matmul_forward(float* out, const float* inp, const float* weight, int64_t N, int IC, int OC);
// dinp (N, IC) += dout @ weight; dweight (OC, IC) += dout^T @ inp. Either may be nullptr (skipped).
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                     int64_t N, int IC, int OC);

// ---- RoPE, "rotate-half" (GPT-NeoX) convention ---------------------------------------------------------------
// For each row t, head h, pair i in [0, D/2): angle = pos[t] * theta^(-2i/D);
//   out[i] = x[i] cos - x[i + D/2] sin;  out[i + D/2] = x[i + D/2] cos + x[i] sin.
// inp row t starts at inp + t * in_row_stride and holds n_heads * D contiguous values (so q/k can be read
// straight out of the fused QKV projection); out (N, n_heads, D) is contiguous.
void rope_forward(float* out, const float* inp, int64_t in_row_stride, const int32_t* pos, int64_t N, int n_heads,
                  int D, float theta);
// Inverse rotation of dout (N, n_heads, D) added into dinp (row stride din_row_stride).
void rope_backward(float* dinp, int64_t din_row_stride, const float* dout, const int32_t* pos, int64_t N,
                   int n_heads, int D, float theta);

// ---- SwiGLU: out (N, F) = silu(gate) * up, where inp (N, 2F) holds [gate | up] per row -----------------------
void swiglu_forward(float* out, const float* inp, int64_t N, int F);
// dinp (N, 2F) +=.
void swiglu_backward(float* dinp, const float* dout, const float* inp, int64_t N, int F);

// ---- elementwise ---------------------------------------------------------------------------------------------
void add_inplace(float* dst, const float* src, int64_t n);  // dst += src
// Copies n_rows rows of width cols from src (row stride src_stride) into dst (row stride dst_stride).
void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t n_rows, int64_t cols);

// ---- cross-entropy over logits (N, V) ------------------------------------------------------------------------
// losses (N) = -log softmax(logits[t])[targets[t]], or 0 where mask[t] == 0 (mask may be nullptr = all ones).
// Returns the sum of the written losses (double accumulation, fixed order).
double cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, const uint8_t* mask,
                             int64_t N, int V);
// dlogits (N, V) += (softmax(logits[t]) - onehot(targets[t])) * grad_scale * mask[t].
void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, const uint8_t* mask,
                            float grad_scale, int64_t N, int V);
// The fused loss head: losses as cross_entropy_forward; when grad_scale != 0, logits (N, V) is then overwritten by
// (softmax - onehot) * grad_scale * mask (bitwise what cross_entropy_backward adds to a zeroed dlogits).
void cross_entropy_fused(float* losses, float* logits, const int32_t* targets, const uint8_t* mask, float grad_scale,
                         int64_t N, int V);

// ---- optimizer -----------------------------------------------------------------------------------------------
// One AdamW step (decoupled weight decay, bias-corrected), step is 1-based:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m/(1-b1^step);  vhat = v/(1-b2^step)
//   param -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param)
// g = grad * grad_scale (gradient clipping folded in; x 1 is exact).
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step, float grad_scale = 1.0f);
// Sum of squares of g in double, fixed order (blocks summed in index order).
double sum_of_squares(const float* g, int64_t n);
void scale_inplace(float* x, int64_t n, float s);

}  // namespace moba::cpu
