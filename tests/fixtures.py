"""A user's own network, importable as ``--model tests.fixtures:make_net`` (run from the repo root)."""

from torch import nn


class SmallNet(nn.Module):
    """A plain CNN as a user would write it (not one of the registered families)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make_net(num_classes: int = 10) -> nn.Module:
    """The factory ``--model tests.fixtures:make_net`` calls (with the dataset's class count)."""
    return SmallNet(num_classes)
