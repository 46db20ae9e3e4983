#include "parallel/layout.h"

#include "common/error.h"

namespace moba::parallel {

ParallelLayout make_layout(int world_size, int rank, int context, int data, const std::string& where) {
  MOBA_CHECK(context >= 1, cat(where, ": parallel.context = ", context, " must be >= 1"),
             "set parallel.context: 1 for no context parallelism");
  MOBA_CHECK(world_size % context == 0,
             cat(where, ": parallel.context = ", context, " does not divide the world size ", world_size,
                 " (ranks launched)"),
             cat("launch a multiple of ", context, " ranks (mpirun -np ", context * ((world_size + context - 1) / context),
                 "), or set parallel.context to a divisor of ", world_size));
  const int dp = world_size / context;
  MOBA_CHECK(data == 0 || data == dp,
             cat(where, ": parallel.data = ", data, " but ", world_size, " ranks with parallel.context = ", context,
                 " give ", dp, " data-parallel ranks"),
             cat("set parallel.data: auto, or launch with mpirun -np ", static_cast<long long>(data) * context));
  ParallelLayout l;
  l.world_size = world_size;
  l.rank = rank;
  l.context = context;
  l.data = dp;
  l.context_rank = rank % context;
  l.data_rank = rank / context;
  return l;
}

}  // namespace moba::parallel
