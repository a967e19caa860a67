"""The cost of the mechanism itself: reading ``layer.weight`` through an identity
parametrization, and a small ``Linear`` forward and backward, against a plain layer."""

from __future__ import annotations

import torch
import torch.nn.utils.parametrize as torch_parametrize
from _timing import measure, paired_ratio, rows, table, target, us
from torch import nn

import tether

FEATURES = 16
BATCH = 32


class Identity(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X


def layers() -> dict[str, nn.Linear]:
    return {
        "plain": nn.Linear(FEATURES, FEATURES),
        "tether": tether.register_parametrization(
            nn.Linear(FEATURES, FEATURES), "weight", Identity()
        ),
        "torch": torch_parametrize.register_parametrization(
            nn.Linear(FEATURES, FEATURES), "weight", Identity()
        ),
    }


def run(quick: bool = False) -> str:
    min_run_time, rounds = (0.9, 6) if quick else (3.0, 20)
    layer = layers()
    env = {"plain": layer["plain"], "ours": layer["tether"], "theirs": layer["torch"]}
    reads = {
        "plain attribute": "plain.weight",
        "tether, identity": "ours.weight",
        "torch parametrize, identity": "theirs.weight",
    }
    read = measure(reads, min_run_time, rounds, env)
    hits = {
        "plain attribute (inside the caches)": "plain.weight",
        "tether, cached hit": "ours.weight",
        "torch parametrize, cached hit": "theirs.weight",
    }
    with tether.cached(), torch_parametrize.cached():
        _ = layer["tether"].weight, layer["torch"].weight
        hit = measure(hits, min_run_time, rounds, env)

    x = torch.randn(BATCH, FEATURES)
    steps = {
        name: (lambda module=module: module(x).sum().backward())
        for name, module in [
            ("plain Linear", layer["plain"]),
            ("tether, identity", layer["tether"]),
            ("torch parametrize, identity", layer["torch"]),
        ]
    }
    step = measure(steps, min_run_time, rounds)

    getter = paired_ratio(read["tether, identity"], read["torch parametrize, identity"])
    hit_ratio = paired_ratio(hit["tether, cached hit"], hit["plain attribute (inside the caches)"])
    linear = paired_ratio(step["tether, identity"], step["plain Linear"])
    return "\n\n".join(
        [
            "### Reading `layer.weight`",
            table(
                ["read", "time (µs)", "vs plain read"],
                rows(read, "plain attribute", us) + rows(hit, next(iter(hits)), us),
            ),
            f"### `Linear({FEATURES}, {FEATURES})` forward + backward, batch {BATCH}",
            table(["layer", "time (µs)", "vs plain"], rows(step, "plain Linear", us)),
            "\n".join(
                [
                    target("tether getter / torch getter", getter, "≤ 0.25", getter <= 0.25),
                    target("tether cached hit / plain read", hit_ratio, "≤ 1.5", hit_ratio <= 1.5),
                    target("tether Linear / plain Linear", linear, "≤ 1.05", linear <= 1.05),
                ]
            ),
        ]
    )


if __name__ == "__main__":
    print(run())
