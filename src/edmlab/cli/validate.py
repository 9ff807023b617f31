"""Start-up checks: every setting that would fail hours into a run fails before `fit`, in one line naming its key."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from edmlab.precond import DenoiserLike

__all__ = ["ConfigError", "check_types", "check_sampling", "check_callbacks"]

_SKIP = ("hydra", "paths")


class ConfigError(ValueError):
    """A setting that cannot work; the message names its key and what to give instead."""


def _targets(node: Any, key: str) -> Iterator[tuple[str, Mapping]]:
    """(dotted key, node) of every config node with a `_target_`, the model's copies of other groups last."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield key, node
        items = sorted(node.items(), key=lambda kv: kv[0] == "model") if not key else node.items()
        for k, v in items:
            if not key and k in _SKIP:
                continue
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def _expected(param: inspect.Parameter) -> type | None:
    """The type a parameter's default (or plain annotation) asks for: bool, int or float; None if no number."""
    default = param.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int | float):
        return type(default)
    text = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    parts = {p.strip() for p in str(text).replace("Optional[", "").rstrip("]").split("|")} - {"None"}
    return {"int": int, "float": float, "bool": bool}.get(parts.pop()) if len(parts) == 1 else None


def _fits(value: Any, expected: type) -> bool:
    if value is None:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return not isinstance(value, str)  # lists, tensors, ...: not this check's business
    return expected is float or float(value).is_integer()


def check_types(config: Mapping[str, Any]) -> None:
    """Numbers where the `_target_`s take numbers (a resolved config): `optim.lr=fast` fails here, not in fit."""
    from hydra.utils import get_object

    for key, node in _targets(config, ""):
        try:
            target = get_object(str(node["_target_"]))
            signature = inspect.signature(target)
        except Exception:  # noqa: BLE001 - an unknown _target_ is reported by instantiate, with its own message
            continue
        for name, value in node.items():
            param = signature.parameters.get(str(name))
            expected = _expected(param) if param is not None else None
            if expected is not None and not _fits(value, expected):
                what = {bool: "true or false", int: "an integer", float: "a number"}[expected]
                raise ConfigError(f"{key}.{name}={value!r}: expected {what} ({expected.__name__}), got "
                                  f"{type(value).__name__}; e.g. {key}.{name}={param.default!r}")


class _Probe(nn.Module):
    """Stands for the denoiser in a dry run of a sampler: its noise range, rounding, labels and shape; outputs zeros."""

    def __init__(self, denoiser: DenoiserLike) -> None:
        super().__init__()
        self.label_dim, self.data_shape = denoiser.label_dim, denoiser.data_shape
        self.sigma_min, self.sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
        self._round_sigma = denoiser.round_sigma

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self._round_sigma(sigma)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None, **_: Any):
        return torch.zeros_like(x)


def _grid(key: str, per_class: Any, num_unconditional: Any, scale: Any) -> None:
    for name, value, low in (("per_class", per_class, 1), ("num_unconditional", num_unconditional, 1),
                             ("scale", scale, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key}.{name}={value!r}: expected an integer >= {low}")


def check_sampling(denoiser: DenoiserLike, data_shape: list[int], samplers: Mapping[str, Callable],
                   grids: Mapping[str, Mapping[str, Any]] = (), checks: Mapping[str, Callable] = ()) -> None:
    """Run each sampler once on a stand-in denoiser (a few steps on one tiny item); check grid sizes; run checks.

    `samplers`: config key -> sampler partial; `grids`: key -> per_class / num_unconditional / scale;
    `checks`: key -> a callable raising ValueError on bad settings (e.g. a metric callback's own check).
    """
    probe = _Probe(denoiser)
    latents = torch.zeros(1, *data_shape)
    labels = torch.eye(probe.label_dim)[:1] if probe.label_dim else None
    for key, sampler in samplers.items():
        try:
            out = sampler(probe, latents, class_labels=labels, generator=[torch.Generator().manual_seed(0)])
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{key}: {e}") from None
        if not (isinstance(out, torch.Tensor) and out.shape == latents.shape):
            raise ConfigError(f"{key}: the sampler returned {type(out).__name__} "
                              f"{getattr(out, 'shape', '')}, not a batch like its latents {tuple(latents.shape)}")
    for key, grid in dict(grids).items():
        _grid(key, grid.get("per_class"), grid.get("num_unconditional"), grid.get("scale"))
    for key, check in dict(checks).items():
        try:
            check()
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{key}: {e}") from None


def check_callbacks(model: nn.Module, callbacks: Mapping[str, Any]) -> None:
    """`check_sampling` for every callback's sampler, grid sizes and own `check_settings`, named by config key."""
    samplers, grids, checks = {}, {}, {}
    for key, callback in callbacks.items():
        if callable(getattr(callback, "sampler", None)):
            samplers[f"{key}.sampler"] = callback.sampler
        if all(hasattr(callback, a) for a in ("per_class", "num_unconditional", "scale")):
            grids[key] = {a: getattr(callback, a) for a in ("per_class", "num_unconditional", "scale")}
        if callable(getattr(callback, "check_settings", None)):  # e.g. a metric callback's own settings
            checks[key] = lambda c=callback: c.check_settings(model)
    check_sampling(model.ema.module, model.data_shape, samplers, grids, checks)
