"""Fit a Gaussian's covariance matrix by maximum likelihood, kept positive definite.

Draws samples from a 6-dimensional Gaussian with a known, badly conditioned covariance, then
fits the mean and the covariance by gradient descent on the negative log-likelihood. The
covariance is a parameter constrained by ``tether.positive_definite``, so every iterate is a
valid covariance (``torch.distributions.MultivariateNormal`` would raise on one that is not)
and no step needs a projection. The result is compared with the closed-form maximum
likelihood estimate, the sample covariance. Run it with ``python examples/spd_covariance.py``;
``--quick`` runs fewer steps.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

import tether


class Gaussian(nn.Module):
    """A Gaussian with a trainable mean and a positive definite covariance."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))
        self.covariance = nn.Parameter(torch.eye(dim))
        tether.positive_definite(self, "covariance")

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood of the rows of ``x``."""
        return -MultivariateNormal(self.mean, self.covariance).log_prob(x).mean()


def true_covariance(dim: int, generator: torch.Generator) -> Tensor:
    """A random covariance with eigenvalues from 0.05 to 5 (condition number 100)."""
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=generator)).Q
    eigenvalues = torch.logspace(-1.3, 0.7, dim)
    return Q @ torch.diag(eigenvalues) @ Q.T


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, in a second or two")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 400

    generator = torch.Generator().manual_seed(0)
    dim = 6
    sigma = true_covariance(dim, generator)
    mu = torch.randn(dim, generator=generator)
    x = mu + torch.randn(2000, dim, generator=generator) @ torch.linalg.cholesky(sigma).T

    torch.manual_seed(0)
    model = Gaussian(dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    always = True  # positive definite at every step?
    for step in range(steps):
        optimizer.zero_grad()
        loss = model.nll(x)
        loss.backward()
        optimizer.step()
        smallest = torch.linalg.eigvalsh(model.covariance.detach()).min().item()
        always = always and smallest > 0
        if step % (steps // 5) == 0:
            print(f"step {step:>4}: nll {loss.item():.4f}, smallest eigenvalue {smallest:.4f}")

    fitted = model.covariance.detach()
    sample = torch.cov(x.T, correction=0)  # the maximum likelihood estimate
    gap = (torch.linalg.matrix_norm(fitted - sample) / torch.linalg.matrix_norm(sample)).item()
    error = (torch.linalg.matrix_norm(fitted - sigma) / torch.linalg.matrix_norm(sigma)).item()
    eigenvalues = torch.linalg.eigvalsh(fitted)
    print(f"\nfitted covariance: eigenvalues {eigenvalues.min():.3f} to {eigenvalues.max():.3f}")
    print(f"relative distance to the sample covariance (the exact optimum): {gap:.4f}")
    print(f"relative distance to the true covariance: {error:.4f}")
    print(f"positive definite at every step: {always}")
    return gap


if __name__ == "__main__":
    main()
