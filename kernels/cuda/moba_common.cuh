// Shared pieces of the MoBA CUDA kernels (moba_routing.cu, moba_forward.cu, moba_backward.cu): bf16 tensor-core
// primitives (mma.sync m16n8k16, ldmatrix, cp.async), segment lookup, and the key-block dispatch that turns a
// selection (N, H, top_k) into per-(block, kv head) lists of the query rows that chose the block.
// Invariant: a "slot" is floor(block_start / B) of a COMPLETE block; distinct complete blocks (disjoint, B tokens
// long) always get distinct slots, so (slot, kv head) indexes buckets without a prefix sum over segments.
// Fragment layouts follow the PTX ISA manual ("Matrix Fragments for mma.m16n8k16", "ldmatrix"); the tiling follows
// FlashAttention-2 (Dao, 2023): online softmax over key tiles, P reused from the accumulators as the A operand.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/moba.h"

namespace moba::cuda::moba_detail {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr int kRowsPerChunk = 64;  // gathered query rows per CTA work item (4 warps x 16 rows)
inline constexpr int kKeyTile = 64;       // keys per tile in every attention kernel

// ---- bf16 and tensor-core primitives ------------------------------------------------------------------------
__device__ __forceinline__ float bf16_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t x) { return __uint_as_float(x & 0xFFFF0000u); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo: the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// D (16x8 f32) += A (16x16 bf16, row) * B (16x8 bf16, col).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// 16-byte global -> shared copy; bytes = 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Fragment loaders for a row-major bf16 tile in shared memory with row stride ld (elements).
// A operand (16 rows x 16 cols at r0, c0): registers a0..a3 of mma_16816.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* tile, int ld, int r0, int c0, int lane) {
  ldmatrix_x4(a, tile + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}
// B operand where B[k][n] = tile[n][k] (keys as rows, contraction over columns): two n-tiles n0..n0+15 for the
// k-step at c0. b[0], b[1] feed n-tile n0; b[2], b[3] feed n-tile n0 + 8.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const bf16* tile, int ld, int n0, int c0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + c0 + ((lane >> 3) & 1) * 8);
}
// B operand where B[k][n] = tile[k][n] (contraction over rows): k-step rows k0..k0+15, n-tiles at c0 and c0 + 8.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const bf16* tile, int ld, int k0, int c0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}

// Copies `rows` rows of D bf16 (one 16-byte vector = 8 channels per copy) into a tile of DP columns (row stride
// ld). Rows with src == nullptr and channels >= D are zero-filled.
template <int DP>
__device__ __forceinline__ void copy_row_async(bf16* dst, const bf16* src, int D, const bf16* any_valid) {
#pragma unroll
  for (int c = 0; c < DP; c += 8) {
    const bool ok = src != nullptr && c < D;
    cp_async16(dst + c, ok ? src + c : any_valid, ok ? 16 : 0);
  }
}

// ---- segments ----------------------------------------------------------------------------------------------
// The segment holding token t: the last s with cu_seqlens[s] <= t (empty segments before it are skipped).
__device__ __forceinline__ int segment_of(const int32_t* cu_seqlens, int n_segments, int64_t t) {
  int first = 0, count = n_segments + 1;
  while (count > 0) {
    const int step = count / 2;
    if (cu_seqlens[first + step] <= t) {
      first += step + 1;
      count -= step + 1;
    } else {
      count = step;
    }
  }
  return first - 1;
}

// Where token t sits: its segment's bounds and its block's start.
struct TokenBlock {
  int64_t segment_start, segment_end, block_start;
};
__device__ __forceinline__ TokenBlock token_block(const int32_t* cu_seqlens, int n_segments, int64_t t, int B) {
  const int s = segment_of(cu_seqlens, n_segments, t);
  const int64_t start = cu_seqlens[s];
  return {start, cu_seqlens[s + 1], start + (t - start) / B * B};
}

// The first token of the complete block whose slot is `slot` (the block starting in [slot * B, slot * B + B)), or
// -1 when no complete block starts there: the first block boundary at or after the window start of the segment
// holding it, or the first block of a later segment starting inside the window.
__device__ __forceinline__ int64_t slot_block_start(const int32_t* cu_seqlens, int n_segments, int64_t slot, int B) {
  const int64_t window = slot * B;
  for (int s = segment_of(cu_seqlens, n_segments, window); s < n_segments && cu_seqlens[s] < window + B; ++s) {
    const int64_t seg = cu_seqlens[s];
    const int64_t first = seg >= window ? seg : seg + (window - seg + B - 1) / B * B;
    if (first < window + B && first + B <= cu_seqlens[s + 1]) return first;
  }
  return -1;
}

// ---- dispatch: selection -> per-bucket lists of query rows ----------------------------------------------------
// A dispatch covers the query rows t * H + h of the tokens [token_begin, token_end) of one chunk (or of all N).
// Layout of its buffer (one scratch slot), all int32:
//   count[n_buckets], fill[n_buckets]          entries per bucket (fill: write cursor)
//   offset[n_buckets + 1], chunk_offset[n_buckets + 1]   exclusive scans; chunk_offset[n_buckets] = work items
//   slot_start[n_slots]                         first token of the complete block of each used slot
//   entries[max_entries]                        row * (top_k - 1) + i: the query row and its selection position
//   items[2 * max_items]                        (bucket, chunk) per work item of kRowsPerChunk rows
// Per-entry buffers of a chunk (partial outputs, dQ parts) are indexed by entry - entry_base.
struct Dispatch {
  int n_slots = 0, n_buckets = 0;
  int64_t max_entries = 0, max_items = 0;
  int64_t entry_base = 0;  // token_begin * H * (top_k - 1): the chunk's first entry
  int32_t* count = nullptr;
  int32_t* fill = nullptr;
  int32_t* offset = nullptr;
  int32_t* chunk_offset = nullptr;
  int32_t* slot_start = nullptr;
  int32_t* entries = nullptr;
  int2* items = nullptr;
};

// Builds the dispatch of the rows of tokens [token_begin, token_end) into scratch slot `slot` on ctx.stream (no host
// synchronisation), sized for max_tokens tokens, so every chunk of a layer fits the same buffer; top_k >= 2.
Dispatch build_dispatch(const CudaContext& ctx, int slot, const int32_t* selected, const int32_t* cu_seqlens,
                        int n_segments, int64_t N, int H, int Hkv, int block_size, int top_k, int64_t token_begin,
                        int64_t token_end, int64_t max_tokens);

// Per-entry f32 buffers (forward partial (o, lse), deterministic dQ parts) hold N * H * (top_k - 1) entries for a
// whole layer (44 GiB at N = 1M, H = 8, k = 12, D = 128), so the query tokens are processed in chunks whose
// entries fit this budget; buckets stay large (every block is chosen by many rows of a chunk).
inline constexpr int64_t kEntryBudgetBytes = int64_t{4} << 30;
// kEntryBudgetBytes, or MOBA_CUDA_ENTRY_BUDGET_MB (MiB) when set: tests use a small budget to run many chunks.
int64_t entry_budget_bytes();
// Tokens per chunk: a multiple of 64 (whole 64-token tiles), at least 64, at most N rounded up to 64.
inline int64_t chunk_tokens(int64_t N, int H, int top_k, int64_t bytes_per_entry) {
  const int64_t per_token = std::max<int64_t>(1, int64_t{H} * (top_k - 1) * bytes_per_entry);
  const int64_t fit = entry_budget_bytes() / per_token / 64 * 64;
  return std::min(std::max<int64_t>(fit, 64), (N + 63) / 64 * 64);
}

// Checks shared by the launchers (throw moba::Error with the caller's name).
void check_moba_shape(const char* caller, int64_t N, int H, int Hkv, int D, int block_size, int top_k,
                      int n_segments);

// ---- which query rows a CTA owns (forward and dQ kernels) -------------------------------------------------------
// SELECTED: blockIdx.x is a dispatch work item: up to kRowsPerChunk gathered rows of one bucket (kv head, complete
//   block); every row sees the whole block; s_aux[r] = the row's partial entry (row * (top_k - 1) + slot).
// Otherwise: blockIdx.x + a.tile_offset is a 64-token tile of head blockIdx.y; row t sees keys [block_start(t), t]; s_aux[r] = the
//   row's current block index inside its segment.
// Fills s_row (t * H + h, or -1), s_aux, s_lo/s_hi (each row's visible keys) and s_range (their union), sets
// *kv_head, and returns false when this CTA has no work item (uniform over the CTA: the caller returns).
// Called by all 128 threads; ends with __syncthreads().
template <bool SELECTED, typename Args>
__device__ bool tile_rows(const Args& a, int* s_row, int* s_aux, int* s_lo, int* s_hi, int* s_range, int* kv_head) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if constexpr (SELECTED) {
    if (static_cast<int>(blockIdx.x) >= a.dispatch.chunk_offset[a.dispatch.n_buckets]) return false;
    const int2 item = a.dispatch.items[blockIdx.x];
    const int bucket = item.x;
    *kv_head = bucket % a.Hkv;
    const int start = a.dispatch.slot_start[bucket / a.Hkv];
    const int n_rows = min(kRowsPerChunk, a.dispatch.count[bucket] - item.y * kRowsPerChunk);
    if (tid < 64) {
      int row = -1, entry = -1;
      if (tid < n_rows) {
        entry = a.dispatch.entries[a.dispatch.offset[bucket] + item.y * kRowsPerChunk + tid];
        row = entry / (a.top_k - 1);
      }
      s_row[tid] = row;
      s_aux[tid] = entry;
      s_lo[tid] = start;
      s_hi[tid] = start + a.B;
    }
    if (tid == 0) {
      s_range[0] = start;
      s_range[1] = start + a.B;
    }
  } else {
    const int h = blockIdx.y;
    *kv_head = h / (a.H / a.Hkv);
    if (tid < 64) {
      const int64_t t = (static_cast<int64_t>(blockIdx.x) + a.tile_offset) * 64 + tid;
      int row = -1, lo = INT_MAX, hi = INT_MIN, current = 0;
      if (t < a.N) {
        const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, t, a.B);
        row = static_cast<int>(t * a.H + h);
        lo = static_cast<int>(tb.block_start);
        hi = static_cast<int>(t + 1);
        current = static_cast<int>((tb.block_start - tb.segment_start) / a.B);
      }
      s_row[tid] = row;
      s_lo[tid] = lo;
      s_hi[tid] = hi;
      s_aux[tid] = current;
    }
    __syncthreads();
    if (warp == 0) {  // union of the 64 rows' key ranges
      int lo = min(s_lo[lane], s_lo[lane + 32]), hi = max(s_hi[lane], s_hi[lane + 32]);
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, d));
        hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, d));
      }
      if (lane == 0) {
        s_range[0] = lo;
        s_range[1] = hi;
      }
    }
  }
  __syncthreads();
  return true;
}

}  // namespace moba::cuda::moba_detail
