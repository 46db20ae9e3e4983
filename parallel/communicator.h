// The communicator of a training job: the world, data-parallel and context-parallel groups of a layout
// (parallel/layout.h) and collectives on Tensors. CPU tensors go through MPI; CUDA tensors through NCCL on a
// communication stream ordered after the compute stream by events, or, with `parallel.transport: mpi`, through
// MPI staged in pinned host memory (slow, but several ranks can then share one GPU, which NCCL refuses).
// Host scalars (losses, counts, flags) always go through the groups' MPI side (host()).
// Invariant: ranks issue the same collectives in the same order; a collective's result is visible to later
// compute only after wait_all() (host transports complete at once); every wait has the parallel.timeout_s
// deadline, after which the job ends with a message naming the group and the call.
#pragma once
#include <memory>
#include <string>

#include "kernels/backend.h"
#include "parallel/collectives.h"
#include "parallel/layout.h"
#include "parallel/mpi_context.h"

namespace moba::parallel {

enum class Transport { nccl, mpi };
const char* transport_name(Transport t);

// `parallel.transport` (auto | nccl | mpi) for a job whose backend runs on `device`, with `local_ranks` ranks on
// this host and `gpus` GPUs visible. auto = nccl when every rank of the host has its own GPU, else mpi (with a
// warning). Throws naming the key when nccl cannot work (CPU backend, ranks sharing a GPU, no NCCL).
Transport resolve_transport(const std::string& setting, Device device, int local_ranks, int gpus,
                            const std::string& where);

class Communicator {
 public:
  Communicator(const MpiContext& mpi, const ParallelLayout& layout, Backend& backend, Transport transport,
               double timeout_s);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  const ParallelLayout& layout() const { return layout_; }
  int size(Group g) const { return host(g).size(); }
  int rank(Group g) const { return host(g).rank(); }
  MpiGroup& host(Group g) const { return groups_.get(g); }
  std::string transport() const;  // "mpi", "nccl", "mpi (staged through host memory)"

  // Tensors live on the backend's device; reductions are f32 sums.
  void all_reduce(Tensor t, Group g, const char* what);
  // in holds size(g) blocks of out.numel() elements; out (may be in's own block) gets the sum of block rank(g).
  void reduce_scatter(const Tensor& in, Tensor out, Group g, const char* what);
  // out holds size(g) blocks of in.numel() elements, in rank order; in may be out's own block.
  void all_gather(const Tensor& in, Tensor out, Group g, const char* what);
  void broadcast(Tensor t, int root, Group g, const char* what);
  // Later compute waits for every collective issued so far (no host synchronisation on the GPU).
  void wait_all();

 private:
  Collectives& for_device(const Tensor& t);
  ParallelLayout layout_;
  Backend& backend_;
  std::unique_ptr<MpiGroup> data_, context_;  // split from the world
  MpiGroups groups_;
  std::unique_ptr<Collectives> host_;    // CPU tensors
  std::unique_ptr<Collectives> device_;  // CUDA tensors (null on the CPU backend)
};

}  // namespace moba::parallel
