// Host memory available to this process (see host_memory.h). The process's cgroup comes from /proc/self/cgroup;
// inside a container whose cgroup namespace hides the path, the files at the mount root are its own.
#include "common/host_memory.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <sstream>
#include <vector>

namespace moba {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::optional<size_t> parse_bytes(const std::string& text) {
  size_t value = 0;
  const char* begin = text.data();
  while (begin < text.data() + text.size() && (*begin == ' ' || *begin == '\t')) ++begin;
  auto [end, error] = std::from_chars(begin, text.data() + text.size(), value);
  if (error != std::errc() || end == begin) return std::nullopt;
  return value;
}

// The process's cgroup paths: {v2 path, v1 memory-controller path} from /proc/self/cgroup.
std::pair<std::string, std::string> own_cgroups() {
  std::istringstream lines(read_text("/proc/self/cgroup"));
  std::string v2, v1;
  for (std::string line; std::getline(lines, line);) {
    // hierarchy-id:controllers:path
    size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    std::string controllers = line.substr(first + 1, second - first - 1), path = line.substr(second + 1);
    if (line.compare(0, first, "0") == 0 && controllers.empty()) v2 = path;
    std::istringstream list(controllers);
    for (std::string c; std::getline(list, c, ',');)
      if (c == "memory") v1 = path;
  }
  return {v2, v1};
}

// The smallest headroom over the candidate (limit, usage) file pairs that exist.
std::optional<size_t> cgroup_headroom() {
  auto [v2, v1] = own_cgroups();
  std::vector<std::pair<std::string, std::string>> candidates = {
      {"/sys/fs/cgroup" + v2 + "/memory.max", "/sys/fs/cgroup" + v2 + "/memory.current"},
      {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
      {"/sys/fs/cgroup/memory" + v1 + "/memory.limit_in_bytes",
       "/sys/fs/cgroup/memory" + v1 + "/memory.usage_in_bytes"},
      {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"}};
  std::optional<size_t> least;
  for (const auto& [limit, usage] : candidates) {
    std::optional<size_t> headroom = cgroup_headroom_bytes(read_text(limit), read_text(usage));
    if (headroom) least = least ? std::min(*least, *headroom) : *headroom;
  }
  return least;
}

}  // namespace

std::optional<size_t> meminfo_available_bytes(const std::string& proc_meminfo) {
  std::istringstream lines(proc_meminfo);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::optional<size_t> kib = parse_bytes(line.substr(13));
    if (kib) return *kib * 1024;  // "MemAvailable:   24047264 kB"
  }
  return std::nullopt;
}

std::optional<size_t> cgroup_headroom_bytes(const std::string& limit, const std::string& usage) {
  std::optional<size_t> l = parse_bytes(limit), u = parse_bytes(usage);
  if (!l || !u) return std::nullopt;  // missing files, or "max" (no limit)
  if (*l >= (size_t{1} << 62)) return std::nullopt;  // v1 writes "no limit" as a huge page-rounded number
  return *l > *u ? *l - *u : 0;
}

size_t host_available_bytes() {
  std::optional<size_t> available = meminfo_available_bytes(read_text("/proc/meminfo"));
  std::optional<size_t> headroom = cgroup_headroom();
  if (available && headroom) return std::min(*available, *headroom);
  return available ? *available : headroom.value_or(0);
}

}  // namespace moba
