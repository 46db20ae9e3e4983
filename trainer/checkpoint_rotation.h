// Which checkpoints of a run directory to resume from, set aside or delete: the policy alone. Callers list the
// candidates and say how to tell whether one is readable (a single file, or a directory of shards), so every
// checkpoint format follows the same rules.
// Invariant: a readable checkpoint is never deleted in favour of an unreadable one (rotation counts only
// readable checkpoints towards `keep` and never deletes an unreadable one), and a run starts from step 0 beside
// unreadable checkpoints only with the user's explicit consent.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moba {

struct CheckpointCandidate {
  int64_t step = 0;
  std::string path;  // a checkpoint file or directory
};

struct UnreadableCheckpoint {
  CheckpointCandidate checkpoint;
  std::string reason;  // why it cannot be used (the check's error)
};

// Why the checkpoint at `path` cannot be used, or "" when it can.
using ReadabilityCheck = std::function<std::string(const std::string& path)>;

struct ResumeChoice {
  std::optional<CheckpointCandidate> resume_from;  // the newest readable checkpoint, if any
  std::vector<UnreadableCheckpoint> unreadable;    // every one newer than resume_from (all, when none), newest first
};

// Checks the candidates newest first and stops at the first readable one, so `readable` may load the checkpoint
// while it checks it (the last successful call is the one resumed from).
ResumeChoice choose_resume(std::vector<CheckpointCandidate> candidates, const ReadabilityCheck& readable);

// Throws unless the run may go on: starting from step 0 while `choice.unreadable` is not empty needs
// `start_over_allowed` (the user's flag, named by `flag` in the message), since the new run would reuse their
// steps. Resuming from an older readable checkpoint needs no consent.
void require_consent_to_start_over(const ResumeChoice& choice, const std::string& checkpoint_dir,
                                   bool start_over_allowed, const std::string& flag);

// Moves files or directories (unreadable checkpoints) into `into_dir` (created), keeping their names, so that a
// run going past their steps never overwrites them. An existing file of the same name there is an error.
void set_aside(const std::vector<std::string>& paths, const std::string& into_dir);

// After a save: the checkpoints to delete so that the newest `keep` readable ones remain. Only readable
// checkpoints older than the keep-th newest readable one are returned; unreadable ones are never returned
// (`kept_unreadable` lists them, so the caller can say so).
std::vector<CheckpointCandidate> checkpoints_to_delete(std::vector<CheckpointCandidate> candidates, int keep,
                                                       const ReadabilityCheck& readable,
                                                       std::vector<UnreadableCheckpoint>* kept_unreadable);

}  // namespace moba
