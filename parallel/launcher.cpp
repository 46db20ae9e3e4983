#include "parallel/launcher.h"

#include <cstdlib>
#include <string>

#include "common/error.h"

namespace moba::parallel {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char* name, int fallback) {
  const char* v = env(name);
  return v ? std::atoi(v) : fallback;
}

}  // namespace

LaunchInfo detect_launch() {
  LaunchInfo info;
  if (env("OMPI_COMM_WORLD_SIZE")) {  // Open MPI's mpirun / mpiexec (and srun --mpi=pmix with Open MPI)
    info.under_mpi_launcher = true;
    info.launcher = "mpirun (Open MPI)";
    info.expected_world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
  } else if (env("PMIX_RANK")) {  // any PMIx launcher: srun --mpi=pmix, prterun
    info.under_mpi_launcher = true;
    info.launcher = "PMIx";
    info.expected_world_size = env_int("SLURM_NTASKS", 1);
  } else if (env("PMI_RANK") || env("PMI_SIZE")) {  // MPICH's hydra, srun --mpi=pmi2
    info.under_mpi_launcher = true;
    info.launcher = "PMI";
    info.expected_world_size = env_int("PMI_SIZE", 1);
  }
  if (!info.under_mpi_launcher) {
    const int slurm_tasks = env_int("SLURM_STEP_NUM_TASKS", env_int("SLURM_NTASKS", 1));
    MOBA_CHECK(slurm_tasks <= 1 || !env("SLURM_STEP_ID"),
               cat("srun started ", slurm_tasks, " tasks without an MPI plugin: each would train alone as world size 1"),
               "launch with `srun --mpi=pmix ...` (see scripts/launch/slurm.sbatch), or with mpirun");
  }
  return info;
}

}  // namespace moba::parallel
