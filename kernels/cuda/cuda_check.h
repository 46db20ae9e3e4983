// One error-check macro per CUDA API family. Failures become moba::Error with file:line, the API's own
// message and a hint; kernels launched asynchronously are checked with MOBA_CUDA_CHECK(cudaGetLastError()).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common/error.h"

#define MOBA_CUDA_CHECK(call)                                                                       \
  do {                                                                                              \
    cudaError_t moba_cuda_err = (call);                                                             \
    if (moba_cuda_err != cudaSuccess)                                                               \
      throw ::moba::Error(::moba::cat("CUDA: ", #call, " failed: ", cudaGetErrorString(moba_cuda_err), \
                                      " at ", __FILE__, ":", __LINE__),                              \
                          moba_cuda_err == cudaErrorMemoryAllocation                                \
                              ? "out of GPU memory: lower train.micro_batch_seqs or data.seq_len, or set " \
                                "train.recompute"                                                   \
                              : "check the driver (nvidia-smi) and that the binary was built for this GPU"); \
  } while (0)

#define MOBA_CUBLAS_CHECK(call)                                                                     \
  do {                                                                                              \
    cublasStatus_t moba_cublas_status = (call);                                                     \
    if (moba_cublas_status != CUBLAS_STATUS_SUCCESS)                                                \
      throw ::moba::Error(::moba::cat("cuBLAS: ", #call, " failed: ",                               \
                                      cublasGetStatusString(moba_cublas_status), " at ", __FILE__, ":", \
                                      __LINE__),                                                    \
                          "this is a bug in the GEMM setup (shapes, layouts or alignment)");       \
  } while (0)
