"""Bring your own model: ``--model path/to/file.py:build`` or ``--model pkg.module:build``.

Contract: ``build()`` — or ``build(input_dim=D)`` when it accepts ``input_dim`` —
returns an ``nn.Module`` whose ``forward(x)`` returns a dict with
``reconstruction`` (B, D), ``mu`` (B, Z), ``log_var`` (B, Z) and optionally ``z``,
like :class:`~meaning_transform.model.MeaningVAE`. Parameters are initialised
under ``torch.manual_seed(seed)`` inside a forked RNG, so runs are reproducible
and the caller's global RNG is untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REQUIRED_KEYS = ("reconstruction", "mu", "log_var")


class ModelSpecError(ValueError):
    """The --model spec cannot be loaded, built or used with the data."""


def _load_callable(spec: str) -> Callable[..., object]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(
            f"--model expects FILE.py:FUNCTION or package.module:FUNCTION, got {spec!r}"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"--model: file not found: {target}")
        name = f"mtx_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"--model: cannot import {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error is theirs to fix
            raise ModelSpecError(f"--model: importing {target} raised {_brief(e)}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"--model: cannot import module {target!r}: {e}") from e
        except Exception as e:
            raise ModelSpecError(f"--model: importing {target} raised {_brief(e)}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ModelSpecError(f"--model: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ModelSpecError(f"--model: {target}:{attr} is not callable")
    return fn


def _brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _accepts_input_dim(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "input_dim" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def load_model_factory(spec: str) -> Callable[[int, int], nn.Module]:
    """Resolve ``spec`` now (so a bad spec fails before any work) and return a factory.

    The factory takes ``(input_dim, seed)`` and returns a fresh model.
    """
    fn = _load_callable(spec)
    pass_dim = _accepts_input_dim(fn)

    def build(input_dim: int, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = fn(input_dim=input_dim) if pass_dim else fn()
            except Exception as e:
                raise ModelSpecError(f"--model: {spec} raised {_brief(e)}") from e
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"--model: {spec} must return a torch.nn.Module, got {type(model).__name__}"
            )
        return model

    return build


def check_model(model: nn.Module, data: torch.Tensor, spec: str = "--model") -> None:
    """Run one forward pass on two rows and check the output against the contract."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data[:2])
    except Exception as e:
        raise ModelSpecError(
            f"{spec}: forward failed on data of shape (B, {data.shape[1]}): {_brief(e)}"
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, dict):
        raise ModelSpecError(
            f"{spec}: forward must return a dict with {', '.join(REQUIRED_KEYS)}, "
            f"got {type(out).__name__}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise ModelSpecError(f"{spec}: forward's dict lacks {', '.join(missing)}")
    rec, mu, log_var = (out[k] for k in REQUIRED_KEYS)
    if not all(isinstance(t, torch.Tensor) for t in (rec, mu, log_var)):
        raise ModelSpecError(f"{spec}: reconstruction, mu and log_var must be tensors")
    if tuple(rec.shape) != tuple(data[:2].shape):
        raise ModelSpecError(
            f"{spec}: reconstruction has shape {tuple(rec.shape)}, "
            f"expected {tuple(data[:2].shape)} to match the data"
        )
    if mu.dim() != 2 or mu.shape != log_var.shape or mu.shape[0] != rec.shape[0]:
        raise ModelSpecError(
            f"{spec}: mu and log_var must both be (B, Z), got {tuple(mu.shape)} "
            f"and {tuple(log_var.shape)}"
        )
