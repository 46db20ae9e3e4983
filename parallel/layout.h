// The parallel layout of a job: world = data x context ranks. Ranks of one context-parallel group are
// consecutive (they share a host first): context_rank = rank % context, data_rank = rank / context.
// Invariant: every rank computes the same layout from the same settings and world size.
#pragma once
#include <string>

namespace moba::parallel {

struct ParallelLayout {
  int world_size = 1, rank = 0;
  int data = 1, context = 1;       // group sizes, data * context == world_size
  int data_rank = 0, context_rank = 0;
};

// Validates `parallel.context` and `parallel.data` (0 = auto) against the world size; `where` names the recipe
// in messages. Throws a moba::Error naming the key and the launch that would work.
ParallelLayout make_layout(int world_size, int rank, int context, int data, const std::string& where);

}  // namespace moba::parallel
