"""The Python API: ``recommend()``, ``show()`` and ``apply_recipe()``; the CLI is a thin layer over it.

    >>> from recommender import recommend
    >>> rec = recommend(model="resnet101", max_drop="2%", budgets=["5M-params"])   # doctest: +SKIP
    >>> rec.recipe, rec.evaluation.accuracy, rec.pareto.head()                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch

from .constraints import Budget, MaxDrop
from .errors import RecommenderError
from .evaluation import TrainProgress
from .io import atomic_write, remove_file
from .quiet import library_calls
from .report import Recommendation, recommendation_from_study
from . import limits, validate
from .search.storage import open_existing_storage, redact, sqlite_url
from .search.study import Search, StudySpec


def recommend(model: str = "resnet101", *, max_drop: str | float | MaxDrop = "2%",
              budgets: Sequence[str | Budget] = ("5M-params",), dataset: Any = "digits",
              log: Callable[[str], None] | None = None,
              callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
              progress: TrainProgress | None = None,
              write_files: bool = True, spec: StudySpec | None = None, **options: Any) -> Recommendation:
    """Search compression recipes for ``model`` and return the recommendation.

    Args:
        model: base model (see :func:`recommender.list_models`).
        max_drop: tolerated top-1 drop: ``"2%"``/``"2pp"`` (points), ``"5%rel"`` (relative).
        budgets: cost limits, the first one primary: ``5M-params``, ``60M-flops``, ``4MB``, ``12ms``.
        dataset: ``digits`` (default, offline), ``cifar10``, ``cifar100``, ``imagefolder:PATH``,
            or a dataset object: :func:`recommender.data.from_datasets` over a ``(train, val)``
            pair of ``torch.utils.data.Dataset``, or any :class:`recommender.data.ImageData`.
        log: receives progress lines.
        callbacks: Optuna callbacks called after every trial (progress bars).
        progress: called after every training step of the baseline and of each trial as
            ``progress(label, step, total, loss)``.
        write_files: write ``<studies_dir>/<study>/report.md``, ``report.json``, ``pareto.png``
            (and ``pareto.html`` with plotly), and ``recipe.json`` when the answer is feasible.
        spec: the question and its options already parsed (what the CLI passes); then
            ``model``, ``max_drop``, ``budgets``, ``dataset`` and ``options`` are not read.
        **options: any other :class:`~recommender.search.study.StudySpec` field (``fidelity``,
            ``trials``, ``timeout``, ``sampler``, ``seed``, ``storage``, ``study_name``, ``space``,
            ``checkpoint``, ``baseline_accuracy``, ``confirm_fidelity``, ``n_confirm``, ...).

    Returns:
        A :class:`~recommender.report.Recommendation` (``.recipe``, ``.evaluation``, ``.pareto``,
        ``.study``, ``.explain()``, ``.load_model()``, ``.build_architecture()``).
    """
    with library_calls():
        return _recommend(model, max_drop=max_drop, budgets=budgets, dataset=dataset, log=log, callbacks=callbacks,
                          progress=progress, write_files=write_files, spec=spec, **options)


def _recommend(model: Any, *, max_drop: Any, budgets: Sequence[str | Budget], dataset: Any,
               log: Callable[[str], None] | None, callbacks: Sequence[Any], progress: TrainProgress | None,
               write_files: bool, spec: StudySpec | None, **options: Any) -> Recommendation:
    if spec is None:
        if not isinstance(dataset, str):  # an ImageData or a (train, val) Dataset pair: by its spec
            from .data import register_dataset

            dataset = register_dataset(dataset)
        spec = StudySpec(model=model, max_drop=max_drop, budgets=tuple(budgets), dataset=dataset, **options)
    search = Search(spec, log=log, callbacks=callbacks, progress=progress)
    search.run()
    rec = recommendation_from_study(search.study, storage=redact(spec.storage_url))
    rec.source_spec = spec
    if write_files:
        write_outputs(rec, Path(spec.studies_dir) / spec.name, log=log)
    _save_dashboard_note(search.study, rec)
    return rec


def resolve_study(ref: str, storage: str | None = None, studies_dir: str = "studies") -> tuple[str, str, str]:
    """(study name, storage URL, how it was found) for what a user calls a study: its name, the
    folder of its reports (``studies/NAME``, beside ``studies/NAME.db``) or its SQLite file
    (``studies/NAME.db``). Anything else is an invalid study name (a one-line error)."""
    if storage is None and not validate.STUDY_NAME.fullmatch(str(ref)):
        p = Path(ref)
        if p.is_file() and p.suffix == ".db":
            return p.stem, sqlite_url(p), f"the SQLite file {p}"
        if p.is_dir() and p.with_name(p.name + ".db").is_file():
            db = p.with_name(p.name + ".db")
            return p.name, sqlite_url(db), f"the folder {p} (its study file {db})"
    validate.study_name(ref)
    return ref, storage or sqlite_url(Path(studies_dir) / (ref + ".db")), ""


def list_studies(storage: str | None = None, studies_dir: str = "studies") -> list[tuple[str, str, int]]:
    """(study name, storage URL, finished trials) of every study in ``storage``, or in every
    SQLite file of ``studies_dir``; promotion rungs (``NAME.rungK``) are part of their study and
    not listed. Only reads."""
    urls = [storage] if storage else [sqlite_url(p) for p in sorted(Path(studies_dir).glob("*.db"))]
    out = []
    for url in urls:
        try:
            st = open_existing_storage(url)
            summaries = st.get_all_studies()
        except RecommenderError:
            if storage:
                raise
            continue  # not a study file: skipped in a listing
        for s in summaries:
            if ".rung" not in s.study_name:
                n = sum(t.state.is_finished() for t in st.get_all_trials(s._study_id, deepcopy=False))
                out.append((s.study_name, redact(url), n))
    return out


def show(study_name: str, storage: str | None = None, studies_dir: str = "studies") -> Recommendation:
    """Re-render a study's answer from its storage (no training, no evaluation; the storage is
    only read: nothing is created in it). ``study_name`` may also be the folder of its reports or
    its SQLite file (:func:`resolve_study`)."""
    with library_calls():
        return _show(study_name, storage, studies_dir)


def _show(study_name: str, storage: str | None, studies_dir: str) -> Recommendation:
    study_name, url, _ = resolve_study(study_name, storage, studies_dir)
    st = open_existing_storage(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        names = [s.study_name for s in st.get_all_studies()]
        raise RecommenderError(f"no study named {study_name!r} in {redact(url)}; studies there: "
                               f"{', '.join(names) or 'none'}") from None
    try:
        return recommendation_from_study(study, storage=redact(url))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # attributes of another shape than this version writes: changed by hand or another tool
        raise RecommenderError(f"study {study_name!r} in {redact(url)} holds attributes this version cannot read "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                               "it was changed outside recommend") from None


def recommended_model(rec: Recommendation, *, log: Callable[[str], None] | None = None,
                      progress: TrainProgress | None = None) -> tuple[torch.nn.Module, Any]:
    """The recommended model as recommended: built, trained (its trained weights come from the
    weights cache, where the search left them, or are trained once), pruned and quantized as the
    recipe says, under the protocol of the rung that decided the answer; and its evaluation,
    measured again on the same validation images (``evaluation.accuracy``, ``drop_pp``).

    Needs the answer of :func:`recommend` (it carries the question it answered); for an answer
    read with :func:`show`, call :func:`recommend` again with the same arguments: a finished
    study returns at once, without new trials. Raises :class:`RecommenderError` when nothing is
    feasible.
    """
    if rec.recipe is None or rec.chosen is None:
        raise RecommenderError("nothing feasible was found: there is no recommended model (rec.feasible is False)")
    spec = rec.source_spec
    if spec is None:
        raise RecommenderError("this answer was read from storage (show): call recommend() with the arguments of "
                               "the study to get its model (a finished study returns at once)")
    with library_calls():
        search = Search(spec, log=log, progress=progress)
        k = rec.chosen.rung
        ev = search.evaluator if k == 0 else search._rung_evaluator(k)
        evaluation, model = ev.evaluate(rec.recipe, search.baseline(k), spec.max_drop, return_model=True)
    if not evaluation.ok:
        raise RecommenderError(f"the recommended recipe could not be rebuilt: {evaluation.reason}")
    return model, evaluation


def write_outputs(rec: Recommendation, folder: Path, *, plots: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the answer into ``folder`` (every file atomically) and return what was written.

    ``report.json`` and ``report.md`` always; ``recipe.json`` (the recipe with its model and class
    count) only for a feasible answer, and a ``recipe.json`` left by an earlier answer is removed
    when the new one has none, so the folder never offers a recipe the study does not recommend;
    ``pareto.png`` (and ``pareto.html`` with plotly) with ``plots``. ``rec.files`` is set to the
    same mapping (name -> path as text).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    recipe_path = folder / "recipe.json"
    if rec.feasible and rec.recipe is not None:
        # what `recommend apply` reproduces by default: the model (a factory's is only named: a
        # recipe file never imports code), the data and the size it was decoded at
        factory = rec.source_spec.model if rec.source_spec is not None else None
        source = {"model_source": factory} if factory and factory != rec.question.model else {}
        out["recipe"] = atomic_write(recipe_path, json.dumps(
            {"model": rec.question.model, **source, "num_classes": rec.question.num_classes,
             "dataset": rec.question.dataset, "image_size": rec.question.image_size,
             "feasible": rec.feasible, "uncertain": rec.uncertain(), "rung": rec.rung,
             "recipe": rec.recipe.to_dict()},
            indent=2))
    elif remove_file(recipe_path) and log:
        log(f"removed {recipe_path}: the study's answer is no longer feasible")
    out["report_json"] = atomic_write(folder / "report.json", rec.to_json(indent=2))
    out["report"] = atomic_write(folder / "report.md", rec.to_markdown())
    if plots:
        from .plot import plot_pareto, plot_pareto_html

        try:
            out["plot"] = plot_pareto(rec, folder / "pareto.png")
            html = plot_pareto_html(rec, folder / "pareto.html")
            if html is not None:
                out["plot_html"] = html
            else:  # an earlier answer's interactive plot would no longer match this one
                remove_file(folder / "pareto.html")
        except Exception as exc:  # a plot is a convenience: never lose a finished answer over it
            if log:
                log(f"could not draw the Pareto plot: {type(exc).__name__}: {exc}")
    rec.files = {k: str(v) for k, v in out.items()}
    return out


def _save_dashboard_note(study: optuna.Study, rec: Recommendation) -> None:
    """Attach the Markdown explanation to the study, so optuna-dashboard shows it, with the
    Pareto plot: an interactive plotly figure where plotly is installed (saved with
    ``save_plotly_graph_object``), else the path of ``pareto.png``."""
    try:
        from optuna_dashboard import save_note

        from .plot import pareto_figure_plotly, plotly_available

        note = rec.to_markdown()
        attached = False
        if plotly_available() and rec.ledger.entries:
            try:
                from optuna_dashboard import save_plotly_graph_object

                save_plotly_graph_object(study, pareto_figure_plotly(rec), graph_object_id="pareto-front")
                attached = True
            except Exception:  # an older optuna-dashboard: the note still names the PNG
                pass
        if attached:
            note += "\nThe Pareto plot (accuracy vs primary cost) is attached to this study (`pareto-front`).\n"
        elif "plot" in rec.files:
            note += f"\nPareto plot: `{rec.files['plot']}`\n"
        save_note(study, note)
    except Exception:  # the note is a convenience; never fail a finished search over it
        pass


@dataclass
class AppliedModel:
    """What ``apply_recipe`` produced: the compressed model, its evaluation, the files written
    (``state_dict``, ``evaluation`` and one per exported format) and each export's check."""

    model: torch.nn.Module
    evaluation: Any
    files: dict[str, Path]
    seconds: float
    exports: list[Any] = field(default_factory=list)


def apply_recipe(recipe_path: str | Path, *, model: str | torch.nn.Module | None = None,
                 dataset: str | None = None, fidelity: str = "paper", data_dir: str | None = None,
                 out_dir: str | Path | None = None, seed: int = 0, cache_dir: str | None = "studies/cache",
                 compare: bool = False, formats: Sequence[str] | None = None, image_size: int | None = None,
                 log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
                 progress: TrainProgress | None = None, **protocol_overrides: Any) -> AppliedModel:
    """Build, train (at ``fidelity``), prune and quantize a recipe, then export it.

    The recipe file is data: its ``model`` is used only when it is a registered model name. A
    recipe found for your own network (``package.module:factory`` or an ``nn.Module``) names it,
    and ``model`` must give it again (the factory is imported and called only then). Without
    ``dataset`` the recipe's recorded dataset is used, decoded at its recorded ``image_size``;
    another ``dataset`` than the recorded one is used as asked, with a warning (``warn``, default
    :func:`warnings.warn`).

    With ``compare`` the baseline is trained (or read from the cache) under the same protocol,
    the candidate distils from it when the protocol says so, and the drop is reported; without
    it only the recipe's own model is trained.

    Writes ``state_dict.pt`` (the compressed model's state dict; load it with
    ``torch.load(..., weights_only=True)``), ``evaluation.json`` and the exported model in each of
    ``formats`` (:mod:`recommender.export`: ``pt2``, ``onnx``, ``torchscript``; None: pt2 and
    TorchScript for float recipes, plus ONNX when the ``export`` extra is installed; TorchScript
    only for int8 recipes), each checked against the PyTorch output. A format that cannot be
    produced (ONNX without its packages, pt2/ONNX of an int8 recipe) is an error before any
    training; a run that fails leaves no output folder it created. ``progress(label, step, total,
    loss)`` follows the training steps.
    """
    from .cache import WeightsCache
    from .compress.quantize import Int8DynamicConfig, Int8StaticConfig
    from .data import load_dataset
    from .evaluation import Evaluator
    from .export import check_formats, default_formats, export_model
    from .models import resolve_model
    from .protocol import get_protocol
    from .recipe import Recipe, read_recipe_file

    t0 = time.perf_counter()
    validate.seed(seed)
    if image_size is not None:
        limits.check("image_size", image_size)
    if protocol_overrides.get("epochs") is not None:
        limits.check("epochs", protocol_overrides["epochs"])
    raw = read_recipe_file(recipe_path)
    if isinstance(raw, dict) and "recipe" in raw:
        recipe, recorded = Recipe.from_dict(raw["recipe"]), raw
    else:
        recipe, recorded = Recipe.from_dict(raw), {}
    name = model if model is not None else _recipe_model(recipe_path, recorded)
    int8 = isinstance(recipe.quant, (Int8DynamicConfig, Int8StaticConfig))
    formats = list(formats) if formats is not None else default_formats(int8)
    check_formats(formats, int8)  # before minutes of training
    dataset, image_size = _recipe_data(recorded, dataset, image_size, warn)
    out = Path(out_dir or Path(recipe_path).with_suffix("").as_posix() + "-applied")
    created = not out.exists()
    validate.writable_dir(out, "the output folder (--out)")  # before any training
    try:
        if cache_dir:
            validate.writable_dir(cache_dir, "--cache-dir (trained weights)")
        data = load_dataset(dataset, data_dir=data_dir, seed=seed, image_size=image_size)
        name = resolve_model(name, num_classes=data.num_classes, seed=seed)  # package.module:factory too
        protocol = get_protocol(fidelity, seed=seed, **protocol_overrides)
        if log:
            log(f"applying to {name} on {dataset} at {data.native_resolution} px, {fidelity} fidelity")
        ev = Evaluator(name, data, protocol, cache=WeightsCache(cache_dir) if cache_dir else None,
                       distill=compare, log=log, progress=progress)
        baseline = ev.evaluate_baseline() if compare else None
        evaluation, compressed = ev.evaluate(recipe, baseline, return_model=True)
        if not evaluation.ok:
            raise RecommenderError(f"the recipe could not be applied: {evaluation.reason}")
        files = {"state_dict": out / "state_dict.pt"}
        state = compressed.state_dict()
        atomic_write(files["state_dict"], lambda f: torch.save(state, f))
        res = protocol.input_resolution(data.native_resolution)
        input_size = [1, 3, res, res]  # the resolution it was trained and evaluated at
        exports = export_model(compressed, input_size, out, formats, log=log, seed=seed)
        for e in exports:
            if e.path is not None:
                files[e.format] = Path(e.path)
        files["evaluation"] = atomic_write(out / "evaluation.json", json.dumps(
            {"model": name, "dataset": dataset, "image_size": data.native_resolution, "fidelity": fidelity,
             "baseline_accuracy": baseline.accuracy if baseline else None, "input_size": input_size,
             "normalisation": {"mean": list(data.mean), "std": list(data.std)},
             "evaluation": evaluation.to_dict(), "exports": [e.to_dict() for e in exports]},
            indent=2, default=str))
    except BaseException:
        if created:  # a failed run leaves no empty output folder behind (only what it created)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return AppliedModel(compressed, evaluation, files, time.perf_counter() - t0, exports)


def _recipe_model(path: str | Path, recorded: dict[str, Any]) -> str:
    """The recipe's model when it is a registered name; a recipe never imports or calls code,
    so your own network must be named again by whoever runs it."""
    from .models.registry import is_registered, resolve_model

    name = recorded.get("model")
    if not name:
        raise RecommenderError(f"{path} names no model; pass --model")
    if not isinstance(name, str):
        raise RecommenderError(f"{path}: model must be a model name, got {type(name).__name__}")
    if is_registered(name):
        return name
    source = recorded.get("model_source")
    if isinstance(source, str) and source:
        raise RecommenderError(f"{path} was found for your own network {source!r}; a recipe file never imports "
                               f"or runs code: pass --model {source} to build it (this imports and runs it)")
    if name.startswith("custom:"):
        raise RecommenderError(f"{path} was found for your own network ({name}); a recipe file never imports "
                               "or runs code: pass --model package.module:factory that builds it")
    resolve_model(name, check_only=True)  # an unknown plain name: the valid ones
    raise RecommenderError(f"{path} names the model {name!r}, which is code to import; a recipe file never imports "
                           f"or runs code: pass --model {name} to build it (this imports and runs it)")


def _recipe_data(recorded: dict[str, Any], dataset: str | None, image_size: int | None,
                 warn: Callable[[str], None] | None) -> tuple[str, int | None]:
    """The dataset and decoded size to apply a recipe to: those asked for, else those the recipe
    recorded; a dataset other than the recorded one is used with a warning."""
    rec_ds, rec_size = recorded.get("dataset"), recorded.get("image_size")
    rec_ds = rec_ds if isinstance(rec_ds, str) and rec_ds else None
    rec_size = rec_size if isinstance(rec_size, int) and not isinstance(rec_size, bool) else None
    if dataset is None:
        return rec_ds or "digits", image_size if image_size is not None else (rec_size if rec_ds else None)
    if rec_ds and dataset != rec_ds:
        msg = (f"the recipe was found on {rec_ds}" + (f" at {rec_size} px" if rec_size else "")
               + f"; it is applied to {dataset} as asked, where its accuracy and costs were never measured")
        if warn is None:
            warnings.warn(msg, stacklevel=3)
        else:
            warn(msg)
    elif rec_ds and image_size is None:
        image_size = rec_size
    return dataset, image_size
