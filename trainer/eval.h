// `moba eval`: loads each checkpoint given and measures, on long documents, the mean loss, the position-wise
// loss per bucket and the trailing loss (../shared/docs/moba-spec.md): position-wise and trailing losses count only
// sequences that reach the full evaluation length N; the mean loss counts every real token.
#pragma once
#include <string>
#include <vector>

namespace moba {
namespace parallel { class MpiContext; }

int eval_command(const std::vector<std::string>& args, parallel::MpiContext& mpi);

}  // namespace moba
