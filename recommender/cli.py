"""The ``recommend`` command: a thin layer over :mod:`recommender.api`.

    recommend --model resnet101 --max-drop 2% --budget 5M-params [--budget 60M-flops] ...
    recommend ablate --model resnet101 --num-classes 10 --structure-only --format table
    recommend show STUDY [--storage URL] [--json | --markdown]
    recommend apply studies/<study>/recipe.json --dataset digits --fidelity paper [--format onnx,pt2]
    recommend dashboard [STUDY] [--storage URL] [--port 8080]

Exit codes of the main job (the commands use 0, 2, 3 and 130 alike; ``apply`` exits 1 when an
export failed its check against PyTorch):

    0    a feasible recommendation (recipe.json written)
    1    finished, nothing feasible (the closest candidates are shown, no recipe.json)
    2    bad input: one line on stderr (unknown model, malformed budget, missing dataset, ...)
    3    internal error (a bug): one line, the traceback with -v or RECOMMENDER_DEBUG=1
    130  interrupted (Ctrl-C, SIGINT); finished trials are kept and the same command resumes
    143  terminated (SIGTERM), as Ctrl-C; a running trial is queued again, not counted

Only this module changes process-wide state (optuna's log level, warning filters, a log handler),
and only for the duration of one command (:func:`command_environment`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Iterator, Sequence

from . import __version__, interrupts
from .constraints import BUDGET_FORMS, DROP_FORMS
from .errors import RecommenderError, Terminated
from .printable import Printable, printable

EXIT_FEASIBLE = 0
EXIT_INFEASIBLE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command its pipe's reader closed

SUBCOMMANDS = ("ablate", "show", "apply", "dashboard", "device-profile")

#: The README's quick start and main job (tests/test_cli.py keeps them equal), with the wall time
#: measured in a fresh clone on 2 CPU cores (docs/measurements.md)
QUICK_START = "recommend --model resnet18 --max-drop 3% --budget 1M-params --trials 12 --timeout 4m"
QUICK_START_TIME = "about 2 minutes"
MAIN_JOB = "recommend --model resnet101 --max-drop 2% --budget 5M-params"
MAIN_JOB_TIME = "10 to 25 minutes"

#: OpenMP's wait policy for the command's process and its workers (see main())
OMP_WAIT_ENV, OMP_WAIT_POLICY = "OMP_WAIT_POLICY", "PASSIVE"

#: recommender.protocol.describe_fidelity() of each fidelity, written out so that --help does not
#: import torch (a test keeps the two the same)
FIDELITY_HELP = (
    "smoke: <= 512 train / <= 256 val images, <= 8 px, 2 ep (a dry run: tests the pipeline, not the tolerance)",
    "proxy: <= 4,096 train / <= 2,000 val images, <= 16 px, 6 ep (the search (default))",
    "confirm: <= 16,384 train / <= 5,000 val images, <= 32 px, 15 ep, aug (a re-check of finalists)",
    "paper: all train / all val images, 32 px, 150 ep, aug (the paper's training protocol)",
)


def _esc(text: str) -> str:
    """Help text with ``%`` escaped (argparse formats help strings with ``%``)."""
    return text.replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


_INT = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)
_FLOAT = re.compile(r"\s*[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)\s*", re.ASCII | re.IGNORECASE)


def _int(text: str) -> int:
    """An integer flag: ASCII digits only (Python's int() also reads ``1_0`` as 10)."""
    if not _INT.fullmatch(str(text)):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _float(text: str) -> float:
    """A number flag: ASCII digits, a decimal point, an exponent (no ``_`` separators)."""
    if not _FLOAT.fullmatch(str(text)):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return float(text)


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``20m``, ``1.5h`` -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text), re.ASCII)
    if not m:
        raise RecommenderError(f"malformed duration {text!r}; use e.g. 90s, 20m, 1h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


# -- the parser ----------------------------------------------------------------------------------

def _add_verbosity(g: Any, *, in_subcommand: bool = False) -> None:
    """``-v/--verbose`` and ``--quiet`` on a parser or argument group. In a subcommand their
    defaults are suppressed, so ``recommend -v ablate`` and ``recommend ablate -v`` mean the same."""
    default: Any = argparse.SUPPRESS if in_subcommand else False
    m = g.add_mutually_exclusive_group()
    m.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug lines: every finished trial, optuna's and the library's log, and where a bug happened "
                        "(the call stack)")
    m.add_argument("--quiet", action="store_true", default=default, help="no progress output (results only)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Every option of the main job (``recommend --model ... --budget ...``), by group.

    Add new run options to the group they belong to here, and map them to StudySpec fields in
    :func:`run_options`.
    """
    g = p.add_argument_group("what to recommend (the main job: --model and --budget are required)")
    g.add_argument("--model", help="base model: resnet18..152, vgg11..19(_bn), tv:NAME (torchvision), "
                                   "package.module:factory (your own nn.Module)")
    g.add_argument("--budget", action="append", metavar="BUDGET",
                   help=_esc(f"cost limit, repeatable; the first is the primary cost: {BUDGET_FORMS}"))
    g.add_argument("--max-drop", metavar="DROP", default="2%", help=_esc(f"tolerated top-1 drop: {DROP_FORMS} (default 2%)"))
    g.add_argument("--dataset", metavar="NAME", default="digits",
                   help="digits (default, offline), cifar10, cifar100, imagefolder:PATH")
    g.add_argument("--data-dir", metavar="DIR", help="where cifar10/cifar100 live")

    g = p.add_argument_group("baseline")
    g.add_argument("--checkpoint", metavar="PATH", help="trained baseline state dict (evaluated, never retrained)")
    g.add_argument("--weights", metavar="PATH",
                   help="initial weights of the baseline (e.g. ImageNet-pretrained), loaded where names and "
                        "shapes match, then trained under the protocol once and cached")
    g.add_argument("--baseline-accuracy", type=_float, metavar="PCT",
                   help="stated baseline top-1 in percent (no baseline evaluation)")

    g = p.add_argument_group("search")
    g.add_argument("--fidelity", metavar="NAME", default="proxy",
                   help="how each candidate is trained: " + "; ".join(FIDELITY_HELP))
    g.add_argument("--rungs", metavar="LADDER", default="auto",
                   help="promotion rungs above the search: auto (default: at proxy, one rung at 3x the epochs, "
                        "native resolution up to 32 px, augmentation, when it sees more of the data than the "
                        "search; none at smoke and paper), a number of rungs (1: none), or fidelity names "
                        "(proxy,confirm)")
    g.add_argument("--promote-fraction", metavar="F", type=_float, default=1 / 3,
                   help="share of the eligible candidates promoted to each rung (default 1/3)")
    g.add_argument("--max-promoted", metavar="N", type=_int, default=4, help="most candidates promoted per rung (default 4)")
    g.add_argument("--confirm-fidelity", metavar="NAME", default=None,
                   help="the older single re-check instead of --rungs: search (a second seed at the search "
                        "fidelity), a fidelity name (e.g. confirm), or none")
    g.add_argument("--n-confirm", metavar="N", type=_int, default=2,
                   help="with --confirm-fidelity: candidates re-checked (default 2)")
    g.add_argument("--trials", metavar="N", type=_int, default=None,
                   help="candidates the study should evaluate; trials skipped before training do not count (default 20)")
    g.add_argument("--timeout", metavar="TIME",
                   help="time for this run, baseline and promotions included: 90s, 20m, 1h (default: none)")
    g.add_argument("--jobs", metavar="N", default="auto",
                   help="worker processes on this machine (default auto: 2 single-threaded workers on a "
                        "CPU with 2+ cores, 1 on a GPU or at the smoke fidelity)")
    g.add_argument("--max-trial-time", metavar="TIME", default="2m",
                   help="skip candidates whose proxy training is estimated to take longer than this and than the "
                        "baseline architecture's own (default 2m; 0: no limit)")
    g.add_argument("--sampler", metavar="NAME", default="tpe", help="tpe (default), nsga2, gp, random")
    g.add_argument("--structure-policy", default="resample", choices=("resample", "constraint"),
                   help="a candidate whose structure breaks a budget: resample (default: the sampler draws "
                        "another) or constraint (an untrained trial that reports its excess to the sampler)")
    g.add_argument("--seed", metavar="N", type=_int, default=0, help="seeds the sampler and the training protocol (default 0)")
    g.add_argument("--space", metavar="YAML", help="search-space file, or a bundled space by name: 'trained' compresses a --checkpoint by its "
                        "per-layer sensitivity (default: the model family's bundled space)")
    g.add_argument("--no-warm-start", action="store_true", help="do not enqueue the paper's presets first")
    g.add_argument("--no-latency", action="store_true", help="skip CPU latency measurement")

    g = p.add_argument_group("where it runs")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="train and evaluate on: auto (default: a CUDA GPU when present), cpu, cuda")
    g.add_argument("--threads", metavar="N", type=_int, default=0,
                   help="CPU threads in all (default 0: OMP_NUM_THREADS, else the CPUs this process may use)")
    g.add_argument("--image-size", metavar="N", type=_int, default=None,
                   help="imagefolder: decode images to N x N px (default: native when square and <= 64, else 32)")

    g = p.add_argument_group("storage and files")
    g.add_argument("--storage", metavar="URL", help="Optuna storage URL (default sqlite:///<studies-dir>/<study>.db)")
    g.add_argument("--study-name", metavar="NAME", help="default: derived from model, dataset, budgets and tolerance")
    g.add_argument("--studies-dir", metavar="DIR", default="studies", help="where SQLite studies, reports and the cache live")
    g.add_argument("--cache-dir", metavar="DIR", help="trained-weights cache (default <studies-dir>/cache)")
    g.add_argument("--heartbeat", metavar="SECONDS", type=_int, default=20,
                   help="a running trial's heartbeat interval in the storage (default 20)")
    g.add_argument("--grace", metavar="SECONDS", type=_int, default=60,
                   help="a running trial whose last heartbeat is this old belongs to a dead worker: it is failed "
                        "and queued again (default 60)")

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the explanation")
    _add_verbosity(g)


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The StudySpec fields (besides model, max drop, budgets, dataset) the main job's flags set."""
    options: dict[str, Any] = dict(
        data_dir=args.data_dir, fidelity=args.fidelity, confirm_fidelity=args.confirm_fidelity,
        n_confirm=args.n_confirm, timeout=parse_duration(args.timeout), sampler=args.sampler, seed=args.seed,
        rungs=args.rungs, promote_fraction=args.promote_fraction, max_promoted=args.max_promoted,
        jobs=parse_jobs(args.jobs),
        storage=args.storage, study_name=args.study_name, space=args.space, checkpoint=args.checkpoint,
        weights=args.weights, baseline_accuracy=args.baseline_accuracy, warm_start=not args.no_warm_start,
        latency=not args.no_latency, studies_dir=args.studies_dir, cache_dir=args.cache_dir,
        max_trial_seconds=parse_duration(args.max_trial_time) or None, structure_policy=args.structure_policy,
        device=args.device, threads=args.threads, image_size=args.image_size, heartbeat=args.heartbeat,
        grace=args.grace)
    if args.trials is not None:
        options["trials"] = args.trials
    return options


def parse_jobs(text: str | int) -> int:
    """``auto`` or a positive number of worker processes (at most the ``jobs`` limit)."""
    from . import validate

    if str(text) == "auto":
        return 0  # decided by the search (recommender.search.study.Search._parallel)
    if not _INT.fullmatch(str(text)):
        raise RecommenderError(f"--jobs must be a positive number or auto, got {text!r}")
    n = int(text)
    if n < 1:
        raise RecommenderError(f"--jobs must be at least 1, got {n}")
    return validate.jobs(n)


def _add_ablate(sub: Any) -> None:
    p = sub.add_parser("ablate", help="the paper's tables: one row per preset (costs, optionally trained accuracy)",
                       description="One row per paper preset of a model: params, MFLOPs, size and % of the "
                                   "baseline (the paper's tables); with training, accuracy and drop.")
    p.add_argument("--model", required=True, help="base model with presets: resnet18..152, vgg11..19(_bn)")
    p.add_argument("--num-classes", type=_int, default=10, help="classifier width for --structure-only (default 10)")
    p.add_argument("--structure-only", action="store_true", help="costs only, no training")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default table)")
    p.add_argument("--dataset", default="digits", help="dataset for training (default digits)")
    p.add_argument("--data-dir", help="where cifar10/cifar100 live")
    p.add_argument("--fidelity", default="proxy", help="training protocol: smoke, proxy (default), confirm, paper")
    p.add_argument("--seed", type=_int, default=0, help="training seed (default 0)")
    p.add_argument("--presets", help="comma-separated subset of presets (default: all of the model's family)")
    p.add_argument("--cache-dir", default="studies/cache", help="trained-weights cache (default studies/cache)")
    _add_verbosity(p, in_subcommand=True)


def _add_show(sub: Any) -> None:
    p = sub.add_parser("show", help="re-render a study's recommendation from its storage",
                       description="Re-render a study's recommendation from its storage (no training).")
    p.add_argument("study", nargs="?", help="study name, the folder of its reports (studies/NAME) or its SQLite "
                                           "file (studies/NAME.db); without it, the studies there are listed")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default sqlite:///<studies-dir>/<study>.db)")
    p.add_argument("--studies-dir", default="studies", help="where SQLite studies live (default studies)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--markdown", action="store_true", help="print the Markdown report")


def _add_apply(sub: Any) -> None:
    p = sub.add_parser("apply", help="train, prune and quantize a recipe, export it (pt2, ONNX, TorchScript)",
                       description="Build, train, prune and quantize a recipe and export it, each exported file "
                                   "checked against the PyTorch output: pt2 (torch.export) and ONNX for float "
                                   "recipes, TorchScript for every recipe (int8 recipes: TorchScript only).")
    p.add_argument("recipe", help="recipe.json written by a study")
    p.add_argument("--model", help="base model (default: the recipe's, when it is a built-in name; a recipe for your "
                                   "own network needs --model package.module:factory again: a recipe file never "
                                   "imports or runs code)")
    p.add_argument("--dataset", default=None,
                   help="training dataset (default: the one the recipe was found on, at its recorded image size)")
    p.add_argument("--image-size", type=_int, metavar="N",
                   help="imagefolder: decode images to N x N px (default: the recipe's recorded size)")
    p.add_argument("--data-dir", help="where cifar10/cifar100 live")
    p.add_argument("--fidelity", default="paper", help="training protocol (default paper)")
    p.add_argument("--epochs", type=_int, help="override the fidelity's epochs")
    p.add_argument("--seed", type=_int, default=0, help="training seed (default 0)")
    p.add_argument("--out", help="output folder (default: next to the recipe, <recipe>-applied)")
    p.add_argument("--cache-dir", default="studies/cache", help="trained-weights cache (default studies/cache)")
    p.add_argument("--compare", action="store_true", help="also train the baseline and report the drop")
    p.add_argument("--format", default="auto", metavar="FORMATS",
                   help="comma-separated export formats: pt2, onnx, torchscript (default auto: pt2,torchscript "
                        "plus onnx when the [export] extra is installed; torchscript for int8 recipes)")
    _add_verbosity(p, in_subcommand=True)


def _add_dashboard(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard for a study's storage (127.0.0.1:8080)",
                       description="Start optuna-dashboard for a study's storage; Ctrl-C stops it.")
    p.add_argument("study", nargs="?", help="study name (its default SQLite file under --studies-dir)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (e.g. a worker fleet's postgresql://...)")
    p.add_argument("--studies-dir", default="studies", help="where SQLite studies live (default studies)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: no authentication)")
    p.add_argument("--port", type=_int, default=8080, help="TCP port (default 8080; 0 picks a free one)")


def _add_device_profile(sub: Any) -> None:
    p = sub.add_parser("device-profile", help="measure a latency profile of this device (for --budget 12ms@FILE)",
                       description="Time, at batch 1, the operators that this tool's presets, models and search "
                                   "spaces are made of, on this device, and fit a calibration on whole models: "
                                   "copy the file to the search machine and use --budget 12ms@FILE. "
                                   "--write-script writes a script that does the same with only torch installed.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", metavar="FILE", help="profile this machine and write the profile (JSON)")
    g.add_argument("--write-script", metavar="FILE",
                   help="write a standalone profiling script (needs only torch) to copy to the device")
    p.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1, as 12ms budgets)")
    p.add_argument("--image-size", default="32", metavar="N[,N]",
                   help="input sizes in px the candidates are deployed at (default 32)")
    p.add_argument("--engines", default="x86,qnnpack",
                   help="int8 engines to time, of those the device has (default x86,qnnpack)")
    p.add_argument("--models", metavar="M[,M]", help="only the plan models of these base models (default: all)")
    p.add_argument("--samples", type=int, default=7, help="timed samples per operator (default 7)")
    _add_verbosity(p, in_subcommand=True)


def build_parser() -> _Parser:
    """``recommend``: the main job's options, and the subcommands."""
    p = _Parser(prog="recommend",
                usage="recommend --model MODEL --budget BUDGET [--max-drop DROP] [options]\n"
                      "       recommend COMMAND [options]   (COMMAND --help for its options)",
                formatter_class=argparse.RawDescriptionHelpFormatter,  # the exit-code table keeps its lines
                description="Recommend a compression recipe (architecture changes, pruning, quantization)\n"
                            "that meets a budget within an accuracy tolerance. On the bundled digits data:\n"
                            f"  {QUICK_START}\n"
                            f"    a first run ({QUICK_START_TIME} on 2 CPU cores)\n"
                            f"  {MAIN_JOB}\n"
                            f"    the main job ({MAIN_JOB_TIME} on 2 CPU cores)\n"
                            "(add --timeout 10m to bound a run; rerun the same command to resume)",
                epilog="exit codes:\n"
                       "  0    a feasible recommendation (recipe.json written)\n"
                       "  1    finished, nothing feasible (the closest candidates are shown)\n"
                       "  2    bad input (one line on stderr)\n"
                       "  3    a bug in recommender: one line (-v shows where it happened)\n"
                       "  130  stopped by Ctrl-C; finished trials are kept, rerun to resume\n"
                       "  143  stopped by SIGTERM; finished trials are kept, rerun to resume\n\n"
                       "more:\n"
                       "  README.md             set-up, examples and the Python API\n"
                       "  docs/measurements.md  what each number is worth against long trainings\n\n"
                       "examples (on the bundled digits data):\n"
                       f"  {QUICK_START}\n"
                       f"  {MAIN_JOB}")
    p.add_argument("--version", action="version", version=f"recommend {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", prog="recommend",
                           parser_class=_Parser)
    _add_ablate(sub)
    _add_show(sub)
    _add_apply(sub)
    _add_dashboard(sub)
    _add_device_profile(sub)
    add_run_options(p)
    return p


# -- what the command does to the process ----------------------------------------------------------

@contextlib.contextmanager
def command_environment(verbose: bool = False, *, console: Any = None) -> Iterator[None]:
    """Log levels and warning filters for one command, restored afterwards.

    Optuna's experimental warnings (heartbeats, grouped TPE, metric names: documented and stable
    enough) are always hidden. Without ``verbose``: optuna logs errors only (a failed trial is
    recorded with its reason and shown in the report; optuna would also print a traceback for
    each), the quantized cat kernel's per-forward note is hidden, and the library's own log shows
    warnings. With ``verbose``: optuna logs warnings, the library logs at DEBUG, and the progress
    prints a line per finished trial and training run. Log records of both go to ``console``.
    """
    import optuna

    logger = logging.getLogger("recommender")
    old_verbosity, old_level, old_propagate = optuna.logging.get_verbosity(), logger.level, logger.propagate
    # optuna's own handler holds the stderr of its import time: it would write through a live
    # progress bar. Its records go to the command's console instead, while the command runs.
    optuna_logger = logging.getLogger("optuna")
    optuna_handlers = list(optuna_logger.handlers)
    handler: logging.Handler
    if console is not None:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        if not verbose:
            warnings.filterwarnings("ignore", message=r"All inputs of this cat operator must share the same "
                                                      r"quantization")
        optuna.logging.set_verbosity(optuna.logging.WARNING if verbose else optuna.logging.ERROR)
        for h in optuna_handlers:
            optuna_logger.removeHandler(h)
        optuna_logger.addHandler(handler)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
            optuna_logger.removeHandler(handler)
            for h in optuna_handlers:
                optuna_logger.addHandler(h)
            optuna.logging.set_verbosity(old_verbosity)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets a readable width instead of 80 columns.
    width = None if stream.isatty() else 120
    return Console(stderr=stderr, highlight=False, width=width)


def _logger(console: Any) -> Callable[[str], None]:
    """Timestamped progress lines; the text is escaped (recipe labels contain [brackets])."""
    from rich.markup import escape

    return lambda s: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(printable(s))}")


def _redact(url: str) -> str:
    from .search.storage import redact

    return redact(url)


# -- progress ------------------------------------------------------------------------------------

class RunProgress:
    """Rich progress for a long command: a bar per training run (step n/N with the loss: the
    baseline, each trial's candidate, each preset), a bar of trials (n/N, best feasible so far,
    elapsed, ETA) as an Optuna callback, and an optional bar of items (ablate's presets).

    ``training(label, step, total, loss)`` is the :class:`recommender.evaluation.Evaluator`
    progress callback; the instance itself is an Optuna callback; ``start(study)`` is called by
    the search when trials begin. With ``verbose`` every finished trial and training run also
    prints a line.
    """

    #: columns (characters) the bar, the counter, the info and the times take at most; the
    #: label gets the rest of the console's width, so the counter and the ETA always show
    FIXED_WIDTH = {"bar": 8, "count": 9, "info": 17, "times": 19}

    def __init__(self, console: Any, total_trials: int | None = None, *, verbose: bool = False,
                 log: Callable[[str], None] | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        from rich.table import Column

        fixed = sum(self.FIXED_WIDTH.values()) + 6  # + the spaces between the 7 columns
        width = getattr(console, "width", 80) or 80
        self.label_width = max(12, min(60, width - fixed))
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                     max_width=self.label_width)),
            BarColumn(bar_width=self.FIXED_WIDTH["bar"]),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                  max_width=self.FIXED_WIDTH["info"])),
            TimeElapsedColumn(table_column=Column(no_wrap=True)), TextColumn("ETA", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)), console=console, transient=False)
        self.total = total_trials
        self.verbose = verbose
        self.log = log or (lambda s: None)
        self.started = False
        self.trials_task: Any = None
        self.items_task: Any = None
        self.train_task: Any = None
        self._train_key: tuple[str, int] | None = None
        self._train_t0 = 0.0
        self._last_step = 0
        self._seen = -1
        self._best = ""

    def _ensure(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    # -- Evaluator progress ----------------------------------------------------------------------
    def training(self, label: str, step: int, total: int, loss: float) -> None:
        from rich.markup import escape

        self._ensure()
        key = (label, total)
        if self.train_task is None or key != self._train_key or step < self._last_step:
            if self.train_task is not None:
                self.progress.remove_task(self.train_task)
            room = self.label_width - len("training ")
            short = label if len(label) <= room else label[: max(1, room - 1)] + "…"
            self.train_task = self.progress.add_task(f"training {escape(printable(short))}", total=total, info="")
            self._train_key, self._train_t0 = key, time.perf_counter()
        self._last_step = step
        self.progress.update(self.train_task, completed=step, info=f"loss {loss:.3f}")
        if step >= total:
            self.progress.remove_task(self.train_task)
            self.train_task, self._train_key, self._last_step = None, None, 0
            if self.verbose:
                self.log(f"trained {label}: {total} steps in {time.perf_counter() - self._train_t0:.1f} s, "
                         f"last loss {loss:.3f}")

    # -- items (ablate's presets) ------------------------------------------------------------------
    def item(self, name: str, i: int, n: int, verb: str = "measuring") -> None:
        from rich.markup import escape

        self._ensure()
        if self.items_task is None:
            self.items_task = self.progress.add_task("presets", total=n, info="")
        done = name == "done"
        self.progress.update(self.items_task, total=n, completed=i,
                             info="" if done else f"{verb} {escape(printable(name))}")

    # -- Optuna callback ---------------------------------------------------------------------------
    def start(self, study: Any) -> None:
        """Called by the search when trials begin (after the baseline), not before."""
        self._ensure()
        if self.trials_task is None:
            self.trials_task = self.progress.add_task("trials", total=self.total, info="")
        self._update(study)

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False

    def __call__(self, study: Any, trial: Any) -> None:
        if self.verbose and trial is not None:
            values = ", ".join(f"{v:.4g}" for v in trial.values) if trial.values else ""
            reason = trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("fail_reason") or ""
            secs = trial.duration.total_seconds() if trial.duration else 0.0
            self.log(f"trial {trial.number} {trial.state.name.lower()} in {secs:.1f} s"
                     f"{': ' + values if values else ''}{' — ' + reason if reason else ''}")
        self._update(study)

    def _update(self, study: Any) -> None:
        if self.trials_task is None:
            return
        from .search.recovery import counted_trials

        done = len(counted_trials(study))
        if done != self._seen:  # the ledger is read again only when a trial finished
            self._seen = done
            from .ledger import Ledger

            c = Ledger.from_study(study).answer().chosen
            p = c.deciding if c is not None else None
            self._best = (f"best #{c.trial} {100 * p.accuracy:.1f}% r{p.rung}" if p is not None else "")
        self.progress.update(self.trials_task, completed=min(self.total, done) if self.total else done,
                             info=self._best)


# -- the main job --------------------------------------------------------------------------------

def exit_code(rec: Any) -> int:
    """The main job's exit code for an answer: 0 when it recommends a feasible recipe (an
    uncertain one too: ``uncertain`` in ``--json`` says so), 1 when nothing is feasible."""
    return EXIT_FEASIBLE if rec.feasible and rec.recipe is not None else EXIT_INFEASIBLE


def cmd_run(args: argparse.Namespace, parser: _Parser) -> int:
    missing = [flag for flag, value in (("--model", args.model), ("--budget", args.budget)) if not value]
    if missing:
        parser.error(f"the main job needs {' and '.join(missing)} (e.g. recommend --model resnet101 "
                     f"--budget 5M-params), or a command: {', '.join(SUBCOMMANDS)}")
    from .api import recommend
    from .search.study import StudySpec

    err = args.err_console
    options = run_options(args)
    spec = StudySpec(model=args.model, max_drop=args.max_drop, budgets=args.budget, dataset=args.dataset,
                     **options)  # validates the grammar before any work
    log = (lambda s: None) if args.quiet else _logger(err)
    bar = None if args.quiet else RunProgress(err, spec.trials, verbose=args.verbose, log=log)
    t0 = time.perf_counter()
    try:
        try:
            rec = recommend(spec=spec, log=log, callbacks=[bar] if bar else [],
                            progress=bar.training if bar else None)
        finally:
            if bar:
                bar.stop()
    except KeyboardInterrupt as exc:
        from .models.registry import is_registered

        # A factory model (package.module:factory) gets its study name once the search resolves
        # it: name the study only when it is known here.
        where = (f"{_redact(spec.storage_url)} (study {spec.name})" if is_registered(args.model)
                 else f"the study's storage under {spec.studies_dir}" if not args.storage else _redact(args.storage))
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"recommend: {what}; finished trials are saved in {printable(where)}; run the same command to resume "
              "(the trials it was running are not counted and run again)", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    wall = time.perf_counter() - t0
    code = exit_code(rec)
    if args.json:
        d = rec.to_dict()
        d["study"]["wall_seconds"] = round(wall, 1)
        d["files"] = dict(rec.files)
        print(json.dumps(d, default=str))
        return code
    out = _console()
    out.print(Printable(rec.renderable()))
    files = rec.files
    # The study's own name and storage: a factory model (package.module:factory) is renamed to its
    # registered name when the search resolves it, so the spec parsed here may not know it.
    storage_flag = f" --storage '{rec.storage}'" if args.storage else ""
    lines = [f"\nStudy {rec.study_name} in {rec.storage} ({wall:.0f} s)."]
    if "report" in files:
        plot = f"   Plot: {files['plot']}" if "plot" in files else ""
        lines.append(f"Report: {files['report']}{plot}")
    if "recipe" in files:
        lines.append(f"Recipe: {files['recipe']}")
    else:
        lines.append("No recipe written: nothing feasible was found (relax --max-drop or --budget, or run more "
                     "--trials).")
    lines.append(f"Re-show: recommend show {rec.study_name}{storage_flag}")
    lines.append(f"Dashboard: recommend dashboard {rec.study_name}{storage_flag}")
    if "recipe" in files:
        factory = rec.source_spec.model if rec.source_spec is not None else None
        source = factory if factory and factory != rec.question.model else None
        lines.append(f"Apply: recommend apply {files['recipe']} --fidelity paper" + (f" --model {source}" if source else ""))
    for line in lines:
        out.print(printable(line), soft_wrap=True, markup=False)  # paths and commands stay copyable
    return code


# -- ablate ------------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace, parser: _Parser) -> int:
    from . import limits
    from .ablate import ablate

    limits.check("num_classes", args.num_classes, "--num-classes")
    err = args.err_console
    presets = [s.strip() for s in args.presets.split(",")] if args.presets else None
    trained = not args.structure_only
    bar = None if args.quiet else RunProgress(err, verbose=args.verbose, log=_logger(err))
    verb = "training" if trained else "measuring"
    try:
        rows = ablate(args.model, args.num_classes, structure_only=args.structure_only, dataset=args.dataset,
                      fidelity=args.fidelity, data_dir=args.data_dir, seed=args.seed, cache_dir=args.cache_dir,
                      presets=presets,
                      progress=(lambda name, i, n: bar.item(name, i, n, verb)) if bar else None,
                      train_progress=bar.training if bar and trained else None)
    finally:
        if bar:
            bar.stop()
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in rows], default=str))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].to_dict()))
        w.writeheader()
        for r in rows:
            w.writerow(r.to_dict())
        print(printable(buf.getvalue()), end="")
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
        skipped = [r for r in rows if r.params is None]
        for r in rows:
            if r.params is None:
                t.add_row(r.preset, *["-"] * (len(cols) - 1))
                continue
            cells = [r.preset, f"{r.params / 1e6:.3f}", f"{r.params_pct:.2f}", f"{r.mflops:.2f}",
                     f"{r.mflops_pct:.2f}", f"{r.size_mb:.2f}", f"{r.size_pct:.2f}"]
            if trained:
                cells += [f"{r.accuracy:.2f}" if r.accuracy is not None else r.status[:30],
                          f"{r.drop:+.2f} [{r.drop_low:+.1f}, {r.drop_high:+.1f}]" if r.drop is not None else ""]
            t.add_row(*cells)
        _console().print(Printable(t))
        for r in skipped:
            print(printable(f"{r.preset}: {r.status}"))
    return 0


# -- show, apply, dashboard --------------------------------------------------------------------

def cmd_show(args: argparse.Namespace, parser: _Parser) -> int:
    from .api import list_studies, resolve_study, show
    from .search.storage import redact

    if args.study is None:
        found = list_studies(args.storage, args.studies_dir)
        where = redact(args.storage) if args.storage else f"{args.studies_dir}/*.db"
        if args.json:
            print(json.dumps([{"study": n, "storage": u, "finished_trials": k} for n, u, k in found]))
            return 0
        if not found:
            print(printable(f"no studies in {where}"))
        for n, u, k in found:
            print(printable(f"{n}  ({k} finished trials, {u})"))
        return 0
    name, url, how = resolve_study(args.study, args.storage, args.studies_dir)
    if how:
        print(printable(f"recommend: study {name} in {redact(url)} (from {how})"), file=sys.stderr)
    rec = show(name, storage=url, studies_dir=args.studies_dir)
    if args.json:
        print(rec.to_json())
    elif args.markdown:
        print(printable(rec.to_markdown()))
    else:
        _console().print(Printable(rec.renderable()))
    return 0


def cmd_apply(args: argparse.Namespace, parser: _Parser) -> int:
    from .api import apply_recipe
    from .export import INT8_REASON, parse_formats

    err = args.err_console
    log = (lambda s: None) if args.quiet else _logger(err)
    formats = parse_formats(args.format)  # an unknown format fails before any work
    overrides = {"epochs": args.epochs} if args.epochs is not None else {}
    bar = None if args.quiet else RunProgress(err, verbose=args.verbose, log=log)
    try:
        res = apply_recipe(args.recipe, model=args.model, dataset=args.dataset, fidelity=args.fidelity,
                           data_dir=args.data_dir, out_dir=args.out, seed=args.seed, cache_dir=args.cache_dir,
                           compare=args.compare, formats=formats, image_size=args.image_size, log=log,
                           warn=lambda s: err.print(f"recommend: warning: {printable(s)}", markup=False,
                                                    highlight=False, soft_wrap=True),
                           progress=bar.training if bar else None, **overrides)
    finally:
        if bar:
            bar.stop()
    e = res.evaluation
    drop = f" (drop {e.drop_pp:+.2f} pp)" if e.drop_pp is not None else ""
    print(f"accuracy {100 * e.accuracy:.2f}%{drop}, params {e.costs.get('params')}, "
          f"{e.costs.get('size_mb'):.2f} MB; wrote " + printable(", ".join(str(f) for f in res.files.values())))
    for x in res.exports:
        print("  " + printable(x.describe()))
    exported = {x.format for x in res.exports}
    if "torchscript" in exported and not exported & {"pt2", "onnx"} and formats is None:
        print(f"  onnx, pt2: not offered: {INT8_REASON}")
    failed = [x for x in res.exports if not x.ok]
    if failed:
        print(f"recommend: error: export failed or disagrees with PyTorch: {', '.join(x.format for x in failed)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_dashboard(args: argparse.Namespace, parser: _Parser) -> int:
    from .dashboard import serve

    return serve(study=args.study, storage=args.storage, studies_dir=args.studies_dir, host=args.host, port=args.port)


def cmd_device_profile(args: argparse.Namespace, parser: _Parser) -> int:
    from .latency_profile import make_profile, write_script

    def ints(text: str, flag: str) -> tuple[int, ...]:
        try:
            vals = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            vals = ()
        if not vals or min(vals) < 1:
            raise RecommenderError(f"{flag} must be positive integers separated by commas, got {text!r}")
        return vals

    sizes = ints(args.image_size, "--image-size")
    if args.threads < 1 or args.samples < 1:
        raise RecommenderError("--threads and --samples must be at least 1")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    if models:
        from .models import list_models

        unknown = [m for m in models if m not in list_models()]
        if unknown:
            raise RecommenderError(f"--models: unknown model {unknown[0]!r}")
    from pathlib import Path

    from .validate import writable_dir

    target = Path(args.write_script or args.out)
    writable_dir(target.parent, f"the folder of {target}")  # before the work, not after it
    log = (lambda s: None) if args.quiet else _logger(args.err_console)
    if args.write_script:
        path = write_script(args.write_script, input_sizes=sizes, engines=engines, models=models, log=log)
        print(f"wrote {path}: copy it to the device and run `python3 {path.name} --out board.json` "
              f"(needs only torch), then search with --budget 12ms@board.json")
        return 0
    prof = make_profile(args.out, threads=args.threads, input_sizes=sizes, engines=engines, models=models,
                        samples=args.samples, log=log)
    v = prof.data["validation"]
    med = v.get("median_error_pct")
    print(f"wrote {args.out}: {len(prof.entries)} operators in {prof.data['seconds']:.0f} s on "
          f"{prof.describe()}; held-out models: median error "
          f"{'n/a' if med is None else f'{med:.1f} %'}; search with --budget 12ms@{args.out}")
    return 0


COMMANDS: dict[str | None, Callable[[argparse.Namespace, _Parser], int]] = {
    None: cmd_run, "ablate": cmd_ablate, "show": cmd_show, "apply": cmd_apply, "dashboard": cmd_dashboard,
    "device-profile": cmd_device_profile}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``recommend`` with ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    # OpenMP's threads spin while they wait, by default: beside another busy process a 2-thread
    # ResNet-101 step took 9-16 s instead of about 1 s; waiting passively it took 0.8-1.5 s
    # (benchmarks/threads_under_load.py). Set before torch loads OpenMP (a user's own setting is
    # kept); --jobs workers inherit it.
    os.environ.setdefault(OMP_WAIT_ENV, OMP_WAIT_POLICY)
    from .search.storage import scrub  # messages may quote a storage URL: never its password

    # SIGTERM stops as Ctrl-C does; both are recorded, so that one CPython drops inside a garbage
    # collector's callback is raised again, and not printed as a traceback (interrupts.py)
    restore_interrupts = interrupts.take_over(Terminated)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = bool(getattr(args, "verbose", False))
        args.verbose, args.quiet = verbose, bool(getattr(args, "quiet", False))
        # One stderr console for log records, progress lines and bars, so a live bar stays intact.
        args.err_console = _console(stderr=True)
        with command_environment(verbose, console=args.err_console):
            return COMMANDS[args.command](args, parser)
    except RecommenderError as exc:
        print(f"recommend: error: {printable(scrub(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"recommend: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly
        with contextlib.suppress(OSError):  # and let the interpreter's final flush write nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: still one line, the traceback on request
        if _storage_refused(exc):  # a read-only or full database: the user's environment
            from .search.storage import error_text

            print(f"recommend: error: the study's storage refused a write: {printable(scrub(error_text(exc)))}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        if os.environ.get("RECOMMENDER_DEBUG"):
            raise
        if verbose:
            traceback.print_exc()
        first = printable(scrub(str(exc).splitlines()[0])) if str(exc) else ""
        print(f"recommend: internal error: {type(exc).__name__}: {first} "
              "(run with -v or RECOMMENDER_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        restore_interrupts()


def _storage_refused(exc: BaseException) -> bool:
    import optuna

    return isinstance(exc, optuna.exceptions.StorageInternalError)


if __name__ == "__main__":
    sys.exit(main())
