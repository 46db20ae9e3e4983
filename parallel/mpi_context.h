// Process bootstrap: MPI is initialised only when a launcher started this process (parallel/launcher.h), so a
// plain `moba ...` is world size 1 without any MPI daemon. Gives the world rank and size, the rank among the
// processes of this host (from MPI_Comm_split_type, never guessed from variables), and the world's host
// collectives. One MpiContext lives for the whole program.
// Invariant: errors on one rank end every rank (trainer/main.cpp calls abort_all), never a hang.
#pragma once
#include <memory>
#include <string>

#include "parallel/launcher.h"
#include "parallel/mpi_group.h"

namespace moba::parallel {

class MpiContext {
 public:
  MpiContext(int* argc, char*** argv);  // MPI_Init_thread under a launcher; sets the log rank
  ~MpiContext();                        // MPI_Finalize unless aborted
  MpiContext(const MpiContext&) = delete;
  MpiContext& operator=(const MpiContext&) = delete;

  bool launched() const { return launch_.under_mpi_launcher; }
  const LaunchInfo& launch() const { return launch_; }
  int rank() const { return world_->rank(); }
  int world_size() const { return world_->size(); }
  bool is_root() const { return rank() == 0; }
  int local_rank() const { return local_rank_; }  // among this host's ranks
  int local_size() const { return local_size_; }
  std::string host() const { return host_; }
  MpiGroup& world() const { return *world_; }

  // Ends every rank now with this exit code (after an error on one rank when several run).
  [[noreturn]] void abort_all(int exit_code) const;

 private:
  LaunchInfo launch_;
  std::unique_ptr<MpiGroup> world_;
  int local_rank_ = 0, local_size_ = 1;
  std::string host_;
};

}  // namespace moba::parallel
