#include "parallel/mpi_context.h"

#include <algorithm>

#include "common/log.h"

namespace moba::parallel {

MpiContext::MpiContext(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MOBA_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  }
  MOBA_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  MOBA_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size_));
  // Errors come back as return codes (checked by MOBA_MPI_CHECK) instead of killing the job silently.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  char name[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  MPI_Get_processor_name(name, &len);
  host_.assign(name, static_cast<size_t>(len));
  set_log_rank(rank_, world_size_);
}

MpiContext::~MpiContext() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiContext::barrier() const { MOBA_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); }

void MpiContext::allreduce_sum(float* data, int64_t count) const {
  // MPI counts are int: reduce in chunks so very large buffers work.
  const int64_t chunk = 1 << 28;
  for (int64_t off = 0; off < count; off += chunk) {
    int n = static_cast<int>(std::min(chunk, count - off));
    MOBA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
  }
}

void MpiContext::allreduce_sum(double* data, int64_t count) const {
  const int64_t chunk = 1 << 27;
  for (int64_t off = 0; off < count; off += chunk) {
    int n = static_cast<int>(std::min(chunk, count - off));
    MOBA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
  }
}

void MpiContext::broadcast(void* data, int64_t bytes, int root) const {
  const int64_t chunk = 1 << 30;
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += chunk) {
    int n = static_cast<int>(std::min(chunk, bytes - off));
    MOBA_MPI_CHECK(MPI_Bcast(p + off, n, MPI_BYTE, root, MPI_COMM_WORLD));
  }
}

void MpiContext::abort_all(int exit_code) const {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::exit(exit_code);  // not reached: MPI_Abort does not return
}

}  // namespace moba::parallel
