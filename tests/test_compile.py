"""``torch.compile`` on models with tether's constraints: no graph breaks, no recompilation
during training (``update_base`` included), and the eager outputs and gradients; with and
without ``tether.autocache``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend

import tether
from tether.functional._skew_exp import algorithm_for

N = 6
# At this width tether's orthogonal map leaves torch.linalg.matrix_exp for its own path,
# under the compiler a custom operator (Note [The skew exponential under torch.compile]).
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
    # The path "auto" takes for this width is one opaque custom operator (or torch's own).
    ops = {"eigh": "tether.skew_exp.default", "matmul": "tether.skew_exp_matmul.default"}
    expected = ops.get(algorithm_for("cpu", width, torch.float64))
    assert {op for op in ops.values() if op in targets} == ({expected} if expected else set())


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


def map_calls(gm: torch.fx.GraphModule) -> int:
    """Calls of the orthogonal map (forward graph) or of its backward (backward graph): torch's
    ``matrix_exp`` (whose backward exponentiates a block matrix) or tether's operators."""
    return sum(
        "matrix_exp" in str(node.target) or str(node.target).startswith("tether.skew_exp")
        for node in gm.graph.nodes
    )


def recording_backend() -> tuple[Any, dict[str, list[torch.fx.GraphModule]]]:
    """An AOTAutograd backend that keeps the forward and backward graphs it compiles."""
    graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}

    def recorder(kind: str):
        def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return record

    backend = aot_autograd(
        fw_compiler=recorder("forward"),
        bw_compiler=recorder("backward"),
        partition_fn=min_cut_rematerialization_partition,
    )
    return backend, graphs


@pytest.mark.parametrize("width", [N, WIDE])
def test_compiled_autocached_recurrent_model_runs_the_map_once_forward_and_backward(width):
    # The traced cache (Note [The cache under torch.compile]): one evaluation in the graph,
    # whose gradient sums over the reads, so the map's backward runs once too.
    backend, graphs = recording_backend()
    model = tether.autocache(Recurrent(width)).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(3):
        xs = torch.randn(TIME_STEPS, 2, width, dtype=torch.float64)
        compiled(xs).sum().backward()
        eager(xs).sum().backward()
    assert len(graphs["forward"]) == 1  # no recompilation
    assert map_calls(graphs["forward"][0]) == 1
    assert map_calls(graphs["backward"][0]) == 1
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    assert tether._cache.tracing is None


def test_without_autocache_a_compiled_model_runs_the_map_backward_once_per_read():
    # What autocache saves under the compiler: the forwards merge, the backwards do not.
    backend, graphs = recording_backend()
    compiled = torch.compile(Recurrent(WIDE), backend=backend, fullgraph=True)
    compiled(torch.randn(TIME_STEPS, 2, WIDE)).sum().backward()
    assert map_calls(graphs["forward"][0]) == 1
    assert map_calls(graphs["backward"][0]) == TIME_STEPS


class Nested(nn.Module):
    """An autocached recurrent model inside another, with a graph break between two uses."""

    def __init__(self, graph_break: bool) -> None:
        super().__init__()
        self.inner = tether.autocache(Recurrent(WIDE))
        self.graph_break = graph_break

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = self.inner(xs)
        if self.graph_break:
            torch._dynamo.graph_break()
        return h + self.inner(xs) + xs[0] @ self.inner.cell.weight_hh


# Across a graph break the traced cache hands the weight computed by the first graph to the
# second as an input, a non-leaf tensor whose .grad Dynamo inspects, which warns (torch 2.13).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("graph_break", [False, True], ids=["one graph", "graph break"])
def test_nested_autocache_and_graph_breaks_under_compile_match_eager(graph_break):
    model = tether.autocache(Nested(graph_break)).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        xs = torch.randn(TIME_STEPS, 2, WIDE, dtype=torch.float64)
        torch.testing.assert_close(compiled(xs), eager(xs), rtol=1e-12, atol=1e-12)
        compiled(xs).sum().backward()
        eager(xs).sum().backward()
        assert tether._cache.tracing is None  # nothing of the traced cache is left
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


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
