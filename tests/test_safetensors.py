"""safetensors checkpoints of parametrized models: ``save_model`` / ``load_model`` round
trips (shared originals included), and plain checkpoints through ``save_file``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tether

safetensors_torch = pytest.importorskip("safetensors.torch")


def make_model() -> nn.Sequential:
    return nn.Sequential(
        tether.orthogonal(nn.Linear(6, 6)),
        nn.Tanh(),
        tether.spectral_norm(nn.Linear(6, 5)),
        tether.prune.l1_unstructured(nn.Linear(5, 4), "weight", amount=0.5),
        tether.weight_norm(nn.Linear(4, 3)),
        tether.positive_definite(nn.Linear(3, 3)),
    ).eval()


def test_save_model_load_model_round_trip(tmp_path: Path):
    model, other = make_model(), make_model()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    missing, unexpected = safetensors_torch.load_model(other, str(path))
    assert not missing and not unexpected
    for key, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], tensor), key
    x = torch.randn(2, 6)
    assert torch.equal(other(x), model(x))


def test_state_dict_saves_with_save_file(tmp_path: Path):
    # Every tensor is contiguous (the orthogonal base point too, which QR makes column-major).
    model = make_model()
    path = tmp_path / "state.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    other = make_model()
    other.load_state_dict(safetensors_torch.load_file(str(path)))
    x = torch.randn(2, 6)
    assert torch.equal(other(x), model(x))


def test_shared_originals_are_saved_once_and_shared_after_loading(tmp_path: Path):
    def shared() -> nn.Sequential:
        first = tether.orthogonal(nn.Linear(4, 4))
        return nn.Sequential(
            first, tether.transfer_parametrizations_and_params(first, nn.Linear(4, 4))
        )

    model, other = shared(), shared()
    path = tmp_path / "shared.safetensors"
    safetensors_torch.save_model(model, str(path))
    assert "1.parametrizations.weight.original" not in safetensors_torch.load_file(str(path))
    missing, unexpected = safetensors_torch.load_model(other, str(path))
    assert not missing and not unexpected
    originals = [layer.parametrizations.weight.original for layer in other]
    assert originals[0] is originals[1]
    x = torch.randn(2, 4)
    assert torch.equal(other(x), model(x))


def test_plain_state_dict_into_save_file_loads_into_plain_modules(tmp_path: Path):
    model = make_model()
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file(tether.plain_state_dict(model), str(path))
    plain = nn.Sequential(
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.Linear(5, 4),
        nn.Linear(4, 3),
        nn.Linear(3, 3),
    )
    plain.load_state_dict(safetensors_torch.load_file(str(path)))
    x = torch.randn(2, 6)
    assert torch.allclose(plain(x), model(x), atol=1e-6)
