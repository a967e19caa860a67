"""The compute dtype of low-precision tensors, and the precision their values carry."""

from __future__ import annotations

import threading

import pytest
import torch

from tether.functional import power_iteration, singular_value_estimate, spd_log
from tether.functional._precision import (
    autocast_enabled,
    compute_dtype,
    precision_eps,
    real_dtype,
    storage_dtype,
    stored_as,
    to_storage,
    upcast,
)

COMPUTED_AS = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float8_e4m3fn, torch.float32),
    (torch.complex32, torch.complex64),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.complex128, torch.complex128),
    (torch.int64, torch.int64),
]


@pytest.mark.parametrize(("dtype", "computed"), COMPUTED_AS)
def test_compute_dtype(dtype, computed):
    assert compute_dtype(dtype) == computed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upcast_leaves_full_precision_tensors_as_they_are(dtype):
    X = torch.ones(2, dtype=dtype)
    assert upcast(X) is X


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_is_differentiable(dtype):
    X = torch.ones(2, dtype=dtype, requires_grad=True)
    (3 * upcast(X)).sum().backward()
    assert X.grad.dtype == dtype and bool((X.grad == 3).all())


@pytest.mark.parametrize(
    ("computed", "stored", "expected"),
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.complex64, torch.complex32, torch.complex32),
        (torch.float32, torch.complex32, torch.float16),  # singular values of complex32
        (torch.int64, torch.bfloat16, torch.int64),  # indices stay indices
    ],
)
def test_storage_dtype(computed, stored, expected):
    assert storage_dtype(computed, stored) == expected


def test_real_dtype():
    assert [real_dtype(d) for d in (torch.complex64, torch.complex32, torch.float16)] == [
        torch.float32,
        torch.float16,
        torch.float16,
    ]


def test_to_storage_casts_each_tensor_of_a_tuple():
    value = (torch.ones(1), torch.ones(1, dtype=torch.float64), torch.arange(2), "label")
    out = to_storage(value, torch.bfloat16)
    assert isinstance(out, tuple)
    assert [getattr(t, "dtype", t) for t in out] == [
        torch.bfloat16,
        torch.bfloat16,
        torch.int64,
        "label",
    ]


def test_precision_eps_follows_the_stored_dtype_inside_the_block_only():
    X = torch.ones(1)
    with stored_as(torch.bfloat16):
        assert precision_eps(X) == torch.finfo(torch.bfloat16).eps
        with stored_as(torch.float16):
            assert precision_eps(X) == torch.finfo(torch.float16).eps
        # never finer than the tensor's own dtype
        assert precision_eps(X.half()) == torch.finfo(torch.bfloat16).eps
    assert precision_eps(X) == torch.finfo(torch.float32).eps


def test_precision_eps_is_per_thread():
    seen = []
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen.append(precision_eps(torch.ones(1)))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with stored_as(torch.bfloat16):
        inside.set()
        done.wait()
    thread.join()
    assert seen == [torch.finfo(torch.float32).eps]


def test_autocast_enabled():
    assert not autocast_enabled(torch.ones(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled(torch.ones(1)) and autocast_enabled("cpu")
        assert not autocast_enabled("meta")  # no autocast there, and no error
        with torch.autocast("cpu", enabled=False):
            assert not autocast_enabled("cpu")


def test_eigenvalue_floor_follows_the_stored_dtype():
    # A singular matrix is lifted to sqrt(eps) of the precision its values carry: for
    # bfloat16 values, a floor that survives rounding to bfloat16.
    A = torch.diag(torch.tensor([1.0, 0.0]))
    with stored_as(torch.bfloat16):
        L = torch.linalg.eigvalsh(torch.linalg.matrix_exp(spd_log(A)))
    eps = torch.finfo(torch.bfloat16).eps
    assert L[0] == pytest.approx(eps**0.5, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_power_iteration_takes_vectors_stored_in_a_lower_precision(dtype):
    W = torch.diag(torch.tensor([3.0, 1.0]))
    u, v = torch.ones(2, dtype=dtype), torch.ones(2, dtype=dtype)
    u, v = power_iteration(W, u, v, 20)
    assert u.dtype == v.dtype == torch.float32
    sigma = singular_value_estimate(W, u.to(dtype), v.to(dtype))
    assert sigma.dtype == torch.float32
    assert sigma.item() == pytest.approx(3.0, rel=torch.finfo(dtype).eps)
