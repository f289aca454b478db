"""Search efficiency: feasible hypervolume after the same number of *trained* trials, per sampler
and structure policy, median over seeds, measured side by side in one run.

The landscape is hard on purpose: the full bundled space of the model's family (architecture x
pruning x quantization), and a params budget picked from the measured best-case structure costs
of random draws so that only ``--fit`` of them (default 15 %) fit. Every evaluation is real (a
short training at smoke fidelity, pruning, quantization, measured accuracy and params) and is
memoised on disk by recipe JSON (``--cache-dir``, default ``studies/bench-cache/``), so every
sampler, policy and seed is scored on the same measured landscape, a recipe is never trained
twice, and a second run takes minutes.

The hypervolume is the area dominated by the feasible front in (accuracy up, params down) with
the reference point (accuracy 0, params = the budget), params normalised by the budget: higher is
better. "Wasted" counts trials that count towards ``--trials`` but trained nothing (skipped by
structure or time, invalid architecture); "skipped" counts the structure-skipped trials of the
``constraint`` policy, which do not count. Policy ``none`` is the behaviour before structure-aware
sampling (the candidate is pruned after it was proposed; ``resample`` with one draw): random
search as it was, printed as "vs plain". "Best known front" is the hypervolume of every feasible
point any study of the run trained: no sampler's median can exceed it by much, so its ratio to
random's median says which ratios the landscape allows at all.

The memo is keyed without the tolerance (it changes only ``prob_within``; the objective judges
each drop against its own ``--max-drop``), so ``--max-drop 5%`` re-uses the landscape measured
at 15 % and trains only what the samplers newly propose.

    python benchmarks/search_efficiency.py                 # 5 seeds x 24 trained trials, all samplers
    python benchmarks/search_efficiency.py --samplers tpe,random --policies resample --seeds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import torch

from recommender.cache import WeightsCache
from recommender.constraints import Budget, MaxDrop, format_quantity, parse_budgets
from recommender.data import load_dataset
from recommender.errors import ArchError
from recommender.evaluation import Evaluation, Evaluator
from recommender.protocol import get_protocol
from recommender.compress.methods import StructureCosts
from recommender.search.objective import Objective, TrialFailed, Verdict
from recommender.search.recovery import SKIPPED_ATTR
from recommender.search.sampling import SAMPLERS, SamplerSettings, make_sampler
from recommender.search.space import SearchSpace
from recommender.search.structure import StructureCheck, best_case

optuna.logging.set_verbosity(optuna.logging.ERROR)

POLICIES = ("resample", "constraint", "none")


class DiskMemoEvaluator:
    """An Evaluator whose evaluations are memoised on disk, one JSON file per recipe (keyed by
    model, dataset, protocol and recipe JSON). The tolerance is not part of the key: it changes
    only ``prob_within``, and the objective judges the drop against its own tolerance, so one
    landscape serves every ``--max-drop``."""

    def __init__(self, inner: Evaluator, root: Path):
        self.inner = inner
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.ident = {"model": inner.model_name, "data": inner.data.identity, "protocol": inner.protocol.key()}
        self.hits = self.misses = 0
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _path(self, recipe_json: str) -> Path:
        key = hashlib.sha256(json.dumps({**self.ident, "recipe": recipe_json}, sort_keys=True).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def evaluate(self, recipe, baseline, max_drop=None, *, deadline=None):
        # no deadline: a memoised evaluation must not depend on how loaded the machine was
        path = self._path(recipe.to_json(sort_keys=True))
        if path.exists():
            self.hits += 1
            return Evaluation.from_dict(json.loads(path.read_text()))
        t0 = time.perf_counter()
        ev = self.inner.evaluate(recipe, baseline, max_drop)
        self.seconds += time.perf_counter() - t0
        self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ev.to_dict(), default=str))
        tmp.replace(path)
        return ev


class MemoObjective(Objective):
    """An Objective whose pre-check verdicts (structure best case, invalid architectures) are
    shared through ``memo`` (recipe JSON -> verdict as JSON), which the benchmark keeps on disk:
    the structured-pruning estimate of a large draft takes seconds, and a study checks hundreds."""

    memo: dict[str, Any] | None = None

    def verdict(self, recipe):
        if self.memo is None:
            return super().verdict(recipe)
        key = recipe.to_json(sort_keys=True)
        if key not in self.memo:
            v = super().verdict(recipe)
            self.memo[key] = None if v is None else {
                "kind": v.kind, "reason": v.reason, "short": v.short,
                "check": None if v.check is None else {"costs": asdict(v.check.costs), "excess": v.check.excess}}
        d = self.memo[key]
        if d is None:
            return None
        c = d["check"]
        check = None if c is None else StructureCheck(StructureCosts(**c["costs"]), excess=c["excess"])
        return Verdict(d["kind"], d["reason"], d["short"], check)


def load_memo(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_memo(path: Path, memo: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(path)


def hypervolume(points: Sequence[tuple[float, float]], ref_cost: float) -> float:
    """Area dominated by (accuracy, cost) points (accuracy up, cost down) with the reference
    point (accuracy 0, ``ref_cost``); the cost axis is normalised by ``ref_cost``. Points at or
    above ``ref_cost`` dominate nothing."""
    pts = sorted((c, a) for a, c in points if c < ref_cost)
    hv, best = 0.0, 0.0
    for cost, acc in pts:  # staircase, cheapest first
        if acc > best:
            hv += (acc - best) * (ref_cost - cost) / ref_cost
            best = acc
    return hv


def feasible_points(study: optuna.Study) -> list[tuple[float, float]]:
    """(accuracy, primary cost) of the trained, feasible trials."""
    return [(t.values[0], t.values[1]) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if "evaluation" in t.user_attrs and all(c <= 0 for c in t.user_attrs.get("constraints", [1]))]


def structure_sample(model: str, space: SearchSpace, num_classes: int, input_size: tuple[int, ...],
                     n: int, cache: Path) -> list[float | None]:
    """Best-case params of ``n`` uniformly random draws (None: an architecture that cannot be
    built), memoised in ``cache``."""
    key = hashlib.sha256(json.dumps([model, space.source, num_classes, input_size, n]).encode()).hexdigest()[:16]
    path = cache / f"structure-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=12345))
    out: list[float | None] = []
    for _ in range(n):
        trial = study.ask()
        recipe = space.sample(trial)
        try:
            out.append(float(best_case(model, num_classes, recipe, input_size, flops=False)[0].params))
        except ArchError:
            out.append(None)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def pick_budget(params: list[float | None], fit: float) -> tuple[Budget, float]:
    """A params budget (two significant digits) under which about ``fit`` of the draws fit, and
    the fraction that actually does."""
    valid = np.array([p for p in params if p is not None])
    raw = float(np.quantile(valid, fit * len(params) / len(valid)))
    limit = float(f"{raw:.2g}")
    text = f"{limit / 1e3:g}k-params" if limit < 1e6 else f"{limit / 1e6:g}M-params"
    return parse_budgets([text])[0], float(np.sum(valid <= limit)) / len(params)


def run_study(objective: Objective, sampler: optuna.samplers.BaseSampler, trained: int, max_skipped: int
              ) -> optuna.Study:
    """Trials until ``trained`` of them count towards ``--trials`` (or ``max_skipped`` were
    skipped without counting)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    counted = skipped = 0
    while counted < trained and skipped < max_skipped:
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        last = study.trials[-1]
        if SKIPPED_ATTR not in last.user_attrs:
            counted += 1
        else:
            skipped += 1
    return study


def wasted(study: optuna.Study) -> int:
    return sum(SKIPPED_ATTR not in t.user_attrs and "evaluation" not in t.user_attrs for t in study.trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--fidelity", default="smoke")
    ap.add_argument("--epochs", type=int, default=4, help="override the fidelity's epochs")
    ap.add_argument("--train-size", type=int, default=1024, help="override the fidelity's training images")
    ap.add_argument("--max-drop", default="15%")
    ap.add_argument("--fit", type=float, default=0.15, help="fraction of random draws the budget lets through")
    ap.add_argument("--budget", default=None, help="a fixed budget instead of --fit")
    ap.add_argument("--draws", type=int, default=200, help="random draws measured to pick the budget")
    ap.add_argument("--memory-limit-gb", type=float, default=10.0,
                    help="address-space limit of this process: torch-pruning's dependency graph of a few "
                         "grouped-conv structures grows to tens of GB on this shared machine")
    ap.add_argument("--trials", type=int, default=24, help="trained trials per study")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--policies", default="resample,constraint")
    ap.add_argument("--baseline-policy-samplers", default="random",
                    help="samplers also run with policy none (the behaviour before structure-aware sampling)")
    ap.add_argument("--max-skipped", type=int, default=400, help="per study, constraint policy")
    ap.add_argument("--tpe-startup", type=int, default=SamplerSettings.tpe_startup_trials)
    ap.add_argument("--cache-dir", default="studies/bench-cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.memory_limit_gb > 0:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t_start = time.perf_counter()
    cache = Path(args.cache_dir)
    space = SearchSpace.for_model(args.model)
    data = load_dataset(args.dataset)
    # One thread: on a shared 2-core machine, two OpenMP threads per step ran 10x slower.
    protocol = get_protocol(args.fidelity, epochs=args.epochs, train_size=args.train_size, threads=1)
    max_drop = MaxDrop.parse(args.max_drop)
    inner = Evaluator(args.model, data, protocol, cache=WeightsCache(cache / "weights"), latency=False)
    evaluator = DiskMemoEvaluator(inner, cache / "evals")
    t0 = time.perf_counter()
    draws = structure_sample(args.model, space, data.num_classes, inner.input_size, args.draws, cache)
    if args.budget:
        budget = parse_budgets([args.budget])[0]
        fits = sum(p is not None and p <= budget.limit for p in draws) / len(draws)
    else:
        budget, fits = pick_budget(draws, args.fit)
    baseline = inner.evaluate_baseline()
    invalid = sum(p is None for p in draws) / len(draws)
    print(f"{args.model} on {args.dataset}, {protocol.describe()}; baseline {100 * baseline.accuracy:.1f}% "
          f"({format_quantity(baseline.costs['params'], 'params')}), max drop {max_drop.describe()}")
    print(f"space {space.source}: {len(space.keys())} searched dimensions; budget {budget.describe()}: "
          f"{100 * fits:.1f}% of {len(draws)} random draws fit ({100 * invalid:.1f}% cannot be built) "
          f"[{time.perf_counter() - t0:.0f} s]")
    print(f"{args.trials} trained trials x {args.seeds} seeds per sampler and policy\n")

    settings = SamplerSettings(tpe_startup_trials=args.tpe_startup)
    samplers = [s for s in args.samplers.split(",") if s]
    configs = [(s, p) for p in args.policies.split(",") if p for s in samplers]
    configs += [(s, "none") for s in args.baseline_policy_samplers.split(",") if s in samplers]
    memo_path = cache / f"verdicts-{hashlib.sha256(json.dumps([args.model, space.source, budget.describe()]).encode()).hexdigest()[:16]}.json"
    memo = load_memo(memo_path)
    objectives = {}
    for p in {p for _, p in configs}:
        objectives[p] = MemoObjective(evaluator, space, baseline, max_drop, [budget],
                                      structure_policy="constraint" if p == "constraint" else "resample",
                                      max_draws=1 if p == "none" else 64)
        objectives[p].memo = memo
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    union: set[tuple[float, float]] = set()  # every feasible trained point of every study
    for sampler_name, policy in configs:
        hv, waste, skip, secs, trained_f = [], [], [], [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            objectives[policy].seed = seed  # the random drafts of resample
            study = run_study(objectives[policy], make_sampler(sampler_name, seed, settings), args.trials,
                              args.max_skipped)
            secs.append(time.perf_counter() - t0)
            save_memo(memo_path, memo)
            pts = feasible_points(study)
            union.update(pts)
            hv.append(hypervolume(pts, budget.limit))
            waste.append(wasted(study))
            skip.append(sum(SKIPPED_ATTR in t.user_attrs for t in study.trials))
            trained_f.append(len(pts))
        rows[sampler_name, policy] = {"hv": hv, "wasted": waste, "skipped": skip, "seconds": secs,
                                      "feasible": trained_f}
        print(f"  {sampler_name:6s} {policy:10s} HV per seed: {', '.join(f'{h:.4f}' for h in hv)}; "
              f"wasted {waste}; skipped {skip}; feasible trained {trained_f}; "
              f"{sum(secs):.0f} s", flush=True)

    # What any sampler could have reached with the recipes this run trained: no sampler's ratio
    # to random can exceed the front's by much, so it says whether a target ratio is reachable.
    ceiling = hypervolume(sorted(union), budget.limit)
    plain = rows.get(("random", "none"))  # random search without structure-aware sampling
    plain_med = statistics.median(plain["hv"]) if plain else float("nan")

    def ratio(a: float, b: float) -> float:
        return a / b if b and b > 0 else float("nan")

    print()
    print(f"{'sampler':7s} {'policy':10s} {'median HV':>9s} {'vs random':>9s} {'vs plain':>8s} {'of front':>8s} "
          f"{'wasted':>7s} {'skipped':>8s} {'feasible':>8s}  per-seed HV")
    summary: dict[str, Any] = {}
    for (s, p), r in rows.items():
        med = statistics.median(r["hv"])
        ref = rows.get(("random", p))
        vs_random = ratio(med, statistics.median(ref["hv"]) if ref else float("nan"))
        vs_plain, share = ratio(med, plain_med), ratio(med, ceiling)
        print(f"{s:7s} {p:10s} {med:9.4f} {vs_random:8.2f}x {vs_plain:7.2f}x {share:8.0%} "
              f"{statistics.median(r['wasted']):7.1f} {statistics.median(r['skipped']):8.1f} "
              f"{statistics.median(r['feasible']):8.1f}  " + ", ".join(f"{h:.3f}" for h in r["hv"]))
        summary[f"{s}/{p}"] = {"median_hv": med, "vs_random": vs_random, "vs_plain_random": vs_plain,
                               "of_front": share, **r}
    ref = rows.get(("random", "resample")) or plain
    ref_med = statistics.median(ref["hv"]) if ref else float("nan")
    print(f"\nbest known front (every feasible point any study here trained, {len(union)} points): "
          f"HV {ceiling:.4f}" + (f" = {ceiling / ref_med:.2f}x random's median" if ref else ""))
    print("vs random: the same structure policy with a random sampler; vs plain: random search without "
          "structure-aware sampling (policy none); of front: share of the best known front's HV")
    print(f"\n{evaluator.misses} recipes evaluated now ({evaluator.seconds:.0f} s), {evaluator.hits} read from "
          f"{cache}; total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"budget": budget.describe(), "max_drop": max_drop.describe(), "fit": fits,
                      "baseline": baseline.accuracy, "ceiling_hv": ceiling, "results": summary}))


if __name__ == "__main__":
    main()
