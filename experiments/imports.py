"""Objects named by import path in configs (omegaconf ``_target_`` style)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["import_object", "registering"]

_T = TypeVar("_T")


def registering(registry: dict[str, Any], kind: str, name: str) -> Callable[[_T], _T]:
    """A decorator adding a factory to ``registry`` under ``name``; a duplicate raises.

    >>> registry: dict[str, Any] = {}
    >>> _ = registering(registry, "model", "m")(dict)
    >>> registering(registry, "model", "m")(list)
    Traceback (most recent call last):
    ValueError: model name='m' is already registered (by <class 'dict'>); pick another name
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")

    def decorator(factory: _T) -> _T:
        if name in registry:
            raise ValueError(
                f"{kind} name={name!r} is already registered (by {registry[name]!r}); "
                "pick another name"
            )
        if not callable(factory):
            raise TypeError(f"register_{kind}({name!r}) needs a callable, got {factory!r}")
        registry[name] = factory
        return factory

    return decorator


def import_object(path: str, key: str = "_target_") -> Any:
    """The object at import path ``package.module.Name`` (or ``package.module:Name``).

    >>> import_object("collections.OrderedDict").__name__
    'OrderedDict'
    >>> import_object("collections.NoSuch", "model")
    Traceback (most recent call last):
    ValueError: model='collections.NoSuch': module 'collections' has no attribute 'NoSuch'
    """
    if not isinstance(path, str) or not path.replace(":", ".").strip("."):
        raise ValueError(f"{key}={path!r} must be an import path like 'package.module.Class'")
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}={path!r} must be an import path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}={path!r}: cannot import {module_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}={path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
