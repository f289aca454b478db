"""Structured pruning of the shuffle presets: ``grouped="skip"`` (before) against ``"aligned"``.

For each preset (ResNet 5, 13, 14; VGG 8, 12, 13 by default, at the paper's CIFAR input of
32 px, untrained weights: channel counts do not depend on them) and each ratio, the fraction of
output channels removed over all conv/linear layers (``PruneReport.achieved_sparsity``), the
parameters, and the CPU latency (ms, batch 1, 1 thread, median) before and after. Goal (issue
23): at 30 % / 50 % at least 25 % / 45 % of the channels go.

    python benchmarks/shuffle_prune.py --out benchmarks/results/shuffle-prune.json
"""

from __future__ import annotations

import argparse
import json
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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    shape = (1, 3, args.size, args.size)
    rows: dict[str, dict] = {}
    for name in args.presets.split(","):
        torch.manual_seed(0)
        m = build_model(get_preset(name).model, name, num_classes=10).eval()
        base_ms = latency_ms(m, shape, threads=1)
        row: dict[str, dict] = {"params": sum(p.numel() for p in m.parameters()), "latency_ms": base_ms}
        for rule in args.rules.split(","):
            for r in (float(x) for x in args.ratios.split(",")):
                t0 = time.perf_counter()
                pm, rep = structured_prune(m, r, example_input=torch.randn(shape), measure_flops=False, grouped=rule)
                secs = time.perf_counter() - t0
                ms = latency_ms(pm, shape, threads=1)
                row[f"{rule}@{r:g}"] = {"channels_removed": rep.achieved_sparsity, "params": rep.params_after,
                                        "latency_ms": ms, "prune_seconds": round(secs, 1), "prunable": rep.prunable,
                                        "note": rep.note[:300]}
                print(f"{name} {rule} {r:.0%}: {rep.achieved_sparsity:.1%} of channels, {rep.params_before} -> "
                      f"{rep.params_after} params, {base_ms:.2f} -> {ms:.2f} ms ({secs:.0f} s)", flush=True)
        rows[name] = row
        # written after every preset: a run cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"input": list(shape), "torch_threads": 1, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
