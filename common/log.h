// Rank-aware console logging: info lines come from rank 0 only, warnings and errors from every rank with
// a "[rank r]" prefix when more than one rank runs. set_log_rank() is called once by parallel/ at start.
#pragma once
#include <string>

#include "common/error.h"

namespace moba {

void set_log_rank(int rank, int world_size);
int log_rank();
int log_world_size();

void log_line(const std::string& line);   // rank 0 only, stdout, flushed
void log_warn(const std::string& line);   // every rank, stderr
void log_error(const std::string& line);  // every rank, stderr

template <typename... Args>
void info(const Args&... args) { log_line(cat(args...)); }
template <typename... Args>
void warn(const Args&... args) { log_warn(cat(args...)); }

}  // namespace moba
