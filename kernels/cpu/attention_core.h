// Internal to kernels/cpu: per-query attention arithmetic shared by dense causal attention and MoBA (one query row
// against a list of key ranges; query-major dQ, key-major dK/dV), the key-major task lists, and the input checks.
// Invariant: every pass computes a pair's score, p and dS with the same functions, so full == MoBA-with-all-blocks
// bit for bit, and a query row's result depends only on its own key ranges (query subsets give the same bits).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/cpu/attention.h"

namespace moba::cpu::detail {

// Key rows [begin, end) of one document.
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
// Shape positive and H divisible by Hkv; cu_seqlens = 0 <= ... <= Nk, non-decreasing, last = Nk; q_rows strictly
// ascending in [0, Nk) (or absent with Nq = Nk); finite scale.
void validate_attention_inputs(const char* caller, const AttentionArgs& a);
void validate_moba_params(const char* caller, const AttentionArgs& a);
// Every selected (Nq, H, top_k) row is strictly ascending, holds only past blocks of its document and ends (before
// the -1 padding) with the query's current block.
void validate_moba_selection(const char* caller, const AttentionArgs& a);

// Document holding key row t (skipping empty documents); cu_seqlens validated.
int segment_of_token(const int32_t* cu_seqlens, int n_segments, int64_t t);
// Longest document, in key rows.
int64_t longest_segment(const int32_t* cu_seqlens, int n_segments);
// (query, key) pairs of dense causal attention per head over all key rows: sum over documents of n (n + 1) / 2.
int64_t causal_pairs(const int32_t* cu_seqlens, int n_segments);
// first[s] = global index of the first complete MoBA block of document s, first[S] = their count (a document
// of n key rows holds n / B complete blocks; a partial block is never a past candidate).
std::vector<int64_t> complete_block_offsets(const AttentionArgs& a);
// The first query row standing at key row t or later (Nq when none): the query rows of key rows [t0, t1) are
// [first_query_at(t0), first_query_at(t1)).
int64_t first_query_at(const AttentionArgs& a, int64_t t);

// ---- the per-query arithmetic -----------------------------------------------------------------------------------
// One query row (head h, kv head kv_head) attends to the keys of `ranges` (ascending, disjoint, non-empty union):
// out_row (D) = softmax(scale * q.k) v, lse = natural log-sum-exp of the scaled scores. Two passes over the keys
// (max, then exp-sum and weighted values); scores_scratch holds one float per key.
void attend_query_forward(float* out_row, float* lse, const float* q_row, int kv_head, std::span<const KeyRange> ranges,
                          const AttentionArgs& a, float* scores_scratch);

// delta (Nq, H) = rowsum(dout * out): the softmax-backward correction of every query row.
void compute_softmax_delta(float* delta, const AttentionArgs& a);

// dQ of one query row over the keys of `ranges`: dq_row (D) += scale * sum_u dS_u k_u. dq_scratch holds D floats.
void attend_query_backward_dq(float* dq_row, const float* q_row, const float* dout_row, float lse, float delta,
                              int kv_head, std::span<const KeyRange> ranges, const AttentionArgs& a, float* dq_scratch);

// dK/dV of key rows [key_begin, key_end) (kv head kv_head, all visible to the query) from one query row:
// dk_rows, dv_rows (key_end - key_begin, D) += dS_u * scale * q and p_u * dO. Rows are the caller's local tile.
void accumulate_key_grads_from_query(float* dk_rows, float* dv_rows, int64_t key_begin, int64_t key_end,
                                     const float* q_row, const float* dout_row, float lse, float delta, int kv_head,
                                     const AttentionArgs& a);

// ---- key-major dK/dV ----------------------------------------------------------------------------------------------
// A task owns key rows [key_begin, key_end) of one kv head inside one block (MoBA) or document (full), and adds the
// gradients of its queries in ascending (query row, head) order. Dense causal attention and MoBA build different
// task lists and visit different queries; the accumulation into a local tile and its single write are shared.
struct KeyTileTask {
  int segment = 0;
  int kv_head = 0;
  int64_t block = 0;  // MoBA: block index relative to the document start
  int64_t key_begin = 0, key_end = 0;
};
// dk, dv (Nk, Hkv, D) rows [key_begin, key_end) of kv head kv_head += the local tiles (key_end - key_begin, D).
void add_key_tile(const AttentionArgs& a, const float* dk_tile, const float* dv_tile, const KeyTileTask& task);

// Runs every task in parallel (one thread owns a task's dK/dV rows): visit_queries(task, add_query) calls
// add_query(query_row * H + h, visible_end) for each query that sees keys [key_begin, visible_end) of the task.
template <typename VisitQueries>
void run_key_tiles(const std::vector<KeyTileTask>& tasks, const AttentionArgs& a, const float* delta, bool parallel,
                   VisitQueries&& visit_queries) {
  const int D = a.head_dim;
#pragma omp parallel if (parallel)
  {
    std::vector<float> dk_tile(static_cast<size_t>(kKeyTile * D));  // (kKeyTile, D)
    std::vector<float> dv_tile(static_cast<size_t>(kKeyTile * D));  // (kKeyTile, D)
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < tasks.size(); ++i) {
      const KeyTileTask& task = tasks[i];
      std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
      std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);
      visit_queries(task, [&](int64_t row, int64_t visible_end) {
        accumulate_key_grads_from_query(dk_tile.data(), dv_tile.data(), task.key_begin, visible_end, a.q + row * D,
                                        a.dout + row * D, a.lse[row], delta[row], task.kv_head, a);
      });
      add_key_tile(a, dk_tile.data(), dv_tile.data(), task);
    }
  }
}

}  // namespace moba::cpu::detail
