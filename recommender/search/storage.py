"""Storage URLs: the one place that turns a ``--storage`` URL into a connection, and hides its
password wherever it is printed.

- :func:`engine_url` maps the documented ``postgresql://user@host/db`` to the PostgreSQL driver
  that is installed (SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not a
  dependency; ``psycopg2-binary`` is, and it is the driver CI tests). An explicit driver
  (``postgresql+psycopg://``, ``postgresql+psycopg2://``) is used as given.
- :func:`redact` hides the password of a URL (SQLAlchemy's URL object, plus query parameters
  named like password/secret/token/key); a URL SQLAlchemy cannot parse, or whose password holds
  an unescaped ``@``, falls back to a conservative pattern. :func:`scrub` removes a URL's secrets
  from any text (an exception message). Every message that names a storage goes through them.
- :func:`open_storage` (read-write, creates Optuna's tables, heartbeats) and
  :func:`open_existing_storage` (read-only use: ``recommend show`` and the dashboard; creates
  nothing) turn any failure into a one-line :class:`~recommender.errors.StorageError`.

This module imports neither torch nor the models (the dashboard uses it).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import StorageError

__all__ = ["engine_url", "redact", "scrub", "sqlite_url", "sqlite_path", "is_postgres", "open_storage",
           "open_existing_storage", "error_text"]

#: Seconds a SQLite write waits for another process's lock (sqlite3's default is 5). Workers of
#: ``--jobs`` and readers (``show``, the dashboard, progress polling) share one database file;
#: on a loaded machine a 5 s wait ran out while a trial was being told its result, and Optuna
#: then failed with "Should not reach".
SQLITE_BUSY_TIMEOUT_S = 60.0

#: Query parameters whose values are secrets (libpq's ``password``, tokens, keys).
_SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)
#: Fallback for a URL SQLAlchemy cannot parse: everything between ``scheme://user:`` and the last
#: ``@`` is treated as the password (over-redacting a host is better than printing a password).
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^\s]*@")
_QUERY_SECRET = re.compile(r"([?&;][^=&\s]*(?:pass|secret|token|key|credential)[^=&\s]*=)[^&\s]*", re.IGNORECASE)
_ANY_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
#: What looks like ``user:secret@`` in any text, also in a malformed URL (``postgresql:/u:pw@h``,
#: ``u:pw@h``): the secret up to the last ``@`` before a space is hidden.
_LOOSE_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*:/{0,3}[^\s:/?#@'\"]*:|(?<![\w:/])[^\s:/?#@'\"]+:)"
                             r"(?!/)[^\s'\"<>]*@(?=[\w\[])")


def _driver() -> str | None:
    """The installed PostgreSQL DBAPI driver, psycopg2 first (the dependency CI tests)."""
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return dialect
    return None


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def engine_url(url: str) -> str:
    """The URL to hand SQLAlchemy: a bare ``postgresql://`` (or ``postgres://``) gets the
    installed driver; anything else is returned unchanged."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        return url
    from sqlalchemy.engine import make_url

    if _ambiguous(url):
        raise StorageError(f"storage URL {redact(url)}: write an '@' in the user name or password as %40")
    driver = _driver()
    if driver is None:
        raise StorageError("no PostgreSQL driver is installed: pip install psycopg2-binary")
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise StorageError(f"malformed storage URL {redact(url)}: {scrub(error_text(exc), url)}") from None
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def _ambiguous(url: str) -> bool:
    """A password with an unescaped ``@``: SQLAlchemy splits at the first ``@``, so part of the
    password would be read (and printed) as the host."""
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.split("?", 1)[0].count("@") > 1


def redact(url: str | None) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``."""
    if not url:
        return str(url)
    text = str(url)
    try:
        from sqlalchemy.engine import make_url

        if _ambiguous(text):
            raise ValueError("ambiguous userinfo")
        u = make_url(text)
        if u.password is None and not any(_SECRET_KEY.search(k) for k in u.query):
            return text  # nothing secret: shown as written (re-rendering would %-encode it)
        if u.query:
            u = u.set(query={k: ("***" if _SECRET_KEY.search(k) else v) for k, v in u.query.items()})
        out = u.render_as_string(hide_password=True)
    except Exception:  # unparsable: the conservative patterns
        out = _LOOSE_USERINFO.sub(r"\1***@", _USERINFO.sub(r"\1***@", text))
    return _QUERY_SECRET.sub(r"\1***", out)


def _secrets(url: str) -> list[str]:
    """The secret substrings of ``url`` (raw and decoded), longest first."""
    from urllib.parse import unquote

    found: set[str] = set()
    m = re.search(r"://[^:/?#@\s]*:(.*)@", url) or re.search(r"^[^:/?#@\s]*:/*[^:/?#@\s]*:(.*)@", url)
    # to the last @: the widest reading (the second form: a malformed URL, one slash or none)
    if m and m.group(1):
        found |= {m.group(1), unquote(m.group(1))}
        found |= set(m.group(1).split("@"))  # each piece an ambiguous parse could print
    for m in _QUERY_SECRET.finditer(url):
        end = url.find("&", m.end())
        value = url[m.end(): end if end >= 0 else len(url)]
        if value:
            found |= {value, unquote(value)}
    try:
        from sqlalchemy.engine import make_url

        pw = make_url(url).password
        if pw:
            found.add(str(pw))
    except Exception:
        pass
    # A one- or two-character piece would blank out letters all over a message; such a piece is
    # still hidden where it appears inside a URL (redact).
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def scrub(text: str, url: str | None = None) -> str:
    """``text`` (an exception message) with every URL redacted and ``url``'s secrets removed."""
    out = str(text)
    if url:
        out = out.replace(url, redact(url))
        for s in _secrets(url):
            out = out.replace(s, "***")
    out = _ANY_URL.sub(_redact_match, out)
    return _LOOSE_USERINFO.sub(r"\1***@", out)


def _redact_match(m: re.Match) -> str:
    # a URL quoted in a sentence ends before its punctuation ("... x.db: no such table")
    url = m.group(0)
    core = url.rstrip(".,:;!?)")
    return redact(core) + url[len(core):]


def error_text(exc: BaseException, root: bool = False) -> str:
    """The first line of an exception's message, else its type name; with ``root``, of the
    innermost exception that has one (Optuna and SQLAlchemy wrap the driver's error)."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for c in (reversed(chain) if root else chain):
        s = str(c).strip()
        if s and not s.startswith(_GENERIC):
            return s.splitlines()[0]
    return type(exc).__name__


#: Optuna's wrapper of any failed commit (its guess: "invalid data ... exceeding max length"): the
#: cause below it says what happened (a read-only database, a full disk).
_GENERIC = "An exception is raised during the commit"


def sqlite_url(path: str | Path) -> str:
    """``sqlite:///PATH`` with the path escaped, so that ``?``, ``#`` or ``%`` in a folder name
    stay part of the path (SQLAlchemy decodes ``%XX`` and starts a query at ``?``)."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def sqlite_path(url: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` URL (decoded as SQLAlchemy decodes it); None for
    other URLs and in-memory SQLite."""
    if not url or not str(url).startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(url).database
    except Exception as exc:
        raise StorageError(f"malformed storage URL {redact(url)}: {scrub(error_text(exc), url)}") from None
    return Path(db) if db and db != ":memory:" else None


def prepare_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite database; an impossible or unwritable folder is a one-line
    :class:`StorageError`."""
    path = sqlite_path(url)
    if path is None:
        return
    from ..validate import writable_dir

    writable_dir(path.parent or Path("."), "the folder of the study database", error=StorageError)


def open_storage(url: str, heartbeat: bool = True, *, heartbeat_interval: int = 20, grace_period: int = 60,
                 stale_callback: Callable[[Any, Any], None] | None = None) -> Any:
    """A read-write Optuna RDB storage (Optuna's tables are created when missing).

    With ``heartbeat`` a running trial's worker writes a heartbeat every ``heartbeat_interval``
    seconds and a RUNNING trial silent for ``grace_period`` seconds is failed by the next live
    worker, which then calls ``stale_callback(study, failed_trial)``. Unreachable or unusable
    storage is a one-line :class:`StorageError` (never with the password).
    """
    from optuna.storages import RDBStorage

    from .lock import study_lock

    prepare_sqlite_folder(url)
    real = engine_url(url)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=stale_callback)
    try:
        # Workers started together on an empty database would race to create Optuna's tables
        # (the losers fail with a duplicate-key error): create them under the advisory lock.
        with study_lock(url if is_postgres(url) else None, "<optuna schema>", "create_tables"):
            engine = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if real.startswith("sqlite")
                      else {"pool_pre_ping": True})
            return RDBStorage(real, engine_kwargs=engine, **kwargs)
    except StorageError:
        raise
    except Exception as exc:  # sqlalchemy/psycopg errors: unreachable, bad URL, no driver
        raise StorageError(f"cannot open storage {redact(url)}: {scrub(error_text(exc), url)}") from None


def open_existing_storage(url: str, purpose: str = "") -> Any:
    """An RDB storage for reading (``recommend show``, the dashboard): no table creation, no
    migration check, verified reachable by listing its studies; any failure is a one-line
    :class:`StorageError`. ``purpose`` ends the message (``for the dashboard``)."""
    from optuna.storages import RDBStorage

    path = sqlite_path(url)
    if url.startswith("sqlite") and path is not None and not path.is_file():
        raise StorageError(f"no study database at {path}; run the study first, or pass --studies-dir or --storage URL")
    real = engine_url(url)
    kwargs: dict[str, Any] = {}
    if not real.startswith("sqlite"):
        # Fail fast on an unreachable server instead of hanging on the first request.
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
        if is_postgres(real):
            kwargs["engine_kwargs"]["connect_args"] = {"connect_timeout": 10}
    st = None
    try:
        st = RDBStorage(real, skip_compatibility_check=True, skip_table_creation=True, **kwargs)
        st.get_all_studies()
    except Exception as exc:  # sqlalchemy/psycopg errors: unreachable, bad URL, no driver, no tables
        if st is not None:
            st.engine.dispose()
        chain, e = [], exc  # Optuna wraps the database error: read the whole chain
        while e is not None and len(chain) < 5:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        text = "\n".join(chain)
        msg = scrub(error_text(exc, root=True), url)
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            msg = "it holds no Optuna studies (no tables)"
        raise StorageError(f"cannot open storage {redact(url)}{' ' + purpose if purpose else ''}: {msg}") from None
    return st
