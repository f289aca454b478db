"""Search efficiency: hypervolume of the feasible Pareto front after the same number of trials for
TPE, NSGA-II and random sampling, median over seeds, measured side by side in one run.

Every evaluation is real (a short training at a cheap fidelity, pruning, quantization, measured
accuracy and params), memoised by recipe, so all samplers and seeds are scored on the same measured
landscape and a recipe is never evaluated twice. The hypervolume is the area dominated by the
feasible front in (accuracy up, params down), with the reference point (accuracy 0, params = the
budget): higher is better.

    python benchmarks/search_efficiency.py                       # defaults below, ~10 min on 2 cores
    python benchmarks/search_efficiency.py --trials 40 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import torch

from recommender.cache import WeightsCache
from recommender.constraints import MaxDrop, parse_budgets
from recommender.data import load_dataset
from recommender.evaluation import Evaluator
from recommender.protocol import get_protocol
from recommender.search.objective import Objective, TrialFailed
from recommender.search.space import SearchSpace
from recommender.search.study import SAMPLERS, make_sampler

optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACE = textwrap.dedent("""
    family: resnet
    arch:
      stem: {value: dws}
      stem_width: {choices: [16, 32]}
      block: {choices: [ghost, ir]}
      widths: {choices: [[16, 24, 40, 88], [10, 22, 42, 86]]}
      inner: {choices: [[32, 64, 128, 256], [64, 128, 256, 512]]}
      drop_last: {value: true}
      head: {value: nofc}
      width_multiplier: {choices: [0.5, 1.0]}
    prune:
      method: {choices: [none, unstructured-l1, structured-channel]}
      sparsity: {low: 0.3, high: 0.6, step: 0.3, when: {method: [unstructured-l1, structured-channel]}}
    quant:
      scheme: {choices: [fp32, int8-dynamic]}
""")


class MemoEvaluator:
    """An Evaluator that evaluates each distinct recipe once."""

    def __init__(self, inner: Evaluator):
        self.inner = inner
        self.memo: dict[str, object] = {}
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, recipe, baseline, max_drop=None):
        key = recipe.to_json(sort_keys=True)
        if key not in self.memo:
            t0 = time.perf_counter()
            self.memo[key] = self.inner.evaluate(recipe, baseline, max_drop)
            self.seconds += time.perf_counter() - t0
        return self.memo[key]


def hypervolume(study: optuna.Study, ref_cost: float) -> float:
    """Area dominated by the feasible (accuracy, cost) front, reference (0, ref_cost)."""
    pts = [(t.values[1], t.values[0]) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
           if all(c <= 0 for c in t.user_attrs.get("constraints", [1]))]
    pts = sorted(p for p in pts if p[0] < ref_cost)
    hv, best = 0.0, 0.0
    for cost, acc in pts:  # staircase, cheapest first
        if acc > best:
            hv += (acc - best) * (ref_cost - cost) / ref_cost
            best = acc
    return hv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--fidelity", default="smoke")
    ap.add_argument("--budget", default="200k-params")
    ap.add_argument("--max-drop", default="10%")
    ap.add_argument("--epochs", type=int, default=6, help="override the fidelity's epochs")
    ap.add_argument("--train-size", type=int, default=1024, help="override the fidelity's training images")
    ap.add_argument("--trials", type=int, default=30, help="per study; TPE starts guiding after 8, NSGA-II after 12")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cache-dir", default=None, help="trained-weights cache (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    space_file = Path(tmp.name) / "space.yaml"
    space_file.write_text(SPACE)
    space = SearchSpace.load(space_file)
    data = load_dataset(args.dataset)
    protocol = get_protocol(args.fidelity, epochs=args.epochs, train_size=args.train_size)
    cache = WeightsCache(args.cache_dir or Path(tmp.name) / "cache")
    evaluator = MemoEvaluator(Evaluator(args.model, data, protocol, cache=cache, latency=False))
    baseline = evaluator.inner.evaluate_baseline()
    budgets = parse_budgets([args.budget])
    max_drop = MaxDrop.parse(args.max_drop)
    print(f"{args.model} on {args.dataset} at {args.fidelity}: baseline {100 * baseline.accuracy:.1f}%, "
          f"budget {budgets[0].describe()}, max drop {max_drop.describe()}, {args.trials} trials x "
          f"{args.seeds} seeds per sampler")

    results: dict[str, list[float]] = {}
    for name in SAMPLERS:
        results[name] = []
        for seed in range(args.seeds):
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(name, seed))
            objective = Objective(evaluator, space, baseline, max_drop, budgets)
            study.optimize(objective, n_trials=args.trials, catch=(TrialFailed,))
            results[name].append(hypervolume(study, budgets[0].limit))
        print(f"  {name:7s} hypervolume per seed: " + ", ".join(f"{h:.4f}" for h in results[name]))

    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"{'sampler':8s} {'median HV':>10s} {'vs random':>10s}")
    for k, v in med.items():
        ratio = v / med["random"] if med["random"] > 0 else float("inf")
        print(f"{k:8s} {v:10.4f} {ratio:9.2f}x")
    print(f"\n{len(evaluator.memo)} distinct recipes evaluated in {evaluator.seconds:.0f} s; "
          f"total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"median_hypervolume": med, "per_seed": results}))


if __name__ == "__main__":
    main()
