"""Latency predicted from a device profile against latency measured, side by side on this CPU.

Profiles this machine (``recommend device-profile``: the operators of the bundled presets and
models, timed at batch 1 with ``--threads`` threads, a calibration fitted on whole replayed
models), then, for every candidate below, predicts its batch-1 latency from the profile
(:func:`recommender.latency_predict.predict_latency`) and measures it as a search does
(:func:`recommender.measure.latency_stats`: 3 warm-up passes, 20 samples, the median). The
candidates: the paper's presets (ResNet-101 and VGG-19 families at their deploy size, 32 px),
structured-pruned models (at sparsities and widths the plan did not time: their shapes are
interpolated), int8 static (x86), fp16, and torchvision models. Weights are random: a kernel's
time does not depend on them.

Prints, and writes to ``--out`` (default ``benchmarks/results/latency-prediction.json``): the
median and 90th-percentile absolute error in %, Kendall's tau between predicted and measured,
and the seconds spent predicting against measuring. Resumable: each candidate is written when
done, and a rerun with the same profile goes on where it stopped (``--max-minutes`` bounds one
run, to share the CPU lock).

    python -c "import json; from recommender.profile_plan import make_plan; \
               json.dump(make_plan(), open('/tmp/plan.json', 'w'))"        # no timing: outside the lock
    flock /tmp/recommender-cpu.lock python benchmarks/latency_prediction.py --plan /tmp/plan.json [--max-minutes 15]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recommender.compress.quantize import quiet_quantization_warnings
from recommender.errors import ProfileError
from recommender.io import atomic_write
from recommender.latency_predict import predict_latency
from recommender.latency_profile import load_profile, make_profile
from recommender.measure import latency_stats
from recommender.profile_plan import PlanModel, build_plan_model

RESULTS = Path(__file__).resolve().parent / "results"

CANDIDATES = [
    # the paper's presets
    *(PlanModel("resnet101", f"paper-resnet101-{i}") for i in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 14)),
    *(PlanModel("vgg19", f"paper-vgg19-{i}") for i in (1, 2, 3, 4, 6, 8, 10, 12, 13)),
    # structured pruning and widths between the plan's
    PlanModel("resnet18", sparsity=0.4), PlanModel("resnet18", sparsity=0.6),
    PlanModel("resnet101", "paper-resnet101-1", sparsity=0.4), PlanModel("vgg19", "paper-vgg19-1", sparsity=0.3),
    PlanModel("tv:mobilenet_v2", sparsity=0.3), PlanModel("resnet18", {"width_multiplier": 0.75}),
    # int8 static (x86)
    PlanModel("resnet18", quant="int8-static"), PlanModel("resnet101", "paper-resnet101-1", quant="int8-static"),
    PlanModel("resnet101", "paper-resnet101-13", quant="int8-static"),
    PlanModel("vgg19", "paper-vgg19-4", quant="int8-static"), PlanModel("tv:mobilenet_v2", quant="int8-static"),
    PlanModel("resnet18", sparsity=0.4, quant="int8-static"),
    # fp16 (emulated on this CPU)
    PlanModel("resnet18", quant="fp16"), PlanModel("resnet101", "paper-resnet101-1", quant="fp16"),
    PlanModel("vgg19", "paper-vgg19-4", quant="fp16"), PlanModel("tv:mobilenet_v2", quant="fp16"),
    # torchvision
    *(PlanModel(m) for m in ("tv:mobilenet_v2", "tv:resnet18", "tv:mobilenet_v3_small", "tv:mobilenet_v3_large",
                             "tv:efficientnet_b0", "tv:shufflenet_v2_x1_0", "tv:regnet_x_400mf", "tv:resnet50")),
]


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either list counted as neither concordant nor discordant)."""
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            a, b = x[i] - x[j], y[i] - y[j]
            if a == 0 and b == 0:
                continue
            if a == 0:
                tx += 1
            elif b == 0:
                ty += 1
            elif (a > 0) == (b > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else float("nan")


def percentile(v: list[float], q: float) -> float:
    v = sorted(v)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(out: dict) -> dict:
    rows = [c for c in out["candidates"] if "measured_ms" in c]
    if not rows:
        return out
    errs = [abs(c["error_pct"]) for c in rows]
    pred_s = sum(c["predict_s"] for c in rows)
    meas_s = sum(c["measure_s"] for c in rows)
    out.update({
        "n": len(rows),
        "median_error_pct": statistics.median(errs),
        "p90_error_pct": percentile(errs, 90),
        "kendall_tau": kendall_tau([c["predicted_ms"] for c in rows], [c["measured_ms"] for c in rows]),
        "predict_s": pred_s,
        "measure_s": meas_s,
        "speedup_total": meas_s / pred_s if pred_s else None,
        "speedup_median": statistics.median(c["measure_s"] / c["predict_s"] for c in rows),
        "refused": [c["name"] for c in out["candidates"] if "refused" in c],
        "within_profile_error": sum(abs(c["error_pct"]) <= (out["profile"]["p90_error_pct"] or 0) for c in rows),
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", default=str(RESULTS / "latency-profile-this-machine.json"),
                    help="profile file (made first when absent)")
    ap.add_argument("--out", default=str(RESULTS / "latency-prediction.json"))
    ap.add_argument("--plan", help="a plan JSON made beforehand (profile_plan.make_plan: no timing, so it "
                                   "may be made outside the CPU lock)")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    ap.add_argument("--note", default="", help="what else ran on the machine (stored with the results)")
    args = ap.parse_args()
    t_start = time.monotonic()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if not Path(args.profile).exists():
        print(f"profiling this machine -> {args.profile}", flush=True)
        plan = json.loads(Path(args.plan).read_text()) if args.plan else None
        make_profile(args.profile, threads=args.threads, plan=plan, log=lambda s: print("  " + s, flush=True))
    prof = load_profile(args.profile)
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    if out.get("profile", {}).get("digest") != prof.digest:
        out = {"candidates": []}
    out["profile"] = {"file": Path(args.profile).name, "digest": prof.digest, "seconds": prof.data["seconds"],
                      "operators": len(prof.entries), "device": prof.describe(),
                      "p90_error_pct": prof.error_pct,
                      "median_error_pct": prof.data["validation"]["median_error_pct"],
                      "validation": prof.data["validation"]["models"], "calibration": prof.calibration}
    out["threads"] = args.threads
    if args.note:
        out.setdefault("notes", []).append(args.note)
    done = {c["name"] for c in out["candidates"]}
    x = (1, 3, 32, 32)
    for pm in CANDIDATES:
        if pm.name in done:
            continue
        if args.max_minutes and time.monotonic() - t_start > args.max_minutes * 60:
            print("time is up: rerun to go on", flush=True)
            break
        with quiet_quantization_warnings():
            net = build_plan_model(pm, input_size=32)
            t0 = time.perf_counter()
            try:
                pred = predict_latency(net, prof, x)
            except ProfileError as exc:  # refused, as documented: counted apart
                out["candidates"].append({"name": pm.name, "quant": pm.quant, "refused": str(exc)})
                print(f"{pm.name:55s} refused: {exc}", flush=True)
                atomic_write(out_path, json.dumps(summary(out), indent=1))
                continue
            predict_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            meas = latency_stats(net, x, threads=args.threads)
            measure_s = time.perf_counter() - t0
        row = {"name": pm.name, "quant": pm.quant, "predicted_ms": pred.ms, "raw_sum_ms": pred.raw_ms,
               "measured_ms": meas.median_ms, "measured_iqr_ms": meas.iqr_ms,
               "error_pct": 100.0 * (pred.ms - meas.median_ms) / meas.median_ms,
               "operators": pred.operators, "exact": pred.exact, "interpolated": pred.interpolated,
               "approximate": pred.approximate, "predict_s": predict_s, "measure_s": measure_s}
        out["candidates"].append(row)
        print(f"{pm.name:55s} predicted {pred.ms:8.2f} ms  measured {meas.median_ms:8.2f} ms "
              f"({row['error_pct']:+6.1f} %)  interpolated {pred.interpolated}/{pred.operators}  "
              f"predict {predict_s:.3f} s, measure {measure_s:.2f} s", flush=True)
        atomic_write(out_path, json.dumps(summary(out), indent=1))
    out = summary(out)
    atomic_write(out_path, json.dumps(out, indent=1))
    if out.get("n"):
        print(f"\n{out['n']} candidates: median |error| {out['median_error_pct']:.1f} %, 90th percentile "
              f"{out['p90_error_pct']:.1f} %, Kendall tau {out['kendall_tau']:.3f}; predicting took "
              f"{out['predict_s']:.1f} s, measuring {out['measure_s']:.1f} s ({out['speedup_total']:.0f}x in all, "
              f"median {out['speedup_median']:.0f}x per candidate); profile {prof.describe()}, made in "
              f"{prof.data['seconds']:.0f} s")


if __name__ == "__main__":
    main()
