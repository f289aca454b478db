"""Reference trainings for the proxy-fidelity benchmark: each model trained long, once.

The proxy-fidelity benchmark (``benchmarks/proxy_fidelity.py``) compares the search's ranking of
candidates with their ranking under a reference protocol trained long enough to stand for "the
recipe trained properly". The reference trainings are the expensive half (hours on a 2-core CPU),
so they run here, once, resumable: every finished model is appended to a JSON file (accuracy,
per-image correctness on the validation split, seconds, protocol) and skipped on the next run.

    python benchmarks/fidelity_reference.py                       # baseline + presets 6..14
    python benchmarks/fidelity_reference.py --epochs 30 --models 10,13
    python benchmarks/fidelity_reference.py --dataset digits --out benchmarks/results/digits-reference.json
    python benchmarks/fidelity_reference.py --models struct30,unstruct59 --recovery-epochs 2   # pruned

Pruned candidates (``struct30``, ``struct50``, ``unstruct59``, ``unstruct80``) start from the
reference baseline's trained weights (train it first), are pruned, then fine-tuned for
``--recovery-epochs`` at the reference protocol (plain cross-entropy; the paper fine-tunes each
pruning round).

The reference protocol is the ``confirm`` fidelity (32 px native, crop + flip, Nesterov SGD with
OneCycle, zero-init residual BN) with ``--epochs`` epochs on the whole training split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.data import find_cifar10_mini, load_dataset  # noqa: E402
from recommender.evaluation import pack_bools  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.train import evaluate, seed_everything, train_model  # noqa: E402


PRUNED = {"struct30": ("structured-channel", 0.3), "struct50": ("structured-channel", 0.5),
          "unstruct59": ("unstructured-l1", 0.59), "unstruct80": ("unstructured-l1", 0.8)}


def _arch(name: str) -> str | None:
    if name in ("baseline", "1") or name in PRUNED:
        return None
    return name if not name.isdigit() else f"paper-resnet101-{name}"


def _pruned(name: str, base_weights: Path, args, data, protocol):
    """The reference baseline pruned as ``name`` says and fine-tuned (returns model, seconds)."""
    from recommender.compress.pipeline import compress
    from recommender.recipe import PruneConfig, Recipe
    from recommender.train import batches, finetune_fn

    net = build_model(args.model, None, num_classes=data.num_classes)
    net.load_state_dict(torch.load(base_weights, map_location="cpu", weights_only=True))
    method, s = PRUNED[name]
    steps = int(args.recovery_epochs * -(-data.n_train // protocol.batch_size))
    ft = protocol.replace(finetune_lr=args.recovery_lr)
    pruned, _ = compress(net, Recipe(prune=PruneConfig(method, s)), example_input=torch.randn(1, 3, 32, 32),
                         batches=list(batches(data, protocol, 2)), finetune=finetune_fn(data, ft),
                         finetune_steps=steps,
                         bn_images=[x for x, _ in batches(data, protocol, protocol.recovery_bn_batches)] or None)
    return pruned


def _device(protocol) -> str:
    """Where the run trained, in words (the execution fields are not in the protocol key)."""
    ex = protocol.execution()
    if ex.device == "cuda":
        return (f"{torch.cuda.get_device_name()} ({str(ex.amp_dtype).replace('torch.', '') if ex.amp_dtype else 'fp32'}"
                f"{', channels_last' if ex.channels_last else ''})")
    return f"cpu ({torch.get_num_threads()} threads)"


def _find(runs: dict, model: str, arch: str, protocol) -> dict | None:
    """A finished run of (model, arch) under the same protocol (compared field by field on what
    decides the result, so that a protocol field added later does not orphan old runs)."""
    want = protocol.to_dict()
    for run in runs.values():
        if run["model"] != model or run["arch"] != arch:
            continue
        have = run["protocol"]
        if all(have.get(k) == want.get(k) for k in ("fidelity", "train_size", "val_size", "resolution",
                                                     "max_resolution", "epochs", "batch_size", "lr",
                                                     "augment", "seed", "distill_alpha")):
            return run
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="6,7,8,9,10,11,12,13,14,baseline",
                    help="comma list: 'baseline', ResNet-101 variant numbers or preset names")
    ap.add_argument("--model", default="resnet101", help="base model")
    ap.add_argument("--dataset", default=None, help="default: imagefolder:cifar10-mini")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recovery-epochs", type=float, default=2.0, help="fine-tune epochs of pruned candidates")
    ap.add_argument("--recovery-lr", type=float, default=0.01, help="their fine-tune learning rate (constant)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None,
                    help="px the images are decoded to (as recommend --image-size); default: native")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<dataset>-reference.json)")
    ap.add_argument("--weights-dir", default="studies/reference", help="where trained weights are kept")
    args = ap.parse_args(argv)

    if args.dataset is None:
        root = find_cifar10_mini()
        if root is None:
            print("cifar10-mini not found; pass --dataset", file=sys.stderr)
            return 2
        args.dataset = f"imagefolder:{root}"
    ds_tag = "cifar10-mini" if "cifar10-mini" in args.dataset else args.dataset.split(":")[0]
    out = Path(args.out or f"benchmarks/results/{ds_tag}-reference.json")
    data = load_dataset(args.dataset, seed=args.seed, image_size=args.image_size)
    overrides = {"epochs": args.epochs, "seed": args.seed, "threads": args.threads}
    if args.lr:
        overrides["lr"] = args.lr
    protocol = get_protocol("confirm", **overrides)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results.setdefault("runs", {})
    results["dataset"] = data.describe()
    wdir = Path(args.weights_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        label = name if name in PRUNED else (_arch(name) or "baseline")
        key = f"{args.model}/{label}/{protocol.key()}"
        done = _find(results["runs"], args.model, label, protocol)
        if done is not None:
            print(f"{key}: done ({100 * done['accuracy']:.2f}%)", flush=True)
            continue
        seed_everything(args.seed)
        t0 = time.perf_counter()
        if name in PRUNED:
            base_key = next((k for k, r in results["runs"].items()
                             if r is _find(results["runs"], args.model, "baseline", protocol)), None)
            base_w = wdir / f"{args.model}-baseline-{base_key.split('/')[-1] if base_key else protocol.key()}.pt"
            if not base_w.exists():
                print(f"{name}: train the reference baseline first ({base_w} missing)", file=sys.stderr)
                continue
            net = _pruned(name, base_w, args, data, protocol)

            class _TR:  # the fine-tune's outcome in the fields the record keeps
                ok, reason, losses, images_per_s, final_loss = True, "", [], 0.0, float("nan")
            tr = _TR()
        else:
            net = build_model(args.model, _arch(name), num_classes=data.num_classes)
            tr = train_model(net, data, protocol)
        ev = evaluate(net, data, protocol)
        secs = time.perf_counter() - t0
        if name not in PRUNED:
            torch.save(net.state_dict(), wdir / f"{args.model}-{label}-{protocol.key()}.pt")
        results["runs"][key] = {
            "model": args.model, "arch": label, "name": label, "accuracy": ev.accuracy,
            "ci": [ev.ci_low, ev.ci_high], "n_val": ev.n, "correct": pack_bools(ev.correct),
            "seconds": round(secs, 1), "train": {"ok": tr.ok, "reason": tr.reason, "losses": tr.losses,
                                                 "images_per_s": tr.images_per_s},
            "protocol": protocol.to_dict(), "torch_threads": torch.get_num_threads(), "device": _device(protocol),
            **({"recovery_epochs": args.recovery_epochs, "recovery_lr": args.recovery_lr} if name in PRUNED else {})}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
        print(f"{key}: {100 * ev.accuracy:.2f}% [{100 * ev.ci_low:.1f}, {100 * ev.ci_high:.1f}] "
              f"in {secs:.0f} s ({tr.images_per_s:.1f} img/s, loss {tr.final_loss:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
