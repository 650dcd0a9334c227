"""A small registry shared by training methods and post-hoc methods.

A method is a class with a ``name``, a ``Params`` dataclass (its hyperparameters and their
defaults) and a ``test_params`` dict (a tiny setting the test suite uses). Modules in a method
package are imported on first use, so adding a method is one new file with one decorator.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from typing import Any


class Registry:
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: type) -> type:
        name = cls.name
        if name in self._entries and self._entries[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{self.kind} {name!r}: Params must be a dataclass")
        self._entries[name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> type:
        self._load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def make_params(self, name: str, params: dict[str, Any] | None, where: str = "") -> Any:
        """The method's Params from a config dict: unknown keys and wrong types are errors."""
        cls = self.get(name)
        return build_params(cls.Params, params or {}, f"{where or self.kind + ' ' + repr(name)}")


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def build_params(params_class: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a Params dataclass from a dict, with errors that name the key and value."""
    hints = typing.get_type_hints(params_class)
    fields = {f.name: f for f in dataclasses.fields(params_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise ValueError(
                f"{where}: parameter {key!r} = {value!r} has the wrong type; expected {_type_name(hints[key])}"
            )
    params = params_class(**values)
    check = getattr(params, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return params
