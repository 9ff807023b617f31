"""The solver registry: every solver has one signature, so a new one plugs into `sample()` by name.

    @register("my_euler")
    def my_euler(D, x, sigmas, callback, ctx, *, my_option: float = 1.0):
        ...

`D(x_hat, sigma)` is the denoiser on the scaled state x_hat = x / s(t) (float64, one counted network
call), `x` the scaled state at sigmas[0], `sigmas` the levels ending with 0, `callback(Step)` is called
once per step, `ctx` carries what `sample()` owns (process, noise, round_sigma) and the keyword-only
arguments with defaults are the solver's options: `sample()` refuses any other option by name.
A solver returns the scaled state at sigma = 0 (every built-in one ends with D itself).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edmlab.process import NoiseProcess

__all__ = ["Context", "Step", "Solver", "SOLVERS", "register", "solver_options"]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """What a solver reports after step i: the scaled state x at sigma, D there, and the next level."""

    i: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[Step], None]


@dataclass(frozen=True)
class Context:
    """What `sample()` owns and some solvers need: the process whose t they step in, noise, the level rounding."""

    process: NoiseProcess
    noise: Callable[[torch.Tensor], torch.Tensor]  # unit Gaussian noise like its argument (per-seed streams)
    round_sigma: Callable[[torch.Tensor], torch.Tensor]


SolverFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, its options with their defaults, and its one-line description."""

    name: str
    fn: SolverFn
    options: dict[str, Any]
    doc: str


SOLVERS: dict[str, Solver] = {}


def register(name: str) -> Callable[[SolverFn], SolverFn]:
    """Add `fn(D, x, sigmas, callback, ctx, **options)` to SOLVERS under `name`; its keyword-only args are options."""

    def add(fn: SolverFn) -> SolverFn:
        params = inspect.signature(fn).parameters.values()
        if [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] != ["D", "x", "sigmas", "callback", "ctx"]:
            raise TypeError(f"solver {name!r}: the signature must start (D, x, sigmas, callback, ctx, *, ...)")
        options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        if any(v is inspect.Parameter.empty for v in options.values()):
            raise TypeError(f"solver {name!r}: every option needs a default")
        if name in SOLVERS:
            raise ValueError(f"a solver named {name!r} is already registered")
        SOLVERS[name] = Solver(name, fn, options, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return add


def solver_options(name: str, given: dict[str, Any], also_valid: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options `given` for solver `name`, refusing (one clear line) any it does not take."""
    solver = SOLVERS[name]
    unknown = [k for k in given if k not in solver.options and k not in also_valid]
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in solver.options.items()) or "no options"
        raise ValueError(f"solver {name!r} does not use {', '.join(unknown)}; it takes {takes}")
    return {k: v for k, v in given.items() if k in solver.options}
