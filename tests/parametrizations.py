"""Small parametrizations that several test modules register, defined once here.

One-to-one maps with a right inverse (symmetric and skew matrices, one with a buffer, one that
counts its calls), scalings to chain after them (fixed or learned), maps onto orthogonal
matrices (the Cayley transform, with a right inverse, and the matrix exponential, without),
many-to-one maps, a shape change, a negation and identities to chain with constraints, and a
map without right inverse. Where two behave differently (an identity that counts its calls and
one that does not), they have different names."""

from __future__ import annotations

import torch
from torch import nn


class Symmetric(nn.Module):
    """Symmetric matrices from the upper triangle."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).mT

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu()


class Skew(nn.Module):
    """Skew-symmetric matrices (batched over leading dimensions) from the strict upper part."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        upper = X.triu(1)
        return upper - upper.mT

    def right_inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A.triu(1)


class Tril(nn.Module):
    """The lower triangle; without right inverse, so assignment through it is not possible."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.tril()


class MatrixExp(nn.Module):
    """``exp(A)``; it has no right_inverse, so assignment through it is not possible."""

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(A)


class Cayley(nn.Module):
    """``Q = (I - A)^-1 (I + A)``, orthogonal for skew ``A``; right_inverse
    ``A = (Q + I)^-1 (Q - I)``."""

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return torch.linalg.solve(eye - A, eye + A)

    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        return torch.linalg.solve(Q + eye, Q - eye)


class Scale(nn.Module):
    """Multiplication by a fixed factor."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.factor

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / self.factor


class Double(Scale):
    """``2 X``, exactly invertible."""

    def __init__(self) -> None:
        super().__init__(2)


class LearnableScale(nn.Module):
    """Multiplication by a trained scalar: the parametrization has state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.scale

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / self.scale


class UpperPlusLower(nn.Module):
    """Many-to-one: the weight is the sum of an upper and a strictly lower triangle."""

    def forward(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        return upper.triu() + lower.tril(-1)

    def right_inverse(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X.triu(), X.tril(-1)


class Halves(nn.Module):
    """Many-to-one for tensors of any shape: the sum of two originals."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def right_inverse(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X / 2, X / 2


class Reshape(nn.Module):
    """Changes the shape (needs unsafe=True); right_inverse flattens back."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.reshape(self.shape)

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X.flatten()


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


class Identity(nn.Module):
    """Returns its input unchanged, with a right_inverse that does the same."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X


class StatefulDouble(nn.Module):
    """Doubles, and counts in buffers how often forward and right_inverse run (a stateful
    parametrization, like spectral norm's power iteration, depends on those counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("inverses", torch.zeros((), dtype=torch.long))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return X * 2

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        self.inverses += 1
        return X / 2
