"""Interrupted trials: who runs a trial, whether that process is still alive, and how a trial
that never finished is failed, retried and kept out of ``--trials``.

A trial can stop without a result in three ways, and each ends the same: the trial is FAIL with
a reason, its parameters are queued again (a WAITING trial with the user attribute
``retry_of``), and it does not count towards ``--trials``, so the study still reaches its target
with every candidate evaluated once.

- **Ctrl-C or SIGTERM** (the CLI turns SIGTERM into a :class:`KeyboardInterrupt`):
  :func:`interruptible` marks the running trial ``interrupted`` and re-queues it before Optuna
  fails it and the interrupt ends the run.
- **A killed process on this machine** (``kill -9``, the OOM killer): every trial records its
  worker (:func:`worker_identity`: host, pid namespace, pid and the pid's start time). When a
  worker starts, and after each of its trials, :func:`reap_dead_trials` fails the RUNNING
  trials whose process on this machine is gone, at once, without waiting for the heartbeat
  grace period. A trial whose evaluation had finished (the result stored, not yet told) is
  finished from what it stored instead of being run again.
- **A dead worker on another machine** (a PostgreSQL fleet): Optuna's heartbeat fails its trial
  after the grace period and calls :class:`RequeueStale`.
- **An interrupt between Optuna creating a trial and the objective starting**: Optuna creates
  the trial (RUNNING) before it calls the objective, outside :func:`interruptible`; under a
  loaded SQLite study that takes long enough for Ctrl-C to land there (seen in a test, with
  two workers). :func:`guard_trial_creation` creates each trial and records its worker with
  Ctrl-C and SIGTERM deferred (they arrive right after, and fail the trial as interrupted),
  and :func:`release_own_trials` finishes what the worker still runs when the interrupt ends
  its loop. A trial left without a worker anyway (an ask outside the main thread, a process
  killed in that moment) is failed by :func:`reap_dead_trials` once it is
  :data:`ORPHAN_AFTER_S` old.

A candidate whose worker died :data:`MAX_RETRIES` times is not queued again (it may be what
kills the worker, e.g. out of memory). Found on this machine, that last failure counts like any
failed trial; found by heartbeat (Optuna has already failed it, so nothing more can be recorded
on it) it is dropped without counting and the study samples another candidate.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

__all__ = ["MAX_RETRIES", "worker_identity", "worker_alive", "interruptible", "mark_interrupted", "reap_dead_trials",
           "RequeueStale", "requeue", "is_interrupted", "counts_toward_target", "counted_trials",
           "guard_trial_creation", "release_own_trials"]

#: How often a candidate whose worker died is run again.
MAX_RETRIES = 2
#: Seconds after which a RUNNING trial that never started its objective (no worker recorded) is
#: an orphan; a live one leaves that state within milliseconds.
ORPHAN_AFTER_S = 600.0
WORKER_ATTR = "worker"
RETRY_ATTR = "retry_of"
INTERRUPTED_ATTR = "interrupted"
#: A trial completed untrained because its structure breaks a budget (the ``constraint``
#: structure policy): the reason.
SKIPPED_ATTR = "skipped_by_structure"
#: User attributes a retry keeps from the trial it repeats.
_KEEP = ("preset",)

ValuesFn = Callable[[Mapping[str, Any]], Sequence[float]]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _machine() -> str:
    """This process's pid namespace on this machine: host name, boot id, pid-namespace inode (a
    pid means the same process only within one namespace of one boot)."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{ns}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process from /proc, None if it has none."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: ``{"host", "machine", "pid", "start"}`` (``start``: the process's start
    time in clock ticks, so a reused pid is not taken for the dead worker)."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
            "start": stat[1] if stat else None}


def worker_alive(info: Mapping[str, Any]) -> bool | None:
    """Whether the worker ``info`` (:func:`worker_identity`) still runs; None when it ran in
    another pid namespace or on another machine (only its heartbeat can tell)."""
    if not isinstance(info, Mapping) or info.get("machine") != _machine():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
            return False
        return info.get("start") is None or stat[1] == info.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- what counts ------------------------------------------------------------------------------

def is_interrupted(t: FrozenTrial) -> bool:
    """A FAIL trial that ended without a result of its own: interrupted, killed, or failed by
    Optuna's heartbeat (it records no reason). Such a trial does not count towards ``--trials``."""
    if t.state != TrialState.FAIL:
        return False
    if INTERRUPTED_ATTR in t.user_attrs:
        return bool(t.user_attrs[INTERRUPTED_ATTR])
    return "fail_reason" not in t.user_attrs and "evaluation" not in t.user_attrs


def counts_toward_target(t: FrozenTrial) -> bool:
    """A candidate that was evaluated (COMPLETE) or failed on its own (FAIL, not interrupted);
    trials skipped before training (PRUNED, or completed as skipped by structure) do not count:
    ``--trials 3`` trains three candidates."""
    if t.state == TrialState.COMPLETE:
        return not t.user_attrs.get(SKIPPED_ATTR)
    return t.state == TrialState.FAIL and not is_interrupted(t)


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count towards ``--trials``."""
    return [t for t in study.get_trials(deepcopy=False) if counts_toward_target(t)]


# -- retrying ---------------------------------------------------------------------------------

def requeue(study: optuna.Study, params: Mapping[str, Any], number: int, user_attrs: Mapping[str, Any],
            *, died: bool) -> None:
    """Queue ``params`` again as a new trial that records ``retry_of: number``; ``died`` counts
    the attempt towards :data:`MAX_RETRIES` (a worker death, not a user's interrupt)."""
    attrs = {k: user_attrs[k] for k in _KEEP if k in user_attrs}
    attrs[RETRY_ATTR] = number
    attrs["retries"] = int(user_attrs.get("retries", 0)) + (1 if died else 0)
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)


def mark_interrupted(trial: optuna.Trial, reason: str) -> None:
    """Record why ``trial`` stopped before its result, mark it interrupted (it does not count)
    and queue its parameters again (a user's interrupt or the time budget, not a death)."""
    params, reason = _to_requeue(trial.params, trial.study._storage.get_trial_system_attrs(trial._trial_id), reason)
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr(INTERRUPTED_ATTR, True)
    if params:
        requeue(trial.study, params, trial.number, trial.user_attrs, died=False)


INTERRUPTED_BEFORE_START = "interrupted (Ctrl-C or SIGTERM) before its evaluation began; queued again"
_HELD = {signal.SIGINT, signal.SIGTERM}
#: Appended to the reason of a trial stopped before it sampled a parameter: there is nothing to
#: repeat, and it does not count, so the study samples another candidate in its place.
NOTHING_SAMPLED = "; it had sampled no parameters yet, so nothing is queued again (the study samples anew)"


def _to_requeue(params: Mapping[str, Any], system_attrs: Mapping[str, Any], reason: str) -> tuple[dict, str]:
    """What a stopped trial is queued again with (what it sampled, else what it was queued with)
    and its reason; a trial stopped before it sampled anything has nothing to repeat, and its
    reason says so (:data:`NOTHING_SAMPLED`)."""
    params = dict(params or system_attrs.get("fixed_params", {}))
    return params, reason if params else reason.replace("; queued again", "") + NOTHING_SAMPLED


def _fail_and_requeue(study: optuna.Study, t: FrozenTrial, reason: str, *, requeue_it: bool = True,
                      died: bool = False) -> bool:
    """Fail the RUNNING trial ``t`` with ``reason``, marked interrupted when it is queued again
    (``requeue_it``): its parameters, or what it was queued with when the objective had not
    suggested them yet. ``died`` counts the attempt towards :data:`MAX_RETRIES`. False when
    another process finished it first."""
    storage, tid = study._storage, t._trial_id
    params, unqueued = _to_requeue(t.params, t.system_attrs, reason)
    reason = unqueued if requeue_it else reason
    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        storage.set_trial_user_attr(tid, INTERRUPTED_ATTR, requeue_it)
        if not storage.set_trial_state_values(tid, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:  # finished meanwhile (its own objective, another worker, a reaper)
        return False
    if requeue_it and params and not _retried(study, t.number):
        requeue(study, params, t.number, t.user_attrs, died=died)
    return True


def _retried(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` was queued again already (its worker did, then was killed
    before the trial was failed): one retry per stopped trial."""
    return any(t.user_attrs.get(RETRY_ATTR) == number for t in study.get_trials(deepcopy=False))


def _who(user_attrs: Mapping[str, Any]) -> str:
    info = user_attrs.get(WORKER_ATTR)
    return f"worker {info.get('host')} pid {info.get('pid')}" if info else "its worker"


def _finish_from_result(study: optuna.Study, t: FrozenTrial, values: ValuesFn | None) -> bool | None:
    """Finish the RUNNING trial ``t`` from what its evaluation stored (COMPLETE with
    ``values(evaluation)``, else FAIL with its own reason, or PRUNED); None when it stored
    nothing to finish from, False when another process finished it first."""
    storage, tid, ua = study._storage, t._trial_id, t.user_attrs
    ev = ua.get("evaluation")
    try:
        # an objective stores its constraints before its evaluation: a stored successful
        # evaluation is a finished one (a promotion rung's trial has no constraints at all)
        if ev is not None and ev.get("ok") and values is not None:
            return storage.set_trial_state_values(tid, TrialState.COMPLETE, list(values(ev)))
        if ev is not None:  # evaluated, failed: its own reason stands
            if "fail_reason" not in ua:
                storage.set_trial_user_attr(tid, "fail_reason", ev.get("reason") or f"{_who(ua)} died after its "
                                            "evaluation")
            return storage.set_trial_state_values(tid, TrialState.FAIL)
        if "pruned_reason" in ua:
            return storage.set_trial_state_values(tid, TrialState.PRUNED)
    except UpdateFinishedTrialError:
        return False
    return None


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the block and deliver them, with the caller's own
    handlers, right after it. Only the main thread receives signals in Python; elsewhere the
    block runs as it is. The handlers are swapped for the block alone and then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {s: signal.getsignal(s) for s in _HELD}
    saved = {s: h for s, h in saved.items() if h is not None}  # None: installed outside Python, left alone
    for s in saved:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        for s in pending:
            signal.raise_signal(s)


def guard_trial_creation(study: optuna.Study) -> optuna.Study:
    """Make ``study.ask`` (which ``study.optimize`` calls for each trial) create the trial and
    record its worker with Ctrl-C and SIGTERM deferred, so that an interrupt never leaves a
    RUNNING trial that no process owns. An interrupt that arrived meanwhile is delivered right
    after: the new trial is then failed as interrupted (what it was queued with is queued
    again) and the interrupt goes on. Idempotent; returns ``study``."""
    if getattr(study, "_guarded_ask", False):
        return study
    ask = study.ask

    def guarded_ask(*args: Any, **kwargs: Any) -> optuna.Trial:
        trial = None
        try:
            with _interrupts_deferred():
                trial = ask(*args, **kwargs)
                trial.set_user_attr(WORKER_ATTR, worker_identity())
        except KeyboardInterrupt:
            if trial is not None:
                _fail_and_requeue(study, study._storage.get_trial(trial._trial_id), INTERRUPTED_BEFORE_START)
            raise
        return trial

    study.ask = guarded_ask  # type: ignore[method-assign]
    study._guarded_ask = True  # type: ignore[attr-defined]
    return study


def release_own_trials(study: optuna.Study, values: ValuesFn | None = None,
                       reason: str = INTERRUPTED_BEFORE_START) -> list[int]:
    """Finish the trials this process still runs after Ctrl-C or SIGTERM ended its loop (the
    interrupt landed between Optuna's steps around the objective); returns their numbers. A
    trial whose result was stored is finished from it, as :func:`reap_dead_trials` does
    (``values(evaluation)``); any other is failed as interrupted and queued again. No other
    process owns these trials: they carry this process's identity."""
    me = worker_identity()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(WORKER_ATTR) != me:
            continue
        if _finish_from_result(study, t, values) is None:
            _fail_and_requeue(study, t, reason)
        out.append(t.number)
    return out


def interruptible(objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """``objective`` that records its worker on the trial and, on Ctrl-C or SIGTERM (a
    KeyboardInterrupt), marks the trial interrupted and queues its parameters again before the
    interrupt goes on (Optuna then fails the trial and re-raises)."""

    def run(trial: optuna.Trial) -> Any:
        if WORKER_ATTR not in trial.user_attrs:  # a guarded ask (guard_trial_creation) has recorded it
            trial.set_user_attr(WORKER_ATTR, worker_identity())
        try:
            return objective(trial)
        except KeyboardInterrupt:
            mark_interrupted(trial, "interrupted (Ctrl-C or SIGTERM) before its evaluation finished; queued again")
            raise

    run.__wrapped__ = objective  # type: ignore[attr-defined]
    return run


def reap_dead_trials(study: optuna.Study, values: ValuesFn | None = None, *,
                     orphan_after_s: float = ORPHAN_AFTER_S) -> list[int]:
    """Finish the RUNNING trials whose worker process on this machine is gone, and orphans (no
    worker recorded, started over ``orphan_after_s`` seconds ago); returns their numbers. A
    trial whose evaluation was stored is finished from it (``values(evaluation)`` gives its
    objective values: COMPLETE, else FAIL/PRUNED with its own reason); any other is failed as
    interrupted and queued again (up to :data:`MAX_RETRIES` deaths)."""
    done = []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR in t.user_attrs:
            dead = worker_alive(t.user_attrs[WORKER_ATTR]) is False
        else:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > orphan_after_s
        if dead and _finish_dead(study, t, values):
            done.append(t.number)
    return done


def _finish_dead(study: optuna.Study, t: FrozenTrial, values: ValuesFn | None) -> bool:
    done = _finish_from_result(study, t, values)
    if done is not None:
        return done
    info, who = t.user_attrs.get(WORKER_ATTR), _who(t.user_attrs)
    deaths = int(t.user_attrs.get("retries", 0))
    requeue_it = deaths < MAX_RETRIES
    reason = (f"interrupted: {who} died before its evaluation finished; queued again" if requeue_it else
              f"{who} died while evaluating it, {deaths + 1} times; not queued again")
    if not info:  # an orphan: queued again with what it was queued with
        reason = "interrupted: its worker stopped before the trial began (no worker, no heartbeat)"
        requeue_it = True
    return _fail_and_requeue(study, t, reason, requeue_it=requeue_it, died=True)


class RequeueStale:
    """Optuna heartbeat callback: a RUNNING trial whose worker stopped beating was failed by
    Optuna; queue its parameters again unless its evaluation had finished or it has already
    been retried :data:`MAX_RETRIES` times."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        ua = trial.user_attrs
        if "evaluation" in ua or "fail_reason" in ua or int(ua.get("retries", 0)) >= MAX_RETRIES:
            return
        requeue(study, trial.params, trial.number, ua, died=True)
