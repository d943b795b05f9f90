"""Lazy package attributes (PEP 562): ``from pkg import Name`` imports its module on first use.

A package ``__init__`` that imported every submodule would import torch, and the CLI
reads constants (thresholds, choices) from torch-free submodules such as
``diagnostics.findings`` without paying for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``name`` from ``package + "." + exports[name]``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
