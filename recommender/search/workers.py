"""Parallel trials on one machine: ``--jobs N`` worker processes on the same study.

The workers are separate processes (PyTorch's thread pool and the GIL make threads a poor fit for
many small trainings) that open the same study, exactly as the workers of a PostgreSQL fleet do:
the same locking, baseline-once, warm-start-once and promotion-once guarantees hold, each worker
draws from its own sampler seed, and each trains with ``threads / jobs`` CPU threads. The
coordinator (the calling process) trains the baselines with every thread first, then waits for
the workers, relaying their progress lines. Ctrl-C reaches every worker (one process group); a
SIGTERM or Ctrl-C sent to the coordinator alone is passed on to them: each records its running
trial as interrupted and stops; nothing finished is lost.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
import warnings
from typing import Any, Callable

import optuna

from .. import interrupts
from ..errors import RecommenderError, Terminated

__all__ = ["run_workers"]

#: Seconds a worker may take to record its trial after Ctrl-C before it is terminated.
INTERRUPT_GRACE = 30.0


def _worker_main(spec: Any, index: int, phase: str, rung: int, deadline: float | None, out: Any,
                 quiet: tuple[int, list] | None = None) -> None:
    import torch

    from .study import Search

    torch.set_num_threads(spec.worker_threads())  # this process is ours alone
    # Ctrl-C and SIGTERM (from a terminal's process group, or forwarded by the coordinator) stop
    # the worker after it records its trial; the second of the two is ignored. A Ctrl-C that
    # CPython drops is raised again, not printed (interrupts.py).
    interrupts.take_over(Terminated, once=True)
    if quiet is not None:  # the caller's Optuna verbosity and warning filters, as in its process
        optuna.logging.set_verbosity(quiet[0])
        warnings.filters[:] = quiet[1]

    def log(line: str) -> None:
        out.put(("log", f"[worker {index}] {line}"))

    try:
        search = Search(spec, log=log, worker=index)
        search.deadline = deadline
        if phase == "search":
            search.optimize(search.baseline(), reserve=search.promotion_reserve)
        else:
            search.run_rung(rung)
        out.put(("done", index))
    except KeyboardInterrupt:
        out.put(("interrupted", index))
    except RecommenderError as exc:
        out.put(("error", f"worker {index}: {exc}"))
        raise SystemExit(2) from None
    except Exception as exc:  # a bug in a worker: one line to the coordinator
        first = str(exc).splitlines()[0] if str(exc) else ""
        out.put(("error", f"worker {index}: internal error: {type(exc).__name__}: {first}"))
        raise SystemExit(1) from None


def run_workers(spec: Any, jobs: int, phase: str, *, rung: int = 0, deadline: float | None = None,
                log: Callable[[str], None] | None = None, poll: Callable[[], None] | None = None,
                interval: float = 0.5) -> None:
    """Run ``jobs`` worker processes for ``phase`` (``search``: trials until the target;
    ``rung``: the enqueued candidates of rung ``rung``) and wait for them. ``poll()`` is called
    every ``interval`` seconds (progress bars). A worker's error is raised here as one line."""
    log = log or (lambda s: None)
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
    out = ctx.Queue()
    quiet = (optuna.logging.get_verbosity(), list(warnings.filters))
    procs = [ctx.Process(target=_worker_main, args=(spec, i, phase, rung, deadline, out, quiet),
                         name=f"recommend-worker-{i}") for i in range(1, jobs + 1)]
    for p in procs:
        p.start()
    errors: list[str] = []
    finished: set[int] = set()  # workers that reported "done" or "interrupted"

    def drain() -> None:
        while True:
            try:
                kind, payload = out.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "log":
                log(payload)
            elif kind == "error":
                errors.append(payload)
            else:
                finished.add(payload)

    try:
        while any(p.is_alive() for p in procs):
            drain()
            if poll is not None:
                poll()
            time.sleep(interval)
        drain()
    except KeyboardInterrupt:
        # The interrupt may have reached this process alone (SIGTERM from a supervisor, `kill`):
        # pass it on, so that every worker records its trial as interrupted. A worker that got
        # it already (Ctrl-C reaches the whole process group) ignores the second.
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # keep reading their queue meanwhile: a worker's exit waits until what it put there is
        # fed into the pipe, which blocks once the pipe is full and nobody reads
        end = time.monotonic() + INTERRUPT_GRACE
        while any(p.is_alive() for p in procs) and time.monotonic() < end:
            drain()
            for p in procs:
                p.join(min(interval, max(0.0, end - time.monotonic())))
        drain()
        for p in procs:
            if p.is_alive():
                p.kill()  # past the grace period (SIGTERM is the worker's stop signal, handled)
        raise
    finally:
        for p in procs:
            p.join(1.0)
    if errors:
        raise RecommenderError(errors[0])
    silent = [i for i, p in enumerate(procs, 1) if i not in finished and p.exitcode not in (0, None)]
    if silent:
        # A worker that dies before it runs (spawn re-imports the caller's main module) says
        # nothing on the queue; without this check the study would end early and look finished.
        raise RecommenderError(
            f"worker {silent[0]} exited with code {procs[silent[0] - 1].exitcode} before reporting; "
            "a script that calls recommend(jobs > 1) must start under `if __name__ == \"__main__\":`")
