// MoBA routing on the GPU (moba-spec.md, Forward steps 1-4): bf16-rounded block means of K, the fp32 gate
// <q, mean> without scale, and per (query, head) the top-(k-1) complete past blocks of the segment plus the current
// block, ties to the lower block index. Invariant: the arithmetic is the CPU reference's, operation for operation
// (kernels/cpu/moba_routing.cpp: block sums in fp32 in sequence order, then / B, then round-to-nearest-even to bf16;
// the gate as 8 interleaved fp32 partial sums of separately rounded products, combined in the same tree), so on
// the same bf16 inputs both backends select the same blocks bit for bit. No host synchronisation; no (N, H, blocks)
// score tensor: each thread keeps its running top-(k-1) in registers.
#include <cmath>
#include <cstdlib>

#include "common/error.h"
#include "kernels/cuda/moba_common.cuh"

namespace moba::cuda {
namespace moba_detail {
namespace {

// kbar (n_slots, Hkv, D) bf16: the mean of the B keys of the complete block whose slot is blockIdx.x (blocks with
// no complete block starting in [slot * B, slot * B + B) are left unwritten: no query ever reads them). One thread
// per channel sums the block's B rows in sequence order (the reference's order).
__global__ void block_means_kernel(bf16* __restrict__ kbar, const bf16* __restrict__ k,
                                   const int32_t* __restrict__ cu_seqlens, int n_segments, int64_t N, int Hkv, int D,
                                   int B) {
  const int64_t slot = blockIdx.x;
  const int64_t window = slot * B;
  // The complete block starting in [window, window + B): the first block boundary at or after `window` of the
  // segment holding `window`, or the first block of a later segment starting inside the window.
  int64_t start = -1;
  for (int s = segment_of(cu_seqlens, n_segments, window); s < n_segments && cu_seqlens[s] < window + B; ++s) {
    const int64_t seg = cu_seqlens[s];
    const int64_t first = seg >= window ? seg : seg + (window - seg + B - 1) / B * B;
    if (first < window + B && first + B <= cu_seqlens[s + 1]) {
      start = first;
      break;
    }
  }
  if (start < 0) return;
  const int channels = Hkv * D;
  for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < channels; c += gridDim.y * blockDim.x) {
    const bf16* col = k + start * channels + c;
    float sum = 0.0f;
    int u = 0;
    for (; u + 8 <= B; u += 8) {  // eight loads in flight, added in order
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = __bfloat162float(col[static_cast<int64_t>(u + i) * channels]);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum = __fadd_rn(sum, x[i]);
    }
    for (; u < B; ++u) sum = __fadd_rn(sum, __bfloat162float(col[static_cast<int64_t>(u) * channels]));
    kbar[slot * channels + c] = __float2bfloat16_rn(__fdiv_rn(sum, static_cast<float>(B)));
  }
}

// One thread per (token, head). SLOTS >= top_k - 1 is the register list size: the list is kept sorted by score
// descending (then block ascending) in its last top_k - 1 entries; the first SLOTS - (top_k - 1) entries hold +inf
// sentinels that never move. Candidates arrive in ascending block order and enter only with a strictly greater
// score than the list's last, so ties keep the lower block index (as the CPU reference).
template <int DP, int SLOTS>
__global__ void __launch_bounds__(128) route_kernel(int32_t* __restrict__ selected, int* __restrict__ nonfinite_flag,
                                                    const bf16* __restrict__ q, const bf16* __restrict__ kbar,
                                                    const int32_t* __restrict__ cu_seqlens, int n_segments, int64_t N,
                                                    int H, int Hkv, int D, int B, int top_k) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= N) return;
  const int h = blockIdx.y;
  const int64_t row = t * H + h;
  const TokenBlock tb = token_block(cu_seqlens, n_segments, t, B);
  const int current = static_cast<int>((tb.block_start - tb.segment_start) / B);
  const int past_slots = top_k - 1;
  int32_t* out = selected + row * top_k;

  if (past_slots == 0) {  // k = 1: the current block only
    out[0] = current;
    return;
  }
  if (current <= past_slots) {  // every complete past block fits: full causal attention inside the segment
    for (int i = 0; i < top_k; ++i) out[i] = i < current ? i : (i == current ? current : -1);
    return;
  }
  // Gate: needs the query row (DP / 8 vectors of 8 bf16; channels >= D are never read).
  uint4 qv[DP / 8];
  bool finite = true;
  const bf16* q_row = q + row * D;
#pragma unroll
  for (int v = 0; v < DP / 8; ++v) {
    qv[v] = v * 8 < D ? *reinterpret_cast<const uint4*>(q_row + v * 8) : make_uint4(0, 0, 0, 0);
    const uint32_t w[4] = {qv[v].x, qv[v].y, qv[v].z, qv[v].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) finite = finite && isfinite(bf16_lo(w[i])) && isfinite(bf16_hi(w[i]));
  }
  if (!finite) {  // never route on NaN/Inf: current block only, and raise the flag (see moba_select_blocks)
    atomicOr(nonfinite_flag, 1);
    out[0] = current;
    for (int i = 1; i < top_k; ++i) out[i] = -1;
    return;
  }

  float best[SLOTS];
  int best_block[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    best[i] = i < SLOTS - past_slots ? INFINITY : -INFINITY;
    best_block[i] = -1;
  }
  const int kv_head = h / (H / Hkv);
  for (int j = 0; j < current; ++j) {
    const int64_t slot = (tb.segment_start + static_cast<int64_t>(j) * B) / B;
    const bf16* mean = kbar + (slot * Hkv + kv_head) * D;
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int v = 0; v < DP / 8; ++v) {
      if (v * 8 < D) {
        const uint4 m = __ldg(reinterpret_cast<const uint4*>(mean + v * 8));
        const uint32_t qw[4] = {qv[v].x, qv[v].y, qv[v].z, qv[v].w};
        const uint32_t mw[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          partial[2 * i] = __fadd_rn(partial[2 * i], __fmul_rn(bf16_lo(qw[i]), bf16_lo(mw[i])));
          partial[2 * i + 1] = __fadd_rn(partial[2 * i + 1], __fmul_rn(bf16_hi(qw[i]), bf16_hi(mw[i])));
        }
      }
    }
    const float score = __fadd_rn(__fadd_rn(__fadd_rn(partial[0], partial[4]), __fadd_rn(partial[1], partial[5])),
                                  __fadd_rn(__fadd_rn(partial[2], partial[6]), __fadd_rn(partial[3], partial[7])));
    if (!(score > best[SLOTS - 1])) continue;
    // Insert: new[i] = old[i-1] if old[i-1] < score, else score if old[i] < score, else old[i].
#pragma unroll
    for (int i = SLOTS - 1; i > 0; --i) {
      const bool shift = best[i - 1] < score;
      const bool place = !shift && best[i] < score;
      best[i] = shift ? best[i - 1] : (place ? score : best[i]);
      best_block[i] = shift ? best_block[i - 1] : (place ? j : best_block[i]);
    }
    if (best[0] < score) {
      best[0] = score;
      best_block[0] = j;
    }
  }
  // Ascending block order: each chosen block's rank among the chosen ones.
  int n_chosen = 0;
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    if (best_block[i] < 0) continue;
    int rank = 0;
#pragma unroll
    for (int m = 0; m < SLOTS; ++m) rank += best_block[m] >= 0 && best_block[m] < best_block[i];
    out[rank] = best_block[i];
    ++n_chosen;
  }
  out[n_chosen] = current;
  for (int i = n_chosen + 1; i < top_k; ++i) out[i] = -1;
}

template <int DP>
void launch_route(dim3 grid, cudaStream_t stream, int32_t* selected, int* flag, const bf16* q, const bf16* kbar,
                  const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int B, int top_k) {
  const int past = top_k - 1;
#define MOBA_ROUTE(SLOTS)                                                                                      \
  route_kernel<DP, SLOTS><<<grid, 128, 0, stream>>>(selected, flag, q, kbar, cu_seqlens, n_segments, N, H, Hkv, \
                                                    D, B, top_k)
  if (past <= 2)
    MOBA_ROUTE(2);
  else if (past <= 4)
    MOBA_ROUTE(4);
  else if (past <= 8)
    MOBA_ROUTE(8);
  else if (past <= 16)
    MOBA_ROUTE(16);
  else if (past <= 32)
    MOBA_ROUTE(32);
  else
    MOBA_ROUTE(64);
#undef MOBA_ROUTE
}

}  // namespace
}  // namespace moba_detail

void moba_select_blocks(const CudaContext& ctx, int32_t* selected, const bf16* q, const bf16* k,
                        const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D, int block_size,
                        int top_k) {
  using namespace moba_detail;
  check_moba_shape("moba_select_blocks", N, H, Hkv, D, block_size, top_k, n_segments);
  MOBA_CHECK(top_k <= 65, cat("moba_select_blocks (cuda): top_k = ", top_k, " exceeds 65"),
             "the CUDA router keeps at most 64 past blocks per query in registers; use a smaller top_k");
  if (N == 0) return;
  const int64_t n_slots = (N + block_size - 1) / block_size;
  // Scratch slot 4: kbar (n_slots, Hkv, D) bf16, then the non-finite flag.
  const size_t kbar_bytes = (static_cast<size_t>(n_slots) * Hkv * D * sizeof(bf16) + 255) / 256 * 256;
  char* scratch = static_cast<char*>(ctx.scratch(4, kbar_bytes + 256));
  bf16* kbar = reinterpret_cast<bf16*>(scratch);
  int* flag = reinterpret_cast<int*>(scratch + kbar_bytes);
  MOBA_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int), ctx.stream));
  if (top_k > 1) {
    const int channels = Hkv * D;
    const int threads = channels < 256 ? (channels + 31) / 32 * 32 : 256;
    const dim3 grid(static_cast<unsigned>(n_slots), (channels + threads - 1) / threads);
    block_means_kernel<<<grid, threads, 0, ctx.stream>>>(kbar, k, cu_seqlens, n_segments, N, Hkv, D, block_size);
    MOBA_CUDA_CHECK(cudaGetLastError());
  }
  const dim3 grid(static_cast<unsigned>((N + 127) / 128), H);
  if (D <= 64)
    launch_route<64>(grid, ctx.stream, selected, flag, q, kbar, cu_seqlens, n_segments, N, H, Hkv, D, block_size,
                     top_k);
  else
    launch_route<128>(grid, ctx.stream, selected, flag, q, kbar, cu_seqlens, n_segments, N, H, Hkv, D, block_size,
                      top_k);
  MOBA_CUDA_CHECK(cudaGetLastError());
  // Debug check (MOBA_CUDA_DEBUG=1): synchronise and fail on a non-finite query, as the CPU router does. Off by
  // default because it stalls the stream; rows with NaN/Inf queries are routed to their current block only.
  static const bool debug = [] {
    const char* v = std::getenv("MOBA_CUDA_DEBUG");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (debug) {
    int host_flag = 0;
    MOBA_CUDA_CHECK(cudaMemcpyAsync(&host_flag, flag, sizeof(int), cudaMemcpyDeviceToHost, ctx.stream));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    MOBA_CHECK(host_flag == 0, "moba_select_blocks (cuda): q holds NaN or Inf; MoBA cannot route on it",
               "the activations diverged before attention: lower the learning rate or check the inputs");
  }
}

}  // namespace moba::cuda
