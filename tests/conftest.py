"""Test-session set-up shared by every test module."""

import os

# The suite runs on 2 cores beside its own subprocesses: OpenMP threads that spin while they wait
# (its default) made a 2-thread training step 10x slower under such load, waiting passively did
# not (benchmarks/threads_under_load.py). Set before any test module imports torch; subprocesses
# inherit it. The CLI sets the same for its own runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
