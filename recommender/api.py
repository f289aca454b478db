"""The Python API: ``recommend()``, ``show()`` and ``apply_recipe()``; the CLI is a thin layer over it.

    >>> from recommender import recommend
    >>> rec = recommend(model="resnet101", max_drop="2%", budgets=["5M-params"])   # doctest: +SKIP
    >>> rec.recipe, rec.evaluation.accuracy, rec.pareto.head()                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch

from .constraints import Budget, MaxDrop
from .errors import RecommenderError, StorageError
from .recipe import Recipe, load_recipe
from .report import Recommendation, recommendation_from_study
from .search.study import Search, StudySpec, open_storage, redact


def recommend(model: str = "resnet101", *, max_drop: str | float | MaxDrop = "2%",
              budgets: Sequence[str | Budget] = ("5M-params",), dataset: Any = "digits",
              log: Callable[[str], None] | None = None,
              callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
              write_files: bool = True, **options: Any) -> Recommendation:
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
        write_files: write ``<studies_dir>/<study>/recipe.json`` and ``report.md``.
        **options: any other :class:`~recommender.search.study.StudySpec` field (``fidelity``,
            ``trials``, ``timeout``, ``sampler``, ``seed``, ``storage``, ``study_name``, ``space``,
            ``checkpoint``, ``baseline_accuracy``, ``confirm_fidelity``, ``n_confirm``, ...).

    Returns:
        A :class:`~recommender.report.Recommendation` (``.recipe``, ``.evaluation``, ``.pareto``,
        ``.study``, ``.explain()``, ``.build_model()``).
    """
    md = max_drop if isinstance(max_drop, MaxDrop) else MaxDrop.parse(max_drop)
    if not isinstance(dataset, str):  # an ImageData or a (train, val) Dataset pair: by its spec
        from .data import register_dataset

        dataset = register_dataset(dataset)
    spec = StudySpec(model=model, max_drop=md, budgets=list(budgets), dataset=dataset, **options)
    search = Search(spec, log=log, callbacks=callbacks)
    search.run()
    rec = recommendation_from_study(search.study, storage=redact(spec.storage_url))
    rec.spec["num_classes"] = search.data.num_classes
    if write_files:
        write_outputs(rec, Path(spec.studies_dir) / spec.name)
    _save_dashboard_note(search.study, rec)
    return rec


def show(study_name: str, storage: str | None = None, studies_dir: str = "studies") -> Recommendation:
    """Re-render a study's answer from its storage (no training, no evaluation)."""
    url = storage or f"sqlite:///{Path(studies_dir) / (study_name + '.db')}"
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise StorageError(f"no study database at {url[len('sqlite:///'):]}; pass --storage URL or run the study first")
    st = open_storage(url, heartbeat=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        raise RecommenderError(f"no study named {study_name!r} in {redact(url)}; studies there: "
                               f"{', '.join(names) or 'none'}") from None
    return recommendation_from_study(study, storage=redact(url))


def write_outputs(rec: Recommendation, folder: Path) -> dict[str, Path]:
    """Write ``recipe.json`` (the recommended recipe with its model and class count),
    ``report.json`` and ``report.md`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if rec.recipe is not None:
        p = folder / "recipe.json"
        p.write_text(json.dumps({"model": rec.spec.get("model"), "num_classes": rec.spec.get("num_classes"),
                                 "dataset": rec.spec.get("dataset"), "feasible": rec.feasible,
                                 "recipe": rec.recipe.to_dict()}, indent=2))
        out["recipe"] = p
    (folder / "report.json").write_text(rec.to_json(indent=2))
    (folder / "report.md").write_text(rec.to_markdown())
    out["report"] = folder / "report.md"
    return out


def _save_dashboard_note(study: optuna.Study, rec: Recommendation) -> None:
    """Attach the Markdown explanation to the study, so optuna-dashboard shows it."""
    try:
        from optuna_dashboard import save_note

        save_note(study, rec.to_markdown())
    except Exception:  # the note is a convenience; never fail a finished search over it
        pass


@dataclass
class AppliedModel:
    """What ``apply_recipe`` produced: the compressed model, its evaluation and the exported files."""

    model: torch.nn.Module
    evaluation: Any
    files: dict[str, Path]
    seconds: float


def apply_recipe(recipe_path: str | Path, *, model: str | None = None, dataset: str = "digits",
                 fidelity: str = "paper", data_dir: str | None = None, out_dir: str | Path | None = None,
                 seed: int = 0, cache_dir: str | None = "studies/cache", compare: bool = False,
                 log: Callable[[str], None] | None = None, **protocol_overrides: Any) -> AppliedModel:
    """Build, train (at ``fidelity``), prune and quantize a recipe, then export it.

    With ``compare`` the baseline is trained (or read from the cache) under the same protocol,
    the candidate distils from it when the protocol says so, and the drop is reported; without
    it only the recipe's own model is trained.

    Exports ``state_dict.pt`` (the compressed model's state dict; load it with
    ``torch.load(..., weights_only=True)``), ``model.ts`` (TorchScript: runs with torch alone,
    ``torch.jit.load``) and ``evaluation.json``.
    """
    from .cache import WeightsCache
    from .data import load_dataset
    from .evaluation import Evaluator
    from .protocol import get_protocol

    t0 = time.perf_counter()
    file_model, _, recipe = load_recipe(recipe_path)
    name = model or file_model
    if not name:
        raise RecommenderError(f"{recipe_path} names no model; pass --model")
    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    protocol = get_protocol(fidelity, seed=seed, **protocol_overrides)
    ev = Evaluator(name, data, protocol, cache=WeightsCache(cache_dir) if cache_dir else None,
                   distill=compare, log=log)
    baseline = ev.evaluate_baseline() if compare else None
    evaluation, compressed = ev.evaluate(recipe, baseline, return_model=True)
    if not evaluation.ok:
        raise RecommenderError(f"the recipe could not be applied: {evaluation.reason}")
    out = Path(out_dir or Path(recipe_path).with_suffix("").as_posix() + "-applied")
    out.mkdir(parents=True, exist_ok=True)
    files = {"state_dict": out / "state_dict.pt", "torchscript": out / "model.ts",
             "evaluation": out / "evaluation.json"}
    torch.save(compressed.state_dict(), files["state_dict"])
    res = protocol.input_resolution(data.native_resolution)
    example = torch.randn(1, 3, res, res)  # the resolution it was trained and evaluated at
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what runs int8 FX
        # models with torch alone today.
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(compressed.eval(), example, check_trace=False)
        torch.jit.save(scripted, str(files["torchscript"]))
    files["evaluation"].write_text(json.dumps({"model": name, "dataset": dataset, "fidelity": fidelity,
                                               "baseline_accuracy": baseline.accuracy if baseline else None,
                                               "input_size": [1, 3, res, res],
                                               "normalisation": {"mean": list(data.mean), "std": list(data.std)},
                                               "evaluation": evaluation.to_dict()}, indent=2, default=str))
    return AppliedModel(compressed, evaluation, files, time.perf_counter() - t0)
