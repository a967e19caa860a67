"""Scale: tall weights, batches of small matrices, and the matrix-product skew exponential.

One section of ``benchmarks/run.py`` gathering three tables, each from its own script
(which also runs alone and documents its method):

- ``tall.py``: ``orthogonal`` on an ``n x 64`` weight, ``n`` = 1000 to 32000: time of
  registration, forward and backward, and peak memory (linear in ``n``);
- ``skew_exp.py``: ``skew_matrix_exp(algorithm="matmul")`` against
  ``torch.linalg.matrix_exp``, ``n`` = 64 to 1024, and the orthogonal kernel of a
  ``Conv2d(256, 256, 3)`` (65,536 matrices of 3 x 3) against PyTorch's ``orthogonal``;
- ``cayley.py``: the Cayley map against PyTorch's, and one training step of an orthogonal
  ``Linear(n, n)`` against POGO, when ``pogo-torch`` is installed (the ``bench`` extra).

    python benchmarks/scale.py            # the full tables (several minutes)
    python benchmarks/scale.py --quick    # smaller sizes
    python benchmarks/scale.py --device cuda    # the same tables on a GPU
"""

from __future__ import annotations

import argparse
import importlib

import torch
from _timing import header

PARTS = ("tall", "skew_exp", "cayley")


def run(quick: bool = False, device: str = "cpu") -> str:
    """The tables of the scale section, in markdown; a part whose script is absent is skipped."""
    sections = ["### Scale"]
    for part in PARTS:
        try:
            module = importlib.import_module(part)
        except ModuleNotFoundError as error:
            if error.name != part:
                raise
            continue
        sections.append(module.table(module.rows(quick, device)))
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(header())
    print()
    print(run(args.quick, args.device))


if __name__ == "__main__":
    main()
