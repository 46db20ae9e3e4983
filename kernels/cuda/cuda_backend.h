// The CUDA backend's shared state (stream, cuBLASLt handle and workspace) and the launchers of each op
// family, one .cu file per family. Device code never sees a config object: plain pointers and sizes.
// Invariant: every launcher runs on CudaContext::stream; nothing synchronises the host inside a step.
#pragma once
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_check.h"

namespace moba::cuda {

struct CudaContext {
  // 0: the loss total (cross_entropy), 1: reduction partials (reduce); the deterministic backward ops:
  // 2: RMSNorm's per-block dweight rows, 3: the embedding's token sort and partial rows.
  static constexpr int kScratchSlots = 4;
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;  // cuBLASLt workspace
  size_t workspace_bytes = 0;
  int sm_count = 0;

  // Device scratch of the reductions, one buffer per slot (the attention ops take named scratch from their call
  // instead, sized up front by the model's plan). A slot grows (synchronously) the first
  // time a larger size is asked for, which happens in the first training step; later steps reuse it, so no
  // allocation happens per step and a step can be captured in a CUDA graph once warmed up.
  void* scratch(int slot, size_t bytes) const {
    MOBA_ASSERT(slot >= 0 && slot < kScratchSlots);
    if (bytes > scratch_bytes[slot]) {
      MOBA_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (scratch_ptr[slot]) MOBA_CUDA_CHECK(cudaFree(scratch_ptr[slot]));
      MOBA_CUDA_CHECK(cudaMalloc(&scratch_ptr[slot], bytes));
      track(static_cast<int64_t>(bytes) - static_cast<int64_t>(scratch_bytes[slot]));
      scratch_bytes[slot] = bytes;
    }
    return scratch_ptr[slot];
  }
  mutable void* scratch_ptr[kScratchSlots] = {};
  mutable size_t scratch_bytes[kScratchSlots] = {};

  // Device bytes held through this context (arenas and scratch), and the peak.
  void track(int64_t delta) const {
    allocated = static_cast<size_t>(static_cast<int64_t>(allocated) + delta);
    if (allocated > peak) peak = allocated;
  }
  mutable size_t allocated = 0, peak = 0;
};

// Whether ctx's GPU runs the warpgroup-MMA (wgmma) kernels: they are built for sm_90a, i.e. compute capability 9.0.
bool device_has_wgmma(const CudaContext& ctx);
// 16-byte aligned: the vector loads, cp.async copies and 16-byte stores of the attention kernels need it.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace moba::cuda
