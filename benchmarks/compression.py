"""Compression ratios measured side by side in one run on this CPU.

For each model: fp32 vs int8 static (x86 engine) serialised size and batch-1 latency, and params /
MFLOPs / latency after 30, 50 and 70 % structured channel pruning (torch-pruning, L1 importance).
Weights are random (the ratios do not depend on training); latency is the median of
``--repeats`` runs at batch 1, 1x3x32x32, with ``--threads`` threads; all variants of a model are
timed in one interleaved loop, so background load hits them alike.

    python benchmarks/compression.py [--models paper-resnet101-1,...] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recommender.compress import apply_pruning, apply_quantization
from recommender.measure import count_flops, count_params, size_mb
from recommender.models import build_model, get_preset
from recommender.recipe import PruneConfig, QuantConfig

DEFAULT = "paper-resnet101-1,paper-vgg19-1,paper-resnet101-11,paper-resnet101-13"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="All inputs of this cat operator")
    ratios = [float(r) for r in args.ratios.split(",")]
    x = torch.randn(1, 3, 32, 32)
    cal = [torch.randn(16, 3, 32, 32) for _ in range(4)]

    quant_rows, prune_rows = [], []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        torch.manual_seed(0)
        m = build_model(get_preset(name).model, name, num_classes=10).eval()
        q, qr = apply_quantization(m, QuantConfig("int8-static", "x86", len(cal)), calibration=cal)
        pruned = []
        for r in ratios:
            pm, pr = apply_pruning(m, PruneConfig("structured-channel", r), example_input=x, measure_flops=False)
            pruned.append((r, pm, pr))
        # every variant of this model is timed in the same interleaved loop (fair under load)
        lat = interleaved_latency([m, q] + [pm for _, pm, _ in pruned], args.threads, args.repeats)
        p0, f0, s0, s1 = count_params(m), count_flops(m) / 1e6, size_mb(m), size_mb(q)
        floats = "none" if not qr.float_modules else f"{len(qr.float_modules)} modules"
        quant_rows.append((name, f"{s0:.2f}", f"{s1:.2f}", f"{s0 / s1:.2f}x", f"{lat[0]:.2f}", f"{lat[1]:.2f}",
                           f"{lat[0] / lat[1]:.2f}x", qr.mode, floats))
        prune_rows.append((name, "0%", f"{p0 / 1e6:.3f}", f"{f0:.2f}", f"{lat[0]:.2f}", "-", "-"))
        for (r, pm, pr), lt in zip(pruned, lat[2:]):
            status = "ok" if pr.prunable else "not prunable"
            prune_rows.append((name, f"{r:.0%}", f"{count_params(pm) / 1e6:.3f}", f"{count_flops(pm) / 1e6:.2f}",
                               f"{lt:.2f}", f"{pr.achieved_sparsity:.0%} ({len(pr.ignored_layers)} ignored)", status))
        print(f"  measured {name} ({time.perf_counter() - t0:.0f}s)", flush=True)

    _table("fp32 vs int8 static (x86), batch 1, "
           f"{args.threads} thread(s), median of {args.repeats}",
           ["model", "fp32 MB", "int8 MB", "size ratio", "fp32 ms", "int8 ms", "speed-up", "FX mode", "float parts"],
           quant_rows)
    _table("structured channel pruning (L1, torch-pruning)",
           ["model", "ratio", "params M", "MFLOPs", "latency ms", "channels removed", "status"], prune_rows)
    print(f"total {time.perf_counter() - t0:.0f}s on torch {torch.__version__}")


def interleaved_latency(models: list[torch.nn.Module], threads: int, repeats: int, warmup: int = 3,
                        size: int = 32) -> list[float]:
    """Median batch-1 latency (ms) of each model at ``size`` x ``size`` px, the models timed in
    turn in one loop."""
    x = torch.randn(1, 3, size, size)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for mod in models:
                    mod(x)
            for _ in range(repeats):
                for i, mod in enumerate(models):
                    t = time.perf_counter()
                    mod(x)
                    times[i].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return [statistics.median(t) * 1000 for t in times]


def _table(title: str, header: list[str], rows: list[tuple]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="right" if h not in ("model", "FX mode", "status") else "left")
        for r in rows:
            t.add_row(*map(str, r))
        Console(width=160).print(t)
    except ImportError:  # plain fallback
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        print(title)
        for r in [header, *rows]:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
