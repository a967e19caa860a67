"""The skew exponential's fast paths against PyTorch: the matrix-product path against
``torch.linalg.matrix_exp``, and the closed forms in ``tether.orthogonal`` on a convolution.

The first table times forward + backward of ``skew_matrix_exp(A, algorithm="matmul")`` (and
``"eigh"`` on a CPU) against ``torch.linalg.matrix_exp`` on one float32 ``n x n`` skew matrix
of 2-norm 3 (a weight some way from its base point, as in training), interleaved; the
error is ``max |QᵀQ - I|``. The second times one read of the weight of a
``Conv2d(256, 256, 3)`` plus a backward pass through it (65,536 matrices of 3 x 3) with
``tether.orthogonal`` and ``torch.nn.utils.parametrizations.orthogonal``, both originals set
to the same point.

    python benchmarks/skew_exp.py                  # n = 64, 128, 256, 512, 1024 (minutes)
    python benchmarks/skew_exp.py --quick          # n = 64, 256
    python benchmarks/skew_exp.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import cast

import _timing
import torch
from _timing import header, measure, median, ms, paired_ratio, ratio
from torch import nn
from torch.nn.utils import parametrizations

import tether
from tether.functional import skew_matrix_exp

SIZES = (64, 128, 256, 512, 1024)
QUICK_SIZES = (64, 256)
# The speedups asked of the products over torch.linalg.matrix_exp at n = 512 (on a CPU), and
# of tether.orthogonal over PyTorch's on the convolution.
MATMUL_GOAL = 2.5
CONV_GOAL = 10.0

Row = dict[str, object]


def _number(value: object) -> float:
    """A number of a row (rows hold numbers, names and None)."""
    return float(cast(float, value))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.detach().double()
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return (Q.mT @ Q - eye).abs().max().item()


def _exp_step(
    function: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor, G: torch.Tensor
) -> Callable[[], None]:
    leaf = A.clone().requires_grad_()

    def step() -> None:
        leaf.grad = None
        (function(leaf) * G).sum().backward()

    return step


def _exp_rows(sizes: Sequence[int], quick: bool, device: str) -> list[Row]:
    generator = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for n in sizes:
        X = torch.randn(n, n, generator=generator)
        A = X - X.mT
        A = (A * (3.0 / torch.linalg.matrix_norm(A, 2))).to(device)
        G = torch.randn(n, n, generator=generator).to(device)
        functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "torch": torch.linalg.matrix_exp,
            "matmul": lambda X: skew_matrix_exp(X, algorithm="matmul"),
        }
        if device == "cpu":
            functions["eigh"] = lambda X: skew_matrix_exp(X, algorithm="eigh")
        steps = {name: _exp_step(f, A, G) for name, f in functions.items()}
        large = n >= 512
        min_run_time = (0.2 if quick else 0.6) * (2.0 if large else 1.0)
        times = measure(steps, min_run_time, rounds=2 if quick or large else 3)
        _sync(device)
        with torch.no_grad():
            errors = {name: _orthogonality_error(f(A)) for name, f in functions.items()}
        row: Row = {
            "n": n,
            "torch_ms": median(times["torch"]) * 1e3,
            "matmul_ms": median(times["matmul"]) * 1e3,
            "eigh_ms": median(times["eigh"]) * 1e3 if "eigh" in times else None,
            "speedup": paired_ratio(times["torch"], times["matmul"]),
            "torch_error": errors["torch"],
            "matmul_error": errors["matmul"],
        }
        rows.append(row)
    return rows


def _conv_layer(library: str, original: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(256, 256, 3, bias=False, device=original.device)
    register = tether.orthogonal if library == "tether" else parametrizations.orthogonal
    register(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(original)
    return conv


def _conv_rows(quick: bool, device: str) -> list[Row]:
    generator = torch.Generator().manual_seed(1)
    # Angles of order 1 in each kernel: some way from the base point.
    original = (0.5 * torch.randn(256, 256, 3, 3, generator=generator)).to(device)
    cotangent = torch.randn(256, 256, 3, 3, generator=generator).to(device)
    layers = {library: _conv_layer(library, original) for library in ("torch", "tether")}

    def step(conv: nn.Conv2d) -> Callable[[], None]:
        def run() -> None:
            conv.zero_grad(set_to_none=True)
            (conv.weight * cotangent).sum().backward()

        return run

    times = measure({name: step(conv) for name, conv in layers.items()}, 1.0 if quick else 3.0)
    with torch.no_grad():
        errors = {name: _orthogonality_error(conv.weight) for name, conv in layers.items()}
    return [
        {
            "case": "Conv2d(256, 256, 3)",
            "torch_ms": median(times["torch"]) * 1e3,
            "tether_ms": median(times["tether"]) * 1e3,
            "speedup": paired_ratio(times["torch"], times["tether"]),
            "torch_error": errors["torch"],
            "tether_error": errors["tether"],
        }
    ]


def rows(quick: bool, device: str = "cpu") -> list[Row]:
    """One row per size of the matrix-product table (keys ``n``, ``torch_ms``, ``matmul_ms``,
    ``eigh_ms`` (None off the CPU), ``speedup`` = torch time / matmul time, ``torch_error``,
    ``matmul_error``), then one for the convolution (keys ``case``, ``torch_ms``,
    ``tether_ms``, ``speedup``, ``torch_error``, ``tether_error``)."""
    return [
        *_exp_rows(QUICK_SIZES if quick else SIZES, quick, device),
        *_conv_rows(quick, device),
    ]


def table(rows: Sequence[Row]) -> str:
    """The rows as two markdown tables, followed by the targets."""
    exp_rows = [row for row in rows if "n" in row]
    conv_rows = [row for row in rows if "case" in row]
    with_eigh = any(row["eigh_ms"] is not None for row in exp_rows)
    columns = ["n", "torch (ms)", "matmul (ms)", *(["eigh (ms)"] if with_eigh else [])]
    columns += ["speedup", "torch error", "matmul error"]
    body = [
        [
            row["n"],
            ms(_number(row["torch_ms"]) / 1e3),
            ms(_number(row["matmul_ms"]) / 1e3),
            *([ms(_number(row["eigh_ms"]) / 1e3)] if with_eigh else []),
            ratio(_number(row["speedup"])),
            f"{row['torch_error']:.1e}",
            f"{row['matmul_error']:.1e}",
        ]
        for row in exp_rows
    ]
    conv_columns = ["weight", "torch (ms)", "tether (ms)", "speedup", "torch error", "tether error"]
    conv_body = [
        [
            row["case"],
            ms(_number(row["torch_ms"]) / 1e3),
            ms(_number(row["tether_ms"]) / 1e3),
            ratio(_number(row["speedup"])),
            f"{row['torch_error']:.1e}",
            f"{row['tether_error']:.1e}",
        ]
        for row in conv_rows
    ]
    targets = [
        f"- products at n = {row['n']}: {_number(row['speedup']):.2f}x "
        f"(target {MATMUL_GOAL}x on a CPU): "
        f"{'met' if _number(row['speedup']) >= MATMUL_GOAL else 'missed'}"
        for row in exp_rows
        if row["n"] == 512
    ]
    targets += [
        f"- {row['case']}: {_number(row['speedup']):.2f}x (target {CONV_GOAL}x): "
        f"{'met' if _number(row['speedup']) >= CONV_GOAL else 'missed'}"
        for row in conv_rows
    ]
    return "\n\n".join(
        [
            "### Skew exponential: matrix products against torch.linalg.matrix_exp",
            _timing.table(columns, body),
            "Forward + backward of one float32 n x n skew matrix of 2-norm 3; speedup = torch "
            "time / matmul time; error = max |QᵀQ - I|.",
            "### Orthogonal convolution kernels: tether against PyTorch",
            _timing.table(conv_columns, conv_body),
            "One read of the weight and a backward pass (65,536 matrices of 3 x 3).",
            "\n".join(targets),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, n = 64 and 256")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header())
    print()
    print(table(rows(args.quick, args.device)))


if __name__ == "__main__":
    main()
