"""Small shared test fixtures: a tiny CNN that trains in a second, a slow one and a diverging one;
an ImageFolder of random images."""

import os
import signal
import time
from pathlib import Path

import numpy as np
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class SlowCNN(TinyCNN):
    """TinyCNN whose every forward pass in eval mode takes ``RECOMMENDER_TEST_SLOW_S`` seconds
    more (default 0): a trial (its evaluation) lasts long enough for a test to interrupt it."""

    def forward(self, x):
        if not self.training:
            time.sleep(float(os.environ.get("RECOMMENDER_TEST_SLOW_S", "0")))
        return super().forward(x)


class DivergingCNN(TinyCNN):
    """TinyCNN whose logits overflow float32 while training (a baseline whose training
    diverges: the loss is not finite)."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1e38 if self.training else out


def step_space(family: str) -> str:
    """A search space of one architecture, no pruning (sparsity 0) and fp32, whose free continuous
    dimension ``prune.step`` makes every candidate distinct: replayed or lockstep proposals show."""
    return f"""\
family: {family}
description: one architecture, no pruning, fp32; prune.step is a free continuous dimension
arch: {{}}
prune:
  method: {{choices: [unstructured-l1]}}
  sparsity: {{value: 0.0}}
  step: {{low: 0.05, high: 0.95}}
quant:
  scheme: {{choices: [fp32]}}
warm_start: []
"""


def interruptible_child() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: restore the default action.
    A test run started in the background of a non-interactive shell inherits SIGINT *ignored*
    (POSIX), and a Python started that way installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def random_image(rng, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, classes: int = 3, per_class: int = 12, size=(20, 20), fmt="png",
                seed: int = 0) -> Path:
    """An ImageFolder of random images: ``classes`` folders of ``per_class`` images of ``size``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_image(rng, size).save(d / f"img{i:03d}.{fmt}")
    return root
