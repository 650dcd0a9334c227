"""Architecture registry.

Each architecture module defines a config dataclass and a network class and registers them with
``@register_architecture(name, ConfigClass)``. ``build_model(name, input_spec, **params)`` checks
the parameter names against the dataclass fields and builds the network.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import ExitHead, ExitOutputs, ExitPrefix, InputSpec, MultiExitNetwork, select_samples

__all__ = [
    "ARCHITECTURES",
    "ExitHead",
    "ExitOutputs",
    "ExitPrefix",
    "InputSpec",
    "MultiExitNetwork",
    "build_model",
    "list_architectures",
    "make_config",
    "register_architecture",
    "select_samples",
]


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    network_class: Callable[..., MultiExitNetwork]


ARCHITECTURES: dict[str, Architecture] = {}

_MODULES = ("msdnet", "ranet", "ee_resnet")


def register_architecture(name: str, config_class: type):
    """Class decorator: register ``network_class(config, input_spec)`` under ``name``.

    Which datasets an architecture can run on follows from their input (``InputSpec``: size,
    channels, classes) and the config class's own checks (``validate(input_size)``), not from a
    list of dataset names."""

    def wrap(network_class):
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = Architecture(name, config_class, network_class)
        return network_class

    return wrap


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise


def list_architectures() -> list[str]:
    _load_all()
    return sorted(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    _load_all()
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def make_config(name: str, params: dict[str, Any] | None = None):
    """The architecture's config dataclass from a dict, rejecting unknown keys."""
    arch = get_architecture(name)
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(arch.config_class)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for architecture {name!r}; allowed: {', '.join(sorted(fields))}"
        )
    config = arch.config_class(**params)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def build_model(name: str, input_spec: InputSpec, **params: Any) -> MultiExitNetwork:
    arch = get_architecture(name)
    return arch.network_class(make_config(name, params), input_spec)
