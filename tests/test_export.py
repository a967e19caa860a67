"""``torch.export.export`` of parametrized models: the exported program computes the
parametrizations from the exported originals and gives the eager outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tether


def make_model() -> nn.Sequential:
    """An orthogonal, a spectrally normalized, a pruned and a weight-normalized layer."""
    return nn.Sequential(
        tether.orthogonal(nn.Linear(6, 6)),
        nn.Tanh(),
        tether.spectral_norm(nn.Linear(6, 5)),
        tether.prune.l1_unstructured(nn.Linear(5, 4), "weight", amount=0.5),
        tether.weight_norm(nn.Linear(4, 3)),
    )


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_exported_program_gives_the_eager_outputs(training: bool):
    model = make_model().train(training)
    x = torch.randn(2, 6)
    program = torch.export.export(model, (x,))
    # The program keeps the state_dict's layout: originals as parameters, state as buffers.
    assert "0.parametrizations.weight.original" in program.graph_signature.parameters
    assert "2.parametrizations.weight.0._u" in program.graph_signature.buffers
    exported = program.module()
    for _ in range(2):  # in training, each call advances the power iteration in both
        x = torch.randn(2, 6)
        assert torch.allclose(exported(x), model(x), atol=1e-6)


def test_exported_program_follows_new_originals():
    model = make_model().eval()
    x = torch.randn(2, 6)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        model[0].parametrizations.weight.original.normal_()
    exported.load_state_dict(model.state_dict())
    assert torch.allclose(exported(x), model(x), atol=1e-6)
