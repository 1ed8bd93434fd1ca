"""Shared fixtures. Component fixtures live in tests/infra/*.py and are loaded here."""

from __future__ import annotations

import importlib
import pkgutil

import tests.infra as _infra

# Every module in tests/infra that defines fixtures is a plugin.
pytest_plugins = [
    f"tests.infra.{m.name}"
    for m in pkgutil.iter_modules(_infra.__path__)
    if not m.name.startswith("_")
]
_ = importlib  # keep import for plugin discovery tools
