"""The model registry: one name per model, mapped to its :class:`~implicit_em.models.base.Net` class.

A model file in this package decorates its class with ``@register("name")``; the package imports every
module in it, so the registry is complete once ``implicit_em.models`` is imported. The CLI help, the ensemble,
export and the experiments list models from here, and a run's model is found again from its saved config
(the net's class path) through :func:`model_class`.
"""

from __future__ import annotations

from implicit_em.errors import ConfigError
from implicit_em.models.base import Net

#: registry name -> Net class
MODELS: dict[str, type[Net]] = {}


def register(name: str):
    """Class decorator: add a :class:`Net` subclass to :data:`MODELS` under ``name``."""

    def add(cls: type[Net]) -> type[Net]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(
                f"model name {name!r} is registered twice ({MODELS[name].__qualname__}, {cls.__qualname__})"
            )
        cls.name = name
        MODELS[name] = cls
        return cls

    return add


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def model_class(name: str) -> type[Net]:
    """The registered class of ``name``: a registry name, a class name or a class path (as configs save it);
    anything else is refused with one line listing the registered models."""
    for cls in MODELS.values():
        if name in (cls.name, cls.__name__, class_path(cls)):
            return cls
    raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")


def model_names() -> list[str]:
    return sorted(MODELS)
