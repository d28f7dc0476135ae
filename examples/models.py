"""Small models the command-line tool and the docs load by module path.

``npas-fx plan examples.models:small_cnn --budget 0.1 --input-shape 1,3,32,32`` builds
:func:`small_cnn` with no arguments, so every factory here has defaults for all of its arguments.

Example:
    >>> import torch
    >>> small_cnn()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["small_cnn", "block_stack"]


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A VGG-style CNN for 3x32x32 images: two stages of identical 3x3 convolutions, then a classifier.

    Identical shapes repeat (``shape`` sharing has something to share) and the stem, the stage
    transition and the classifier have shapes of their own.
    """
    return nn.Sequential(
        _conv(3, width),
        _conv(width, width),
        _conv(width, width),
        _conv(width, 2 * width, stride=2),
        _conv(2 * width, 2 * width),
        _conv(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )


class _Block(nn.Module):
    """A pre-norm residual MLP block (the feed-forward half of a transformer layer)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, dim) -> (B, dim)
        return x + self.down(self.up(self.norm(x)).relu())


class _BlockStack(nn.Module):
    def __init__(self, depth: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def block_stack(depth: int = 12, dim: int = 16, num_classes: int = 10) -> nn.Module:
    """``depth`` identical residual MLP blocks between an input and an output layer (2*depth+2 weights).

    Example:
        >>> import torch
        >>> block_stack(depth=3)(torch.zeros(1, 16)).shape
        torch.Size([1, 10])
    """
    return _BlockStack(depth, dim, num_classes)
