// Checkpoints in HDF5: params/<name>, optimizer/m/<name>, optimizer/v/<name> (fp32, the arena's named
// tensors), and attributes: step, tokens_seen, optimizer_steps, sampler_epoch, sampler_cursor, seed,
// recipe (the resolved YAML), format_version. The training data order is a pure function of the seed and
// the sampler state, so (seed, sampler state) is the whole RNG state of a run.
// Invariant: a checkpoint file exists under its final name only once completely written (temp + rename).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/sampler.h"
#include "model/transformer.h"
#include "trainer/optimizer.h"

namespace moba {

struct CheckpointState {
  int64_t step = 0;          // optimizer steps completed
  double tokens_seen = 0;    // training tokens consumed
  data::SamplerState sampler;
  uint64_t seed = 0;
  std::string recipe_yaml;   // the resolved recipe the run used
};

// Writes <dir>/step_<step>.h5 (via a temp file + rename) and deletes all but the newest `keep` checkpoints.
std::string save_checkpoint(const std::string& dir, const CheckpointState& state, const model::Transformer& model,
                            const AdamW& optimizer, int keep);
// The newest checkpoint in dir that opens; corrupt or partial ones are reported and skipped.
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Reads the attributes only (step, tokens, recipe) - what `moba eval` needs to rebuild the model.
CheckpointState read_checkpoint_state(const std::string& path);
// Loads weights (and optimizer state when optimizer != nullptr) into the model; shapes must match.
CheckpointState load_checkpoint(const std::string& path, model::Transformer& model, AdamW* optimizer);

}  // namespace moba
