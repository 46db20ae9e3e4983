// Internal to kernels/cpu: per-query attention arithmetic shared by dense causal attention and MoBA (one query row
// against a list of key ranges; query-major dQ, key-major dK/dV), plus the input checks both run. Invariant: every
// pass computes a pair's score, p and dS with the same functions, so full == MoBA-with-all-blocks bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <span>

#include "kernels/cpu/attention.h"

namespace moba::cpu::detail {

// Token rows [begin, end) of one segment, as absolute indices into the packed N axis.
struct KeyRange {
  int64_t begin = 0;
  int64_t end = 0;
};

// A parallel region pays off above ~1e5 multiply-adds; below that its wake-up costs more than the work (far more
// on a loaded machine). Results never depend on this choice.
inline bool worth_parallel(int64_t multiply_adds) { return multiply_adds >= (int64_t{1} << 17); }

// Keys per dK/dV task: the task's dK and dV tiles (kKeyTile, D) stay in L1/L2 while queries stream past.
inline constexpr int64_t kKeyTile = 32;

// Dot product with 8 interleaved fp32 partial sums combined in a fixed order. The order is part of the contract
// (same bits in forward, dQ and dK/dV); 8 lanes let the compiler vectorise it without -ffast-math.
inline float dot(const float* a, const float* b, int n) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int lane = 0; lane < 8; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  float sum = ((partial[0] + partial[4]) + (partial[1] + partial[5])) +
              ((partial[2] + partial[6]) + (partial[3] + partial[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Softmax backward of one (query, key) pair (FlashAttention-2, Dao 2023, Algorithm 2):
// p = exp(scale * q.k - lse), dS = p * (dO.v - delta).
struct PairGrad {
  float p;
  float ds;
};
inline PairGrad softmax_pair_grad(const float* q_row, const float* dout_row, const float* k_row, const float* v_row,
                                  float lse, float delta, float scale, int head_dim) {
  const float p = std::exp(dot(q_row, k_row, head_dim) * scale - lse);
  const float ds = p * (dot(dout_row, v_row, head_dim) - delta);
  return {p, ds};
}

// ---- input checks (throw moba::Error naming the caller) -------------------------------------------------------
// Shape positive and H divisible by Hkv; cu_seqlens = 0 <= ... <= N, non-decreasing, last = N; finite scale.
void validate_attention_inputs(const char* caller, const int32_t* cu_seqlens, int n_segments,
                               const AttentionShape& shape, float softmax_scale);
void validate_moba_params(const char* caller, const MobaParams& params);
// Every selected (N, H, top_k) row is strictly ascending, holds only past blocks of its segment and ends (before
// the -1 padding) with the query's current block.
void validate_moba_selection(const char* caller, const int32_t* selected, const int32_t* cu_seqlens,
                             int n_segments, const AttentionShape& shape, const MobaParams& params);

// Segment holding token t (skipping empty segments); cu_seqlens validated.
int segment_of_token(const int32_t* cu_seqlens, int n_segments, int64_t t);
// Longest segment, in tokens.
int64_t longest_segment(const int32_t* cu_seqlens, int n_segments);
// (query, key) pairs of dense causal attention per head: sum over segments of n (n + 1) / 2.
int64_t causal_pairs(const int32_t* cu_seqlens, int n_segments);

// ---- the per-query arithmetic -----------------------------------------------------------------------------------
// One query row (head h, kv head kv_head) attends to the keys of `ranges` (ascending, disjoint, non-empty union):
// out_row (D) = softmax(scale * q.k) v, lse = natural log-sum-exp of the scaled scores. Two passes over the keys
// (max, then exp-sum and weighted values); scores_scratch holds one float per key.
void attend_query_forward(float* out_row, float* lse, const float* q_row, const float* k, const float* v,
                          int kv_head, std::span<const KeyRange> ranges, const AttentionShape& shape, float scale,
                          float* scores_scratch);

// delta (N, H) = rowsum(dout * out): the softmax-backward correction of every query row.
void compute_softmax_delta(float* delta, const float* dout, const float* out, const AttentionShape& shape);

// dQ of one query row over the keys of `ranges`: dq_row (D) += scale * sum_u dS_u k_u. dq_scratch holds D floats.
void attend_query_backward_dq(float* dq_row, const float* q_row, const float* dout_row, float lse, float delta,
                              const float* k, const float* v, int kv_head, std::span<const KeyRange> ranges,
                              const AttentionShape& shape, float scale, float* dq_scratch);

// dK/dV of keys [key_begin, key_end) (kv head kv_head, all visible to the query) from one query row:
// dk_rows, dv_rows (key_end - key_begin, D) += dS_u * scale * q and p_u * dO. Rows are the caller's local tile.
void accumulate_key_grads_from_query(float* dk_rows, float* dv_rows, int64_t key_begin, int64_t key_end,
                                     const float* q_row, const float* dout_row, float lse, float delta,
                                     const float* k, const float* v, int kv_head, const AttentionShape& shape,
                                     float scale);

// dk, dv (N, Hkv, D) rows [key_begin, key_end) of kv head kv_head += the local tiles (key_end - key_begin, D).
void add_key_tile(float* dk, float* dv, const float* dk_tile, const float* dv_tile, int64_t key_begin,
                  int64_t key_end, int kv_head, const AttentionShape& shape);

}  // namespace moba::cpu::detail
