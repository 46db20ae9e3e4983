// Row gather on the GPU (the embedding lookup out = wte[tokens], and any reordering of rows), and the embedding's
// scatter-add of dout into the f32 gradient (backward), in two forms:
//  - atomic (default): f32 atomics, so rows with a repeated token id add in a run-dependent order;
//  - deterministic: the positions sorted stably by token id (kernels/cuda/sort.cuh), cut into pieces of
//    kPieceRows sorted positions (one CTA each, so a hot token - the space byte of byte-level text - spreads over
//    many CTAs); a token's rows inside a piece are added in position order starting from dwte's row, and a token
//    whose rows span pieces gets its piece partials added in piece order by a second kernel. The layout (sort, then
//    sums over fixed partial segments) follows PyTorch's embedding_dense_backward (EmbeddingBackwardKernel.cu).
// Invariant: the gather is an exact copy. The atomic backward agrees with the CPU's ordered sums to f32 rounding, not
// bitwise; the deterministic one is bitwise reproducible run to run, and equals the CPU's sums bitwise for every
// token whose rows fit one piece (the same additions in the same order).
#include <algorithm>

#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/sort.cuh"

namespace moba::cuda {
namespace {

constexpr int kMaxThreads = 256;

// One block per row t: out[t] = src[rows[t]], copied as Chunk-sized pieces (uint4 = 16 bytes, or 2 or 1 bytes).
template <typename Chunk>
__global__ void gather_rows_kernel(Chunk* out, const int32_t* rows, const Chunk* src, int chunks_per_row) {
  const int64_t t = blockIdx.x;
  const Chunk* from = src + static_cast<int64_t>(rows[t]) * chunks_per_row;
  Chunk* dst = out + t * chunks_per_row;
  for (int i = threadIdx.x; i < chunks_per_row; i += blockDim.x) dst[i] = from[i];
}

// One block per token row t: dwte[tokens[t]] += dout[t] with f32 atomics (RED instructions, no return value).
template <int kVec>
__global__ void embedding_backward_kernel(float* dwte, const bf16* dout, const int32_t* tokens, int C) {
  const int64_t t = blockIdx.x;
  float* drow = dwte + static_cast<int64_t>(tokens[t]) * C;
  const bf16* grow = dout + t * C;
  for (int c = threadIdx.x * kVec; c < C; c += blockDim.x * kVec) {
    float g[kVec];
    load_bf16<kVec>(g, grow + c);
#pragma unroll
    for (int k = 0; k < kVec; ++k) atomicAdd(drow + c + k, g[k]);
  }
}

int threads_for(int work_items) { return work_items >= kMaxThreads ? kMaxThreads : (work_items + 31) / 32 * 32; }

// ---- deterministic backward ----
constexpr int kPieceRows = 128;  // sorted positions per piece (one CTA of the piece-sums kernel)

// Where a piece's runs go. A run = the sorted positions of one token; a piece may hold several runs, and a run that
// crosses a piece boundary leaves partial rows: `head` for the piece's first run when it began in an earlier piece,
// `tail` for its last run when it goes on in a later one (a piece inside one run uses head).
struct PieceRuns {
  bool first_continues;  // the piece's first position continues a run of an earlier piece
  bool last_continues;   // the piece's last run goes on in the next piece
};
__device__ __forceinline__ PieceRuns piece_runs(const int32_t* sorted_tokens, int64_t begin, int64_t end, int64_t N) {
  return {begin > 0 && sorted_tokens[begin - 1] == sorted_tokens[begin],
          end < N && sorted_tokens[end] == sorted_tokens[end - 1]};
}

__global__ void iota_kernel(int32_t* positions, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) positions[i] = static_cast<int32_t>(i);
}

// One CTA per piece, threads over columns: each run of the piece sums its dout rows in position order. A run that
// starts in this piece starts from dwte's row (so a run inside the piece is the CPU's exact sequence of adds) and
// is stored into dwte, or into the piece's tail partial when it goes on; a continued run starts from 0 and is stored
// into the head partial. partials: (pieces, 2, C) f32, [piece][0] head, [piece][1] tail.
template <int kVec>
__global__ void piece_sums_kernel(float* dwte, float* partials, const bf16* dout, const int32_t* sorted_tokens,
                                  const int32_t* sorted_positions, int64_t N, int C) {
  __shared__ int32_t s_token[kPieceRows], s_position[kPieceRows];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPieceRows, end = min(N, begin + kPieceRows);
  const int n = static_cast<int>(end - begin);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s_token[i] = sorted_tokens[begin + i];
    s_position[i] = sorted_positions[begin + i];
  }
  const PieceRuns runs = piece_runs(sorted_tokens, begin, end, N);
  __syncthreads();
  float* head = partials + (static_cast<int64_t>(blockIdx.x) * 2) * C;
  float* tail = head + C;
  for (int c = threadIdx.x * kVec; c < C; c += blockDim.x * kVec) {
    float acc[kVec];
    int run_begin = 0;
    for (int i = 0; i < n; ++i) {
      const bool continued = run_begin == 0 && runs.first_continues;
      if (i == run_begin) {  // a run's first position here: start from dwte's row, or from 0 when continued
        const float* from = dwte + static_cast<int64_t>(s_token[i]) * C + c;
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = continued ? 0.0f : from[k];
      }
      float g[kVec];
      load_bf16<kVec>(g, dout + static_cast<int64_t>(s_position[i]) * C + c);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] += g[k];
      if (i + 1 < n && s_token[i + 1] == s_token[i]) continue;
      // The run ends here (in this piece, or at its end).
      float* to = continued                                   ? head + c
                  : (i + 1 == n && runs.last_continues) ? tail + c
                                                              : dwte + static_cast<int64_t>(s_token[i]) * C + c;
#pragma unroll
      for (int k = 0; k < kVec; ++k) to[k] = acc[k];
      run_begin = i + 1;
    }
  }
}

// Grid (pieces, ceil(C / 32)), 8 warps: the piece where a run spanning pieces starts owns it and stores
// dwte[token] = its tail partial + the head partials of the following pieces, in piece order (warp w adds pieces
// w, w + 8, ... of the run's continuation for 32 columns; the warp sums then add in warp order).
__global__ void __launch_bounds__(256) add_spanning_runs_kernel(float* dwte, const float* partials,
                                                                const int32_t* sorted_tokens, int64_t N, int C) {
  __shared__ int s_pieces;
  __shared__ float warp_sums[8][32];
  const int64_t piece = blockIdx.x;
  const int64_t begin = piece * kPieceRows, end = min(N, begin + kPieceRows);
  const int32_t token = sorted_tokens[end - 1];
  const PieceRuns runs = piece_runs(sorted_tokens, begin, end, N);
  // The owner: its last run goes on and did not begin in an earlier piece.
  if (!runs.last_continues || (runs.first_continues && sorted_tokens[begin] == token)) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {  // following pieces the run reaches into
    int pieces = 0;
    for (int64_t next = end; next < N && sorted_tokens[next] == token; next += kPieceRows) ++pieces;
    s_pieces = pieces;
  }
  __syncthreads();
  const int c = blockIdx.y * 32 + lane;
  float sum = 0.0f;
  if (c < C)
    for (int q = warp; q < s_pieces; q += 8) sum += partials[((piece + 1 + q) * 2) * C + c];  // their heads
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && c < C) {
    float total = partials[(piece * 2 + 1) * C + c];  // the owner's tail
    for (int w = 0; w < 8; ++w) total += warp_sums[w][lane];
    dwte[static_cast<int64_t>(token) * C + c] = total;
  }
}

// Scratch slot 3 of the deterministic backward, carved in 256-byte aligned pieces (one layout for the sizing and
// the launch).
struct EmbeddingScratch {
  int32_t* sorted_tokens;     // (N)
  int32_t* positions;         // (N) 0 .. N - 1
  int32_t* sorted_positions;  // (N)
  float* partials;            // (pieces, 2, C)
  void* sort_temp;
  size_t sort_temp_bytes;
};
struct EmbeddingScratchLayout {
  size_t index_bytes, partial_bytes, temp_bytes;
  int key_bits;
  size_t total() const { return 3 * index_bytes + partial_bytes + temp_bytes; }
};
EmbeddingScratchLayout embedding_scratch_layout(int64_t N, int C, int V) {
  const int64_t pieces = (N + kPieceRows - 1) / kPieceRows;
  const int key_bits = sort_key_bits(std::max(V - 1, 1));
  return {aligned_256(sizeof(int32_t) * static_cast<size_t>(N)),
          aligned_256(sizeof(float) * static_cast<size_t>(pieces) * 2 * C), sort_pairs_temp_bytes(N, key_bits),
          key_bits};
}
EmbeddingScratch embedding_scratch(const CudaContext& ctx, const EmbeddingScratchLayout& l) {
  auto* base = static_cast<char*>(ctx.scratch(3, l.total()));
  return {reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base + l.index_bytes),
          reinterpret_cast<int32_t*>(base + 2 * l.index_bytes), reinterpret_cast<float*>(base + 3 * l.index_bytes),
          base + 3 * l.index_bytes + l.partial_bytes, l.temp_bytes};
}

template <int kVec>
void embedding_backward_sorted(const CudaContext& ctx, float* dwte, const bf16* dout, const int32_t* tokens, int64_t N,
                               int C, int V) {
  const EmbeddingScratchLayout layout = embedding_scratch_layout(N, C, V);
  const int key_bits = layout.key_bits;
  const EmbeddingScratch s = embedding_scratch(ctx, layout);
  iota_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, ctx.stream>>>(s.positions, N);
  MOBA_CUDA_CHECK(cudaGetLastError());
  sort_pairs(ctx.stream, s.sort_temp, s.sort_temp_bytes, tokens, s.sorted_tokens, s.positions, s.sorted_positions, N,
             key_bits);
  const unsigned pieces = static_cast<unsigned>((N + kPieceRows - 1) / kPieceRows);
  piece_sums_kernel<kVec><<<pieces, threads_for(C / kVec), 0, ctx.stream>>>(dwte, s.partials, dout, s.sorted_tokens,
                                                                            s.sorted_positions, N, C);
  MOBA_CUDA_CHECK(cudaGetLastError());
  add_spanning_runs_kernel<<<dim3(pieces, static_cast<unsigned>((C + 31) / 32)), 256, 0, ctx.stream>>>(
      dwte, s.partials, s.sorted_tokens, N, C);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// out (N, row_bytes) = src (M, row_bytes) [rows (N)]
void gather_rows(const CudaContext& ctx, void* out, const int32_t* rows, const void* src, int64_t N, int64_t row_bytes) {
  if (N == 0 || row_bytes == 0) return;
  const unsigned blocks = static_cast<unsigned>(N);
  if (row_bytes % 16 == 0 && aligned_16({out, src})) {
    const int chunks = static_cast<int>(row_bytes / 16);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint4*>(out), rows, static_cast<const uint4*>(src), chunks);
  } else if (row_bytes % 2 == 0) {
    const int chunks = static_cast<int>(row_bytes / 2);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint16_t*>(out), rows, static_cast<const uint16_t*>(src), chunks);
  } else {
    const int chunks = static_cast<int>(row_bytes);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint8_t*>(out), rows, static_cast<const uint8_t*>(src), chunks);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

size_t embedding_backward_scratch_bytes(int64_t N, int C, int V) {
  return N > 0 && C > 0 ? embedding_scratch_layout(N, C, V).total() : 0;
}

// dwte (V, C) f32 += scatter of dout (N, C) bf16 by tokens (N); deterministic: scratch slot 3 holds three (N) i32
// index arrays, (ceil(N / 128), 2, C) f32 partial rows and cub's sort storage.
void embedding_backward(const CudaContext& ctx, float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int C,
                        int V, bool deterministic) {
  if (N == 0 || C == 0) return;
  const bool vector = C % 8 == 0 && aligned_16({dout});
  if (deterministic) {
    MOBA_CHECK(N < (int64_t{1} << 31), cat("embedding_backward: ", N, " tokens do not fit 32-bit positions"),
               "split the batch into smaller micro-batches");
    if (vector) embedding_backward_sorted<8>(ctx, dwte, dout, tokens, N, C, V);
    else embedding_backward_sorted<1>(ctx, dwte, dout, tokens, N, C, V);
    return;
  }
  if (vector) {
    embedding_backward_kernel<8>
        <<<static_cast<unsigned>(N), threads_for(C / 8), 0, ctx.stream>>>(dwte, dout, tokens, C);
  } else {
    embedding_backward_kernel<1><<<static_cast<unsigned>(N), threads_for(C), 0, ctx.stream>>>(dwte, dout, tokens, C);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
