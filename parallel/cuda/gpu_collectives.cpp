// NCCL collectives for GPU tensors. One NCCL communicator per group: the world's from a unique id broadcast over
// MPI, the data and context groups' split from it (ncclCommSplit). Every collective runs on the communication
// stream after an event recorded on the compute stream, so gradient buckets are reduced while backward goes on;
// wait_all() makes the compute stream wait for the communication stream. A watchdog thread polls the events of
// issued collectives and ncclCommGetAsyncError: past parallel.timeout_s, or on an asynchronous error, it prints
// which collective on which group failed, aborts the communicators and exits, so mpirun ends the job.
// Learned from: NCCL's user guide (in-place reduce-scatter/all-gather, ncclCommSplit, async error handling and
// ncclCommAbort) and llm.c's multi-GPU bootstrap over MPI (llmc/zero.cuh).
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

#include "common/log.h"
#include "kernels/cuda/cuda_check.h"
#include "parallel/cuda/gpu_collectives.h"

// MOBA_NCCL_CHECK(call): an NCCL failure becomes a moba::Error naming the rank, the call and NCCL's message.
#define MOBA_NCCL_CHECK(call)                                                                                  \
  do {                                                                                                         \
    ncclResult_t moba_nccl_rc = (call);                                                                        \
    if (moba_nccl_rc != ncclSuccess)                                                                           \
      throw ::moba::Error(::moba::cat("[rank ", ::moba::log_rank(), "] NCCL: ", #call, " failed: ",           \
                                      ncclGetErrorString(moba_nccl_rc), " at ", __FILE__, ":", __LINE__),      \
                          "check that every rank has its own GPU and that NCCL_* variables are sane; "         \
                          "NCCL_DEBUG=WARN prints NCCL's own diagnosis");                                      \
  } while (0)

namespace moba::parallel {
namespace {

class NcclCollectives final : public Collectives {
 public:
  NcclCollectives(MpiGroups groups, cudaStream_t compute, int device, double timeout_s)
      : groups_(groups), compute_(compute), device_(device), timeout_s_(timeout_s) {
    MOBA_CUDA_CHECK(cudaSetDevice(device_));
    ncclUniqueId id{};
    if (groups_.world->rank() == 0) MOBA_NCCL_CHECK(ncclGetUniqueId(&id));
    groups_.world->broadcast(&id, sizeof id, 0, "NCCL unique id");
    MOBA_NCCL_CHECK(ncclCommInitRank(&comms_[0], groups_.world->size(), id, groups_.world->rank()));
    // ncclCommSplit: ranks with the same colour form a group, ordered by key (the world rank), as MPI_Comm_split.
    const ParallelColours colours = colours_of();
    MOBA_NCCL_CHECK(ncclCommSplit(comms_[0], colours.data, groups_.world->rank(), &comms_[1], nullptr));
    MOBA_NCCL_CHECK(ncclCommSplit(comms_[0], colours.context, groups_.world->rank(), &comms_[2], nullptr));
    MOBA_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    MOBA_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    MOBA_CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
    watchdog_ = std::thread([this] { watch(); });
  }

  ~NcclCollectives() override {
    stop_ = true;
    if (watchdog_.joinable()) watchdog_.join();
    cudaStreamSynchronize(comm_stream_);
    for (Pending& p : pending_) cudaEventDestroy(p.event);
    for (ncclComm_t c : comms_)
      if (c) ncclCommDestroy(c);
    cudaEventDestroy(compute_done_);
    cudaEventDestroy(comm_done_);
    cudaStreamDestroy(comm_stream_);
  }

  std::string name() const override { return "nccl"; }

  void all_reduce(float* data, int64_t count, Group g, const char* what) override {
    begin();
    MOBA_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat32, ncclSum, comm(g), comm_stream_));
    end(g, what);
  }
  void reduce_scatter(float* in, float* out, int64_t count_per_rank, Group g, const char* what) override {
    begin();
    MOBA_NCCL_CHECK(ncclReduceScatter(in, out, static_cast<size_t>(count_per_rank), ncclFloat32, ncclSum, comm(g),
                                      comm_stream_));
    end(g, what);
  }
  void all_gather(const void* in, void* out, int64_t bytes_per_rank, Group g, const char* what) override {
    begin();
    MOBA_NCCL_CHECK(ncclAllGather(in, out, static_cast<size_t>(bytes_per_rank), ncclUint8, comm(g), comm_stream_));
    end(g, what);
  }
  void broadcast(void* data, int64_t bytes, int root, Group g, const char* what) override {
    begin();
    MOBA_NCCL_CHECK(ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm(g), comm_stream_));
    end(g, what);
  }
  void wait_all() override {
    if (!issued_since_wait_) return;
    MOBA_CUDA_CHECK(cudaEventRecord(comm_done_, comm_stream_));
    MOBA_CUDA_CHECK(cudaStreamWaitEvent(compute_, comm_done_, 0));
    issued_since_wait_ = false;
  }

 private:
  struct ParallelColours {
    int data, context;
  };
  // The data group gathers the ranks with the same context rank; the context group those with the same data rank.
  ParallelColours colours_of() const {
    const int context = groups_.context->size();
    return {groups_.world->rank() % context, groups_.world->rank() / context};
  }
  ncclComm_t comm(Group g) const { return comms_[g == Group::world ? 0 : g == Group::data ? 1 : 2]; }

  void begin() {  // the communication stream waits for the compute work queued so far
    MOBA_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
    MOBA_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, compute_done_, 0));
  }
  void end(Group g, const char* what) {
    cudaEvent_t done;
    MOBA_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    MOBA_CUDA_CHECK(cudaEventRecord(done, comm_stream_));
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back({done, cat(what, " on the ", groups_.get(g).name(), " group"), std::chrono::steady_clock::now()});
    issued_since_wait_ = true;
  }

  // The watchdog: completed collectives are retired; one past the deadline, or an NCCL async error, ends the job.
  void watch() {
    cudaSetDevice(device_);
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::string failure;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        while (!pending_.empty()) {
          cudaError_t state = cudaEventQuery(pending_.front().event);
          if (state == cudaErrorNotReady) {
            double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - pending_.front().issued).count();
            if (waited > timeout_s_)
              failure = cat("NCCL collective '", pending_.front().what, "' did not complete within ", timeout_s_,
                            " s: a peer rank died, hangs, or issued a different collective");
            break;
          }
          if (state != cudaSuccess) {
            failure = cat("CUDA error while waiting for '", pending_.front().what, "': ", cudaGetErrorString(state));
            break;
          }
          cudaEventDestroy(pending_.front().event);
          pending_.pop_front();
        }
      }
      for (int i = 0; i < 3 && failure.empty(); ++i) {
        ncclResult_t async = ncclSuccess;
        if (ncclCommGetAsyncError(comms_[i], &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
          failure = cat("NCCL reported an asynchronous error on the ", i == 0 ? "world" : i == 1 ? "data-parallel" :
                        "context-parallel", " communicator: ", ncclGetErrorString(async));
      }
      if (!failure.empty()) {
        log_error(failure);
        std::fprintf(stderr, "  hint: look for the first error from another rank; raise parallel.timeout_s if a step "
                             "legitimately takes longer\n");
        std::fflush(stderr);
        for (ncclComm_t c : comms_)
          if (c) ncclCommAbort(c);
        std::_Exit(1);  // the launcher sees a failed rank and ends the job
      }
    }
  }

  struct Pending {
    cudaEvent_t event;
    std::string what;
    std::chrono::steady_clock::time_point issued;
  };
  MpiGroups groups_;
  cudaStream_t compute_ = nullptr, comm_stream_ = nullptr;
  int device_ = 0;
  double timeout_s_;
  ncclComm_t comms_[3] = {nullptr, nullptr, nullptr};  // world, data, context
  cudaEvent_t compute_done_ = nullptr, comm_done_ = nullptr;
  bool issued_since_wait_ = false;
  std::mutex mutex_;
  std::deque<Pending> pending_;
  std::atomic<bool> stop_{false};
  std::thread watchdog_;
};

// MPI on pinned host copies of GPU buffers: each call copies out on the compute stream, waits for it, runs the
// host collective and copies back, so it is complete when it returns (several ranks may share one GPU).
class StagedCollectives final : public Collectives {
 public:
  StagedCollectives(MpiGroups groups, cudaStream_t compute) : host_(groups), groups_(groups), compute_(compute) {}
  ~StagedCollectives() override {
    if (buffer_) cudaFreeHost(buffer_);
  }
  std::string name() const override { return "mpi (staged through host memory)"; }

  void all_reduce(float* data, int64_t count, Group g, const char* what) override {
    float* h = static_cast<float*>(stage(data, static_cast<size_t>(count) * sizeof(float)));
    host_.all_reduce(h, count, g, what);
    unstage(data, h, static_cast<size_t>(count) * sizeof(float));
  }
  void reduce_scatter(float* in, float* out, int64_t count_per_rank, Group g, const char* what) override {
    const int size = groups_.get(g).size(), rank = groups_.get(g).rank();
    const size_t block = static_cast<size_t>(count_per_rank) * sizeof(float);
    float* h = static_cast<float*>(stage(in, block * static_cast<size_t>(size)));
    host_.reduce_scatter(h, h + rank * count_per_rank, count_per_rank, g, what);
    unstage(out, h + rank * count_per_rank, block);
  }
  void all_gather(const void* in, void* out, int64_t bytes_per_rank, Group g, const char* what) override {
    const int size = groups_.get(g).size(), rank = groups_.get(g).rank();
    char* h = static_cast<char*>(reserve(static_cast<size_t>(bytes_per_rank) * static_cast<size_t>(size)));
    char* own = h + rank * bytes_per_rank;
    MOBA_CUDA_CHECK(cudaMemcpyAsync(own, in, static_cast<size_t>(bytes_per_rank), cudaMemcpyDeviceToHost, compute_));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(compute_));
    host_.all_gather(own, h, bytes_per_rank, g, what);
    unstage(out, h, static_cast<size_t>(bytes_per_rank) * static_cast<size_t>(size));
  }
  void broadcast(void* data, int64_t bytes, int root, Group g, const char* what) override {
    void* h = stage(data, static_cast<size_t>(bytes));
    host_.broadcast(h, bytes, root, g, what);
    unstage(data, h, static_cast<size_t>(bytes));
  }
  void wait_all() override {}

 private:
  void* reserve(size_t bytes) {
    if (bytes > capacity_) {  // grows in the first step only; later steps reuse it
      if (buffer_) MOBA_CUDA_CHECK(cudaFreeHost(buffer_));
      MOBA_CUDA_CHECK(cudaHostAlloc(&buffer_, bytes, cudaHostAllocDefault));
      capacity_ = bytes;
    }
    return buffer_;
  }
  void* stage(const void* device, size_t bytes) {
    void* h = reserve(bytes);
    MOBA_CUDA_CHECK(cudaMemcpyAsync(h, device, bytes, cudaMemcpyDeviceToHost, compute_));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(compute_));
    return h;
  }
  void unstage(void* device, const void* h, size_t bytes) {
    MOBA_CUDA_CHECK(cudaMemcpyAsync(device, h, bytes, cudaMemcpyHostToDevice, compute_));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(compute_));  // the buffer is reused by the next call
  }
  HostCollectives host_;
  MpiGroups groups_;
  cudaStream_t compute_;
  void* buffer_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace

std::unique_ptr<Collectives> make_nccl_collectives(MpiGroups groups, void* compute_stream, int device,
                                                   double timeout_s) {
  return std::make_unique<NcclCollectives>(groups, static_cast<cudaStream_t>(compute_stream), device, timeout_s);
}

std::unique_ptr<Collectives> make_staged_collectives(MpiGroups groups, void* compute_stream) {
  return std::make_unique<StagedCollectives>(groups, static_cast<cudaStream_t>(compute_stream));
}


}  // namespace moba::parallel
