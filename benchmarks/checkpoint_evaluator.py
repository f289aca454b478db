"""What the benchmarks that start from a trained checkpoint share: their command-line arguments
and the evaluator, set up as ``recommend --checkpoint`` runs the search rung (every rung at the
data's native size, the size the checkpoint was trained at)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.cache import WeightsCache  # noqa: E402
from recommender.data import load_dataset  # noqa: E402
from recommender.evaluation import Evaluator  # noqa: E402
from recommender.protocol import ProxyProtocol, get_protocol  # noqa: E402
from recommender.search.rungs import ladder  # noqa: E402


def add_checkpoint_args(ap: argparse.ArgumentParser, out: str) -> None:
    """--checkpoint, --dataset, --model, --fidelity, --threads, --image-size, --cache-dir and --out
    (default ``out``)."""
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--fidelity", default="proxy")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None,
                    help="px the images are decoded to, the size the checkpoint was trained at (as recommend --image-size)")
    ap.add_argument("--cache-dir", default="studies/cache")
    ap.add_argument("--out", default=out)


def checkpoint_evaluator(args: argparse.Namespace, *, latency: bool) -> tuple[Any, ProxyProtocol, Evaluator]:
    """(data, the search rung's protocol pinned to the data's native size, its evaluator from the
    checkpoint); sets torch's thread count when ``--threads`` is given (a benchmark's process)."""
    data = load_dataset(args.dataset, seed=0, image_size=args.image_size)
    search = get_protocol(args.fidelity, seed=0, threads=args.threads)
    protocol = ladder(search, data.native_resolution, "auto", pin_resolution=int(data.native_resolution))[0].protocol
    if args.threads:
        torch.set_num_threads(args.threads)
    ev = Evaluator(args.model, data, protocol, cache=WeightsCache(args.cache_dir), latency=latency,
                   checkpoint=args.checkpoint)
    return data, protocol, ev
