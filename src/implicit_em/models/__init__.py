"""The models: :mod:`.base` (the ``Net`` interface), :mod:`.registry` (names to classes), one module per model.

Importing this package imports every module in it, so each model registers itself: adding a model is adding
one file here (and its config in ``configs/model/``).
"""

from __future__ import annotations

import importlib
import pkgutil

from implicit_em.models.base import Net
from implicit_em.models.registry import MODELS, model_class, model_names, register

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MODELS", "Net", "model_class", "model_names", "register"]
