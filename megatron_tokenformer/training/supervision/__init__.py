"""Run supervision: how a run ends (one line, an exit code, on every rank), the exit status file, the
launcher watch, the collective timeout and its diagnosis, and the numerical checks."""
