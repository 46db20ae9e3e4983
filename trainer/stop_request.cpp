#include "trainer/stop_request.h"

#include <csignal>
#include <initializer_list>

namespace moba {
namespace {

volatile std::sig_atomic_t g_signal = 0;

extern "C" void on_stop_signal(int signal) {
  if (g_signal == 0) g_signal = signal;
  std::signal(signal, SIG_DFL);  // a second Ctrl-C (or TERM) ends the process at once
}

}  // namespace

void install_stop_handlers() {
  for (int s : {SIGINT, SIGTERM, SIGUSR1}) std::signal(s, on_stop_signal);
}

int stop_signal() { return g_signal; }

const char* signal_name(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    default: return "a signal";
  }
}

}  // namespace moba
