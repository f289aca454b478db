"""Peak memory of an image folder held in memory vs streamed, side by side.

    python benchmarks/data_memory.py                       # 3,000 JPEGs of 256 x 256 px
    python benchmarks/data_memory.py --images 1000 --image-size 128 --workers 2

A folder of ``--images`` JPEGs (``--source-size`` px squares: cifar10-mini images upscaled, or
synthetic ones without it) is written to a temporary directory, then each storage is measured in
its own fresh Python process: ``load_dataset("imagefolder:...", image_size=N, in_memory=...)``
followed by one augmented training epoch (``train_batches``, batch 64) and one pass over the
validation split (batch 64), as a training at that size would read them. Reported per storage:
the main process's RSS after the imports, the growth of its peak RSS over that after the load
and after the epoch (the peak mark is reset after the imports through ``/proc/self/clear_refs``;
elsewhere ``resource.getrusage``), the largest DataLoader worker's peak RSS (forked workers share the parent's pages copy-on-write, so
this overstates what they add), and the seconds to load and to read one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from recommender.data import load_dataset
    import torchvision.transforms.v2, PIL.Image
    torch.set_num_threads({threads})

    def status(key):  # MB, from /proc/self/status (Linux)
        text = open("/proc/self/status").read()
        return int(text.split(key + ":")[1].split()[0]) / 1024

    try:  # reset the peak-RSS mark (VmHWM): the imports' own transient peak is not counted
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak_of = status("VmRSS"), lambda: status("VmHWM")
    except OSError:  # not Linux: the process's peak since it started
        maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        base, peak_of = maxrss(), maxrss
    t0 = time.perf_counter()
    d = load_dataset("imagefolder:{folder}", image_size={size}, in_memory={in_memory},
                     num_workers={workers})
    t1 = time.perf_counter()
    after_load = peak_of() - base
    g = torch.Generator().manual_seed(0)
    n = 0
    for x, y in d.train_batches(64, augment=True, generator=g):
        n += x.shape[0]
    for x, y in d.val_batches(64):
        n += x.shape[0]
    t2 = time.perf_counter()
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({{"storage": d.storage, "grown_mb": peak_of() - base, "load_mb": after_load,
                      "base_mb": base, "worker_mb": child, "load_s": t1 - t0,
                      "epoch_s": t2 - t1, "images": n, "identity": d.identity}}))
""")


def make_folder(folder: Path, images: int, size: int) -> None:
    from PIL import Image

    from recommender.data import find_cifar10_mini

    src = find_cifar10_mini()
    files = sorted(src.glob("*/*.png")) if src else []
    rng = np.random.default_rng(0)
    for i in range(images):
        if files:
            path = files[(i * 7919) % len(files)]  # a prime stride mixes the classes
            cls = path.parent.name
            im = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        else:
            cls = f"class{i % 10}"
            ramp = np.linspace(0, 255, size, dtype=np.float32)
            img = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
            im = Image.fromarray(img.astype(np.uint8))
        (folder / cls).mkdir(parents=True, exist_ok=True)
        im.save(folder / cls / f"{i:05d}.jpg", quality=90)


def run(folder: Path, size: int, in_memory: bool, workers: int, threads: int) -> dict:
    code = CHILD.format(folder=folder, size=size, in_memory=in_memory, workers=workers,
                        threads=threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--source-size", type=int, default=256, help="px side of the JPEGs written")
    ap.add_argument("--image-size", type=int, default=256, help="px side they are decoded to")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of both storages")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", help="write the images here and keep them (default: a temporary "
                                     "directory); an existing folder is reused as it is")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "images"
        if not folder.exists():
            make_folder(folder, args.images, args.source_size)
        mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
        decoded = args.images * 3 * args.image_size ** 2 / 2**20
        print(f"{args.images} JPEGs of {args.source_size} px ({mb:.0f} MB on disk), decoded at "
              f"{args.image_size} px: {decoded:.0f} MB of uint8; {args.workers} workers, "
              f"load average {os.getloadavg()[0]:.2f}")
        rows = [run(folder, args.image_size, mode, args.workers, args.threads)
                for mode in (True, False)]
    assert rows[0]["identity"] == rows[1]["identity"], "both storages must be the same data"
    head = (f"{'storage':<10} {'RSS after imports MB':>20} {'peak growth: load':>17} "
            f"{'+ epoch MB':>10} {'largest worker MB':>17} {'load s':>7} {'epoch s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        name = "in memory" if r["storage"] == "memory" else "streamed"
        print(f"{name:<10} {r['base_mb']:>20.0f} {r['load_mb']:>17.0f} {r['grown_mb']:>10.0f} "
              f"{r['worker_mb']:>17.0f} {r['load_s']:>7.1f} {r['epoch_s']:>8.1f}")
    print(f"(both storages give the same data: identity {rows[0]['identity']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
