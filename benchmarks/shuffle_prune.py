"""Structured pruning of the shuffle presets: ``grouped="skip"`` (before) against ``"aligned"``.

For each preset (ResNet 5, 13, 14; VGG 8, 12, 13 by default, at the paper's CIFAR input of
32 px, untrained weights: channel counts do not depend on them) and each ratio, the fraction of
output channels removed over all conv/linear layers (``PruneReport.achieved_sparsity``), the
parameters, and the CPU latency (ms, batch 1, 1 thread; the median of ``--repeats`` measurements
taken in turn with the unpruned model's) before and after. Goal (issue
23): at 30 % / 50 % at least 25 % / 45 % of the channels go.

    python benchmarks/shuffle_prune.py --out benchmarks/results/shuffle-prune.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.compress.prune import structured_prune  # noqa: E402
from recommender.measure import latency_ms  # noqa: E402
from recommender.models import build_model, get_preset  # noqa: E402

PRESETS = "paper-resnet101-5,paper-resnet101-13,paper-resnet101-14,paper-vgg19-8,paper-vgg19-12,paper-vgg19-13"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--rules", default="skip,aligned")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/shuffle-prune.json")
    ap.add_argument("--repeats", type=int, default=5, help="latency measurements per model (median)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    shape = (1, 3, args.size, args.size)
    rows: dict[str, dict] = {}
    for name in args.presets.split(","):
        torch.manual_seed(0)
        m = build_model(get_preset(name).model, name, num_classes=10).eval()
        row: dict[str, dict] = {"params": sum(p.numel() for p in m.parameters())}
        models = {"base": m}
        for rule in args.rules.split(","):
            for r in (float(x) for x in args.ratios.split(",")):
                t0 = time.perf_counter()
                pm, rep = structured_prune(m, r, example_input=torch.randn(shape), measure_flops=False, grouped=rule)
                key = f"{rule}@{r:g}"
                models[key] = pm
                row[key] = {"channels_removed": rep.achieved_sparsity, "params": rep.params_after,
                            "prune_seconds": round(time.perf_counter() - t0, 1), "prunable": rep.prunable,
                            "note": rep.note[:300]}
        # latency: every model measured once per repeat, in turn, so that drifting load hits all alike
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.repeats):
            for k, mod in models.items():
                times[k].append(latency_ms(mod, shape, threads=1))
        row["latency_ms"] = statistics.median(times["base"])
        for k in models:
            if k != "base":
                row[k]["latency_ms"] = statistics.median(times[k])
                print(f"{name} {k}: {row[k]['channels_removed']:.1%} of channels, {row['params']} -> "
                      f"{row[k]['params']} params, {row['latency_ms']:.2f} -> {row[k]['latency_ms']:.2f} ms "
                      f"({row[k]['prune_seconds']:.0f} s)", flush=True)
        rows[name] = row
        # written after every preset: a run cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"input": list(shape), "torch_threads": 1, "latency_repeats": args.repeats,
                                             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
