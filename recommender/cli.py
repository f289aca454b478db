"""The ``recommend`` command: a thin layer over :mod:`recommender.api`.

    recommend --model resnet101 --max-drop 2% --budget 5M-params [--budget 60M-flops] ...
    recommend ablate --model resnet101 --num-classes 10 --structure-only --format table
    recommend show STUDY [--storage URL] [--json | --markdown]
    recommend apply studies/<study>/recipe.json --dataset digits --fidelity paper
    recommend dashboard [STUDY] [--storage URL] [--port 8080]

Bad input (an unknown model, a malformed budget, a missing dataset, an unreachable storage, a
corrupt checkpoint or recipe) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from .constraints import BUDGET_FORMS, DROP_FORMS
from .errors import RecommenderError

SUBCOMMANDS = ("ablate", "show", "apply", "dashboard")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``20m``, ``1.5h`` -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise RecommenderError(f"malformed duration {text!r}; use e.g. 90s, 20m, 1h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="recommend", description="Recommend a compression recipe (architecture changes, "
                "pruning, quantization) that meets a budget within an accuracy tolerance.",
                epilog="Subcommands: " + ", ".join(SUBCOMMANDS) + " (recommend SUBCOMMAND --help).")
    p.add_argument("--model", required=True, help="base model, e.g. resnet101, vgg19 (see `recommend ablate --help`)")
    p.add_argument("--max-drop", default="2%", help=f"tolerated top-1 drop: {DROP_FORMS} (default 2%%)")
    p.add_argument("--budget", action="append", required=True,
                   help=f"cost limit, repeatable, the first is the primary cost: {BUDGET_FORMS}")
    p.add_argument("--dataset", default="digits", help="digits (default, offline), cifar10, cifar100, imagefolder:PATH")
    p.add_argument("--data-dir", help="where cifar10/cifar100 live")
    p.add_argument("--fidelity", default="proxy", help="search protocol: smoke, proxy (default), confirm, paper")
    p.add_argument("--confirm-fidelity", default="search",
                   help="re-check of the finalists: search (default: a second seed at the search fidelity), "
                        "a fidelity name (e.g. confirm: more data and epochs, baseline retrained once), or none")
    p.add_argument("--n-confirm", type=int, default=2, help="candidates re-checked (default 2)")
    p.add_argument("--trials", type=int, default=None, help="finished trials the study should reach (default 20)")
    p.add_argument("--timeout", help="search time for this run: 90s, 20m, 1h")
    p.add_argument("--max-trial-time", default="2m",
                   help="skip candidates whose proxy training is estimated to take longer (default 2m; 0: no limit)")
    p.add_argument("--sampler", default="tpe", help="tpe (default), nsga2, random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("--study-name", help="default: derived from model, dataset, budgets and tolerance")
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<family>.yaml)")
    p.add_argument("--checkpoint", help="trained baseline state dict (evaluated, never retrained)")
    p.add_argument("--baseline-accuracy", type=float, help="stated baseline top-1 in percent")
    p.add_argument("--no-warm-start", action="store_true", help="do not enqueue the paper's presets first")
    p.add_argument("--no-latency", action="store_true", help="skip CPU latency measurement")
    p.add_argument("--studies-dir", default="studies", help="where SQLite studies, reports and the cache live")
    p.add_argument("--cache-dir", help="trained-weights cache (default <studies-dir>/cache)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the explanation")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_execution_options(p)
    return p


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    """Where training runs and how images are decoded (StudySpec device, threads, image_size)."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="train and evaluate on: auto (default: a CUDA GPU when present), cpu, cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: OMP_NUM_THREADS, else the CPUs this process may use)")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder: decode images to N x N px (default: native when square and <= 64, else 32)")


def _execution_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": args.device, "threads": args.threads, "image_size": args.image_size}


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets a readable width instead of 80 columns.
    width = None if stream.isatty() else 120
    return Console(stderr=stderr, highlight=False, width=width)


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    from .api import recommend
    from .search.study import StudySpec

    err = _console(stderr=True)
    quiet = args.quiet
    options: dict[str, Any] = dict(
        data_dir=args.data_dir, fidelity=args.fidelity, confirm_fidelity=args.confirm_fidelity,
        n_confirm=args.n_confirm, timeout=parse_duration(args.timeout), sampler=args.sampler, seed=args.seed,
        storage=args.storage, study_name=args.study_name, space=args.space, checkpoint=args.checkpoint,
        baseline_accuracy=args.baseline_accuracy, warm_start=not args.no_warm_start,
        latency=not args.no_latency, studies_dir=args.studies_dir, cache_dir=args.cache_dir,
        max_trial_seconds=parse_duration(args.max_trial_time) or None, **_execution_options(args))
    if args.trials is not None:
        options["trials"] = args.trials
    spec = StudySpec(model=args.model, max_drop=args.max_drop, budgets=args.budget, dataset=args.dataset,
                     **options)  # validates the grammar before any work
    log = (lambda s: None) if quiet else _logger(err)
    bar = None if quiet else TrialProgress(err, spec.trials)
    t0 = time.perf_counter()
    try:
        try:
            rec = recommend(args.model, max_drop=spec.max_drop, budgets=spec.budgets, dataset=args.dataset,
                            log=log, callbacks=[bar] if bar else [], **options)
        finally:
            if bar:
                bar.stop()
    except KeyboardInterrupt:
        print(f"recommend: interrupted; finished trials are saved in {_redact(spec.storage_url)} "
              f"(study {spec.name}); run the same command to resume", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    if args.json:
        d = rec.to_dict()
        d["study"]["wall_seconds"] = round(wall, 1)
        print(json.dumps(d, default=str))
        return 0 if rec.recipe is not None else 1
    out = _console()
    out.print(rec.renderable())
    folder = os.path.join(spec.studies_dir, spec.name)
    out.print(f"\nStudy [bold]{spec.name}[/] in {_redact(spec.storage_url)} ({wall:.0f} s). "
              f"Recipe: {folder}/recipe.json; report: {folder}/report.md")
    show_storage = f" --storage '{_redact(spec.storage_url)}'" if args.storage else ""
    out.print(f"Re-show: recommend show {spec.name}{show_storage}    "
              f"Dashboard: recommend dashboard {spec.name}{show_storage}    "
              f"Apply: recommend apply {folder}/recipe.json --dataset {args.dataset} --fidelity paper")
    return 0 if rec.recipe is not None else 1


def _logger(console: Any):
    """Timestamped progress lines; the text is escaped (recipe labels contain [brackets])."""
    from rich.markup import escape

    return lambda s: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(s)}")


def _redact(url: str) -> str:
    from .search.study import redact

    return redact(url)


class TrialProgress:
    """A rich progress bar as an Optuna callback: trial n/N, best feasible so far, elapsed, ETA."""

    def __init__(self, console: Any, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.total = total
        self.task = None

    def start(self, study: Any) -> None:
        """Called by the search when trials begin (after the baseline), not before."""
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("search", total=self.total, best="")
        self(study, None)

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, study: Any, trial: Any) -> None:
        if self.task is None:
            return
        from .report import feasible_pareto
        from .search.study import finished_trials

        front = feasible_pareto(study)
        best = ""
        if front:
            t = front[0]
            best = f"best feasible: trial {t.number}, acc {100 * t.values[0]:.1f}%, cost {t.values[1]:.4g}"
        self.progress.update(self.task, completed=min(self.total, len(finished_trials(study))), best=best)


# -- ablate ------------------------------------------------------------------------------------

def cmd_ablate(argv: Sequence[str]) -> int:
    p = _Parser(prog="recommend ablate", description="One row per paper preset of a model: params, "
                "MFLOPs, size and % of the baseline (the paper's tables); with training, accuracy and drop.")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=10, help="classifier width for --structure-only (default 10)")
    p.add_argument("--structure-only", action="store_true", help="costs only, no training")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--fidelity", default="proxy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", help="comma-separated subset of presets")
    p.add_argument("--cache-dir", default="studies/cache")
    args = p.parse_args(argv)
    from .ablate import ablate

    err = _console(stderr=True)
    presets = [s.strip() for s in args.presets.split(",")] if args.presets else None
    if args.structure_only:
        rows = ablate(args.model, args.num_classes, structure_only=True, presets=presets)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err) as prog:
            task = prog.add_task("training presets", total=None)

            def progress(name: str, i: int, n: int) -> None:
                prog.update(task, total=n, completed=i, description=f"training {name}")

            rows = ablate(args.model, args.num_classes, structure_only=False, dataset=args.dataset,
                          fidelity=args.fidelity, data_dir=args.data_dir, seed=args.seed,
                          cache_dir=args.cache_dir, presets=presets, progress=progress)
    trained = not args.structure_only
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in rows], default=str))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].to_dict()))
        w.writeheader()
        for r in rows:
            w.writerow(r.to_dict())
        print(buf.getvalue(), end="")
    else:
        from rich import box
        from rich.table import Table

        t = Table(title=f"{args.model}: paper presets ({'trained at ' + args.fidelity if trained else 'structure'})",
                  box=box.SIMPLE)
        cols = ["preset", "params (M)", "%", "MFLOPs", "%", "size MB", "%"]
        if trained:
            cols += ["accuracy %", "drop pp [95% CI]"]
        for c in cols:
            t.add_column(c, justify="left" if c == "preset" else "right")
        for r in rows:
            cells = [r.preset, f"{r.params / 1e6:.3f}", f"{r.params_pct:.2f}", f"{r.mflops:.2f}",
                     f"{r.mflops_pct:.2f}", f"{r.size_mb:.2f}", f"{r.size_pct:.2f}"]
            if trained:
                cells += [f"{r.accuracy:.2f}" if r.accuracy is not None else r.status[:30],
                          f"{r.drop:+.2f} [{r.drop_low:+.1f}, {r.drop_high:+.1f}]" if r.drop is not None else ""]
            t.add_row(*cells)
        _console().print(t)
    return 0


# -- show, apply, dashboard --------------------------------------------------------------------

def cmd_show(argv: Sequence[str]) -> int:
    p = _Parser(prog="recommend show", description="Re-render a study's recommendation from its storage.")
    p.add_argument("study")
    p.add_argument("--storage")
    p.add_argument("--studies-dir", default="studies")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    from .api import show

    rec = show(args.study, storage=args.storage, studies_dir=args.studies_dir)
    if args.json:
        print(rec.to_json())
    elif args.markdown:
        print(rec.to_markdown())
    else:
        _console().print(rec.renderable())
    return 0


def cmd_apply(argv: Sequence[str]) -> int:
    p = _Parser(prog="recommend apply", description="Build, train, prune and quantize a recipe and export it "
                "(state dict + TorchScript that runs with torch alone).")
    p.add_argument("recipe", help="recipe.json written by a study")
    p.add_argument("--model", help="base model (default: the one in the recipe file)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--fidelity", default="paper")
    p.add_argument("--epochs", type=int, help="override the fidelity's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: next to the recipe)")
    p.add_argument("--cache-dir", default="studies/cache")
    p.add_argument("--compare", action="store_true", help="also train the baseline and report the drop")
    args = p.parse_args(argv)
    from .api import apply_recipe

    err = _console(stderr=True)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    res = apply_recipe(args.recipe, model=args.model, dataset=args.dataset, fidelity=args.fidelity,
                       data_dir=args.data_dir, out_dir=args.out, seed=args.seed, cache_dir=args.cache_dir,
                       compare=args.compare, log=_logger(err),
                       **overrides)
    e = res.evaluation
    drop = f" (drop {e.drop_pp:+.2f} pp)" if e.drop_pp is not None else ""
    print(f"accuracy {100 * e.accuracy:.2f}%{drop}, params {e.costs.get('params')}, "
          f"{e.costs.get('size_mb'):.2f} MB; wrote " + ", ".join(str(f) for f in res.files.values()))
    return 0


def cmd_dashboard(argv: Sequence[str]) -> int:
    p = _Parser(prog="recommend dashboard", description="Start optuna-dashboard for a study's storage.")
    p.add_argument("study", nargs="?", help="study name (its default SQLite file under --studies-dir)")
    p.add_argument("--storage")
    p.add_argument("--studies-dir", default="studies")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    from .dashboard import serve

    return serve(study=args.study, storage=args.storage, studies_dir=args.studies_dir, host=args.host, port=args.port)


COMMANDS = {"ablate": cmd_ablate, "show": cmd_show, "apply": cmd_apply, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = COMMANDS.get(argv[0]) if argv else None
    try:
        return cmd(argv[1:]) if cmd else cmd_run(argv)
    except RecommenderError as exc:
        print(f"recommend: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("recommend: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("RECOMMENDER_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"recommend: internal error: {type(exc).__name__}: {first} "
              "(set RECOMMENDER_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
