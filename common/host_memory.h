// How much host memory this process may still allocate: MemAvailable from /proc/meminfo, lowered by the memory
// limit of the process's cgroup (v2 memory.max, v1 memory.limit_in_bytes) minus what the cgroup uses already.
// Invariant: never more than the truth as far as Linux tells it; 0 means "unknown" (no /proc), not "none left".
#pragma once
#include <cstddef>
#include <optional>
#include <string>

namespace moba {

size_t host_available_bytes();

// The pieces, from the files' text, so tests can check them without the machine's own values.
std::optional<size_t> meminfo_available_bytes(const std::string& proc_meminfo);          // MemAvailable line
std::optional<size_t> cgroup_headroom_bytes(const std::string& limit, const std::string& usage);  // "max" = none

}  // namespace moba
