"""Placeholder until this command lands."""

from __future__ import annotations


def anneal_demo() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")
