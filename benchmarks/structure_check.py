"""What a structure check costs: the check every draft of the search passes before training,
before (a real build, fvcore's JIT-traced FLOPs, ``torch.save`` for the size, torch-pruning for
structured pruning's best case) and now (a meta-device build, FLOPs from the shapes, the methods'
quick bounds; the exact estimate only for a draft between its bound and its structure), side by
side on the same random drafts of the model's search space, interleaved.

    python benchmarks/structure_check.py                       # resnet101, 1k-params and 5M-params
    python benchmarks/structure_check.py --model resnet18 --draws 40 --budget 60M-flops

Prints the median and the 90th percentile of each (ms) and the ratio of the medians, and the
time of the up-front floor search for each budget; writes ``--out`` (JSON) when given.
Timings share the CPU with whatever else runs: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender import measure  # noqa: E402
from recommender.compress.methods import CompressContext, StructureCosts, get_method  # noqa: E402
from recommender.constraints import parse_budgets  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.search.floor import space_floor  # noqa: E402
from recommender.search.space import SearchSpace  # noqa: E402
from recommender.search.structure import STRUCTURAL, _structure, check_structure  # noqa: E402


class RandomDraft:
    """A trial stand-in that draws every dimension uniformly (the search's random drafts)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name, choices):
        return self.rng.choice(choices)

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.rng.randrange(low, high + 1, step)

    def suggest_float(self, name, low, high, step=None, log=False):
        if step:
            return low + step * self.rng.randrange(0, int(round((high - low) / step)) + 1)
        return self.rng.uniform(low, high)


def old_check(model, num_classes, recipe, budgets, size):
    """The check as it was: a real build, fvcore, torch.save, every method's exact estimate."""
    judged = [b for b in budgets if b.metric in STRUCTURAL]
    net = build_model(model, recipe.arch, num_classes=num_classes).eval()
    n = measure.count_params(net)
    flops = any(b.metric == "flops" for b in judged)
    mflops = measure.count_flops(net, size) / 1e6 if flops else None
    costs = StructureCosts(n, n, mflops, measure.size_mb(net))
    if all(b.violation(costs.as_costs()) <= 0 for b in judged):
        return costs
    ctx = CompressContext(example_input=torch.randn(size))
    for cfg in recipe.stages():
        m = get_method(cfg.stage, cfg.method)
        if m.estimate is not None:
            if cfg.method == "structured-channel" and flops:  # fvcore on the pruned model, as before
                from recommender.compress.prune import structured_prune

                net, _ = structured_prune(net, cfg.sparsity, example_input=ctx.example_input, measure_flops=False)
                n = measure.count_params(net)
                costs = StructureCosts(n, n, measure.count_flops(net, size) / 1e6, measure.size_mb(net))
            else:
                net, costs = m.estimate(net, cfg, costs, ctx)
    return costs


class _Timeout(Exception):
    pass


def _timeout(signum, frame):
    raise _Timeout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--budget", action="append", help="budgets to check against (default 1k-params, 5M-params)")
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--size", type=int, default=8, help="input side (px): digits' 8 px by default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-timeout", type=int, default=120,
                    help="seconds after which one old check is stopped and counted at that time (torch-pruning "
                         "takes minutes on some graphs)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (1, 3, args.size, args.size)
    space = SearchSpace.for_model(args.model)
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.model} at {args.size} px, {args.threads} thread(s)")
    results = {"model": args.model, "size": args.size, "draws": args.draws, "threads": args.threads, "budgets": {}}
    build_model(args.model, None, num_classes=10)  # imports and first-call costs outside the timings
    for text in args.budget or ["1k-params", "5M-params"]:
        budgets = parse_budgets([text])
        rng = random.Random(args.seed)
        drafts = [space.sample(RandomDraft(rng)) for _ in range(args.draws)]
        new, old, skipped = [], [], 0
        for r in drafts:
            _structure.cache_clear()  # every draft measured cold, as a new architecture would be
            t0 = time.perf_counter()
            try:
                check_structure(args.model, 10, r, budgets, size)
            except Exception:
                pass
            new.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(args.old_timeout)
            try:
                old_check(args.model, 10, r, budgets, size)
            except _Timeout:
                skipped += 1  # counted at the timeout: a lower bound of its time
            except Exception:
                pass
            finally:
                signal.alarm(0)
            old.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        floor = space_floor(space, args.model, 10, size, budgets)
        floor_s = time.perf_counter() - t0

        def q(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(p * len(xs)))]

        row = {"new_median_ms": statistics.median(new), "new_p90_ms": q(new, 0.9),
               "old_median_ms": statistics.median(old), "old_p90_ms": q(old, 0.9), "old_timed_out": skipped,
               "ratio_of_medians": statistics.median(old) / statistics.median(new),
               "floor_seconds": floor_s, "floor": [f.to_dict() for f in floor]}
        results["budgets"][text] = row
        print(f"{text}: structure check median {row['new_median_ms']:.1f} ms (p90 {row['new_p90_ms']:.1f}) "
              f"vs before {row['old_median_ms']:.1f} ms (p90 {row['old_p90_ms']:.1f}); "
              f"{row['ratio_of_medians']:.1f}x; floor search {floor_s:.1f} s: "
              + "; ".join(f"{f.describe()} reached={f.reached}" for f in floor))
    results["load_average_after"] = os.getloadavg()[0]
    print(f"load average after: {results['load_average_after']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
