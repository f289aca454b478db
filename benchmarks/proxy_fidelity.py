"""Does the search's rung rank candidates, and call their drops, as a properly trained reference does?

For the baseline and the paper's ResNet-101 presets 6-14 (and, with ``--pruned``, pruned
candidates of the baseline), this compares the search rung (the ``proxy`` fidelity as the search
runs it: trained-model-first, with or without distillation) with a reference protocol trained long
(``benchmarks/fidelity_reference.py`` writes it; hours on a 2-core CPU, so it runs once). Printed,
side by side in one run, for each search-rung variant:

- Kendall's tau (scipy, with its p-value) between the search rung's accuracies and the reference's,
  and the same tau for the rankings that cost nothing: by MFLOPs and by params (a proxy training
  must carry information that the cost columns do not);
- drop calibration: mean absolute difference (pp) between each candidate's drop from the baseline
  at the search rung and at the reference;
- feasibility agreement at the tolerance (2 pp): how many models are classified within / outside
  the tolerance the same way as the reference.

    python benchmarks/fidelity_reference.py                     # once: the reference trainings
    python benchmarks/proxy_fidelity.py                         # cifar10-mini, variants kd and nokd
    python benchmarks/proxy_fidelity.py --dataset digits --reference benchmarks/results/digits-reference.json
    python benchmarks/proxy_fidelity.py --variants kd --override epochs=8 --json out.json
    python benchmarks/proxy_fidelity.py --rung 1                # the promotion rung (3x epochs, native px)
    python benchmarks/proxy_fidelity.py --checkpoint REFERENCE_BASELINE.pt --pruned   # as --checkpoint

``--checkpoint`` scores the search as ``recommend --checkpoint`` runs it: the baseline is the given
trained weights (evaluated, never retrained), every rung runs at the data's native size, pruned
candidates inherit those weights. Given the reference's own baseline weights, the pruned
candidates' search-rung and reference drops start from the same converged network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.cache import WeightsCache  # noqa: E402
from recommender.constraints import MaxDrop  # noqa: E402
from recommender.data import find_cifar10_mini, load_dataset  # noqa: E402
from recommender.evaluation import Evaluator, unpack_bools  # noqa: E402
from recommender.measure import count_flops, count_nonzero_params  # noqa: E402
from recommender.models import build_model, get_preset  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.recipe import PruneConfig, Recipe  # noqa: E402
from recommender.search.rungs import ladder  # noqa: E402
from recommender.stats import paired_drop  # noqa: E402

#: search-rung variants: protocol overrides of the ``proxy`` fidelity
VARIANTS = {
    "kd": {"distill_alpha": 0.5, "recovery_distill_alpha": 0.5},
    "nokd": {"distill_alpha": 0.0, "recovery_distill_alpha": 0.0},
    "default": {},  # the shipped defaults (distillation in recovery only)
    # block-wise distillation: each stage of a rewrite matches the trained baseline's
    "blockwise": {"feature_distill_alpha": 1.0},
    # a cheaper search rung: 4 epochs at batch 128 (half the baseline's steps)
    "fast": {"epochs": 4, "batch_size": 128, "lr": 0.03},
    # BN statistics re-estimated on 4 x 64 training images after a pruned candidate's recovery
    "adaptive-bn": {"recovery_bn_batches": 4},
}
PRESETS = [f"paper-resnet101-{i}" for i in range(6, 15)]
#: pruned candidates of the baseline (they inherit its trained weights)
PRUNED = {"struct30": ("structured-channel", 0.3), "struct50": ("structured-channel", 0.5),
          "unstruct59": ("unstructured-l1", 0.59), "unstruct80": ("unstructured-l1", 0.8)}


def _recipe(name: str) -> Recipe:
    if name == "baseline":
        return Recipe()
    if name in PRUNED:
        method, s = PRUNED[name]
        return Recipe(prune=PruneConfig(method, s))
    return Recipe(arch=get_preset(name).arch)


def _reference(path: Path, model: str, epochs: int | None = None) -> dict[str, dict]:
    """Reference runs by name ('baseline', preset names, pruned names), all of one protocol:
    ``epochs``, or else the longest one that has a baseline run (a file may hold several)."""
    data = json.loads(path.read_text())
    runs = [r for r in data["runs"].values() if r["model"] == model]
    if epochs is None:
        base = [r["protocol"]["epochs"] for r in runs if (r.get("name") or r["arch"]) == "baseline"]
        epochs = max(base) if base else None
    return {(r.get("name") or r["arch"]): r for r in runs if r["protocol"]["epochs"] == epochs}


def _costs(model: str, names: list[str], nc: int) -> dict[str, tuple[int, float]]:
    """(non-zero params, MFLOPs at 32 px) of each model as it is deployed: pruned candidates
    are pruned (structure and sparsity do not depend on the trained weights at these ratios)."""
    import torch

    from recommender.compress.pipeline import compress

    out = {}
    for n in names:
        net = build_model(model, _recipe(n).arch, nc).eval()
        if n in PRUNED:
            net, _ = compress(net, _recipe(n), example_input=torch.randn(1, 3, 32, 32), batches=None)
            net.eval()
        out[n] = (count_nonzero_params(net), count_flops(net, (1, 3, 32, 32)) / 1e6)
    return out


def _tau(x: list[float], y: list[float]) -> tuple[float, float]:
    res = kendalltau(x, y)
    return float(res.statistic), float(res.pvalue)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None, help="default: imagefolder:cifar10-mini")
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--reference", default=None, help="default benchmarks/results/<dataset>-reference.json")
    ap.add_argument("--variants", default="kd,nokd", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--fidelity", default="proxy", help="the search rung's fidelity")
    ap.add_argument("--rung", type=int, default=0,
                    help="which rung of the default ladder to score (0: the search rung, 1: the promotion rung)")
    ap.add_argument("--override", action="append", default=[], help="protocol field=value (repeatable)")
    ap.add_argument("--pruned", action="store_true", help="also pruned candidates of the baseline")
    ap.add_argument("--models", default=None,
                    help="comma list: only these (preset numbers 6-14, pruned names); the baseline always")
    ap.add_argument("--reference-epochs", type=int, default=None,
                    help="which reference protocol (default: the longest with a baseline run)")
    ap.add_argument("--max-drop", type=float, default=2.0, help="tolerance in pp (default 2)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None,
                    help="px the images are decoded to (as recommend --image-size); default: native")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained baseline's weights (as recommend --checkpoint): the reference's own baseline")
    ap.add_argument("--reuse", default=None,
                    help="a JSON this script wrote: its search-rung rows of the same variant and protocol are "
                         "taken instead of trained again (when a reference run finishes after the search rung)")
    ap.add_argument("--cache-dir", default="studies/cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.dataset is None:
        root = find_cifar10_mini()
        if root is None:
            print("cifar10-mini not found; pass --dataset", file=sys.stderr)
            return 2
        args.dataset = f"imagefolder:{root}"
    tag = "cifar10-mini" if "cifar10-mini" in args.dataset else args.dataset.split(":")[0]
    ref_path = Path(args.reference or f"benchmarks/results/{tag}-reference.json")
    if not ref_path.exists():
        print(f"no reference results at {ref_path}: run benchmarks/fidelity_reference.py first", file=sys.stderr)
        return 2
    ref = _reference(ref_path, args.model, args.reference_epochs)
    data = load_dataset(args.dataset, seed=0, image_size=args.image_size)
    names = ["baseline"] + [p for p in PRESETS if p in ref] + ([n for n in PRUNED if n in ref] if args.pruned else [])
    names = [n for n in names if n in ref]
    if args.models:  # e.g. only the pruned candidates, when an override would retrain the presets
        keep = {f"paper-resnet101-{m}" if m.isdigit() else m for m in (x.strip() for x in args.models.split(","))}
        names = [n for n in names if n == "baseline" or n in keep]
    if "baseline" not in ref:
        print("the reference has no baseline run yet", file=sys.stderr)
        return 2
    costs = _costs(args.model, names, data.num_classes)
    tol = MaxDrop(args.max_drop)
    ref_base = unpack_bools(ref["baseline"]["correct"])
    ref_acc = {n: 100 * ref[n]["accuracy"] for n in names}
    # a pruned reference run started from a retrained baseline (``baseline_rerun``) is compared
    # with that baseline, the weights it was pruned from
    ref_drop = {n: paired_drop(unpack_bools(ref[n]["baseline_rerun"]["correct"]) if "baseline_rerun" in ref[n]
                               else ref_base, unpack_bools(ref[n]["correct"])).drop_pp for n in names}
    overrides = {}
    for item in args.override:
        k, _, v = item.partition("=")
        overrides[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v

    reused = json.loads(Path(args.reuse).read_text())["variants"] if args.reuse else {}
    results = {"dataset": data.describe(), "reference": str(ref_path), "models": names, "rung": args.rung,
               "checkpoint": args.checkpoint,
               "reference_protocol": ref["baseline"]["protocol"], "variants": {}}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        search = get_protocol(args.fidelity, seed=0, threads=args.threads)
        pinned = int(data.native_resolution) if args.checkpoint else 0  # as the search pins it
        rung = ladder(search, data.native_resolution, "auto", pin_resolution=pinned)[args.rung].protocol
        protocol = rung.replace(**{**VARIANTS[variant], **overrides})
        ev = Evaluator(args.model, data, protocol, cache=WeightsCache(args.cache_dir), latency=False,
                       checkpoint=args.checkpoint)
        t0 = time.perf_counter()
        base = ev.evaluate_baseline()
        rows = {"baseline": {"accuracy": 100 * base.accuracy, "drop": 0.0, "seconds": base.train_seconds}}
        for n in names[1:]:
            same = reused.get(variant, {})  # the protocol key when the file has it (describe() omits recovery)
            if n in same.get("rows", {}) and same.get("protocol_key", protocol.key()) == protocol.key() \
                    and same["protocol"] == protocol.describe():
                rows[n] = {k: v for k, v in same["rows"][n].items() if not k.startswith("ref_")}
                print(f"[{variant}] {n}: {rows[n]['accuracy']:.2f}% drop {rows[n]['drop']:+.2f} pp (from "
                      f"{args.reuse}; reference {ref_acc[n]:.2f}%, drop {ref_drop[n]:+.2f})", flush=True)
                continue
            t1 = time.perf_counter()
            e = ev.evaluate(_recipe(n), base, tol)
            rows[n] = {"accuracy": 100 * (e.accuracy or 0.0), "drop": e.drop_pp, "ok": e.ok, "reason": e.reason,
                       "seconds": round(time.perf_counter() - t1, 1), "inherited": e.inherited}
            print(f"[{variant}] {n}: {rows[n]['accuracy']:.2f}% drop {e.drop_pp:+.2f} pp "
                  f"(reference {ref_acc[n]:.2f}%, drop {ref_drop[n]:+.2f}) in {rows[n]['seconds']:.0f} s", flush=True)
        for n in names:
            rows[n].update(ref_accuracy=ref_acc[n], ref_drop=ref_drop[n], params=costs[n][0], mflops=costs[n][1])

        def summary(sub: list[str]) -> dict:
            """Ranking and calibration scores over the models ``sub`` (the baseline among them)."""
            reference = [ref_acc[n] for n in sub]
            tau, p = _tau([rows[n]["accuracy"] for n in sub], reference)
            tau_f, p_f = _tau([costs[n][1] for n in sub], reference)
            tau_p, p_p = _tau([costs[n][0] for n in sub], reference)
            return {"tau": tau, "p": p, "tau_mflops": tau_f, "p_mflops": p_f, "tau_params": tau_p, "p_params": p_p,
                    "drop_calibration_pp": float(np.mean([abs(rows[n]["drop"] - ref_drop[n]) for n in sub
                                                          if n != "baseline"])),
                    "feasibility_agreement": sum((rows[n]["drop"] <= tol.value) == (ref_drop[n] <= tol.value)
                                                 for n in sub), "n": len(sub)}

        results["variants"][variant] = {"protocol": protocol.describe(), "protocol_key": protocol.key(),
                                        "rows": rows, **summary(names),
                                        "seconds": round(time.perf_counter() - t0, 1)}
        arch = [n for n in names if n not in PRUNED]
        if 3 <= len(arch) < len(names):  # the architecture models alone (the ones the cost columns can rank)
            results["variants"][variant]["architectures"] = summary(arch)

    rp = ref["baseline"]["protocol"]  # the size the reference trained at, on this data
    ref_px = rp.get("resolution") or min(data.native_resolution, rp.get("max_resolution") or data.native_resolution)
    print(f"\n{results['dataset']}; reference: {ref['baseline']['protocol']['fidelity']} "
          f"{ref['baseline']['protocol']['epochs']} epochs, {ref_px} px, "
          f"aug {ref['baseline']['protocol']['augment']}")
    print(f"{'model':22} {'MFLOPs':>8} {'ref acc':>8} {'ref drop':>9}" +
          "".join(f" {v + ' acc':>10} {v + ' drop':>10}" for v in results["variants"]))
    for n in names:
        line = f"{n:22} {costs[n][1]:8.1f} {ref_acc[n]:8.2f} {ref_drop[n]:+9.2f}"
        for v, r in results["variants"].items():
            line += f" {r['rows'][n]['accuracy']:10.2f} {r['rows'][n]['drop']:+10.2f}"
        print(line)
    print()
    for v, r in results["variants"].items():
        for label, sr in (("", r), (" architectures only", r.get("architectures"))):
            if sr is None:
                continue
            print(f"{v}{label}: tau {sr['tau']:+.3f} (p {sr['p']:.3f}) | by MFLOPs {sr['tau_mflops']:+.3f} "
                  f"(p {sr['p_mflops']:.3f}) | by params {sr['tau_params']:+.3f} (p {sr['p_params']:.3f}) | "
                  f"drop calibration {sr['drop_calibration_pp']:.2f} pp | feasibility agreement at {tol.value:g} pp "
                  f"{sr['feasibility_agreement']}/{sr['n']}" + (f" | {r['seconds']:.0f} s" if not label else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
