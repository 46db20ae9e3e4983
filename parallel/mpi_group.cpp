#include "parallel/mpi_group.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <thread>

#include "common/log.h"

namespace moba::parallel {

int world_rank_for_messages() { return log_rank(); }

MpiGroup::MpiGroup(MPI_Comm comm, std::string name, double timeout_s)
    : comm_(comm), name_(std::move(name)), timeout_s_(timeout_s) {
  if (comm_ == MPI_COMM_NULL) return;
  owns_comm_ = comm_ != MPI_COMM_WORLD;
  MOBA_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOBA_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
}

MpiGroup::~MpiGroup() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_comm_ && !finalized) MPI_Comm_free(&comm_);
}

void MpiGroup::wait(MPI_Request& request, const char* what) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s_);
  int done = 0;
  int polls = 0;
  while (true) {
    MOBA_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (clock::now() > deadline) {
      // A peer died or stopped calling collectives: say so on this rank, then end every rank (no hang).
      log_error(cat("collective '", what, "' on the ", name_, " group (", size_, " ranks) did not complete within ",
                    timeout_s_, " s: a peer rank died, hangs, or called a different collective"));
      std::fprintf(stderr, "  hint: look for the first error above from another rank; raise parallel.timeout_s if "
                           "a step legitimately takes longer\n");
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    // Spin for the first few polls (small CPU collectives finish in microseconds), then back off to 1 ms.
    if (++polls > 64) std::this_thread::sleep_for(std::chrono::microseconds(std::min(1000, polls)));
  }
}

namespace {
int as_count(int64_t n, const char* what) {
  MOBA_CHECK(n <= INT_MAX, cat("collective '", what, "': ", n, " elements exceed MPI's int count"),
             "this is a bug: buckets are split below 2^31 elements");
  return static_cast<int>(n);
}
}  // namespace

void MpiGroup::all_reduce(double* data, int64_t count, ReduceOp op, const char* what) {
  if (comm_ == MPI_COMM_NULL || size_ == 1) return;
  MPI_Request req;
  MOBA_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, as_count(count, what), MPI_DOUBLE,
                                op == ReduceOp::sum ? MPI_SUM : MPI_MAX, comm_, &req));
  wait(req, what);
}

void MpiGroup::all_reduce(float* data, int64_t count, const char* what) {
  if (comm_ == MPI_COMM_NULL || size_ == 1) return;
  const int64_t chunk = int64_t{1} << 28;
  for (int64_t off = 0; off < count; off += chunk) {
    MPI_Request req;
    MOBA_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data + off, static_cast<int>(std::min(chunk, count - off)), MPI_FLOAT,
                                  MPI_SUM, comm_, &req));
    wait(req, what);
  }
}

void MpiGroup::reduce_scatter(float* in, float* out, int64_t count_per_rank, const char* what) {
  if (comm_ == MPI_COMM_NULL || size_ == 1) {
    if (out != in) std::memmove(out, in, static_cast<size_t>(count_per_rank) * sizeof(float));
    return;
  }
  MPI_Request req;
  float* own_block = in + rank_ * count_per_rank;
  if (out == own_block) {  // in place: MPI's in-place form takes the whole buffer and writes the first block
    MOBA_MPI_CHECK(MPI_Ireduce_scatter_block(MPI_IN_PLACE, in, as_count(count_per_rank, what), MPI_FLOAT, MPI_SUM,
                                             comm_, &req));
    wait(req, what);
    if (rank_ != 0) std::memmove(own_block, in, static_cast<size_t>(count_per_rank) * sizeof(float));
    return;
  }
  MOBA_MPI_CHECK(MPI_Ireduce_scatter_block(in, out, as_count(count_per_rank, what), MPI_FLOAT, MPI_SUM, comm_, &req));
  wait(req, what);
}

void MpiGroup::all_gather(const void* in, void* out, int64_t bytes_per_rank, const char* what) {
  char* own_block = static_cast<char*>(out) + rank_ * bytes_per_rank;
  if (comm_ == MPI_COMM_NULL || size_ == 1) {
    if (in != own_block) std::memmove(own_block, in, static_cast<size_t>(bytes_per_rank));
    return;
  }
  MPI_Request req;
  const void* send = in == own_block ? MPI_IN_PLACE : in;
  MOBA_MPI_CHECK(MPI_Iallgather(send, as_count(bytes_per_rank, what), MPI_BYTE, out, as_count(bytes_per_rank, what),
                                MPI_BYTE, comm_, &req));
  wait(req, what);
}

void MpiGroup::broadcast(void* data, int64_t bytes, int root, const char* what) {
  if (comm_ == MPI_COMM_NULL || size_ == 1) return;
  const int64_t chunk = int64_t{1} << 30;
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += chunk) {
    MPI_Request req;
    MOBA_MPI_CHECK(MPI_Ibcast(p + off, static_cast<int>(std::min(chunk, bytes - off)), MPI_BYTE, root, comm_, &req));
    wait(req, what);
  }
}

void MpiGroup::barrier(const char* what) {
  if (comm_ == MPI_COMM_NULL || size_ == 1) return;
  MPI_Request req;
  MOBA_MPI_CHECK(MPI_Ibarrier(comm_, &req));
  wait(req, what);
}

}  // namespace moba::parallel
