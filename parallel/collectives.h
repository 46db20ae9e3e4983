// The collectives of one transport on raw buffers of a group: what the Communicator dispatches to. Host buffers
// go through MPI (HostCollectives); GPU buffers through NCCL or through MPI staged in pinned host memory
// (parallel/cuda/). Every call is "issued": ordered after the work the caller queued before it; its result is
// visible to the caller's later work after wait_all() (host transports complete before returning).
// Invariant: the ranks of a group issue the same calls in the same order with the same sizes.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/tensor.h"
#include "parallel/mpi_group.h"

namespace moba::parallel {

enum class Group { world, data, context };
const char* group_name(Group g);

// The MPI groups of a layout, shared by every transport (NCCL bootstraps from them).
struct MpiGroups {
  MpiGroup* world = nullptr;
  MpiGroup* data = nullptr;
  MpiGroup* context = nullptr;
  MpiGroup& get(Group g) const { return g == Group::world ? *world : g == Group::data ? *data : *context; }
};

class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual std::string name() const = 0;
  // f32 sum in place over `count` elements.
  virtual void all_reduce(float* data, int64_t count, Group g, const char* what) = 0;
  // in: size blocks of count_per_rank f32; the sum of block `rank` lands in out (which may be in's own block).
  virtual void reduce_scatter(float* in, float* out, int64_t count_per_rank, Group g, const char* what) = 0;
  // Every rank's bytes_per_rank bytes into out in rank order; in may be out's own block.
  virtual void all_gather(const void* in, void* out, int64_t bytes_per_rank, Group g, const char* what) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root, Group g, const char* what) = 0;
  // The caller's stream (host: nothing) waits for every collective issued so far.
  virtual void wait_all() = 0;
};

// MPI on host memory; complete when each call returns.
class HostCollectives final : public Collectives {
 public:
  explicit HostCollectives(MpiGroups groups) : groups_(groups) {}
  std::string name() const override { return "mpi"; }
  void all_reduce(float* data, int64_t count, Group g, const char* what) override;
  void reduce_scatter(float* in, float* out, int64_t count_per_rank, Group g, const char* what) override;
  void all_gather(const void* in, void* out, int64_t bytes_per_rank, Group g, const char* what) override;
  void broadcast(void* data, int64_t bytes, int root, Group g, const char* what) override;
  void wait_all() override {}

 private:
  MpiGroups groups_;
};

}  // namespace moba::parallel
