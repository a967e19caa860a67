"""The three ways a user copies a whole model, shared by the tests that check each of them."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import torch
from torch import nn


def pickle_roundtrip(model: nn.Module) -> nn.Module:
    """``model`` through ``pickle.dumps`` and ``pickle.loads``."""
    return pickle.loads(pickle.dumps(model))


def torch_save_roundtrip(model: nn.Module) -> nn.Module:
    """``model`` through ``torch.save`` and ``torch.load(weights_only=False)``."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUNDTRIPS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "pickle": pickle_roundtrip,
    "deepcopy": copy.deepcopy,
    "torch.save": torch_save_roundtrip,
}
