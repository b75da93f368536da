"""The bad-input contract: what a public call must do with an input, and the outcome it had.

An expectation is `Raises(type, *words)`: an exception of that type whose message holds every word (the
argument it names); `Reference(n)`: the answer of the float64 reference backend within the error model
of diffkern.testing.numerics, with NaN and inf where the reference has them; or `Equals(value)`: exactly
that result (integer outputs).
`outcome(call, expected)` runs one call and classifies it:
    "ok"     as expected;
    "wrong"  a result where an error was expected, or a result that differs from the reference's;
    "vague"  an exception where a result was expected, or of another type, or not naming the argument.
(A crash would end the test process, which fails the run.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .. import backend
from . import numerics


@dataclasses.dataclass(frozen=True)
class Raises:
    """An exception of `type` (a type or a tuple of types) whose message holds every one of `words`."""
    type: type | tuple
    words: tuple[str, ...]

    def __init__(self, exc_type: type | tuple, *words: str):
        object.__setattr__(self, "type", exc_type)
        object.__setattr__(self, "words", words)

    def __str__(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return f"{' or '.join(t.__name__ for t in types)} naming {' and '.join(self.words)}"


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference backend's float64 answer on the same inputs; n: the fan-in of one output (or one per
    input, None for inputs not perturbed) as in numerics.oracle_with_spread."""
    n: int | Sequence[int | None] = 0


@dataclasses.dataclass(frozen=True)
class Equals:
    """Exactly this result (for ops without a float reference: integer counts, shapes)."""
    value: object


@dataclasses.dataclass(frozen=True)
class Call:
    """fn(*inputs()) on the default backends, or under diffkern.backend(forced); inputs builds the tensors
    afresh (seeded) for each run."""
    fn: Callable
    inputs: Callable[[], Sequence]
    forced: str | None = None

    def run(self):
        if self.forced is None:
            return self.fn(*self.inputs())
        with backend(self.forced):
            return self.fn(*self.inputs())


def _tensors(outputs) -> list:
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in _tensors(o)]
    return [outputs] if isinstance(outputs, torch.Tensor) else []


def _dtype(inputs) -> torch.dtype:
    floats = [t.dtype for t in _tensors(list(inputs)) if t.is_floating_point()]
    return floats[0] if floats else torch.float64


def _disagreement(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, spread: float, dtype) -> str:
    """Why actual is not the reference's answer ("" when it is)."""
    if actual.shape != oracle.shape:
        return f"shape {list(actual.shape)} != reference {list(oracle.shape)}"
    a, o = actual.detach().cpu().double(), oracle.detach().cpu().double()
    if not torch.equal(a.isnan(), o.isnan()):
        return f"NaN at {int((a.isnan() != o.isnan()).sum())} elements where the reference differs"
    inf = o.isinf()
    if not torch.equal(a.isinf(), inf) or not torch.equal(a[inf], o[inf]):
        return "inf where the reference differs"
    fin = o.isfinite()
    if not fin.any():
        return ""
    err = numerics.max_error(a[fin], o[fin])
    tol = numerics.tolerance(dtype if dtype in numerics.ULP else torch.float64, o[fin],
                             plain.detach().cpu().double()[fin], spread)
    return "" if err <= tol else f"max error {err:.3e} > tolerance {tol:.3e}"


def _reference(call: Call, expected: Reference, actual) -> str:
    inputs = list(call.inputs())
    dtype = _dtype(inputs)
    with backend("reference"):
        oracle = _tensors(call.fn(*[numerics._perturb(x, 0.0, None) for x in inputs]))
        plain = _tensors(call.fn(*inputs))
        # the spread ignores NaN/inf outputs: they are compared exactly
        _, spreads = numerics.oracle_with_spread(
            lambda *a: [torch.nan_to_num(t, 0.0, 0.0, 0.0) for t in _tensors(call.fn(*a))], inputs,
            expected.n, dtype)
    actual = _tensors(actual)
    if len(actual) != len(oracle):
        return f"{len(actual)} tensor outputs, the reference has {len(oracle)}"
    for i, (a, o, p, s) in enumerate(zip(actual, oracle, plain, spreads)):
        why = _disagreement(a, o, p, s, dtype)
        if why:
            return f"output {i}: {why}"
    return ""


def outcome(call: Call, expected: Raises | Reference | Equals) -> tuple[str, str]:
    """(one of "ok", "wrong", "vague"; what happened)."""
    try:
        result = call.run()
    except Exception as err:  # noqa: BLE001 (every exception is classified)
        said = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if isinstance(expected, Reference):
            return "vague", f"raised where the reference answers: {said}"
        if not isinstance(err, expected.type) or not all(w in str(err) for w in expected.words):
            return "vague", f"expected {expected}, got {said}"
        return "ok", said
    if isinstance(expected, Raises):
        return "wrong", f"returned a result where {expected} was expected"
    if isinstance(expected, Equals):
        same = torch.equal(result, expected.value) if isinstance(result, torch.Tensor) else result == expected.value
        return ("ok", "equal") if same else ("wrong", f"returned {result}, expected {expected.value}")
    why = _reference(call, expected, result)
    return ("wrong", why) if why else ("ok", "matches the reference")
