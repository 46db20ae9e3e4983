// Context parallelism's cut of a micro-batch: every sequence of T tokens is split into 2C chunks of T / 2C and
// context-parallel rank r keeps chunks r and 2C-1-r (zigzag: every rank gets the same causal work). The local rows
// carry their inputs, targets, loss mask and true positions; attention needs where they stand in the whole
// micro-batch and how to put the keys gathered from every rank (rank-major) back in order.
// Invariant: local rows are in ascending whole-batch order; concatenating every rank's global_rows in rank order
// gives gathered_rows, and gathered_index is its inverse.
#pragma once
#include <cstdint>
#include <vector>

#include "data/sampler.h"

namespace moba::data {

struct ContextShard {
  Batch local;                          // (S * T / C) rows of this rank; local.cu_seqlens is unused (empty)
  std::vector<int32_t> global_rows;     // (S * T / C) whole-batch row of each local row, ascending
  std::vector<int32_t> cu_seqlens;      // (segments + 1) the whole micro-batch's documents (the key sequence)
  std::vector<int32_t> gathered_rows;   // (S * T) whole-batch row of each row of the rank-major gathered order
  std::vector<int32_t> gathered_index;  // (S * T) position in the gathered order of each whole-batch row
};

// Throws a moba::Error when T is not a multiple of 2C.
ContextShard shard_for_context(const Batch& batch, int context, int rank);

}  // namespace moba::data
