// The two transports for GPU tensors: NCCL (one communicator per group, split from the world's, on its own
// stream, with a watchdog thread that ends the job on an NCCL async error or a collective past its deadline) and
// MPI staged through pinned host memory. Compiled only with the CUDA backend.
#pragma once
#include <memory>

#include "parallel/collectives.h"

namespace moba::parallel {

// compute_stream: the backend's cudaStream_t (Backend::stream_handle()); device: the GPU this rank uses.
std::unique_ptr<Collectives> make_nccl_collectives(MpiGroups groups, void* compute_stream, int device,
                                                   double timeout_s);
std::unique_ptr<Collectives> make_staged_collectives(MpiGroups groups, void* compute_stream);

}  // namespace moba::parallel
