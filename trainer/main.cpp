// Entry point of the `moba` binary: dispatches subcommands (filled in by trainer/commands.cpp).
int main() { return 0; }
