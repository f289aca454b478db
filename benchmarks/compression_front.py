"""The compression front from a trained checkpoint: today's space against the sensitivity space.

Both spaces get the same number of candidates, each evaluated as ``recommend --checkpoint`` does
(inherit the trained weights, compress, the protocol's recovery fine-tune with distillation,
evaluate, measure size and CPU latency at batch 1):

- ``uniform`` (today): structured channel pruning at one ratio for the whole model (L1), then
  fp32 or whole-model int8-static;
- ``sensitivity``: the same ratios allocated per dependency group by the trained model's pruning
  sensitivity, channel counts rounded to multiples of 8, then int8-static for the whole model or
  with the ``keep_float`` most int8-sensitive layers left in float (two variants per ratio, as
  ``uniform`` has: int8 was smaller than fp32 at every ratio measured, and a kept float layer
  costs latency, so the pair spans the size and the latency side).

QAT is left out of both so that every candidate has the same recovery budget (QAT adds its own
fine-tune steps; ``benchmarks/int8_accuracy.py`` measures it apart). For each max drop the
smallest size (MB) and the lowest latency (ms) among the candidates within it are printed side by
side, with their ratio, and written to ``--out`` (keys per dataset and tolerance: ``size_mb``,
``latency_ms``, ``candidates`` for ``uniform`` and ``sensitivity``).

    python benchmarks/compression_front.py --checkpoint CKPT.pt --dataset digits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_evaluator import add_checkpoint_args, checkpoint_evaluator  # noqa: E402

from recommender.constraints import MaxDrop  # noqa: E402
from recommender.recipe import Recipe  # noqa: E402

#: Pruning ratios each space is evaluated at, and the quantization variants after each.
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
KEEP_FLOAT = 2


def spaces(ratios: tuple[float, ...], keep_float: int) -> dict[str, list[tuple[str, dict]]]:
    """(label, recipe dict) per space; the same count in each."""
    out: dict[str, list[tuple[str, dict]]] = {"uniform": [], "sensitivity": []}
    for r in ratios:
        p = int(round(100 * r))
        uni = {"method": "structured-channel", "sparsity": r}
        sen = {**uni, "allocation": "sensitivity", "round_to": 8}
        out["uniform"] += [(f"uniform-{p}-fp32", {"prune": uni}),
                           (f"uniform-{p}-int8", {"prune": uni, "quant": {"scheme": "int8-static", "observer": "minmax"}})]
        out["sensitivity"] += [(f"sens-{p}-int8", {"prune": sen, "quant": {"scheme": "int8-static",
                                                                           "observer": "minmax"}}),
                               (f"sens-{p}-int8-keep{keep_float}",
                                {"prune": sen, "quant": {"scheme": "int8-static", "observer": "minmax",
                                                         "keep_float": keep_float}})]
    return out


def best(rows: list[dict], tol_pp: float, key: str) -> dict | None:
    """The row with the lowest ``key`` among those whose drop is within ``tol_pp``."""
    ok = [r for r in rows if r["ok"] and r["drop_pp"] is not None and r["drop_pp"] <= tol_pp + 1e-9]
    return min(ok, key=lambda r: r[key]) if ok else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, "benchmarks/results/compression-front.json")
    ap.add_argument("--tolerances", default="1,2", help="max drops in pp")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="pruning ratios of both spaces")
    ap.add_argument("--keep-float", type=int, default=KEEP_FLOAT, help="layers int8 keeps in float (sensitivity space)")
    args = ap.parse_args(argv)

    data, protocol, ev = checkpoint_evaluator(args, latency=True)
    base = ev.evaluate_baseline()
    tol = MaxDrop(2.0)
    print(f"baseline {100 * base.accuracy:.2f}% {base.costs['size_mb']:.2f} MB {base.costs['latency_ms']:.1f} ms",
          flush=True)
    t0 = time.perf_counter()
    ev.prune_sensitivity()
    sens_s = time.perf_counter() - t0

    out_path = Path(args.out)
    result: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    rows: dict[str, list[dict]] = {}
    for space, cands in spaces(tuple(float(r) for r in args.ratios.split(",")), args.keep_float).items():
        rows[space] = []
        for label, d in cands:
            t1 = time.perf_counter()
            e = ev.evaluate(Recipe.from_dict(d), base, tol)
            row = {"label": label, "recipe": d, "ok": e.ok, "reason": e.reason,
                   "accuracy": None if e.accuracy is None else 100 * e.accuracy, "drop_pp": e.drop_pp,
                   "drop_interval": [e.drop_low_pp, e.drop_high_pp], "size_mb": e.costs.get("size_mb"),
                   "latency_ms": e.costs.get("latency_ms"), "params": e.costs.get("params"),
                   "seconds": round(time.perf_counter() - t1, 1)}
            rows[space].append(row)
            acc = "failed" if row["accuracy"] is None else f"{row['accuracy']:.2f}% drop {row['drop_pp']:+.2f} pp"
            print(f"{space:12s} {label:22s} {acc}  {row['size_mb'] or 0:.2f} MB  {row['latency_ms'] or 0:.1f} ms  "
                  f"({row['seconds']} s)", flush=True)

    entry: dict = {"baseline": {"accuracy": 100 * base.accuracy, "size_mb": base.costs["size_mb"],
                                "latency_ms": base.costs["latency_ms"]},
                   "checkpoint": args.checkpoint, "protocol": protocol.fidelity,
                   "sensitivity_seconds": round(sens_s, 1), "rows": rows}
    print(f"\n{'max drop':>8s} | {'space':12s} | {'smallest MB':>12s} | {'lowest ms':>10s}")
    for t in (float(x) for x in args.tolerances.split(",")):
        key = f"{t:g}pp"
        entry[key] = {}
        for space in rows:
            bs, bl = best(rows[space], t, "size_mb"), best(rows[space], t, "latency_ms")
            entry[key][space] = {"size_mb": bs and bs["size_mb"], "size_label": bs and bs["label"],
                                 "latency_ms": bl and bl["latency_ms"], "latency_label": bl and bl["label"],
                                 "candidates": len(rows[space])}
            print(f"{key:>8s} | {space:12s} | {bs['size_mb'] if bs else float('nan'):12.2f} | "
                  f"{bl['latency_ms'] if bl else float('nan'):10.1f}")
        u, s = entry[key]["uniform"], entry[key]["sensitivity"]
        if u["size_mb"] and s["size_mb"] and u["latency_ms"] and s["latency_ms"]:
            entry[key]["size_ratio"] = u["size_mb"] / s["size_mb"]
            entry[key]["latency_ratio"] = u["latency_ms"] / s["latency_ms"]
            print(f"{key:>8s} | uniform/sensitivity: size {entry[key]['size_ratio']:.2f}x, "
                  f"latency {entry[key]['latency_ratio']:.2f}x (goal: 1.5x on either)")
    # keyed by the dataset's name, not its path on the machine that ran it
    folder = Path(args.dataset.split(":", 1)[-1])
    name = (folder.parent.name if folder.name in ("train", "val") else folder.name) \
        if args.dataset.startswith("imagefolder:") else args.dataset
    result[name or args.dataset] = {"dataset": args.dataset, "image_size": args.image_size, **entry}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"written {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
