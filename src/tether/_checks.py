"""Validation helpers and the wording of tether's error messages.

Every message says who (the module's class and the tensor, or the function and its argument),
what was found, what was expected and how to fix it, with expected and found values on
separate lines where there are two to compare. Keeping the builders here keeps the wording
uniform across the package.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn

from tether import _torch_compat
from tether._chains import chains_of, class_before

__all__ = [
    "bad_dtype",
    "bad_shape",
    "bad_type",
    "bad_value",
    "call_labelled",
    "check_dim",
    "check_slices",
    "check_square",
    "choice",
    "describe",
    "dims",
    "expect_arity",
    "expect_finite",
    "expect_same_dtype",
    "expect_same_shape",
    "expect_tensor",
    "expect_tensors",
    "int_dim",
    "not_scriptable",
    "parameter_assigned",
    "positive_number",
    "real_number",
    "registrable_tensor",
    "required_rank",
    "tensor_label",
    "tensor_to_constrain",
]


def tensor_label(module: nn.Module, tensor_name: str) -> str:
    """Name a tensor of a module for a message, e.g. ``"Linear.weight"``."""
    return f"{class_before(module).__name__}.{tensor_name}"


def parameter_assigned(module: nn.Module, tensor_name: str) -> KeyError:
    """The error for ``module.<tensor_name> = nn.Parameter(...)`` on a parametrized name.

    ``KeyError``, the type PyTorch raises there (Note [Assigning a Parameter to a
    parametrized name]).
    """
    label = tensor_label(module, tensor_name)
    return KeyError(
        f"Cannot assign an nn.Parameter to {label}: it is parametrized, so it is computed from "
        f"module.parametrizations.{tensor_name} and cannot be replaced by another Parameter "
        "(that Parameter would not be trained through the parametrization). To set its value, "
        f"assign a plain tensor (module.{tensor_name} = W.detach()), which goes through "
        "right_inverse; to share or replace the Parameter (weight tying, fusing), do it before "
        f"registering, or call tether.remove_parametrizations(module, {tensor_name!r}) first."
    )


def required_rank(rank: int | None, function: str) -> int:
    """``rank`` if given, else the ``TypeError`` Python raises for a missing argument.

    The rank helpers take ``rank`` after ``name``, which has a default, so that geotorch's
    positional ``low_rank(module, "weight", 2)`` works: ``None`` stands for "not given".
    """
    if rank is None:
        raise TypeError(
            f"{function}() missing required argument 'rank': pass it, e.g. "
            f"{function}(module, rank=2) or {function}(module, 'weight', 2)."
        )
    return rank


def describe(value: object) -> str:
    """Describe a value without printing its contents (tensors can be large)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if value is None:
        return "None"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"a {type(value).__name__} of {len(value)} items"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def expect_tensor(value: object, what: str, fix: str) -> Tensor:
    """Return ``value`` if it is a tensor, else raise a ``TypeError`` naming ``what``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a tensor; got {describe(value)}. {fix}")
    return value


def expect_tensors(value: object, what: str) -> Tensor | tuple[Tensor, ...]:
    """Accept a tensor or a sequence of tensors (what ``right_inverse`` may return)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        for i, item in enumerate(value):
            if not isinstance(item, Tensor):
                raise ValueError(
                    f"{what} must return a Tensor or a Sequence of tensors; "
                    f"item {i} of the sequence is {describe(item)}."
                )
        return tuple(value)
    raise ValueError(
        f"{what} must return a Tensor or a Sequence of tensors (list, tuple...); "
        f"got {describe(value)}."
    )


def expect_arity(parametrization: nn.Module, count: int, label: str) -> None:
    """Raise ``TypeError`` unless ``parametrization.forward`` takes ``count`` tensors: the
    number that the right inverses on ``label`` returned."""
    try:
        signature = inspect.signature(parametrization.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call tell
        return
    try:
        signature.bind(*range(count))
    except TypeError:
        returned = "one tensor" if count == 1 else f"{count} tensors"
        forward = f"{type(parametrization).__name__}.forward({', '.join(signature.parameters)})"
        raise TypeError(
            f"Cannot parametrize {label}: {forward} does not take {returned}, which is what it "
            "gets (the tensor itself, or what the right_inverse methods return). A "
            "right_inverse must return what the first parametrization's forward takes: one "
            "tensor for forward(X), a tuple of k tensors for forward(X0, ..., Xk-1)."
        ) from None


def expect_same_dtype(expected: torch.dtype, got: torch.dtype, what: str, fix: str) -> None:
    """Raise a ``ValueError`` when two dtypes differ."""
    if expected != got:
        raise ValueError(f"{what}\n  expected dtype: {expected}\n  got dtype:      {got}\n{fix}")


def expect_same_shape(expected: torch.Size, got: torch.Size, what: str, fix: str) -> None:
    """Raise a ``ValueError`` when two shapes differ."""
    if expected != got:
        raise ValueError(
            f"{what}\n  expected shape: {tuple(expected)}\n  got shape:      {tuple(got)}\n{fix}"
        )


def expect_finite(value: Tensor, what: str, fix: str) -> None:
    """Raise a ``ValueError`` when ``value`` holds NaN or infinite entries.

    A right inverse given NaN or an infinity stores NaN in the original (or crashes in a linear
    algebra routine), and an optimizer never recovers from it, so values are checked where they
    enter: assignment, registration and loading. Tensors whose values cannot be read here (on
    the meta device, under ``torch.compile`` or ``torch.func`` transforms, tensor subclasses)
    are let through unchecked, as PyTorch lets every value through.
    """
    if not (value.is_floating_point() or value.is_complex()) or not _readable(value):
        return
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    nans = int(torch.isnan(value).sum())
    infs = value.numel() - int(finite.sum()) - nans
    found = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "infinite")) if n)
    raise ValueError(f"{what}: {found} among its {value.numel()} entries. {fix}")


def _readable(value: Tensor) -> bool:
    if type(value) not in (Tensor, nn.Parameter) or value.is_meta:
        return False
    if torch.compiler.is_compiling():
        return False
    return not _torch_compat.is_functorch_wrapped_tensor(value)


def bad_dtype(
    constraint: str, dtype: torch.dtype, label: str | None = None
) -> TypeError | ValueError:
    """The error for a tensor whose dtype a constraint cannot take.

    A ``TypeError`` for integer and boolean tensors, which no constraint takes; a
    ``ValueError`` for complex ones on a constraint defined on real tensors only (the type
    ``orthogonal()`` raises for a complex Householder map). ``label`` names the tensor
    (``"Linear.idx"``); without it the caller adds it, as the mechanism does for errors
    raised inside a parametrization.

    Example: ``Cannot parametrize Linear.idx: Orthogonal needs a floating-point or complex
    tensor; got dtype torch.int64. ...``
    """
    if dtype.is_complex:
        needs = "a real (floating-point) tensor"
        fix = f"{constraint} is defined for real tensors only: use a real dtype (float32...)."
    else:
        needs = "a floating-point or complex tensor"
        fix = (
            "Integer and boolean tensors cannot be constrained (no values lie between theirs, "
            "and they get no gradients): convert the tensor to a floating-point dtype first, "
            "e.g. with .float(), or leave it unconstrained."
        )
    message = f"{constraint} needs {needs}; got dtype {dtype}. {fix}"
    message = f"Cannot parametrize {label}: {message}" if label else message
    return ValueError(message) if dtype.is_complex else TypeError(message)


def bad_shape(
    constraint: str, label: str, shape: Sequence[int], needs: str, hint: str = ""
) -> ValueError:
    """The error for a shape a constraint's math rules out.

    Example: ``orthogonal() on Linear.weight needs a matrix or a batch of matrices; got shape
    (20,). For vectors use tether.sphere.``
    """
    message = f"{constraint} on {label} needs {needs}; got shape {tuple(shape)}."
    return ValueError(f"{message} {hint}" if hint else message)


def check_square(constraint: str, label: str, shape: Sequence[int]) -> None:
    """Raise :func:`bad_shape` unless ``shape`` is ``(*, n, n)``."""
    if len(shape) < 2 or shape[-2] != shape[-1]:
        hint = "Leading dimensions are batch dimensions; the last two must be equal."
        raise bad_shape(
            constraint,
            label,
            shape,
            "a square matrix or a batch of square matrices, shape (*, n, n)",
            hint if len(shape) >= 2 else "",
        )


def check_slices(
    constraint: str,
    label: str,
    shape: Sequence[int],
    dim: int | tuple[int, ...] | None,
    scalar_hint: str = "A scalar has no dimensions; use dim=None for the whole tensor.",
) -> None:
    """Raise :func:`bad_shape` unless ``shape`` is non-empty and has every dimension in ``dim``."""
    if math.prod(shape) == 0:
        raise bad_shape(constraint, label, shape, "a non-empty tensor")
    if dim is None:
        return
    ndim = len(shape)
    wanted = (dim,) if isinstance(dim, int) else dim
    if not all(-ndim <= d < ndim for d in wanted):
        needs = f"a tensor with dim={dim!r}"
        if ndim == 0:
            hint = scalar_hint
        else:
            hint = f"Valid dims for {ndim} dimensions: {-ndim} to {ndim - 1}."
        raise bad_shape(constraint, label, shape, needs, hint)
    if len({d % ndim for d in wanted}) < len(wanted):
        raise bad_shape(
            constraint, label, shape, f"distinct dims, not {dim!r}", "Two name the same dimension."
        )


# Arguments. ``owner`` starts the message: the function or class that takes the argument
# (``"low_rank()"``), or the call and the tensor (``"spectral_norm() on Linear.weight"``).


def _got(value: object) -> str:
    """A wrong argument's type, with its value if it is a small scalar: ``'2' (a str)``."""
    if isinstance(value, (bool, int, float, str)) and len(repr(value)) <= 40:
        return f"{value!r} ({describe(value)})"
    return describe(value)


def _shown(value: object) -> str:
    """A wrong argument's value: its repr if short (never a tensor's), else a description."""
    text = repr(value)
    return describe(value) if isinstance(value, Tensor) or len(text) > 40 else text


def bad_type(owner: str, argument: str, needs: str, value: object, hint: str = "") -> TypeError:
    """The error for an argument of the wrong type: ``low_rank(): `rank` must be ...; got ...``."""
    message = f"{owner}: `{argument}` must be {needs}; got {_got(value)}."
    return TypeError(f"{message} {hint}" if hint else message)


def bad_value(owner: str, argument: str, needs: str, value: object, hint: str = "") -> ValueError:
    """The error for an argument of the right type but out of range."""
    message = f"{owner}: `{argument}` must be {needs}; got {_shown(value)}."
    return ValueError(f"{message} {hint}" if hint else message)


def real_number(value: object, argument: str, owner: str) -> float:
    """``value`` as a float if it is a finite real number, else a TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad_type(owner, argument, "a real number", value)
    if not math.isfinite(value):
        raise bad_value(owner, argument, "finite", value)
    return float(value)


def positive_number(value: object, argument: str, owner: str) -> float:
    """``value`` as a float if it is a finite number above 0."""
    number = real_number(value, argument, owner)
    if not number > 0:
        raise bad_value(owner, argument, "positive", value)
    return number


def choice(value: object, argument: str, allowed: Sequence[str], owner: str) -> str:
    """``value`` if it is one of the ``allowed`` strings (a TypeError if it is no string)."""
    needs = f"one of {', '.join(map(repr, allowed))}"
    if not isinstance(value, str):
        raise bad_type(owner, argument, needs, value)
    if value not in allowed:
        raise bad_value(owner, argument, needs, value)
    return value


def int_dim(value: object, owner: str) -> int:
    """``value`` as an int if it is one (not a bool), or an integer type such as numpy's."""
    if isinstance(value, SupportsIndex) and not isinstance(value, bool):
        with contextlib.suppress(TypeError):  # a float tensor has __index__, and raises
            return operator.index(value)
    raise bad_type(owner, "dim", "an int", value)


def dims(value: object, owner: str) -> int | tuple[int, ...] | None:
    """``value`` as ``None``, an int or a tuple of distinct ints (lists are accepted)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) > 0:
        result = tuple(int_dim(d, owner) for d in value)
        if len(set(result)) < len(result):
            raise bad_value(owner, "dim", "a tuple without repeated dimensions", value)
        return result
    try:
        return int_dim(value, owner)
    except TypeError:
        needs = "None (the whole tensor), an int or a non-empty tuple of ints"
        raise bad_type(owner, "dim", needs, value) from None


def check_dim(dim: object, tensor: Tensor, who: str) -> None:
    """Raise torch's error types for a ``dim`` that is not an int or is out of range.

    The norms follow torch here, so code that catches torch's ``IndexError`` still works.
    """
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise bad_type(who, "dim", "an int or None", dim)
    ndim = max(tensor.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{who}: dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
            f"but got {dim}); the tensor has shape {tuple(tensor.shape)}."
        )


def call_labelled(function: Any, value: object, context: str, label: str) -> object:
    """Call a parametrization's function, adding ``context`` (which tensor) to its plain errors.

    A constraint that refuses a value (a singular matrix for ``invertible``) does not know
    which module's tensor it was given; the same exception type comes back with the tensor
    named. Exceptions of other types (a user's own, NotImplementedError) pass unchanged.
    """
    try:
        return function(value)
    except (TypeError, ValueError, RuntimeError) as error:
        if type(error) not in (TypeError, ValueError, RuntimeError) or label in str(error):
            raise
        raise type(error)(f"{context}: {error}") from error


def not_scriptable(module: nn.Module, label: str) -> RuntimeError:
    """The error ``torch.jit.script`` raises on a module that holds tether parametrizations.

    Note [TorchScript]
        TorchScript compiles a module's properties as well as its ``forward``, and
        PyTorch's parametrized tensor is a property that raises "Parametrization is not
        working with scripting" when the scripted module runs: no parametrization runs in
        TorchScript. tether refuses at ``torch.jit.script`` time instead (through
        ``__prepare_scriptable__``, which TorchScript calls on every submodule before compiling
        anything), naming what works: ``torch.export``, ``torch.compile``, ``torch.jit.trace``,
        or scripting after ``remove_parametrizations`` has baked the values in.
    """
    return RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__}: {label} is parametrized, and "
        "TorchScript cannot run parametrizations (PyTorch's own parametrized modules script "
        "but raise 'Parametrization is not working with scripting' when called). Use "
        "torch.export.export(model, args) or torch.compile(model), which run them, or "
        "torch.jit.trace(model, args); or bake the current values in with "
        "tether.remove_parametrizations(module, name) on each parametrized tensor (or script "
        "a copy after loading tether.plain_state_dict(model) into an unparametrized model)."
    )


def registrable_tensor(module: nn.Module, tensor_name: str, label: str) -> Tensor:
    """The parameter or buffer ``tensor_name`` of ``module``, or a ValueError saying why not.

    The check every registration makes (once, at the boundary) for a name that is not
    parametrized yet; ``label`` names the tensor, as :func:`tensor_label` does.
    """
    tensor = module._parameters.get(tensor_name, module._buffers.get(tensor_name))
    if isinstance(tensor, Tensor):
        if not chains_of(module) and hasattr(module, "parametrizations"):
            raise ValueError(
                f"Cannot parametrize {label}: {type(module).__name__} already has an attribute "
                "named 'parametrizations', where parametrizations are stored. Rename it."
            )
        return tensor
    if tensor_name in module._parameters or tensor_name in module._buffers:
        raise ValueError(
            f"Cannot parametrize {label}: it is None (for a bias, the layer was built with "
            "bias=False). Parametrize a tensor that exists."
        )
    tensors = [
        n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None
    ]
    known = ", ".join(repr(n) for n in [*tensors, *chains_of(module)]) or "none"
    if hasattr(module, tensor_name):
        what = describe(getattr(module, tensor_name))
        problem = f"it is {what}, not a parameter or buffer registered on the module"
    else:
        problem = "there is no parameter, buffer or parametrized tensor of that name"
    raise ValueError(
        f"Cannot parametrize {label}: {problem}. Tensors that can be parametrized: {known}."
    )


def tensor_to_constrain(module: nn.Module, tensor_name: str) -> Tensor:
    """The current value of ``module.<tensor_name>`` that a helper such as ``orthogonal()`` is
    about to constrain (the parametrized value if the name is parametrized), or the ValueError
    that registration would raise, for helpers that look at the tensor before registering.
    """
    if tensor_name in chains_of(module):
        value: Tensor = getattr(module, tensor_name)
        return value
    return registrable_tensor(module, tensor_name, tensor_label(module, tensor_name))
