#include "trainer/run_directory.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <vector>

#include "common/log.h"

namespace fs = std::filesystem;

namespace moba {

uint64_t text_hash(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

RunDirectory::RunDirectory(const std::string& path, const std::string& resolved_recipe, const parallel::MpiContext& mpi)
    : path_(path) {
  parallel::MpiGroup& world = mpi.world();
  // 1. Every rank runs rank 0's recipe, or nobody starts.
  const uint64_t mine = text_hash(resolved_recipe);
  std::vector<uint64_t> all(static_cast<size_t>(world.size()));
  world.all_gather(&mine, all.data(), sizeof mine, "recipe hash");
  std::string differing;
  for (size_t r = 1; r < all.size(); ++r)
    if (all[r] != all[0]) differing += cat(differing.empty() ? "" : ", ", r);
  MOBA_CHECK(differing.empty(),
             cat("rank(s) ", differing, " resolved a different recipe than rank 0 (after --set overrides)"),
             "launch every rank with the same recipe file and the same --set options (the resolved recipe is printed "
             "at start)");

  // 2. Rank 0 creates and locks the directory; the others learn the outcome (no rank hangs on a failure).
  char failure[1024] = {0};
  if (mpi.is_root()) {
    try {
      std::error_code ec;
      fs::create_directories(path_, ec);
      MOBA_CHECK(!ec, cat("cannot create the run directory ", path_, ": ", ec.message()),
                 "check the path (run_dir) and its permissions");
      const std::string lock_path = (fs::path(path_) / ".lock").string();
      lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      MOBA_CHECK(lock_fd_ >= 0, cat("cannot open ", lock_path, ": ", std::strerror(errno)),
                 "check the run directory's permissions");
      if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
        std::ifstream in(lock_path);
        std::string owner((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        while (!owner.empty() && owner.back() == '\n') owner.pop_back();
        ::close(lock_fd_);
        lock_fd_ = -1;
        throw Error(cat("the run directory ", path_, " is in use by another job (", owner.empty() ? "owner unknown" : owner,
                        ")"),
                    "wait for that job to finish or stop it, or set another run_dir (e.g. --set run_dir=runs/other)");
      }
      const std::string owner = cat("pid ", getpid(), " on ", mpi.host(), ", ", mpi.world_size(), " rank(s), since ",
                                    std::time(nullptr), " (unix time)\n");
      if (::ftruncate(lock_fd_, 0) == 0 && ::write(lock_fd_, owner.data(), owner.size()) < 0) {
        // the lock itself is what matters; its text is only a courtesy for the next message
      }
    } catch (const Error& e) {
      std::snprintf(failure, sizeof failure, "%s\n%s", e.what(), e.hint().c_str());
    }
  }
  world.broadcast(failure, sizeof failure, 0, "run directory lock");
  if (failure[0]) {
    std::string text(failure);
    const size_t nl = text.find('\n');
    if (mpi.is_root()) throw Error(text.substr(0, nl), text.substr(nl + 1));
    // The other ranks stop quietly: rank 0 reports it.
    throw Error(cat("rank 0 could not take the run directory ", path_), "see rank 0's message");
  }
}

RunDirectory::~RunDirectory() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

}  // namespace moba
