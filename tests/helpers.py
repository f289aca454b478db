"""Small shared test fixtures: a tiny CNN that trains in a second, a slow one and a diverging one."""

import time

import torch
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
    """TinyCNN whose every forward pass in eval mode takes 0.3 s more: a trial (its evaluation)
    lasts long enough for a test to interrupt it mid-way."""

    delay_s = 0.3

    def forward(self, x):
        if not self.training:
            time.sleep(self.delay_s)
        return super().forward(x)


class DivergingCNN(TinyCNN):
    """TinyCNN with weights so large that its first training step overflows (a baseline whose
    training diverges)."""

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(1e30)
