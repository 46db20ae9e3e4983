// Checkpoints. Format 2 (written now) is a directory per step, written collectively:
//   checkpoints/step_00000040/            written as step_00000040.tmp/ and renamed once every rank is done
//     shard_00000.h5 ... shard_<D-1>.h5   one per data-parallel rank: its owned ranges of the f32 master weights
//                                         and AdamW moments: datasets ranges (K x 3 int64: bucket, begin, numel),
//                                         master, m, v (f32, the ranges concatenated)
//     model.h5                            rank 0: params/<name> (f32, every tensor in logical order) and the run's
//                                         attributes (step, tokens_seen, optimizer_steps, sampler, seed, recipe)
//     manifest.yaml                       rank 0, last: the files and every shard's ranges
// Ranges are (bucket, offset inside the bucket's content), independent of the rank count, so a run resumes on
// another number of data-parallel ranks (each rank reads the pieces of old shards its new ranges cover), and on
// another backend. Format 1 (one step_N.h5 file with params/, optimizer/m/, optimizer/v/) still loads.
// The sampler cursor is stored as global sequences consumed in the epoch (every data rank's cursor x ranks).
// Every dataset carries a Fletcher32 checksum (common/hdf5_io.h), so corruption is an error, never weights.
// Invariant: a checkpoint exists under its final name only once completely written and read back (temp + verify +
// rename; the temp is removed when the save fails, e.g. on a full disk); rotation follows
// trainer/checkpoint_rotation.h (only readable checkpoints count towards `keep`, unreadable ones are never deleted).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/sampler.h"
#include "model/transformer.h"
#include "parallel/communicator.h"
#include "trainer/checkpoint_rotation.h"
#include "trainer/optimizer.h"

namespace moba {

struct CheckpointState {
  int64_t step = 0;          // optimizer steps completed
  double tokens_seen = 0;    // training tokens consumed
  data::SamplerState sampler;  // epoch, and the cursor in global sequences of the epoch
  uint64_t seed = 0;
  std::string recipe_yaml;   // the resolved recipe the run used
};

// Every rank calls it (comm may be null for a single rank). Writes <dir>/step_<step>/, each rank reading back what it
// wrote, and keeps the newest `keep` readable checkpoints. Returns the checkpoint's path. after_shards, when set, runs on every rank once its shard is written
// and before the checkpoint is complete (the fault tests kill a rank there).
std::string save_checkpoint(const std::string& dir, const CheckpointState& state, const model::Transformer& model,
                            const AdamW& optimizer, parallel::Communicator* comm, int keep,
                            const std::function<void()>& after_shards = nullptr);
// The newest checkpoint in dir that opens (a step_N/ directory or a step_N.h5 file); unreadable ones are reported
// and skipped.
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Checkpoints in dir (step_N/ directories and step_N.h5 files, readable or not), oldest first.
std::vector<CheckpointCandidate> list_checkpoints(const std::string& dir);
// Why the checkpoint at path cannot be used ("" when it opens as a supported moba checkpoint with a manifest; the
// data's checksums are verified when it is loaded).
std::string checkpoint_problem(const std::string& path);
// A checkpoint as given (a step_N/ directory with model.h5, or a step_N.h5 file), or the newest readable checkpoint
// of a run directory (RUN_DIR/checkpoints, or the checkpoints directory itself); throws naming `what` (e.g.
// "init_from") when there is none.
std::string resolve_checkpoint(const std::string& checkpoint_or_run_dir, const std::string& what);
// Reads the attributes only (step, tokens, recipe) - what `moba eval` needs to rebuild the model.
CheckpointState read_checkpoint_state(const std::string& path);
// The f32 weights as a full arena of `layout` (eval, init_from, tests).
std::vector<float> read_checkpoint_weights(const std::string& path, const model::ParameterLayout& layout);
// Weights only: into the optimizer's master weights (which publishes them to the model) when optimizer != null,
// else straight into the model's weights.
CheckpointState load_weights(const std::string& path, model::Transformer& model, AdamW* optimizer);
// Resumes a run: master weights, moments and step counter of the owned ranges, then the working weights.
CheckpointState load_checkpoint(const std::string& path, model::Transformer& model, AdamW& optimizer);

}  // namespace moba
