// Process-group bootstrap: MPI initialisation, rank/world queries, and the few collectives the CPU backend
// needs (NCCL takes over collectives on GPUs in a later layer). One MpiContext lives for the whole program.
// Invariant: every rank calls the collectives in the same order; errors on one rank abort all (abort_all).
#pragma once
#include <mpi.h>

#include <cstdint>
#include <string>

#include "common/error.h"

// MOBA_MPI_CHECK(call): any MPI failure becomes a moba::Error with the MPI error string.
#define MOBA_MPI_CHECK(call)                                                                     \
  do {                                                                                           \
    int moba_mpi_rc = (call);                                                                    \
    if (moba_mpi_rc != MPI_SUCCESS) {                                                            \
      char moba_mpi_msg[MPI_MAX_ERROR_STRING];                                                   \
      int moba_mpi_len = 0;                                                                      \
      MPI_Error_string(moba_mpi_rc, moba_mpi_msg, &moba_mpi_len);                                \
      throw ::moba::Error(::moba::cat("MPI: ", #call, " failed: ", moba_mpi_msg, " at ",         \
                                      __FILE__, ":", __LINE__),                                  \
                          "check the mpirun command line and that every rank runs the same binary"); \
    }                                                                                            \
  } while (0)

namespace moba::parallel {

class MpiContext {
 public:
  MpiContext(int* argc, char*** argv);  // MPI_Init_thread; sets the log rank
  ~MpiContext();                        // MPI_Finalize unless aborted
  MpiContext(const MpiContext&) = delete;
  MpiContext& operator=(const MpiContext&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  bool is_root() const { return rank_ == 0; }
  std::string host() const { return host_; }

  void barrier() const;
  void allreduce_sum(float* data, int64_t count) const;   // in place, fixed order per element (MPI's)
  void allreduce_sum(double* data, int64_t count) const;
  void broadcast(void* data, int64_t bytes, int root = 0) const;
  // Ends every rank now with this exit code (used after an error on one rank when several run).
  [[noreturn]] void abort_all(int exit_code) const;

 private:
  int rank_ = 0;
  int world_size_ = 1;
  std::string host_;
};

}  // namespace moba::parallel
