// The attention ops every backend runs, described by one plain parameter struct per call (FlashAttention-3 style):
// keys are a whole packed sequence (Nk rows, documents in cu_seqlens); queries are Nq rows that stand at ascending
// rows of that key sequence. Query row i (at key row t = q_rows[i]) sees key row j iff j <= t in the same document
// (full), or additionally j lies in the current block of t or in one of t's selected past blocks (MoBA,
// ../shared/docs/moba-spec.md; blocks count from each document's start, block means over the WHOLE key sequence).
// So a subset of query rows (context parallelism: a rank's zigzag chunks against the gathered K/V) gets exactly the
// rows the whole sequence would, and its backward returns dQ for its rows and partial dK/dV for every key row.
// Invariant: results never depend on which other query rows share the call (bitwise on the CPU backend).
#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace moba {

enum class AttentionMode { full, moba };
const char* attention_mode_name(AttentionMode m);

// Kernel choices that trade speed or memory and never change results beyond rounding. Typed settings (bench flags,
// tests, the model's attention plan), not environment variables.
struct AttentionKernelSettings {
  // Bitwise-reproducible backward run to run where the backend otherwise sums in a run-dependent order (CUDA: dQ of
  // MoBA and full attention without float atomics; the MoBA dispatch of all rows in canonical order, so dK/dV sum a
  // block's rows in a fixed order); slower. The forward and routing are reproducible either way.
  bool deterministic = false;
  // CUDA MoBA dK/dV kernel: automatic = warpgroup MMAs on sm_90 for head dims 72..128, else mma.sync;
  // mma_sync forces the latter (comparisons on one device).
  enum class MobaDkvKernel { automatic, mma_sync } moba_dkv_kernel = MobaDkvKernel::automatic;
  // CUDA MoBA: the f32 buffers per (query row, head, past block) (forward partial outputs, deterministic dQ parts)
  // hold the query rows in chunks of at most this many bytes, so they do not grow with N * H * (top_k - 1).
  int64_t entry_budget_bytes = int64_t{4} << 30;
  // CUDA MoBA routing: synchronise after routing and throw when q holds NaN or Inf, as the CPU router always does.
  // Off by default because it stalls the stream; unchecked, such a row attends its current block only and the
  // step's non-finite loss stops the run.
  bool check_finite_queries = false;
};

// Scratch the attention ops use on the device, named; empty tensors where a backend needs none (the CPU backend
// keeps its per-thread scratch on the host). Sized by Backend::attention_scratch_sizes for the largest call.
struct AttentionScratch {
  Tensor row_stats;       // f32: per (query row, head) softmax statistics of the backward (Delta, lse * log2 e)
  Tensor partials;        // f32: MoBA forward partial outputs, dQ sums or parts (per query row / past block)
  Tensor block_means;     // MoBA routing: the mean of every complete key block, (ceil(Nk / B), Hkv, D), and a flag
  Tensor dispatch;        // i32: MoBA lists of the query rows that chose each (key block, kv head)
  Tensor chunk_dispatch;  // i32: the same for one chunk of query rows (deterministic dQ in several chunks)
  Tensor query_index;     // i32 (Nk + 1): the first query row standing at or after each key row (with q_rows)
};

// The largest calls a scratch must serve: every call with at most these rows, at least this block size and at
// most this top_k fits (sizes grow with the rows, top_k and 1 / block size).
struct AttentionScratchShape {
  int64_t max_queries = 0, max_keys = 0;  // Nq, Nk
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int min_block_size = 1, max_top_k = 0;  // MoBA (max_top_k 0: full attention only)
  bool query_rows = false;                // calls pass q_rows (query subsets)
  AttentionKernelSettings settings;             // the entry budget; both values of `deterministic` are covered
};
struct AttentionScratchSizes {  // bytes per AttentionScratch buffer (0 = not needed)
  size_t row_stats = 0, partials = 0, block_means = 0, dispatch = 0, chunk_dispatch = 0, query_index = 0;
};

// One attention call. Tensors live on the backend's device; the activation dtype is the backend's (f32 on the CPU,
// bf16 on CUDA) except where noted.
struct AttentionCall {
  // ---- keys: the whole packed sequence (under context parallelism: gathered from every rank) ----
  Tensor k, v;         // (Nk, Hkv, D)
  Tensor cu_seqlens;   // (S + 1) i32: document s is key rows [cu[s], cu[s + 1]); cu[0] = 0, cu[S] = Nk
  // ---- queries ----
  Tensor q;            // (Nq, H, D)
  Tensor q_rows;       // (Nq) i32, strictly ascending, in [0, Nk): the key row query row i stands at;
                       // empty: Nq == Nk and query row i stands at key row i
  // ---- what is attended ----
  AttentionMode mode = AttentionMode::full;
  int block_size = 0;  // MoBA
  int top_k = 0;       // MoBA, counts the current block
  Tensor selected;     // MoBA (Nq, H, top_k) i32: block indices relative to the document, ascending, the current
                       // block last, -1 padded; moba_select_blocks writes it, forward and backward read it
  float softmax_scale = 0;
  // ---- forward outputs (backward inputs) ----
  Tensor out;          // (Nq, H, D)
  Tensor lse;          // (Nq, H) f32, natural log
  // ---- backward: gradients ACCUMULATE (+=) ----
  Tensor dout;         // (Nq, H, D)
  Tensor dq;           // (Nq, H, D)
  Tensor dk, dv;       // (Nk, Hkv, D), the activation dtype or f32 (partial sums to reduce across ranks);
                       // every key row gets its sum over this call's query rows (0 where none sees it)
  AttentionKernelSettings settings;
  AttentionScratch scratch;

  int64_t n_queries() const { return q.rows(); }
  int64_t n_keys() const { return k.rows(); }
  int n_heads() const { return static_cast<int>(q.shape[1]); }
  int n_kv_heads() const { return static_cast<int>(k.shape[1]); }
  int head_dim() const { return static_cast<int>(q.shape[2]); }
  int n_segments() const { return static_cast<int>(cu_seqlens.numel()) - 1; }
};

// Shapes, dtypes and devices of a call (throws moba::Error naming `op` and the tensor at fault): q, k, v, out, dq,
// dout of dtype `activations`; lse f32; cu_seqlens, q_rows, selected i32; dk/dv `activations` or f32; all on
// `device`. `backward` also checks dout, dq, dk, dv. Values (ascending q_rows, cu_seqlens) are the backend's.
void check_attention_call(const char* op, const AttentionCall& c, DType activations, Device device, bool backward);

}  // namespace moba
