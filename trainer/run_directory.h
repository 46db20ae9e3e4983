// Taking ownership of a run directory before anyone writes into it: every rank checks that its resolved recipe
// is rank 0's (by hash), rank 0 creates the directory and locks it (flock on RUN_DIR/.lock, released when the
// process ends, even by SIGKILL), and the other ranks wait for that before touching it.
// Invariant: two jobs never write one run directory; ranks launched with different recipes never allocate.
#pragma once
#include <string>

#include "parallel/mpi_context.h"

namespace moba {

class RunDirectory {
 public:
  // Collective over the world. Throws a moba::Error (on every rank) when recipes differ between ranks or another
  // job holds the directory.
  RunDirectory(const std::string& path, const std::string& resolved_recipe, const parallel::MpiContext& mpi);
  ~RunDirectory();
  RunDirectory(const RunDirectory&) = delete;
  RunDirectory& operator=(const RunDirectory&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int lock_fd_ = -1;  // rank 0 only
};

// FNV-1a 64-bit hash of a string (the recipe check; not cryptographic).
uint64_t text_hash(const std::string& text);

}  // namespace moba
