#include "parallel/communicator.h"

#include "common/log.h"
#if MOBA_HAVE_CUDA
#include "parallel/cuda/gpu_collectives.h"
#endif

namespace moba::parallel {

const char* transport_name(Transport t) { return t == Transport::nccl ? "nccl" : "mpi"; }

Transport resolve_transport(const std::string& setting, Device device, int local_ranks, int gpus,
                            const std::string& where) {
  MOBA_CHECK(setting == "auto" || setting == "nccl" || setting == "mpi",
             cat(where, ": parallel.transport '", setting, "' is not allowed"), "allowed: auto, nccl, mpi");
  if (device == Device::cpu) {
    MOBA_CHECK(setting != "nccl", cat(where, ": parallel.transport: nccl needs backend: cuda"),
               "use parallel.transport: auto (or mpi) with backend: cpu");
    return Transport::mpi;
  }
  const bool shared = local_ranks > gpus;
  if (setting == "mpi") return Transport::mpi;
  if (setting == "nccl") {
    MOBA_CHECK(!shared,
               cat(where, ": parallel.transport: nccl with ", local_ranks, " ranks on this host but ", gpus,
                   " GPU(s): NCCL needs one GPU per rank"),
               "launch at most one rank per GPU, or set parallel.transport: mpi to let ranks share a GPU (slow)");
    return Transport::nccl;
  }
  if (shared) {
    warn(local_ranks, " ranks share ", gpus, " GPU(s) on this host: NCCL needs one GPU per rank, so GPU tensors are "
         "exchanged through host memory (parallel.transport: mpi; set it explicitly to silence this warning)");
    return Transport::mpi;
  }
  return Transport::nccl;
}

Communicator::Communicator(const MpiContext& mpi, const ParallelLayout& layout, Backend& backend,
                           Transport transport, double timeout_s)
    : layout_(layout), backend_(backend) {
  MpiGroup& world = mpi.world();
  world.set_timeout(timeout_s);
  MPI_Comm data = MPI_COMM_NULL, context = MPI_COMM_NULL;
  if (mpi.launched()) {
    // Data group: the ranks with the same context rank; context group: consecutive ranks (parallel/layout.h).
    MOBA_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, layout.context_rank, layout.rank, &data));
    MOBA_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, layout.data_rank, layout.rank, &context));
  }
  data_ = std::make_unique<MpiGroup>(data, "data-parallel", timeout_s);
  context_ = std::make_unique<MpiGroup>(context, "context-parallel", timeout_s);
  groups_ = MpiGroups{&world, data_.get(), context_.get()};
  MOBA_ASSERT(data_->size() == layout.data && context_->size() == layout.context);
  host_ = std::make_unique<HostCollectives>(groups_);
  if (backend.device() == Device::cuda) {
#if MOBA_HAVE_CUDA
    device_ = transport == Transport::nccl
                  ? make_nccl_collectives(groups_, backend.stream_handle(), backend.device_index(), timeout_s)
                  : make_staged_collectives(groups_, backend.stream_handle());
#else
    MOBA_ASSERT(false);  // a CUDA backend exists only in CUDA builds
#endif
  }
}

Communicator::~Communicator() = default;

std::string Communicator::transport() const {
  if (!device_) return "mpi";
  return device_->name();
}

Collectives& Communicator::for_device(const Tensor& t) {
  MOBA_CHECK(t.device == backend_.device(),
             cat("communicator: a tensor on ", t.device == Device::cpu ? "cpu" : "cuda", " with a ", backend_.name(),
                 " backend"),
             "this is a bug in the caller");
  MOBA_ASSERT(t.contiguous());
  return t.device == Device::cpu ? *host_ : *device_;
}

void Communicator::all_reduce(Tensor t, Group g, const char* what) {
  MOBA_ASSERT(t.dtype == DType::f32);
  if (size(g) == 1) return;
  for_device(t).all_reduce(t.as<float>(), t.numel(), g, what);
}

void Communicator::reduce_scatter(const Tensor& in, Tensor out, Group g, const char* what) {
  MOBA_ASSERT(in.dtype == DType::f32 && out.dtype == DType::f32 && in.numel() == out.numel() * size(g));
  for_device(in).reduce_scatter(in.as<float>(), out.as<float>(), out.numel(), g, what);
}

void Communicator::all_gather(const Tensor& in, Tensor out, Group g, const char* what) {
  MOBA_ASSERT(in.dtype == out.dtype && out.numel() == in.numel() * size(g));
  for_device(in).all_gather(in.data, out.data, static_cast<int64_t>(in.bytes()), g, what);
}

void Communicator::broadcast(Tensor t, int root, Group g, const char* what) {
  if (size(g) == 1) return;
  for_device(t).broadcast(t.data, static_cast<int64_t>(t.bytes()), root, g, what);
}

void Communicator::wait_all() {
  if (device_) device_->wait_all();
}

}  // namespace moba::parallel
