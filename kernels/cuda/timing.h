// Timing on a CUDA stream with events: the one implementation behind Backend::time_ms and the GPU benchmark
// tests. Each timed run is bracketed by events on the stream; warm-up runs are not timed.
#pragma once
#include <cuda_runtime.h>

#include <functional>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace moba::cuda {

// Milliseconds of each of `reps` runs of fn (after `warmup` untimed runs), in run order.
inline std::vector<double> time_on_stream(cudaStream_t stream, const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start, stop;
  MOBA_CUDA_CHECK(cudaEventCreate(&start));
  MOBA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    MOBA_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    MOBA_CUDA_CHECK(cudaEventRecord(stop, stream));
    MOBA_CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0;
    MOBA_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

}  // namespace moba::cuda
