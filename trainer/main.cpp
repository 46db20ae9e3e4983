// Entry point of the `moba` binary: initialises MPI (so `mpirun -np N moba ...` works), dispatches the
// subcommand, and turns a moba::Error into a readable message and a non-zero exit (aborting all ranks
// when several run, so no rank hangs in a collective).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "data/prep.h"
#include "kernels/check_vectors.h"
#include "parallel/mpi_context.h"
#include "trainer/bench.h"
#include "trainer/eval.h"
#include "trainer/plan.h"
#include "trainer/train.h"

namespace {

const char* kUsage =
    "usage: moba <command> [args] [--help]\n"
    "\n"
    "commands:\n"
    "  prep            tokenize text (JSONL/.xz/.gz/plain text) into HDF5 train/val datasets\n"
    "  train           train a model from a YAML recipe (resumes automatically)\n"
    "  eval            mean, position-wise and trailing loss of checkpoints on long documents\n"
    "  plan            resolve a recipe and print its parameters, tokens and FLOPs (JSON)\n"
    "  check-vectors   run MoBA on a test-vector file (moba-vectors.h5 format) and compare\n"
    "  bench           time attention layers or training steps (JSON lines for bench/results/)\n"
    "\n"
    "Run `moba <command> --help` for the options of each. Launch with `mpirun -np N moba train ...` for\n"
    "several ranks.\n";

int dispatch(const std::string& command, const std::vector<std::string>& args, moba::parallel::MpiContext& mpi) {
  if (command == "prep") return moba::data::prep_command(args);
  if (command == "train") return moba::train_command(args, mpi);
  if (command == "eval") return moba::eval_command(args, mpi);
  if (command == "plan") return moba::plan_command(args);
  if (command == "check-vectors") return moba::check_vectors_command(args);
  if (command == "bench") return moba::bench_command(args, mpi);
  throw moba::UsageError(moba::cat("unknown command '", command, "'"), "run `moba --help` for the list of commands");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::unique_ptr<moba::parallel::MpiContext> mpi;
  int status = 1;
  try {
    mpi = std::make_unique<moba::parallel::MpiContext>(&argc, &argv);
    std::vector<std::string> args(argv + 2, argv + argc);
    return dispatch(argv[1], args, *mpi);
  } catch (const moba::Error& e) {
    moba::log_error(e.what());
    if (!e.hint().empty()) std::fprintf(stderr, "  hint: %s\n", e.hint().c_str());
    if (dynamic_cast<const moba::UsageError*>(&e)) status = 2;
  } catch (const std::exception& e) {
    moba::log_error(moba::cat("unexpected failure: ", e.what()));
  }
  if (mpi && mpi->world_size() > 1) mpi->abort_all(status);
  return status;
}
