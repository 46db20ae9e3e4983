// CPU reference attention (fp32): dense causal attention and MoBA, forward and backward, over packed
// variable-length segments. Semantics are pinned by ../shared/docs/moba-spec.md; read it before editing.
// Layout: q (N, H, D), k and v (N, Hkv, D), out (N, H, D), lse (N, H) natural log; N = total packed tokens;
// segments [cu_seqlens[s], cu_seqlens[s+1]) never attend to each other; positions restart at each segment.
// GQA/MQA: query head h reads key/value head h / (H / Hkv); K and V are never expanded.
// Backward functions ACCUMULATE (+=) into dq, dk, dv, and are bitwise deterministic for any thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace moba::cpu {

struct AttentionShape {
  int64_t total_tokens = 0;  // N
  int n_heads = 0;           // H
  int n_kv_heads = 0;        // Hkv, divides H
  int head_dim = 0;          // D
};

struct MobaParams {
  int block_size = 512;  // B
  int top_k = 3;         // k, counts the current block
};

// ---- dense causal attention ----------------------------------------------------------------------------------
void attention_full_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            const int32_t* cu_seqlens, int n_segments, const AttentionShape& shape,
                            float softmax_scale);
void attention_full_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                             const float* v, const float* out, const float* lse, const int32_t* cu_seqlens,
                             int n_segments, const AttentionShape& shape, float softmax_scale);

// ---- MoBA ------------------------------------------------------------------------------------------------
// Routing. selected (N, H, top_k) int32: for each query t and head h the chosen block indices relative to the
// segment start, ascending, the current block included, -1 padded when fewer blocks exist.
// Block means are accumulated in fp32 and rounded to bf16 (round-to-nearest-even) before the fp32 gate, as
// the official code does; ties go to the lower block index. Throws moba::Error if q holds a NaN or Inf.
void moba_select_blocks(int32_t* selected, const float* q, const float* k, const int32_t* cu_seqlens,
                        int n_segments, const AttentionShape& shape, const MobaParams& params);
// Attention over the union of the selected past blocks and the causal part of the current block.
void moba_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                            const AttentionShape& shape, const MobaParams& params, float softmax_scale);
void moba_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                             const float* v, const float* out, const float* lse, const int32_t* selected,
                             const int32_t* cu_seqlens, int n_segments, const AttentionShape& shape,
                             const MobaParams& params, float softmax_scale);

// ---- explicit-mask reference (tests only; float64, O(N^2) memory per segment) -------------------------------------
// allowed(t, u, h) is derived from `selected` when non-null (MoBA) or is plain causal when null (full).
// Writes out (N, H, D) and lse (N, H) and, when dout is non-null, dq/dk/dv (overwritten, not accumulated).
void attention_masked_reference(double* out, double* lse, double* dq, double* dk, double* dv, const float* dout,
                                const float* q, const float* k, const float* v, const int32_t* selected, int top_k,
                                int block_size, const int32_t* cu_seqlens, int n_segments,
                                const AttentionShape& shape, double softmax_scale);

}  // namespace moba::cpu
