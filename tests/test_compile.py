"""``torch.compile`` on models with tether's constraints: no graph breaks, no recompilation
during training (``update_base`` included), and the eager outputs and gradients; with and
without ``tether.autocache``."""

from __future__ import annotations

import copy

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend

import tether

N = 6
# From 32 on, tether's orthogonal map is the eigendecomposition, under the compiler as a
# custom operator (Note [The skew exponential under torch.compile]).
WIDE = 40
STEPS = 20
UPDATE_BASE_EVERY = 5
TIME_STEPS = 4


def make_model(autocache: bool, width: int = N) -> nn.Sequential:
    """An orthogonal, a spectrally normalized and a pruned layer."""
    model = nn.Sequential(
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    ).double()
    tether.orthogonal(model[0])
    tether.spectral_norm(model[2])
    tether.prune.l1_unstructured(model[4], "weight", amount=0.5)
    return tether.autocache(model) if autocache else model


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles, then runs aot_eager."""

    def __init__(self) -> None:
        self.compilations = 0
        self.graphs: list[torch.fx.GraphModule] = []
        self.inner = lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.compilations += 1
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tolerance(dtype: torch.dtype) -> float:
    return 1000 * torch.finfo(dtype).eps


@pytest.mark.parametrize("width", [N, WIDE])
@pytest.mark.parametrize("autocache", [False, True], ids=["plain", "autocache"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dynamo_finds_no_graph_breaks(autocache, training, width):
    model = make_model(autocache, width).train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(5, width, dtype=torch.float64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    targets = {str(node.target) for node in explanation.graphs[0].graph.nodes}
    assert ("tether.skew_exp.default" in targets) == (width >= 32)


@pytest.mark.parametrize("width", [N, WIDE])
@pytest.mark.parametrize("autocache", [False, True], ids=["plain", "autocache"])
def test_training_compiles_once_and_matches_eager(autocache, width):
    model = make_model(autocache, width)
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    tol = tolerance(torch.float64)

    for step in range(STEPS):
        x = torch.randn(5, width, dtype=torch.float64)
        outputs = [compiled(x), eager(x)]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol)
        for output, optimizer in zip(outputs, optimizers, strict=True):
            optimizer.zero_grad()
            output.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=f"{name}, {step}")
        for optimizer in optimizers:
            optimizer.step()
        if step % UPDATE_BASE_EVERY == UPDATE_BASE_EVERY - 1:
            tether.update_base(model[0])
            tether.update_base(eager[0])

    assert backend.compilations == 1
    for name, buffer in eager.named_buffers():  # spectral norm's power iteration vectors
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=tol, atol=tol, msg=name)


class Recurrent(nn.Module):
    """Runs an RNN cell with an orthogonal recurrent kernel over the time steps."""

    def __init__(self, width: int = N) -> None:
        super().__init__()
        self.width = width
        self.cell = tether.orthogonal(nn.RNNCell(width, width), "weight_hh")

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[1], self.width)
        for x in xs:
            h = self.cell(x, h)
        return h


def matrix_exps(gm: torch.fx.GraphModule) -> int:
    """Evaluations of the orthogonal map: torch's ``matrix_exp`` or tether's operator."""
    return sum(
        "matrix_exp" in str(node.target) or str(node.target) == "tether.skew_exp.default"
        for node in gm.graph.nodes
    )


@pytest.mark.parametrize("width", [N, WIDE])
def test_compiled_recurrent_model_computes_the_kernel_once_per_graph(width):
    # autocache does nothing under compile (Note [autocache hooks]): the graph holds one
    # evaluation per read, which AOTAutograd's common subexpression elimination merges.
    forward_graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        forward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=record,
        bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    model = tether.autocache(Recurrent(width))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(torch.randn(TIME_STEPS, 2, width)).sum().backward()
    assert matrix_exps(forward_graphs[0]) == 1


def test_a_model_compiled_inside_cached_has_no_graph_breaks():
    model = Recurrent()
    with tether.cached():
        explanation = torch._dynamo.explain(model)(torch.randn(TIME_STEPS, 2, N))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_a_compiled_submodule_of_an_autocached_model_matches_eager():
    model = tether.autocache(nn.Sequential(Recurrent()))
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    model[0] = torch.compile(model[0], backend=backend, fullgraph=True)
    xs = torch.randn(TIME_STEPS, 2, N)
    torch.testing.assert_close(model(xs), eager(xs))
    model(xs)
    assert backend.compilations == 1


# Every constraint compiles whole: maps whose autograd.Function has a forward-mode rule (which
# Dynamo cannot trace) apply a twin without it under the compiler. Dynamo itself instantiates
# the autograd.Function base class while tracing any Function, which warns (torch 2.13).
TRACES_A_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
CONSTRAINTS = {
    "orthogonal": tether.orthogonal,
    "cayley": lambda m: tether.orthogonal(m, orthogonal_map="cayley"),
    "householder": lambda m: tether.orthogonal(m, orthogonal_map="householder"),
    "special_orthogonal": tether.special_orthogonal,
    "grassmannian": tether.grassmannian,
    "symmetric": tether.symmetric,
    "skew": tether.skew,
    "positive_definite": tether.positive_definite,
    "positive_definite_softplus": lambda m: tether.positive_definite(m, map="softplus"),
    "positive_semidefinite": tether.positive_semidefinite,
    "psd_low_rank": lambda m: tether.psd_low_rank(m, rank=3),
    "psd_fixed_rank": lambda m: tether.psd_fixed_rank(m, rank=3),
    "low_rank": lambda m: tether.low_rank(m, rank=3),
    "fixed_rank": lambda m: tether.fixed_rank(m, rank=3),
    "invertible": tether.invertible,
    "special_linear": tether.special_linear,
    "almost_orthogonal": tether.almost_orthogonal,
    "hurwitz": tether.hurwitz,
    "sphere": tether.sphere,
    "poincare_ball": tether.poincare_ball,
    "positive": tether.positive,
    "bounded": lambda m: tether.bounded(m, low=-1.0, high=1.0),
    "simplex": tether.simplex,
    "weight_norm": tether.weight_norm,
    "spectral_norm": tether.spectral_norm,
}


@TRACES_A_FUNCTION
@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
def test_every_constraint_compiles_without_graph_breaks(constraint):
    layer = CONSTRAINTS[constraint](nn.Linear(WIDE, WIDE))
    explanation = torch._dynamo.explain(layer)(torch.randn(3, WIDE))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@TRACES_A_FUNCTION
@pytest.mark.parametrize(
    "constraint", ["householder", "positive_definite", "positive_definite_softplus"]
)
def test_maps_traced_without_forward_mode_match_eager(constraint):
    layer = CONSTRAINTS[constraint](nn.Linear(WIDE, WIDE).double())
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, WIDE, dtype=torch.float64)
    for call in (compiled, eager):
        call(x).square().sum().backward()
    tol = tolerance(torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=tol, atol=tol)
    for p, q in zip(layer.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol)
