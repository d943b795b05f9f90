"""Placeholder until this command lands."""

from __future__ import annotations


def debug_extended() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")
