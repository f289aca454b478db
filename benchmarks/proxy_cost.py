"""What one proxy epoch costs: training and evaluation throughput of the ResNet-101 baseline and
paper presets on digits and cifar10-mini at several input resolutions, measured in one run.

    python benchmarks/proxy_cost.py                       # resnet101 baseline, presets 11 and 13
    python benchmarks/proxy_cost.py --steps 2 --resolutions 8,16,32 --threads 2

Each cell trains ``--steps`` SGD steps (after one warm-up step) at ``--batch-size`` on real
batches of the dataset (normalised, resized, no augmentation) and evaluates ``--eval-images``
images; seconds per epoch = training images of the dataset / training images per second.
Timings share the CPU with whatever else runs: note the load average printed at the top.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.data import find_cifar10_mini, load_dataset  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.train import seed_everything, zero_init_residual  # noqa: E402




def measure(model, data, res: int, batch_size: int, steps: int, eval_images: int):
    gen = torch.Generator().manual_seed(0)
    it = data.train_batches(batch_size, res, generator=gen, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()
    t = 0.0
    for i in range(steps + 1):
        try:
            x, y = next(it)
        except StopIteration:
            it = data.train_batches(batch_size, res, generator=gen, drop_last=True)
            x, y = next(it)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # step 0 is warm-up
            t += time.perf_counter() - t0
    train_ips = steps * batch_size / t
    model.eval()
    n = min(eval_images, data.n_val)
    with torch.no_grad():
        xs = list(data.val_batches(256, res))
        model(xs[0][0][:8])  # warm-up
        t0 = time.perf_counter()
        seen = 0
        for x, _ in xs:
            model(x)
            seen += x.shape[0]
            if seen >= n:
                break
        eval_ips = seen / (time.perf_counter() - t0)
    return train_ips, eval_ips


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet101,paper-resnet101-11,paper-resnet101-13",
                    help="comma list: 'resnet101' (baseline) or preset names")
    ap.add_argument("--datasets", default="digits,cifar10-mini")
    ap.add_argument("--resolutions", default="8,16,32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f} (other processes share the cores), batch {args.batch_size}, "
          f"{args.steps} timed steps per cell")
    datasets = {}
    for name in args.datasets.split(","):
        if name == "cifar10-mini":
            root = find_cifar10_mini()
            if root is None:
                print("cifar10-mini not found: skipped")
                continue
            datasets[name] = load_dataset(f"imagefolder:{root}")
        else:
            datasets[name] = load_dataset(name)
    rows = []
    header = (f"{'model':<20} {'dataset':<13} {'px':>3} {'train img/s':>11} {'s/epoch':>8} "
              f"{'eval img/s':>10} {'params':>10}")
    print(header)
    print("-" * len(header))
    for spec in args.models.split(","):
        arch = None if spec == "resnet101" else spec
        for dname, data in datasets.items():
            for res in [int(r) for r in args.resolutions.split(",")]:
                seed_everything(0)
                model = build_model("resnet101", arch, num_classes=data.num_classes)
                zero_init_residual(model)
                params = sum(p.numel() for p in model.parameters())
                tr, ev = measure(model, data, res, args.batch_size, args.steps, args.eval_images)
                spe = data.n_train / tr
                rows.append((spec, dname, res, tr, spe, ev))
                print(f"{spec:<20} {dname:<13} {res:>3} {tr:>11.1f} {spe:>8.1f} {ev:>10.1f} "
                      f"{params:>10,}", flush=True)
    print(f"\nepoch = all training images of the dataset "
          + ", ".join(f"{k}: {v.n_train}" for k, v in datasets.items())
          + f"; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
