// Graceful stop on SIGINT, SIGTERM and SIGUSR1 (Ctrl-C, Slurm pre-emption, `kill -USR1` of mpirun, which forwards
// it): the handler only records the signal; the training loop agrees across ranks after each step, writes a
// checkpoint and exits 0, and the next launch resumes. A second signal of the same kind kills at once.
// Invariant: the handler is async-signal-safe (it stores one sig_atomic_t and restores the default action).
#pragma once

namespace moba {

void install_stop_handlers();
int stop_signal();              // the first signal received, 0 if none
const char* signal_name(int signal);

}  // namespace moba
