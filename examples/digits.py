"""scikit-learn's bundled handwritten digits (real data, no download) and a small CNN for them.

Shared by the demo (``examples/digits_cnn.py``) and the benchmarks.

Example:
    >>> data = load_digits_split(seed=0)
    >>> data.train_x.shape, data.test_x.shape
    (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

__all__ = ["DigitsSplit", "load_digits_split", "DigitsCNN", "train", "accuracy"]


@dataclass(frozen=True)
class DigitsSplit:
    train_x: Tensor  # (N, 1, 8, 8), scaled to [0, 1]
    train_y: Tensor  # (N,)
    test_x: Tensor
    test_y: Tensor


def load_digits_split(seed: int = 0, test_size: float = 0.2) -> DigitsSplit:
    """1797 8x8 digits, stratified train/test split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=test_size, random_state=seed, stratify=digits.target)
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks (BatchNorm, ReLU, a residual add) and a two-layer head.

    ``width`` scales every layer; the dense "narrow" baseline is this model at a smaller width.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, 4 * width)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(4 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.stem(x)))  # (B, w, 8, 8)
        h = h + F.relu(self.bn2(self.conv2(h)))  # residual, (B, w, 8, 8)
        h = F.relu(self.bn3(self.conv3(h)))  # (B, 2w, 4, 4)
        h = self.dropout(F.relu(self.fc1(h.flatten(1))))  # (B, 4w)
        return self.fc2(h)


def train(model: nn.Module, data: DigitsSplit, epochs: int = 15, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam on mini-batches of 64 with a cosine schedule; returns ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data.train_y) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsSplit) -> float:
    """Test accuracy in eval mode."""
    model.eval()
    return float((model(data.test_x).argmax(1) == data.test_y).float().mean())
