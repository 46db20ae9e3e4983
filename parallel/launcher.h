// How this process was started: by an MPI launcher (mpirun/mpiexec, or srun with PMI/PMIx), or as a plain
// command. A plain `moba ...` is world size 1 and never initialises MPI, so it needs no MPI daemon and two such
// processes can never race on Open MPI's singleton session directory.
// Invariant: only the launcher's own variables are read (no moba setting is ever switched by the environment).
#pragma once
#include <string>

namespace moba::parallel {

struct LaunchInfo {
  bool under_mpi_launcher = false;  // MPI_Init must run (the launcher wired this process into a job)
  std::string launcher;             // "mpirun (Open MPI)", "PMIx", "PMI", or "" for a plain start
  int expected_world_size = 1;      // the size the launcher announced, when it says (else 1)
};

// Reads the variables every launcher sets for its processes (OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK/PMI_SIZE).
// Throws a moba::Error when Slurm started several tasks without an MPI plugin (each would train alone).
LaunchInfo detect_launch();

}  // namespace moba::parallel
