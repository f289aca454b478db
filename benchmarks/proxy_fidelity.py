"""Does the cheap ``proxy`` fidelity rank architectures like the dearer ``confirm`` one?

Trains each ResNet-101 preset (default: paper variants 6..15) on cifar10-mini at both fidelities,
prints the accuracies with their intervals, the wall time of every run and Kendall's tau between
the two rankings. A GPU is used when available (``torch.cuda.is_available()``).

    python benchmarks/proxy_fidelity.py                         # presets 6..15, proxy vs confirm
    python benchmarks/proxy_fidelity.py --presets 6,11,13 --fidelities smoke,proxy
    python benchmarks/proxy_fidelity.py --dataset digits --override epochs=4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.data import find_cifar10_mini, load_dataset  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.train import evaluate, seed_everything, train_model  # noqa: E402




def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking handled); nan with fewer than 2 items."""
    n = len(a)
    conc = disc = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="6,7,8,9,10,11,12,13,14,15",
                    help="comma list of ResNet-101 variant numbers or preset names")
    ap.add_argument("--fidelities", default="proxy,confirm")
    ap.add_argument("--dataset", default=None, help="default: imagefolder:cifar10-mini")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--override", action="append", default=[],
                    help="protocol field=value applied to every fidelity (repeatable)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.dataset is None:
        root = find_cifar10_mini()
        if root is None:
            print("cifar10-mini not found (set RECOMMENDER_CIFAR10_MINI or give --dataset)")
            return 2
        args.dataset = f"imagefolder:{root}"
    data = load_dataset(args.dataset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    presets = [p if not p.isdigit() else f"paper-resnet101-{p}" for p in args.presets.split(",")]
    fids = args.fidelities.split(",")
    extra = _parse_overrides(args.override)
    protos = {f: get_protocol(f, device=device, threads=args.threads, seed=args.seed, **extra)
              for f in fids}
    print(f"{data.describe()}; device {device}; load average {os.getloadavg()[0]:.2f}")
    for f, p in protos.items():
        print(f"  {p.describe()} -> {p.input_resolution(data.native_resolution)} px")
    results: dict[str, dict[str, dict]] = {f: {} for f in fids}
    for f in fids:
        for preset in presets:
            seed_everything(args.seed)
            model = build_model("resnet101", preset, num_classes=data.num_classes)
            t0 = time.perf_counter()
            tr = train_model(model, data, protos[f])
            ev = evaluate(model, data, protos[f])
            wall = time.perf_counter() - t0
            results[f][preset] = {"acc": ev.accuracy, "lo": ev.ci_low, "hi": ev.ci_high,
                                  "n": ev.n, "ok": tr.ok, "train_s": tr.seconds, "wall_s": wall,
                                  "final_loss": tr.final_loss}
            print(f"[{f:>7}] {preset:<20} acc {ev.accuracy * 100:5.1f}% "
                  f"[{ev.ci_low * 100:4.1f}, {ev.ci_high * 100:4.1f}] n={ev.n} "
                  f"train {tr.seconds:6.1f}s wall {wall:6.1f}s{'' if tr.ok else ' ' + tr.reason}",
                  flush=True)

    print()
    head = f"{'preset':<20}" + "".join(f"{f + ' acc%':>14}{'s':>8}" for f in fids)
    print(head)
    print("-" * len(head))
    for preset in presets:
        row = f"{preset:<20}"
        for f in fids:
            r = results[f][preset]
            row += f"{r['acc'] * 100:>14.1f}{r['wall_s']:>8.1f}"
        print(row)
    total = {f: sum(r["wall_s"] for r in results[f].values()) for f in fids}
    print("total s".ljust(20) + "".join(f"{'':>14}{total[f]:>8.1f}" for f in fids))
    for i in range(len(fids)):
        for j in range(i + 1, len(fids)):
            a = [results[fids[i]][p]["acc"] for p in presets]
            b = [results[fids[j]][p]["acc"] for p in presets]
            print(f"Kendall tau ({fids[i]} vs {fids[j]}, {len(presets)} presets): "
                  f"{kendall_tau(a, b):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": data.name, "device": device,
                                               "protocols": {f: p.to_dict() for f, p in
                                                             protos.items()},
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
