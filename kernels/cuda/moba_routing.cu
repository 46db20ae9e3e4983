// MoBA routing on the GPU (moba-spec.md, Forward steps 1-4): bf16-rounded block means of the whole key sequence,
// the fp32 gate <q, mean> without scale, and per (query row, head) the top-(k-1) complete past blocks of its document
// plus the current block, ties to the lower block index, for any top_k. Query rows stand at their key rows (q_rows):
// a row's selection depends only on its q and its key row. No host synchronisation and no (Nq, H, blocks) score
// tensor. Two routers, one CTA per (64 query rows, head) each:
//  - top_k - 1 <= 64 (fast): the gate against 64 candidate blocks at a time on the tensor cores (bf16 products are
//    exact in fp32; fp32 accumulation) into shared memory; one thread per token keeps its running top-(k-1) in
//    registers. Only the gate's summation order differs from the CPU, which can flip a near-tie (measured
//    agreement in tests/test_cuda_moba_gpu.cpp and `moba check-vectors --backend cuda`).
//  - top_k - 1 > 64 (general): the gate on the CUDA cores in the CPU's exact order, an exact radix select of the
//    (k-1)-th largest score per token, then emission: selections bit-identical to the CPU's.
// Invariants: block means are summed in fp32 in sequence order (the CPU's order, so kbar is bit-identical to the
// reference); identical block means give identical scores, so exact ties go to the lower block like the CPU.
#include <cmath>

#include "common/error.h"
#include "kernels/cuda/attention_scratch.h"
#include "kernels/cuda/moba_common.cuh"

namespace moba::cuda {
namespace attn {
namespace {

// The inputs both routers read: q rows, their key rows, the block means and the documents.
struct RouteArgs {
  int32_t* selected;           // (Nq, H, top_k)
  int* nonfinite_flag;         // set when a gated query holds NaN/Inf
  const bf16* q;               // (Nq, H, D)
  const bf16* kbar;            // (n_slots, Hkv, D)
  const int32_t* cu_seqlens;   // (S + 1)
  const int32_t* q_rows;       // (Nq) or nullptr
  int n_segments;
  int64_t Nq;
  int H, Hkv, D, B, top_k;
};

// The 64 candidate block means j0 .. j0 + 63 of the document starting at seg_start (kv head kv_head) into sM, rows of
// ld bf16, zero past `candidates` (cp.async, waited for, then a barrier).
template <int DP>
__device__ __forceinline__ void load_block_means(bf16* sM, int ld, const RouteArgs& a, int64_t seg_start, int j0,
                                                 int candidates, int kv_head) {
  for (int idx = threadIdx.x; idx < 64 * (DP / 8); idx += 128) {
    const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
    const bool ok = j0 + r < candidates && c < a.D;
    const int64_t slot = (seg_start + static_cast<int64_t>(j0 + r) * a.B) / a.B;
    cp_async_16(sM + r * ld + c, ok ? a.kbar + (slot * a.Hkv + kv_head) * a.D + c : a.kbar, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// kbar (n_slots, Hkv, D) bf16: the mean of the B keys of the complete block whose slot is blockIdx.x (slots with
// no complete block are left unwritten: no query reads them). One thread per channel sums the block's B rows in
// sequence order (the reference's order).
__global__ void block_means_kernel(bf16* __restrict__ kbar, const bf16* __restrict__ k,
                                   const int32_t* __restrict__ cu_seqlens, int n_segments, int Hkv, int D, int B) {
  const int64_t slot = blockIdx.x;
  const int64_t start = slot_block_start(cu_seqlens, n_segments, slot, B);
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

template <int DP>
constexpr size_t route_smem_bytes() {
  return size_t{2} * 64 * (DP + 8) * sizeof(bf16) + size_t{64} * 65 * sizeof(float);
}

// One CTA per (64-token tile, head); 4 warps. SLOTS >= top_k - 1 is the register list size of each token's thread:
// sorted by score descending (then block ascending) in its last top_k - 1 entries; the first SLOTS - (top_k - 1)
// entries hold +inf sentinels that never move. Candidates arrive in ascending block order and enter only with a
// strictly greater score than the list's last, so ties keep the lower block index (as the CPU reference).
template <int DP, int SLOTS>
__global__ void __launch_bounds__(128) route_kernel(const RouteArgs a) {
  const int H = a.H, Hkv = a.Hkv, D = a.D, B = a.B, top_k = a.top_k, n_segments = a.n_segments;
  const int64_t N = a.Nq;
  const int32_t* cu_seqlens = a.cu_seqlens;
  const bf16* q = a.q;
  constexpr int LD = DP + 8;
  constexpr int LDS = 65;  // score row stride (floats): column reads by 64 row threads hit distinct banks
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);            // (64, LD) the tile's query rows
  bf16* sM = sQ + 64 * LD;                             // (64, LD) block means of 64 candidates
  float* sS = reinterpret_cast<float*>(sM + 64 * LD);  // (64, LDS) gate scores
  __shared__ int s_seg[64], s_current[64];             // per token: segment (-1 past N), current block
  __shared__ int s_candidates;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h = blockIdx.y, kv_head = h / (H / Hkv);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int past_slots = top_k - 1;

  if (tid < 64) {
    int seg = -1, current = 0;
    if (t0 + tid < N) {
      const int t = query_key_row(a.q_rows, t0 + tid);
      seg = segment_of(cu_seqlens, n_segments, t);
      current = static_cast<int>((t - cu_seqlens[seg]) / B);
    }
    s_seg[tid] = seg;
    s_current[tid] = current;
  }
  for (int idx = tid; idx < 64 * (DP / 8); idx += 128) {
    const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
    const bool ok = t0 + r < N && c < D;
    cp_async_16(sQ + r * LD + c, ok ? q + ((t0 + r) * H + h) * D + c : q, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Token state (threads 0..63): the running list, and whether the token needs the gate at all.
  const int my_seg = tid < 64 ? s_seg[tid] : -1;
  const int my_current = tid < 64 ? s_current[tid] : 0;
  bool gated = my_seg >= 0 && past_slots > 0 && my_current > past_slots;
  if (gated) {  // never route on NaN/Inf: current block only, and raise the flag (see moba_select_blocks)
    bool finite = true;
    for (int c = 0; c < D; ++c) finite = finite && isfinite(__bfloat162float(sQ[tid * LD + c]));
    if (!finite) {
      atomicOr(a.nonfinite_flag, 1);
      gated = false;
    }
  }
  float best[SLOTS];
  int best_block[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    best[i] = i < SLOTS - past_slots ? INFINITY : -INFINITY;
    best_block[i] = -1;
  }

  const int last_row = static_cast<int>(N - 1 - t0 < 63 ? N - 1 - t0 : 63);
  for (int seg = s_seg[0]; seg <= s_seg[last_row] && past_slots > 0; ++seg) {
    if (tid == 0) s_candidates = 0;
    __syncthreads();
    if (gated && my_seg == seg) atomicMax(&s_candidates, my_current);
    __syncthreads();
    const int candidates = s_candidates;  // blocks 0 .. candidates-1 of segment seg are complete and past
    __syncthreads();                       // read by all before the next segment resets it
    const int64_t seg_start = cu_seqlens[seg];
    for (int j0 = 0; j0 < candidates; j0 += 64) {
      load_block_means<DP>(sM, LD, a, seg_start, j0, candidates, kv_head);
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
      mma_rows_times_rows<DP, 64>(acc, sQ, warp * 16, sM, LD, lane);
      const int r0 = warp * 16 + (lane >> 2), col0 = 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        sS[r0 * LDS + j * 8 + col0] = acc[j][0];
        sS[r0 * LDS + j * 8 + col0 + 1] = acc[j][1];
        sS[(r0 + 8) * LDS + j * 8 + col0] = acc[j][2];
        sS[(r0 + 8) * LDS + j * 8 + col0 + 1] = acc[j][3];
      }
      __syncthreads();
      if (gated && my_seg == seg) {
        const int n = min(64, my_current - j0);
        for (int jj = 0; jj < n; ++jj) {
          const float score = sS[tid * LDS + jj];
          if (!(score > best[SLOTS - 1])) continue;
          // Insert: new[i] = old[i-1] if old[i-1] < score, else score if old[i] < score, else old[i].
#pragma unroll
          for (int i = SLOTS - 1; i > 0; --i) {
            const bool shift = best[i - 1] < score;
            const bool place = !shift && best[i] < score;
            best[i] = shift ? best[i - 1] : (place ? score : best[i]);
            best_block[i] = shift ? best_block[i - 1] : (place ? j0 + jj : best_block[i]);
          }
          if (best[0] < score) {
            best[0] = score;
            best_block[0] = j0 + jj;
          }
        }
      }
      __syncthreads();  // sM and sS are rewritten by the next chunk
    }
  }

  if (tid >= 64 || my_seg < 0) return;
  int32_t* out = a.selected + ((t0 + tid) * H + h) * top_k;
  if (!gated) {  // k = 1, all past blocks fit (full causal attention in the segment), or a non-finite query
    const bool all_past = past_slots > 0 && my_current <= past_slots && my_seg >= 0;
    const int n_past = all_past ? my_current : 0;
    for (int i = 0; i < top_k; ++i) out[i] = i < n_past ? i : (i == n_past ? my_current : -1);
    return;
  }
  int n_chosen = 0;  // ascending block order: each chosen block's rank among the chosen ones
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    if (best_block[i] < 0) continue;
    int rank = 0;
#pragma unroll
    for (int m = 0; m < SLOTS; ++m) rank += best_block[m] >= 0 && best_block[m] < best_block[i];
    out[rank] = best_block[i];
    ++n_chosen;
  }
  out[n_chosen] = my_current;
  for (int i = n_chosen + 1; i < top_k; ++i) out[i] = -1;
}

// ---- general router (top_k - 1 > 64): exact gate, exact threshold by radix select -----------------------------
// The gate in the CPU reference's arithmetic (detail::dot in kernels/cpu/attention_core.h: eight interleaved fp32
// partial sums over the channels, combined as ((p0 + p4) + (p1 + p5)) + ((p2 + p6) + (p3 + p7)); bf16 x bf16
// products are exact in fp32), so scores and selections are bit-identical to the CPU's. Per token, the (k-1)-th
// largest score is found exactly by a most-significant-digit radix select over order-preserving keys of the float
// bits (4 passes of 8 bits with per-token 256-bin histograms in shared memory; radix selection as in Alabi et al.,
// "Fast k-selection algorithms for graphics processing units", ACM JEA 2012), recomputing the scores each pass
// instead of storing a (tokens, blocks) score tensor; a fifth pass emits, in ascending block order, every candidate
// above the threshold and the lowest-indexed ones equal to it (ties to the lower block, as the CPU's list).
inline constexpr int kRadixBins = 256;
inline constexpr int kHistLd = kRadixBins + 1;  // per-token histogram row stride: 64 tokens hit distinct banks

// Order-preserving key: a > b as floats iff key(a) > key(b); -0 and +0 get one key (they tie on the CPU).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = x == 0.0f ? 0u : __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

template <int DP>
constexpr size_t route_radix_smem_bytes() {
  return size_t{64} * DP * sizeof(bf16) + size_t{64} * 65 * sizeof(uint32_t) + size_t{64} * kHistLd * sizeof(int);
}

// One CTA per (64-token tile, head); 128 threads, two per token (each scores one half of a 64-candidate chunk with
// the token's q row in registers; all lanes of a warp read the same block mean: shared-memory broadcasts).
template <int DP>
__global__ void __launch_bounds__(128) route_radix_kernel(const RouteArgs a) {
  const int H = a.H, D = a.D, B = a.B, top_k = a.top_k, n_segments = a.n_segments;
  const int64_t N = a.Nq;
  const int32_t* cu_seqlens = a.cu_seqlens;
  const bf16* q = a.q;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sM = reinterpret_cast<bf16*>(smem);                   // (64, DP) block means of 64 candidates
  uint32_t* sKey = reinterpret_cast<uint32_t*>(sM + 64 * DP);  // (64, 65) keys of the chunk per token (emission)
  int* hist = reinterpret_cast<int*>(sKey + 64 * 65);          // (64, kHistLd) digit histogram per token
  __shared__ int s_seg[64], s_current[64];                     // per token: segment (-1 past N), current block
  __shared__ int s_candidates;
  const int tid = threadIdx.x, token = tid & 63, half = tid >> 6;
  const int h = blockIdx.y, kv_head = h / (H / a.Hkv);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 64, t = t0 + token;  // the query row
  const int past_slots = top_k - 1;

  if (tid < 64) {
    int seg = -1, current = 0;
    if (t < N) {
      const int key_row = query_key_row(a.q_rows, t);
      seg = segment_of(cu_seqlens, n_segments, key_row);
      current = static_cast<int>((key_row - cu_seqlens[seg]) / B);
    }
    s_seg[tid] = seg;
    s_current[tid] = current;
  }
  uint32_t qw[DP / 2];  // the token's q row, bf16 pairs (low half = lower channel)
#pragma unroll
  for (int i = 0; i < DP / 2; ++i) qw[i] = 0;
  if (t < N) {
    const uint4* src = reinterpret_cast<const uint4*>(q + (t * H + h) * D);
#pragma unroll
    for (int c = 0; c < DP / 8; ++c) {
      if (c * 8 < D) {
        const uint4 x = src[c];
        qw[4 * c] = x.x;
        qw[4 * c + 1] = x.y;
        qw[4 * c + 2] = x.z;
        qw[4 * c + 3] = x.w;
      }
    }
  }
  __syncthreads();
  const int my_seg = s_seg[token], my_current = s_current[token];
  bool gated = my_seg >= 0 && my_current > past_slots;
  if (gated) {  // never route on NaN/Inf (see moba_select_blocks): current block only, and raise the flag
    bool finite = true;
#pragma unroll
    for (int i = 0; i < DP / 2; ++i)
      finite = finite && (qw[i] & 0x7F80u) != 0x7F80u && (qw[i] & 0x7F800000u) != 0x7F800000u;
    if (!finite) {
      if (half == 0) atomicOr(a.nonfinite_flag, 1);
      gated = false;
    }
  }

  // The gate of this token against the block mean at m (shared memory), in the CPU's exact order.
  auto gate = [&](const bf16* m) {
    float p[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < DP / 8; ++c) {
      if (c * 8 < D) {
        const uint4 mv = *reinterpret_cast<const uint4*>(m + c * 8);
        const uint32_t mw[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          p[2 * i] = __fadd_rn(p[2 * i], __fmul_rn(bf16_lo(qw[4 * c + i]), bf16_lo(mw[i])));
          p[2 * i + 1] = __fadd_rn(p[2 * i + 1], __fmul_rn(bf16_hi(qw[4 * c + i]), bf16_hi(mw[i])));
        }
      }
    }
    return __fadd_rn(__fadd_rn(__fadd_rn(p[0], p[4]), __fadd_rn(p[1], p[5])),
                     __fadd_rn(__fadd_rn(p[2], p[6]), __fadd_rn(p[3], p[7])));
  };
  // Calls visit(j0, n) for every chunk of 64 candidate blocks j0 .. j0 + 63 of every segment in the tile, with their
  // means in sM; n = how many of them are this token's candidates (0: another segment or not gated). Called by all
  // threads; visit may __syncthreads.
  const int last_row = static_cast<int>(N - 1 - t0 < 63 ? N - 1 - t0 : 63);
  auto for_each_chunk = [&](auto&& visit) {
    for (int seg = s_seg[0]; seg <= s_seg[last_row]; ++seg) {
      if (tid == 0) s_candidates = 0;
      __syncthreads();
      if (half == 0 && gated && my_seg == seg) atomicMax(&s_candidates, my_current);
      __syncthreads();
      const int candidates = s_candidates;
      __syncthreads();
      const int64_t seg_start = cu_seqlens[seg];
      for (int j0 = 0; j0 < candidates; j0 += 64) {
        load_block_means<DP>(sM, DP, a, seg_start, j0, candidates, kv_head);
        visit(j0, gated && my_seg == seg ? max(0, min(64, my_current - j0)) : 0);
        __syncthreads();  // sM (and sKey) are rewritten by the next chunk
      }
    }
  };

  // Radix select: after the pass of `shift`, prefix holds the top bits of the threshold key (the (k-1)-th largest
  // key of the token's candidates) and need how many candidates matching the prefix are still to be taken.
  uint32_t prefix = 0, mask = 0;
  int need = past_slots;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 64 * kHistLd; i += 128) hist[i] = 0;
    __syncthreads();
    for_each_chunk([&](int, int n) {
      for (int jj = half * 32; jj < half * 32 + 32 && jj < n; ++jj) {
        const uint32_t key = order_key(gate(sM + jj * DP));
        if ((key & mask) == prefix) atomicAdd(&hist[token * kHistLd + ((key >> shift) & 0xFFu)], 1);
      }
    });
    __syncthreads();
    if (gated) {
      int above = 0;  // candidates matching the prefix with a larger digit
      for (int b = kRadixBins - 1; b >= 0; --b) {
        const int c = hist[token * kHistLd + b];
        if (above + c >= need) {
          prefix |= static_cast<uint32_t>(b) << shift;
          need -= above;
          break;
        }
        above += c;
      }
    }
    mask |= 0xFFu << shift;
    __syncthreads();  // every token has read its histogram before the next pass clears it
  }

  // Emission in ascending block order: keys above the threshold, and the first `need` keys equal to it.
  int32_t* out = a.selected + (t * H + h) * top_k;
  int n_out = 0, ties_left = need;
  for_each_chunk([&](int j0, int n) {
    for (int jj = half * 32; jj < half * 32 + 32 && jj < n; ++jj) sKey[token * 65 + jj] = order_key(gate(sM + jj * DP));
    __syncthreads();
    if (half == 0) {
      for (int jj = 0; jj < n; ++jj) {
        const uint32_t key = sKey[token * 65 + jj];
        if (key > prefix || (key == prefix && ties_left > 0)) {
          ties_left -= key == prefix;
          out[n_out++] = j0 + jj;
        }
      }
    }
  });

  if (half != 0 || my_seg < 0) return;
  if (!gated) {  // all past blocks fit (full causal attention in the segment), or a non-finite query
    const int n_past = my_current <= past_slots ? my_current : 0;
    for (int i = 0; i < top_k; ++i) out[i] = i < n_past ? i : (i == n_past ? my_current : -1);
    return;
  }
  out[n_out] = my_current;  // n_out == past_slots
  for (int i = n_out + 1; i < top_k; ++i) out[i] = -1;
}

template <int DP>
void launch_route(dim3 grid, cudaStream_t stream, const RouteArgs& a) {
  const int past = a.top_k - 1;
  auto launch = [&](auto kernel, size_t bytes) {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<grid, 128, bytes, stream>>>(a);
  };
  constexpr size_t bytes = route_smem_bytes<DP>();
  if (past <= 2) launch(route_kernel<DP, 2>, bytes);
  else if (past <= 4) launch(route_kernel<DP, 4>, bytes);
  else if (past <= 8) launch(route_kernel<DP, 8>, bytes);
  else if (past <= 16) launch(route_kernel<DP, 16>, bytes);
  else if (past <= 32) launch(route_kernel<DP, 32>, bytes);
  else if (past <= 64) launch(route_kernel<DP, 64>, bytes);
  else launch(route_radix_kernel<DP>, route_radix_smem_bytes<DP>());
}

}  // namespace
}  // namespace attn

void moba_select_blocks(const CudaContext& ctx, const AttentionArgs& a) {
  using namespace attn;
  check_moba_shape("moba_select_blocks", a);
  if (a.n_queries == 0) return;
  const int Hkv = a.n_kv_heads, D = a.head_dim, B = a.block_size;
  const int64_t n_slots = (a.n_keys + B - 1) / B;
  // Scratch `block_means`: kbar (n_slots, Hkv, D) bf16, padded to 256 bytes, then the non-finite flag.
  char* buffer = static_cast<char*>(scratch(a.scratch.block_means, "block_means",
                                            moba_block_means_bytes(a.n_keys, B, Hkv, D)));
  bf16* kbar = reinterpret_cast<bf16*>(buffer);
  int* flag = reinterpret_cast<int*>(buffer + moba_block_means_bytes(a.n_keys, B, Hkv, D) - 256);
  MOBA_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int), ctx.stream));
  if (a.top_k > 1 && n_slots > 0) {
    const int channels = Hkv * D;
    const int threads = channels < 256 ? (channels + 31) / 32 * 32 : 256;
    const dim3 grid(static_cast<unsigned>(n_slots), (channels + threads - 1) / threads);
    block_means_kernel<<<grid, threads, 0, ctx.stream>>>(kbar, a.k, a.cu_seqlens, a.n_segments, Hkv, D, B);
    MOBA_CUDA_CHECK(cudaGetLastError());
  }
  const RouteArgs r{a.selected, flag, a.q, kbar, a.cu_seqlens, a.q_rows, a.n_segments, a.n_queries, a.n_heads, Hkv, D, B,
                    a.top_k};
  const dim3 grid(static_cast<unsigned>((a.n_queries + 63) / 64), a.n_heads);
  if (D <= 64) launch_route<64>(grid, ctx.stream, r);
  else launch_route<128>(grid, ctx.stream, r);
  MOBA_CUDA_CHECK(cudaGetLastError());
  // Rows with NaN/Inf queries were routed to their current block only and raised the flag; the settings decide
  // whether to synchronise and fail on it, as the CPU router does.
  if (a.settings.check_finite_queries) {
    int host_flag = 0;
    MOBA_CUDA_CHECK(cudaMemcpyAsync(&host_flag, flag, sizeof(int), cudaMemcpyDeviceToHost, ctx.stream));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    MOBA_CHECK(host_flag == 0, "moba_select_blocks (cuda): q holds NaN or Inf; MoBA cannot route on it",
               "the activations diverged before attention: lower the learning rate or check the inputs");
  }
}

}  // namespace moba::cuda
