// A stable sort of (key, value) int32 pairs on the GPU, for the deterministic ops that group rows by a key and must
// keep the rows of one key in their original order (embedding backward by token id, the MoBA dispatch by bucket):
// cub::DeviceRadixSort::SortPairs (CUB ships with the CUDA toolkit; an LSD radix sort, stable by construction).
// Invariant: no host synchronisation (a step stays capturable in a CUDA graph); the temporary bytes depend only on
// the pair count, the key bits and the GPU, so callers size their scratch with sort_pairs_temp_bytes up front.
#pragma once
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_check.h"

namespace moba::cuda {

// Bits that hold every key in [0, max_key] (at least 1): the sort only looks at these.
inline int sort_key_bits(int64_t max_key) {
  int bits = 1;
  while (bits < 31 && (int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

// Bytes rounded up to 256: the callers carve one scratch buffer into the sort's arrays and cub's storage, each
// starting 256-byte aligned.
inline size_t aligned_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The pair count as cub's 32-bit item count (the callers' indices are int32 anyway).
inline int sort_items(int64_t n) {
  MOBA_CHECK(n >= 0 && n < (int64_t{1} << 31), cat("sort of ", n, " pairs: more than 32-bit indices hold"),
             "split the batch into smaller micro-batches");
  return static_cast<int>(n);
}

// cub's temporary bytes for n pairs with keys of key_bits bits (a host query, no device work).
inline size_t sort_pairs_temp_bytes(int64_t n, int key_bits) {
  size_t bytes = 0;
  MOBA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                                  static_cast<uint32_t*>(nullptr),
                                                  static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), sort_items(n), 0, key_bits));
  return bytes;
}

// keys_out, values_out (n) = the pairs (keys_in, values_in) (n) ordered by key, equal keys in input order. Keys must
// lie in [0, 2^key_bits); temp holds temp_bytes >= sort_pairs_temp_bytes(n, key_bits).
inline void sort_pairs(cudaStream_t stream, void* temp, size_t temp_bytes, const int32_t* keys_in, int32_t* keys_out,
                       const int32_t* values_in, int32_t* values_out, int64_t n, int key_bits) {
  if (n == 0) return;
  MOBA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, reinterpret_cast<const uint32_t*>(keys_in),
                                                  reinterpret_cast<uint32_t*>(keys_out), values_in, values_out,
                                                  sort_items(n), 0, key_bits, stream));
}

}  // namespace moba::cuda
