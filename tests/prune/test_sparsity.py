"""Tests for ``sparsity``: the counts, the rows, the table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether
from tether import prune
from tether.prune import Sparsity, TensorSparsity


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def test_counts_the_zeros_of_each_pruned_tensor_and_in_total():
    net = network()
    prune.l1_unstructured(net[0], "weight", amount=6)
    prune.ln_structured(net[2], "weight", amount=1, n=2, dim=0)
    report = prune.sparsity(net)
    assert list(report) == [
        TensorSparsity("0.weight", 6, 20, 0.3),
        TensorSparsity("2.weight", 5, 10, 0.5),
    ]
    assert report.total == TensorSparsity("total", 11, 30, 11 / 30)
    assert report["2.weight"].fraction == 0.5
    assert len(report) == 2


def test_rows_unpack_as_name_zeros_total_fraction():
    net = prune.random_unstructured(network()[0], "weight", amount=0.25)
    [(name, zeros, total, fraction)] = prune.sparsity(net)
    assert (name, zeros, total, fraction) == ("weight", 5, 20, 0.25)


def test_counts_values_not_masks_so_entries_that_are_zero_count_too():
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
    prune.custom_from_mask(layer, "weight", torch.eye(3) == 0)
    assert prune.sparsity(layer).total.zeros == 3


def test_include_unpruned_lists_every_tensor_of_the_plain_model():
    net = network()
    tether.register_parametrization(net[2], "weight", torch.tril)
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    report = prune.sparsity(net, include_unpruned=True)
    assert [row.name for row in report] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.total.total == sum(p.numel() for p in network().parameters())
    assert report["2.weight"].zeros == 4 + 3  # tril of a 2x5 matrix
    assert [row.name for row in prune.sparsity(net)] == ["0.weight"]


def test_an_unpruned_model_gives_an_empty_report_with_a_zero_total():
    report = prune.sparsity(network())
    assert list(report) == []
    assert report.total == TensorSparsity("total", 0, 0, 0.0)


def test_the_table_prints_aligned_with_a_total_line():
    report = Sparsity((TensorSparsity("a.weight", 3, 10, 0.3), TensorSparsity("b", 0, 5, 0.0)))
    assert str(report) == (
        "tensor    zeros  total  sparsity\n"
        "a.weight      3     10     30.0%\n"
        "b             0      5      0.0%\n"
        "--------------------------------\n"
        "total         3     15     20.0%"
    )
    assert repr(report) == str(report)


def test_looking_up_a_missing_name_lists_the_names():
    report = prune.sparsity(prune.identity(network()[0], "weight"))
    with pytest.raises(KeyError, match="'weight'"):
        report["bias"]
