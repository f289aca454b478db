"""``recommend dashboard``: optuna-dashboard for a study's storage.

    recommend dashboard resnet101-digits-5M-params-drop2pct-proxy        # studies/<study>.db
    recommend dashboard --storage postgresql://user@db-host/recommender  # a worker fleet's database

The dashboard reads the same storage the search writes, so it shows every trial live while a
search (or a fleet of workers) runs: each trial's parameters, its two objectives (accuracy and
the primary cost), its constraint values, and the user attributes the objective stores
(``recipe``, ``describe``, ``evaluation``, ``constraints``, ``fail_reason``/``pruned_reason``);
the study's note is the Markdown explanation written when a search finishes.

It binds to 127.0.0.1 by default: the dashboard has no authentication and can edit the storage
(notes, deleting studies), so expose it on another interface only on a trusted network.

Requests must name an allowed host in their ``Host`` header, else they get 403 (:class:`HostCheck`):
on a loopback bind ``127.0.0.1``, ``localhost`` and ``[::1]`` (with no port or the dashboard's
port). This stops DNS rebinding, where a web page the user opens points its own host name at
127.0.0.1 and calls the dashboard's write endpoints (``DELETE /api/studies/1``) from the browser.
A request that changes something (not GET/HEAD/OPTIONS) and carries an ``Origin`` header of
another host gets 403 too (a cross-site form post). Bound to a named address (``--host
10.0.0.5``) that address is allowed as well; bound to every interface (``0.0.0.0``, ``::``) the
Host check is off, since the server cannot know every name it is reached by.

What remains exposed: the check is not authentication. Any program or user on this machine (and,
bound to another interface, anyone who can reach the port) can read every study in the storage
and edit or delete it.

:func:`serve` blocks until Ctrl-C; :func:`start` runs the same server in a background thread
and returns a :class:`DashboardHandle` whose :meth:`~DashboardHandle.stop` shuts it down (tests,
notebooks).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import validate
from .errors import RecommenderError, StorageError
from .search.storage import open_existing_storage, redact, sqlite_path, sqlite_url

__all__ = ["serve", "start", "DashboardHandle", "resolve_storage", "open_dashboard_storage", "HostCheck"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")
_redact = redact  # one redaction everywhere (recommender.search.storage)


def resolve_storage(study: str | None = None, storage: str | None = None,
                    studies_dir: str | Path = "studies") -> str:
    """The storage URL to show: ``storage`` as given, else ``sqlite:///<studies_dir>/<study>.db``.

    With neither a study nor a storage, a :class:`StorageError` lists the studies found in
    ``studies_dir``; a named SQLite file that does not exist is a :class:`StorageError` too.
    """
    folder = Path(studies_dir)
    if study is not None:
        validate.study_name(study)
    if storage:
        url = storage
    elif study:
        url = sqlite_url(folder / (study + ".db"))
    else:
        found = sorted(p.stem for p in folder.glob("*.db")) if folder.is_dir() else []
        where = f"studies in {folder}/: {', '.join(found)}" if found else f"no studies (*.db) in {folder}/"
        raise StorageError(f"name a study or pass --storage URL ({where})")
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StorageError(f"no study database at {path}; run the study first, or pass --studies-dir "
                           "or --storage URL")
    return url


def open_dashboard_storage(url: str) -> Any:
    """An RDB storage for the dashboard (no table creation, no migration check), verified reachable
    by listing its studies; any failure is a one-line :class:`StorageError`."""
    return open_existing_storage(url, "for the dashboard")


class HostCheck:
    """WSGI middleware: answer 403 unless the request's ``Host`` header names an allowed host
    (see the module docstring); ``hosts`` None allows any."""

    def __init__(self, app: Any, hosts: set[str] | None, port: int):
        self.app, self.hosts, self.port = app, hosts, port

    def allowed(self, header: str | None) -> bool:
        if self.hosts is None:
            return True
        if not header:
            return False
        header = header.strip().lower()
        if header.startswith("["):  # [::1]:8080
            host, _, rest = header[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
        else:
            host, _, port = header.partition(":")
        if port is None or (port and port != str(self.port)):
            return False
        return host.rstrip(".") in self.hosts

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        origin = environ.get("HTTP_ORIGIN")
        cross_site = (environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD", "OPTIONS") and origin
                      and not self.allowed(origin.split("://", 1)[-1].split("/", 1)[0]))
        if self.allowed(environ.get("HTTP_HOST")) and not cross_site:
            return self.app(environ, start_response)
        body = b"403 Forbidden: this Host is not allowed (the dashboard answers only to the address it listens on)\n"
        start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def allowed_hosts(host: str) -> set[str] | None:
    """The Host names a dashboard bound to ``host`` answers to; None (any) for every interface."""
    if host in _WILDCARD:
        return None
    names = {"127.0.0.1", "localhost", "::1"}
    names.add(host.strip("[]").lower())
    return names


class _ThreadedWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow browser request never blocks shutdown
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass


class _V6Server(_ThreadedWSGIServer):
    address_family = socket.AF_INET6


@dataclass
class DashboardHandle:
    """A dashboard running in a background thread."""

    host: str
    port: int
    storage_url: str
    _httpd: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _storage: Any = field(repr=False, default=None)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def study_url(self, study_name: str) -> str | None:
        """The dashboard page of a study, or None when the storage holds no such study."""
        for s in self._storage.get_all_studies():
            if s.study_name == study_name:
                return f"{self.url}dashboard/studies/{s._study_id}"
        return None

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt in the caller)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Shut the server down, close its socket and release the storage's connections."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(10)
        self._httpd.server_close()
        engine = getattr(self._storage, "engine", None)
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> "DashboardHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(storage_url: str, host: str = "127.0.0.1", port: int = 8080, *, quiet: bool = True) -> DashboardHandle:
    """Start optuna-dashboard for ``storage_url`` in a background thread and return at once.

    ``port=0`` picks a free port (read it from ``handle.port``). Raises :class:`StorageError` for
    an unreachable storage and :class:`RecommenderError` for a port outside [0, 65535] or an
    address that cannot be bound. Requests whose ``Host`` header names another host get 403
    (:class:`HostCheck`).
    """
    validate.port(port)
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise RecommenderError("optuna-dashboard is not installed: pip install optuna-dashboard") from None
    storage = open_dashboard_storage(storage_url)
    app = wsgi(storage)
    server_class = _V6Server if ":" in host else _ThreadedWSGIServer
    try:
        httpd = make_server(host, port, app, server_class=server_class,
                            handler_class=_QuietHandler if quiet else WSGIRequestHandler)
    except (OSError, OverflowError) as exc:  # in use, not ours, or an unknown host name
        storage.engine.dispose()
        why = getattr(exc, "strerror", None) or str(exc)
        raise RecommenderError(f"cannot listen on {host}:{port}: {why}; pass another --port (or --host)") from None
    httpd.set_app(HostCheck(app, allowed_hosts(host), httpd.server_port))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"optuna-dashboard:{httpd.server_port}", daemon=True)
    thread.start()
    return DashboardHandle(host, httpd.server_port, storage_url, httpd, thread, storage)


def serve(study: str | None = None, storage: str | None = None, studies_dir: str = "studies",
          host: str = "127.0.0.1", port: int = 8080) -> int:
    """Start optuna-dashboard for a study's storage, print its address and block until Ctrl-C.

    Args:
        study: study name; without ``storage`` its SQLite file ``<studies_dir>/<study>.db``.
        storage: any Optuna RDB storage URL (``postgresql://...`` for a worker fleet).
        studies_dir: where SQLite studies live.
        host: interface to bind (default loopback only: the dashboard has no authentication).
        port: TCP port (0 picks a free one).

    Returns:
        0 after Ctrl-C (or SIGTERM).
    """
    validate.port(port)
    url = resolve_storage(study, storage, studies_dir)
    handle = start(url, host, port)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # `kill`, systemd and `docker stop` send SIGTERM: stop as cleanly as on Ctrl-C.
        def _term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _term)
    try:
        page = handle.study_url(study) if study else None
        print(f"optuna-dashboard for {_redact(url)} at {handle.url}", flush=True)
        if study and page is None:
            names = [s.study_name for s in handle._storage.get_all_studies()]
            print(f"note: no study named {study!r} there yet; studies: {', '.join(names) or 'none'}",
                  file=sys.stderr, flush=True)
        elif page:
            print(f"study {study}: {page}", flush=True)
        if host not in _LOOPBACK:
            print(f"warning: listening on {host}: the dashboard has no authentication and can edit "
                  "the storage; expose it only on a trusted network", file=sys.stderr, flush=True)
        print("Ctrl-C to stop.", flush=True)
        handle.wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 0
