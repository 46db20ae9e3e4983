#include "common/log.h"

#include <cstdio>

namespace moba {
namespace {
int g_rank = 0;
int g_world = 1;

std::string prefix() { return g_world > 1 ? cat("[rank ", g_rank, "] ") : std::string(); }
}  // namespace

void set_log_rank(int rank, int world_size) {
  g_rank = rank;
  g_world = world_size;
}
int log_rank() { return g_rank; }
int log_world_size() { return g_world; }

void log_line(const std::string& line) {
  if (g_rank != 0) return;
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

void log_warn(const std::string& line) {
  std::fprintf(stderr, "%swarning: %s\n", prefix().c_str(), line.c_str());
  std::fflush(stderr);
}

void log_error(const std::string& line) {
  std::fprintf(stderr, "%serror: %s\n", prefix().c_str(), line.c_str());
  std::fflush(stderr);
}

}  // namespace moba
