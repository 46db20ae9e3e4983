#include "parallel/mpi_context.h"

#include <unistd.h>

#include <cstdlib>

#include "common/log.h"

namespace moba::parallel {

MpiContext::MpiContext(int* argc, char*** argv) : launch_(detect_launch()) {
  char name[256] = {0};
  gethostname(name, sizeof name - 1);
  host_ = name;
  if (!launch_.under_mpi_launcher) {
    world_ = std::make_unique<MpiGroup>(MPI_COMM_NULL, "world", 600);
    set_log_rank(0, 1);
    return;
  }
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MOBA_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  }
  // Errors come back as return codes (checked by MOBA_MPI_CHECK) instead of killing the job silently.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  world_ = std::make_unique<MpiGroup>(MPI_COMM_WORLD, "world", 600);
  set_log_rank(world_->rank(), world_->size());
  MPI_Comm local = MPI_COMM_NULL;
  MOBA_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_->rank(), MPI_INFO_NULL, &local));
  MOBA_MPI_CHECK(MPI_Comm_rank(local, &local_rank_));
  MOBA_MPI_CHECK(MPI_Comm_size(local, &local_size_));
  MPI_Comm_free(&local);
}

MpiContext::~MpiContext() {
  if (!launch_.under_mpi_launcher) return;
  world_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiContext::abort_all(int exit_code) const {
  if (launch_.under_mpi_launcher) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::exit(exit_code);  // not reached under a launcher: MPI_Abort does not return
}

}  // namespace moba::parallel
