"""Small parametrizations that several test modules register: one-to-one maps with a right
inverse (one with a buffer, one that counts its calls), a scaling to chain after them, a
many-to-one map, and a negation and a counting identity to chain with constraints."""

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


class Normalized(nn.Module):
    """``X * norm``, with the norm a buffer of the parametrization that ``right_inverse`` sets."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("norm", torch.ones(()))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.norm

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        norm = X.norm()
        self.norm.copy_(norm)
        return X / norm


class CountingSymmetric(nn.Module):
    """Symmetric matrices from their upper triangle; counts how often it is evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return X.triu() + X.triu(1).mT

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu()


class Negated(nn.Module):
    """``-X``: exactly invertible, and it keeps every set symmetric under negation (orthogonal
    matrices among them), so that it can stand before or after a constraint in a chain."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return -X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return -X


class Counting(nn.Module):
    """The identity, counting how often it is evaluated: chained after another
    parametrization, it counts the evaluations of the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X
