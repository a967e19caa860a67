"""Small parametrizations that several test modules register: a one-to-one map with a right
inverse, a scaling to chain after it, and a many-to-one map."""

from __future__ import annotations

import torch
from torch import nn


class Symmetric(nn.Module):
    """Symmetric matrices from the upper triangle."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).mT

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu()


class Double(nn.Module):
    """``2 X``, exactly invertible."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return 2 * X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / 2


class UpperPlusLower(nn.Module):
    """Many-to-one: the weight is the sum of an upper and a strictly lower triangle."""

    def forward(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        return upper.triu() + lower.tril(-1)

    def right_inverse(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X.triu(), X.tril(-1)
