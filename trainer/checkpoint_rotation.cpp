// The checkpoint rotation policy (see checkpoint_rotation.h): candidates are always considered newest first.
// Invariant: nothing here deletes a file; callers delete exactly what checkpoints_to_delete returns.
#include "trainer/checkpoint_rotation.h"

#include <algorithm>
#include <filesystem>

#include "common/error.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

void sort_newest_first(std::vector<CheckpointCandidate>& candidates) {
  std::sort(candidates.begin(), candidates.end(),
            [](const CheckpointCandidate& a, const CheckpointCandidate& b) { return a.step > b.step; });
}

}  // namespace

ResumeChoice choose_resume(std::vector<CheckpointCandidate> candidates, const ReadabilityCheck& readable) {
  sort_newest_first(candidates);
  ResumeChoice choice;
  for (const CheckpointCandidate& c : candidates) {
    std::string reason = readable(c.path);
    if (reason.empty()) {
      choice.resume_from = c;
      break;
    }
    choice.unreadable.push_back({c, reason});
  }
  return choice;
}

void require_consent_to_start_over(const ResumeChoice& choice, const std::string& checkpoint_dir,
                                   bool start_over_allowed, const std::string& flag) {
  if (choice.resume_from || choice.unreadable.empty() || start_over_allowed) return;
  std::string list;
  for (const UnreadableCheckpoint& u : choice.unreadable) list += cat("\n  ", u.checkpoint.path, ": ", u.reason);
  throw Error(cat(checkpoint_dir, " holds ", choice.unreadable.size(),
                  " checkpoint(s) that cannot be read and none that can, so this run would start again from step 0:",
                  list),
              cat("restore readable checkpoints (or use the moba version that wrote them), pick another run_dir, or "
                  "pass ", flag, " to start from step 0 (the unreadable checkpoints are moved to ", checkpoint_dir,
                  "/unreadable/, not deleted)"));
}

void set_aside(const std::vector<std::string>& paths, const std::string& into_dir) {
  if (paths.empty()) return;
  std::error_code ec;
  fs::create_directories(into_dir, ec);
  MOBA_CHECK(!ec, cat("cannot create ", into_dir, ": ", ec.message()), "check the run directory's permissions");
  for (const std::string& from : paths) {
    fs::path to = fs::path(into_dir) / fs::path(from).filename();
    MOBA_CHECK(!fs::exists(to), cat("cannot set ", from, " aside: ", to.string(), " exists already"),
               cat("move or delete ", to.string(), " first"));
    fs::rename(from, to, ec);
    MOBA_CHECK(!ec, cat("cannot move ", from, " to ", to.string(), ": ", ec.message()),
               "check the run directory's permissions");
  }
}

std::vector<CheckpointCandidate> checkpoints_to_delete(std::vector<CheckpointCandidate> candidates, int keep,
                                                       const ReadabilityCheck& readable,
                                                       std::vector<UnreadableCheckpoint>* kept_unreadable) {
  MOBA_ASSERT(keep >= 1);
  sort_newest_first(candidates);
  std::vector<CheckpointCandidate> doomed;
  int readable_seen = 0;
  for (const CheckpointCandidate& c : candidates) {
    std::string reason = readable(c.path);
    if (!reason.empty()) {
      if (kept_unreadable) kept_unreadable->push_back({c, reason});
      continue;
    }
    if (++readable_seen > keep) doomed.push_back(c);
  }
  return doomed;
}

}  // namespace moba
