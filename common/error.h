// Errors the user can act on: every failure is a moba::Error carrying what went wrong and how to fix it.
// Invariant: library code throws, never exits; only trainer/main.cpp turns an Error into an exit code (2 for a
// UsageError, else 1; an MPI abort when several ranks run), so nothing already written is lost half-way.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moba {

class Error : public std::runtime_error {
 public:
  Error(const std::string& what, const std::string& hint = "") : std::runtime_error(what), hint_(hint) {}
  const std::string& hint() const { return hint_; }

 private:
  std::string hint_;
};

// A command line the command cannot run: unknown command or option, a missing or malformed argument, an option
// value out of range, a malformed --set. main() exits with 2 for these (1 for every other Error).
class UsageError : public Error {
 public:
  using Error::Error;
};

// Builds a message from stream pieces: moba::cat("bad value ", x, " in ", file).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace moba

// MOBA_CHECK(cond, what, hint): user-facing precondition; throws moba::Error naming file:line.
#define MOBA_CHECK(cond, what, hint)                                                             \
  do {                                                                                           \
    if (!(cond)) throw ::moba::Error(::moba::cat(what), ::moba::cat(hint));                      \
  } while (0)

// MOBA_ASSERT(cond): internal invariant (a bug in this code, not the user's input).
#define MOBA_ASSERT(cond)                                                                        \
  do {                                                                                           \
    if (!(cond))                                                                                 \
      throw ::moba::Error(::moba::cat("internal error: ", #cond, " failed at ", __FILE__, ":",   \
                                      __LINE__),                                                 \
                          "please report this with the command that triggered it");             \
  } while (0)
