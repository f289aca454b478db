"""int8 accuracy of a trained network, side by side: observers, per-channel weights, mixed precision
(the k most int8-sensitive layers kept float) and quantization-aware fine-tuning (QAT).

From a trained checkpoint (default: ResNet-101 trained on digits with the stored reference
command, ``fidelity_reference.py --dataset digits --models baseline``), on the dataset's validation
split: each variant's accuracy, its drop against the float model (paired 95 % bootstrap interval),
its serialised size and size ratio, and its batch-1 CPU latency at the deploy size (all variants
timed in one interleaved loop, so background load hits them alike). Also the per-layer sensitivity
measurement itself: seconds of each method (simulated ``loss``, FX-isolated ``fx`` on every
``--fx-every``-th layer, ``weight-mse``), the rank agreement of ``loss`` and ``weight-mse`` with
``fx``, and keep_float k under the ``loss`` and the ``weight-mse`` rankings.

    python benchmarks/int8_accuracy.py --checkpoint studies/reference-digits/resnet101-baseline-confirm-8a66df28cd04.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recommender.compress import apply_quantization  # noqa: E402
from recommender.compress.quant_sensitivity import measure_quant_sensitivity  # noqa: E402
from recommender.compress.quantize import Int8StaticConfig  # noqa: E402
from recommender.data import load_dataset  # noqa: E402
from recommender.measure import size_mb  # noqa: E402
from recommender.models import build_model, get_family  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.stats import paired_drop  # noqa: E402
from recommender.train import batches, evaluate, finetune_fn, protocol_data, teacher_logits  # noqa: E402

try:
    from benchmarks.compression import _table, interleaved_latency  # noqa: E402
except ImportError:  # run as a script from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compression import _table, interleaved_latency  # noqa: E402


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="trained state dict of --model")
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--fidelity", default="proxy", help="protocol of calibration, recovery and evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--sensitivity-batches", type=int, default=4)
    ap.add_argument("--keep", default="1,2,4", help="keep_float values")
    ap.add_argument("--qat-epochs", default="1", help="QAT epochs to try (comma list)")
    ap.add_argument("--fx-every", type=int, default=4, help="FX-isolated reference on every n-th layer (0: off)")
    ap.add_argument("--observers", default="minmax,histogram,percentile,moving-average")
    ap.add_argument("--control", action="store_true",
                    help="also fine-tune the float model for each --qat-epochs (same steps, distillation and lr) and "
                         "quantize it after training: separates what QAT recovers from what the extra training adds")
    ap.add_argument("--only", default="", help="run only the variants whose label contains this text")
    ap.add_argument("--out", default="benchmarks/results/int8-accuracy.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    data = load_dataset(args.dataset)
    protocol = get_protocol(args.fidelity, threads=args.threads)
    model = build_model(args.model, None, num_classes=data.num_classes)
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    deploy = get_family(args.model).deploy_size(data.native_resolution)
    cal = list(batches(data, protocol, args.calibration_batches))
    base = evaluate(model, data, protocol)
    print(f"baseline {args.model} on {args.dataset}: "
          f"{base.accuracy:.2%} on {base.n} validation images; {protocol.describe()}", flush=True)

    # -- per-layer sensitivity ---------------------------------------------------------------
    sens_batches = list(batches(data, protocol, args.sensitivity_batches))
    keeps = [int(k) for k in args.keep.split(",") if k]
    sens = {m: measure_quant_sensitivity(model, sens_batches, method=m if keeps else "weight-mse", observer="minmax")
            for m in ("loss", "weight-mse")}
    for m, s in sens.items():
        print(f"  sensitivity {m}: {len(s.layers)} layers in {s.seconds:.1f} s; top 5 {s.ranking()[:5]}", flush=True)
    fx_info: dict = {}
    if args.fx_every:
        names = [layer.name for layer in sens["loss"].layers][:: args.fx_every]
        fx = measure_quant_sensitivity(model, sens_batches, method="fx", observer="minmax", layers=names)
        by = {k: {layer.name: layer for layer in s.layers} for k, s in sens.items()}
        ref = [layer.loss_delta for layer in fx.layers]
        fx_info = {
            "layers": len(names), "seconds": fx.seconds,
            "seconds_per_layer": fx.seconds / len(names),
            "loss_seconds_per_layer": sens["loss"].seconds / len(sens["loss"].layers),
            "spearman_loss_vs_fx": _spearman([by["loss"][n].loss_delta for n in names], ref),
            "spearman_weight_mse_vs_fx": _spearman([by["weight-mse"][n].weight_mse for n in names], ref),
            "max_abs_loss_diff": max(abs(by["loss"][n].loss_delta - r) for n, r in zip(names, ref)),
        }
        print(f"  fx-isolated reference on {len(names)} layers: {fx.seconds:.1f} s; {fx_info}", flush=True)

    # -- variants ----------------------------------------------------------------------------
    variants: list[tuple[str, Int8StaticConfig, tuple[str, ...] | None]] = []
    for obs in args.observers.split(","):
        variants.append((f"ptq {obs}", Int8StaticConfig(calibration_batches=args.calibration_batches,
                                                        observer=obs), None))
    variants.append(("ptq minmax per-tensor", Int8StaticConfig(calibration_batches=args.calibration_batches,
                                                               observer="minmax", per_channel=False), None))
    for k in keeps:
        for how in ("loss", "weight-mse"):
            variants.append((f"ptq minmax keep_float {k} ({how})",
                             Int8StaticConfig(calibration_batches=args.calibration_batches, observer="minmax",
                                              keep_float=k), sens[how].ranking()))
    qat_list = [float(e) for e in args.qat_epochs.split(",") if e]
    for e in qat_list:
        variants.append((f"qat {e:g} ep", Int8StaticConfig(calibration_batches=args.calibration_batches,
                                                           observer="minmax", qat_epochs=e), None))
    if keeps and qat_list:
        k = max(keeps)
        variants.append((f"qat {qat_list[0]:g} ep + keep_float {k}",
                         Int8StaticConfig(calibration_batches=args.calibration_batches, observer="minmax",
                                          qat_epochs=qat_list[0], keep_float=k), sens["loss"].ranking()))

    def header() -> dict:
        return {"model": args.model, "checkpoint": Path(args.checkpoint).name, "dataset": args.dataset,
                "protocol": protocol.describe(), "validation_images": base.n, "baseline_accuracy": base.accuracy,
                "fp32_size_mb": size_mb(model), "deploy_px": deploy, "threads": args.threads,
                "latency_threads": args.latency_threads, "torch": torch.__version__, "command": " ".join(sys.argv)}

    sens_summary = {m: {"seconds": s.seconds, "layers": len(s.layers), "top10": list(s.ranking()[:10])}
                    for m, s in sens.items()}
    if args.control:
        for e in qat_list:
            variants.append((f"control: fp32 fine-tune {e:g} ep, then ptq minmax",
                             Int8StaticConfig(calibration_batches=args.calibration_batches, observer="minmax"), e))
    variants = [v for v in variants if args.only in v[0]]
    teacher = teacher_logits(model, data, protocol) if qat_list and protocol.recovery_distill_alpha > 0 else None
    spe = -(-protocol_data(data, protocol).n_train // protocol.batch_size)
    rows, results, models = [], [], []
    s0 = size_mb(model)
    for label, cfg, ranking in variants:
        t0 = time.perf_counter()
        ft = finetune_fn(data, protocol, teacher) if cfg.qat_epochs or label.startswith("control") else None
        src, extra = model, {}
        if label.startswith("control"):  # ``ranking`` holds the epochs: the float model fine-tuned as QAT is
            import copy

            src = copy.deepcopy(model)
            ft(src, max(1, -(-int(ranking * spe * 1000) // 1000)))
            src.eval()
            fev = evaluate(src, data, protocol)
            extra = {"float_finetuned_accuracy": fev.accuracy,
                     "float_finetuned_drop_pp": paired_drop(base.correct, fev.correct).drop_pp}
            print(f"  {label}: the fine-tuned float model {fev.accuracy:.2%}", flush=True)
            ranking = None
        q, rep = apply_quantization(src, cfg, calibration=cal, ranking=ranking, finetune=ft, steps_per_epoch=spe)
        seconds = time.perf_counter() - t0
        ev = evaluate(q, data, protocol)
        d = paired_drop(base.correct, ev.correct)
        s1 = size_mb(q)
        kept = [n for n, r in rep.float_modules.items() if "keep_float" in r]
        results.append({"variant": label, "config": cfg.to_dict(), "accuracy": ev.accuracy, "drop_pp": d.drop_pp,
                        "drop_ci_pp": [d.ci_low_pp, d.ci_high_pp], "size_mb": s1, "size_ratio": s0 / s1,
                        "seconds": seconds, "qat_steps": rep.qat_steps, "mode": rep.mode, "kept_float": kept,
                        "note": rep.note, **extra})
        models.append(q)
        print(f"  {label}: {ev.accuracy:.2%} (drop {d.drop_pp:+.2f} pp), {s1:.2f} MB, {seconds:.0f} s", flush=True)
        _write(args.out, {**header(), "sensitivity": sens_summary, "fx_reference": fx_info, "variants": results,
                          "partial": "latency not measured yet"})

    lat = interleaved_latency([model] + models, args.latency_threads, args.repeats, size=deploy)
    for r, ms in zip(results, lat[1:]):
        r["latency_ms"] = ms
        rows.append((r["variant"], f"{r['accuracy']:.2%}", f"{r['drop_pp']:+.2f} [{r['drop_ci_pp'][0]:+.2f}, "
                     f"{r['drop_ci_pp'][1]:+.2f}]", f"{r['size_mb']:.2f}", f"{r['size_ratio']:.2f}x", f"{ms:.2f}",
                     f"{r['seconds']:.0f}", ", ".join(r["kept_float"])[:60] or "-"))
    rows.insert(0, ("fp32", f"{base.accuracy:.2%}", "0", f"{s0:.2f}", "1.00x", f"{lat[0]:.2f}", "-", "-"))
    _table(f"{args.model} int8 from {Path(args.checkpoint).name}, {base.n} validation images "
           f"(1 image = {100 / base.n:.2f} pp); latency batch 1, {deploy} px, {args.latency_threads} thread(s), "
           f"median of {args.repeats}",
           ["variant", "accuracy", "drop pp [95% CI]", "MB", "size ratio", "ms", "s to build", "kept float"], rows)
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s on torch {torch.__version__}")
    out = {**header(), "fp32_latency_ms": lat[0], "sensitivity": sens_summary, "fx_reference": fx_info,
           "variants": results, "seconds": total}
    _write(args.out, out)
    print(f"wrote {args.out}")


def _write(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


if __name__ == "__main__":
    main()
