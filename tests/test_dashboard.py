"""`recommend dashboard`: optuna-dashboard serves a study's trials, their recipes and the note.

The study is written directly with Optuna the way the search writes it (two objectives, the
``recipe``/``evaluation`` user attributes, the Markdown note), so this test needs no training.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

optuna_dashboard = pytest.importorskip("optuna_dashboard")

from recommender.dashboard import resolve_storage, serve, start  # noqa: E402
from recommender.errors import RecommenderError, StorageError  # noqa: E402

NOTE = "# Recommendation\n\nTrial 1: **ghost** + int8, 91.2% (drop +0.8 pp [-0.4, +2.0])."


def _recipe(i: int) -> dict:
    return {"arch": {"preset": None, "ghost": i % 2 == 1}, "prune": {"method": "none", "sparsity": 0.0},
            "quant": {"mode": "int8-static" if i else "none"}}


def _evaluation(i: int) -> dict:
    return {"ok": True, "accuracy": 0.9 - 0.01 * i, "drop_pp": 0.5 + i,
            "costs": {"params": 1_000_000 - 100_000 * i, "mflops": 50.0 - i, "size_mb": 4.0 - 0.5 * i}}


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    folder = tmp_path_factory.mktemp("studies")
    name = "resnet18-digits-1M-params-drop2pct-smoke"
    url = f"sqlite:///{folder / (name + '.db')}"
    study = optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"])
    study.set_user_attr("spec", {"model": "resnet18", "dataset": "digits"})
    study.set_user_attr("baseline_evaluations", 1)
    for i in range(3):
        t = study.ask()
        t.suggest_categorical("ghost", [False, True])
        t.suggest_float("sparsity", 0.0, 0.9)
        t.set_user_attr("recipe", _recipe(i))
        t.set_user_attr("describe", f"recipe {i}")
        t.set_user_attr("evaluation", _evaluation(i))
        t.set_user_attr("constraints", [-1.0, -0.5])
        study.tell(t, [0.9 - 0.01 * i, 1.0 - 0.1 * i])
    optuna_dashboard.save_note(study, NOTE)
    return url, name, folder


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


def _attrs(items: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in items}


def test_dashboard_serves_trials_recipes_and_note(study_db: tuple[str, str, Path]) -> None:
    url, name, _ = study_db
    t0 = time.perf_counter()
    with start(url, "127.0.0.1", 0) as dash:
        assert dash.host == "127.0.0.1" and dash.port > 0 and dash.alive()
        summaries = _get(f"{dash.url}api/studies")["study_summaries"]
        match = [s for s in summaries if s["study_name"] == name]
        assert len(match) == 1, summaries
        summary = match[0]
        assert summary["directions"] == ["maximize", "minimize"]
        assert _attrs(summary["user_attrs"])["baseline_evaluations"] == "1"
        sid = summary["study_id"]
        assert dash.study_url(name) == f"{dash.url}dashboard/studies/{sid}"
        assert dash.study_url("nope") is None

        detail = _get(f"{dash.url}api/studies/{sid}")
        assert detail["name"] == name
        assert detail["note"]["version"] == 1 and detail["note"]["body"] == NOTE
        trials = detail["trials"]
        assert [t["number"] for t in trials] == [0, 1, 2]
        assert all(t["state"] == "Complete" for t in trials)
        for t in trials:
            attrs = _attrs(t["user_attrs"])
            assert json.loads(attrs["recipe"]) == _recipe(t["number"])
            assert json.loads(attrs["evaluation"])["costs"] == _evaluation(t["number"])["costs"]
            assert attrs["describe"] == f"recipe {t['number']}"
            assert t["values"] == pytest.approx([0.9 - 0.01 * t["number"], 1.0 - 0.1 * t["number"]])
        assert {a["key"] for a in detail["union_user_attrs"]} >= {"recipe", "evaluation", "describe"}
        assert len(detail["best_trials"]) == 3  # all three are Pareto-optimal
        # the single-page app itself is served too
        with urllib.request.urlopen(f"{dash.url}dashboard", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        port = dash.port
    assert not dash.alive()
    with pytest.raises(OSError):  # the socket is closed
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert time.perf_counter() - t0 < 30


def test_dashboard_sees_trials_written_while_it_runs(study_db: tuple[str, str, Path]) -> None:
    url, name, _ = study_db
    with start(url, "127.0.0.1", 0) as dash:
        sid = next(s["study_id"] for s in _get(f"{dash.url}api/studies")["study_summaries"]
                   if s["study_name"] == name)
        n0 = len(_get(f"{dash.url}api/studies/{sid}")["trials"])
        study = optuna.load_study(study_name=name, storage=url)
        t = study.ask()
        t.set_user_attr("fail_reason", "invalid architecture: test")
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        deadline = time.monotonic() + 10  # the dashboard caches a study's trials for ~2 s
        while len(trials := _get(f"{dash.url}api/studies/{sid}")["trials"]) == n0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(trials) == n0 + 1
        assert trials[-1]["state"] == "Fail"
        assert _attrs(trials[-1]["user_attrs"])["fail_reason"] == "invalid architecture: test"


def test_resolve_storage_errors(tmp_path: Path, study_db: tuple[str, str, Path]) -> None:
    url, name, folder = study_db
    assert resolve_storage(name, None, folder) == url
    assert resolve_storage(None, "postgresql://u@h/db", folder) == "postgresql://u@h/db"
    with pytest.raises(StorageError, match=name):  # no study, no storage: lists the .db files
        resolve_storage(None, None, folder)
    with pytest.raises(StorageError, match="no studies"):
        resolve_storage(None, None, tmp_path)
    with pytest.raises(StorageError, match="no study database"):
        resolve_storage("missing", None, folder)
    assert not (folder / "missing.db").exists()  # never created by asking


def test_unreachable_storage_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError, match="cannot open storage") as err:
        start(f"postgresql+psycopg2://u:secret@127.0.0.1:{port}/db", "127.0.0.1", 0)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StorageError, match="no Optuna studies"):
        start(f"sqlite:///{empty}", "127.0.0.1", 0)


def test_port_in_use_is_one_line_error(study_db: tuple[str, str, Path]) -> None:
    url, _, _ = study_db
    with start(url, "127.0.0.1", 0) as dash:
        with pytest.raises(RecommenderError, match=f"cannot listen on 127.0.0.1:{dash.port}"):
            start(url, "127.0.0.1", dash.port)


def test_serve_blocks_until_interrupt(study_db: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    url, name, folder = study_db
    from recommender import dashboard

    seen = {}

    def interrupt(self: dashboard.DashboardHandle) -> None:  # Ctrl-C while serving
        seen["summaries"] = _get(f"{self.url}api/studies")["study_summaries"]
        raise KeyboardInterrupt

    monkeypatch.setattr(dashboard.DashboardHandle, "wait", interrupt)
    assert serve(name, studies_dir=str(folder), port=0) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:" in out and f"study {name}: http://127.0.0.1:" in out
    assert [s["study_name"] for s in seen["summaries"]] == [name]


def test_cli_dashboard_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "recommender.cli", "dashboard", "--studies-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "recommend: error:" in r.stderr and "no studies" in r.stderr
    r = subprocess.run([sys.executable, "-m", "recommender.cli", "dashboard", "nope", "--studies-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no study database" in r.stderr and r.stderr.strip().count("\n") == 0


def test_cli_dashboard_serves_until_sigterm(study_db: tuple[str, str, Path]) -> None:
    import signal

    url, name, folder = study_db
    p = subprocess.Popen([sys.executable, "-m", "recommender.cli", "dashboard", name, "--studies-dir", str(folder),
                          "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()  # "optuna-dashboard for sqlite:///... at http://127.0.0.1:PORT/"
        assert " at http://127.0.0.1:" in first, first + p.stderr.read()
        base = first.rsplit(" at ", 1)[1].strip()
        assert [s["study_name"] for s in _get(f"{base}api/studies")["study_summaries"]] == [name]
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _request(dash, method: str, path: str, host: str | None, origin: str | None = None) -> int:
    """Send a real request with a chosen Host header (as a DNS-rebinding page would) and return
    the HTTP status."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        if origin is not None:
            conn.putheader("Origin", origin)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_dashboard_refuses_foreign_host_headers(tmp_path: Path) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 cannot call the
    dashboard (403), while the loopback names with the right port (or none) work."""
    url = f"sqlite:///{tmp_path / 'victim.db'}"
    optuna.create_study(storage=url, study_name="victim", directions=["maximize", "minimize"])
    with start(url, "127.0.0.1", 0) as dash:
        sid = next(s["study_id"] for s in _get(f"{dash.url}api/studies")["study_summaries"])
        p = dash.port
        for host in ("evil.example", f"evil.example:{p}", f"127.0.0.1.evil.example:{p}", f"127.0.0.1:{p + 1}",
                     f"localhost:{p}@evil.example", None):
            assert _request(dash, "GET", "/api/studies", host) == 403, host
            assert _request(dash, "DELETE", f"/api/studies/{sid}", host) == 403, host
        # a cross-site form post carries the right Host but a foreign Origin
        assert _request(dash, "DELETE", f"/api/studies/{sid}", f"127.0.0.1:{p}", "http://evil.example") == 403
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["victim"]  # still there
        for host in (f"127.0.0.1:{p}", f"localhost:{p}", "localhost", f"[::1]:{p}", f"LOCALHOST:{p}"):
            assert _request(dash, "GET", "/api/studies", host) == 200, host
        # the dashboard's own page (same origin) may still delete
        assert _request(dash, "DELETE", f"/api/studies/{sid}", f"127.0.0.1:{p}", f"http://127.0.0.1:{p}") == 204
    assert optuna.get_all_study_summaries(url) == []


def test_dashboard_bound_elsewhere_accepts_that_host() -> None:
    from recommender.dashboard import HostCheck, allowed_hosts

    ok = lambda host, bind: HostCheck(None, allowed_hosts(bind), 8080).allowed(host)  # noqa: E731
    assert ok("10.0.0.5:8080", "10.0.0.5") and ok("localhost:8080", "10.0.0.5")
    assert not ok("evil.example:8080", "10.0.0.5") and not ok("10.0.0.5:8080", "127.0.0.1")
    assert ok("anything.example:8080", "0.0.0.0")  # every interface: the check is off (documented)
