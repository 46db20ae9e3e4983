// `moba train RECIPE`: the training loop. Resumes automatically from the newest checkpoint in the run
// directory; writes metrics.jsonl, the resolved recipe, checkpoints and periodic validation loss.
#pragma once
#include <string>
#include <vector>

namespace moba {
namespace parallel { class MpiContext; }

int train_command(const std::vector<std::string>& args, parallel::MpiContext& mpi);

}  // namespace moba
