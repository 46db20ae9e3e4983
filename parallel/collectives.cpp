#include "parallel/collectives.h"

namespace moba::parallel {

const char* group_name(Group g) {
  switch (g) {
    case Group::world: return "world";
    case Group::data: return "data";
    case Group::context: return "context";
  }
  return "?";
}

void HostCollectives::all_reduce(float* data, int64_t count, Group g, const char* what) {
  groups_.get(g).all_reduce(data, count, what);
}
void HostCollectives::reduce_scatter(float* in, float* out, int64_t count_per_rank, Group g, const char* what) {
  groups_.get(g).reduce_scatter(in, out, count_per_rank, what);
}
void HostCollectives::all_gather(const void* in, void* out, int64_t bytes_per_rank, Group g, const char* what) {
  groups_.get(g).all_gather(in, out, bytes_per_rank, what);
}
void HostCollectives::broadcast(void* data, int64_t bytes, int root, Group g, const char* what) {
  groups_.get(g).broadcast(data, bytes, root, what);
}

}  // namespace moba::parallel
