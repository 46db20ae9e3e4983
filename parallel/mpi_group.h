// One MPI communicator (the world, or a data / context group) and its collectives on host memory, each with a
// deadline: the operation is issued non-blocking and waited for by polling, so a dead or stuck peer ends the job
// with a message naming the group and the call instead of a hang. Without a launcher (world size 1) every
// collective is a local copy or nothing.
// Invariant: every rank of the group calls the same collectives in the same order.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <string>

#include "common/error.h"

// MOBA_MPI_CHECK(call): an MPI failure becomes a moba::Error naming the rank, the call and MPI's own message.
#define MOBA_MPI_CHECK(call)                                                                          \
  do {                                                                                                \
    int moba_mpi_rc = (call);                                                                         \
    if (moba_mpi_rc != MPI_SUCCESS) {                                                                 \
      char moba_mpi_msg[MPI_MAX_ERROR_STRING];                                                        \
      int moba_mpi_len = 0;                                                                           \
      MPI_Error_string(moba_mpi_rc, moba_mpi_msg, &moba_mpi_len);                                     \
      throw ::moba::Error(::moba::cat("[rank ", ::moba::parallel::world_rank_for_messages(), "] MPI: ", \
                                      #call, " failed: ", moba_mpi_msg, " at ", __FILE__, ":", __LINE__), \
                          "check the mpirun command line and that every rank runs the same binary");  \
    }                                                                                                 \
  } while (0)

namespace moba::parallel {

int world_rank_for_messages();  // this process's world rank (0 before MPI starts)

enum class ReduceOp { sum, max };

class MpiGroup {
 public:
  // comm == MPI_COMM_NULL: a group of one (no launcher). `name` appears in error messages ("world", "data").
  MpiGroup(MPI_Comm comm, std::string name, double timeout_s);
  MpiGroup(const MpiGroup&) = delete;
  MpiGroup& operator=(const MpiGroup&) = delete;
  ~MpiGroup();

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  MPI_Comm comm() const { return comm_; }
  void set_timeout(double seconds) { timeout_s_ = seconds; }
  double timeout() const { return timeout_s_; }

  // `what` names the operation in a timeout or failure message ("gradient bucket 3", "loss").
  void all_reduce(double* data, int64_t count, ReduceOp op, const char* what);
  void all_reduce(float* data, int64_t count, const char* what);  // sum
  // in (size * count_per_rank floats): the sum of block `rank` lands in out (count_per_rank). in == out allowed
  // (then the rank's block of `in` receives it in place).
  void reduce_scatter(float* in, float* out, int64_t count_per_rank, const char* what);
  // Every rank's block of `bytes_per_rank` bytes, in rank order, into out (size * bytes_per_rank); in may point at
  // the rank's own block of out (in place).
  void all_gather(const void* in, void* out, int64_t bytes_per_rank, const char* what);
  void broadcast(void* data, int64_t bytes, int root, const char* what);
  void barrier(const char* what);

 private:
  // Waits for a non-blocking request, polling with a growing pause, and ends the job at the deadline.
  void wait(MPI_Request& request, const char* what);
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owns_comm_ = false;
  int rank_ = 0, size_ = 1;
  std::string name_;
  double timeout_s_ = 600;
};

}  // namespace moba::parallel
