"""Bring your own model: ``--model path/to/file.py:build`` or ``--model pkg.module:build``.

Contract: ``build()`` — or ``build(input_dim=D)`` when it accepts ``input_dim`` —
returns an ``nn.Module`` whose ``forward(x)`` returns a dict with
``reconstruction`` (B, D), ``mu`` (B, Z), ``log_var`` (B, Z) and optionally ``z``,
like :class:`~meaning_transform.model.MeaningVAE`. Parameters are initialised
under ``torch.manual_seed(seed)`` inside a forked RNG, so runs are reproducible
and the caller's global RNG is untouched.

The user's code is guarded wherever it runs (import, build, every forward): an
exception or a ``sys.exit`` in it becomes a :class:`UserCodeError`, which the CLI
prints as one line with exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from meaning_transform.adapters import (
    InputShapeError,
    OutputRolesError,
    output_roles,
    shape_rows,
)

REQUIRED_KEYS = ("reconstruction", "mu", "log_var")
_BRIEF_MAX = 200  # characters of the user's exception message kept in the error line


class ModelSpecError(ValueError):
    """The --model spec cannot be loaded, built or used with the data."""


class UserCodeError(ModelSpecError):
    """The user's code raised (or called ``sys.exit``) at import, in build or in forward."""


def _load_callable(spec: str, option: str = "--model") -> Callable[..., object]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(f"{option} expects FILE.py:NAME or package.module:NAME, got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"--model: cannot import module {target!r}: {_brief(e)}") from e
        except (Exception, SystemExit) as e:  # the user's module: any error is theirs to fix
            raise UserCodeError(f"--model: importing {target} {raised(e)}") from e
    fn: object = module
    try:
        for part in attr.split("."):  # "VanillaVAE.loss_function": a method, by its class
            fn = getattr(fn, part, None)
            if fn is None:
                break
    except (Exception, SystemExit) as e:  # a module-level __getattr__
        raise UserCodeError(f"{option}: {target}.{attr} {raised(e)}") from e
    if fn is None:
        raise ModelSpecError(f"{option}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ModelSpecError(f"{option}: {target}:{attr} is not callable")
    return fn


def load_loss_factory(
    spec: str,
    extra_kwargs: dict[str, object] | None = None,
    beta_kwarg: str | None = None,
    weights: dict[str, float] | None = None,
) -> Callable[[nn.Module], nn.Module]:
    """``--loss FILE.py:NAME``: the user's loss, resolved now, built per model.

    NAME is a function (``loss_function``) or a method by its class
    (``VanillaVAE.loss_function``), which is bound to the model it is built for. The
    factory returns a :class:`~meaning_transform.adapters.LossStep` that calls the loss
    with what the user's model returned (see :data:`LAST_CALL`).
    """
    from meaning_transform.adapters import LossBindingError, LossStep, UserLoss

    fn = _load_callable(spec, option="--loss")
    method = "." in spec.rpartition(":")[2]

    def build(model: nn.Module) -> nn.Module:
        bound = fn.__get__(model) if method and hasattr(fn, "__get__") else fn
        try:
            user_loss = UserLoss(bound, extra_kwargs=extra_kwargs, weights=weights, name=spec)
        except LossBindingError as e:  # its message names the loss already
            raise ModelSpecError(f"--loss: {e}") from e
        return LossStep(user_loss, lambda: LAST_CALL.get(id(model)), beta_kwarg)

    return build


def check_loss(loss_fn: nn.Module, model: nn.Module, data: torch.Tensor) -> None:
    """Call the user's loss once on the model's output for a few rows (no update): a
    loss that returns what mtx cannot read fails now, in one line, not mid-training.
    A NaN is not refused here: it is a finding."""
    from meaning_transform.adapters import LossResultError

    rows = data[:4]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        out = model(rows)
        try:
            loss_fn(out, rows)
        except LossResultError as e:
            raise ModelSpecError(f"--loss: {e}") from e


def _import_file(target: str) -> ModuleType:
    path = Path(target)
    try:
        is_file = path.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _brief(e)
        raise ModelSpecError(f"--model: cannot use {target[:80]!r}: {reason}") from e
    if not is_file:
        raise ModelSpecError(f"--model: file not found: {target}")
    name = f"mtx_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"--model: cannot import {target}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's file: any error is theirs to fix
        sys.modules.pop(name, None)
        raise UserCodeError(f"--model: importing {target} {raised(e)}") from e
    return module


def raised(e: BaseException) -> str:
    """``raised TypeError: <first line>``, or ``called sys.exit(0)``."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}); user code must return or raise, not exit"
    return f"raised {_brief(e)}"


def _brief(e: BaseException) -> str:
    """``TypeError: <first non-empty line of the message>``, at most ~200 characters."""
    try:
        text = str(e)
    except Exception:  # a user exception whose __str__ itself raises
        text = ""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) > _BRIEF_MAX:
        line = line[: _BRIEF_MAX - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _accepts_input_dim(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "input_dim" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def load_model_factory(
    spec: str, input_shape: tuple[int, ...] | None = None
) -> Callable[[int, int], nn.Module]:
    """Resolve ``spec`` now (so a bad spec fails before any work) and return a factory.

    The factory takes ``(input_dim, seed)`` and returns a fresh model whose forward is
    guarded: whatever the user's code raises, or a ``sys.exit`` in it, at any call,
    becomes a :class:`UserCodeError` naming the spec, and an output that breaks the
    contract a :class:`ModelSpecError`. A model without trainable parameters is refused.
    """
    fn = _load_callable(spec)
    pass_dim = _accepts_input_dim(fn)

    def build(input_dim: int, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = fn(input_dim=input_dim) if pass_dim else fn()
            except (Exception, SystemExit) as e:
                raise UserCodeError(f"--model {spec} {raised(e)}") from e
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"--model: {spec} must return a torch.nn.Module, got {type(model).__name__}"
            )
        _check_trainable(model, spec)
        _guard_forward(model, spec, input_shape)
        return model

    return build


def _check_trainable(model: nn.Module, spec: str) -> None:
    params = list(model.parameters())
    what = type(model).__name__
    if not params:
        raise ModelSpecError(f"--model {spec}: the {what} it returns has no parameters to train")
    if not any(p.requires_grad for p in params):
        raise ModelSpecError(
            f"--model {spec}: none of the {len(params)} parameters of the {what} it returns "
            "requires a gradient (all frozen): nothing to train"
        )
    if any(p.is_meta for p in params):
        raise ModelSpecError(
            f"--model {spec}: the {what} it returns has parameters on the 'meta' device, "
            "which hold no values; build it on the CPU"
        )


def _guard_forward(model: nn.Module, spec: str, input_shape: tuple[int, ...] | None = None) -> None:
    """Adapt ``model.forward`` to mtx: flat rows in, named roles out, user errors caught.

    Called with data rows ``(B, D)``, the adapted forward reshapes them to
    ``input_shape`` (``--input-shape``) when given, calls the user's forward, reads the
    roles from whatever it returns (:func:`~meaning_transform.adapters.output_roles`: a
    dict with the usual aliases, a tuple or list in the common conventions, an object
    with attributes) and returns the dict mtx's checks read, the reconstruction as
    ``(B, D)``. The user's own output and input are kept in :data:`LAST_CALL` for the
    user's loss. Whatever the user's code raises, or a ``sys.exit`` in it, becomes a
    :class:`UserCodeError` naming the spec.

    Set on the instance (``nn.Module.__call__`` calls ``self.forward``), so hooks,
    parameter names and the class are untouched; a bound method, so ``copy.deepcopy``
    of the model calls the copy's own forward.
    """
    forward = type(model).forward

    def guarded(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        rows = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(rows, torch.Tensor):
            rows = None
        x = rows
        if rows is not None and input_shape is not None:
            try:
                x = shape_rows(rows, input_shape)
            except InputShapeError as e:
                raise ModelSpecError(f"--input-shape: {e}") from e
        try:
            out = forward(self, x) if x is not None else forward(self, *args, **kwargs)
        except ModelSpecError:
            raise
        except (Exception, SystemExit) as e:
            raise UserCodeError(f"--model {spec}: forward {raised(e)}{_hint(e)}") from e
        if x is None or rows is None:
            return out
        try:
            roles = output_roles(out, x)
        except OutputRolesError as e:
            raise ModelSpecError(f"--model {spec}: {e}") from e
        LAST_CALL[id(self)] = (out, x)
        named = roles.as_dict()
        named["reconstruction"] = roles.reconstruction.reshape(rows.shape[0], -1)  # (B, D)
        return named

    try:
        model.forward = types.MethodType(guarded, model)
    except (AttributeError, TypeError, RuntimeError):  # e.g. a TorchScript module: unguarded
        pass


# The user's own output and the input it was computed from, per adapted model (by id),
# from its latest forward: the user's loss is called with these, as they wrote it.
LAST_CALL: dict[int, tuple[object, torch.Tensor]] = {}


def _hint(e: BaseException) -> str:
    if isinstance(e, ValueError) and str(e).startswith("Expected more than 1 value per channel"):
        return " (batch norm cannot train on a batch of 1 sample: use --batch-size 2 or more)"
    text = str(e)
    if isinstance(e, RuntimeError) and ("conv" in text or "Expected 3D" in text or "4D" in text):
        return " (a conv model takes images: give their shape with --input-shape C,H,W)"
    return ""


def check_model(model: nn.Module, data: torch.Tensor, spec: str = "--model") -> None:
    """Run one forward pass on two rows and check the output against the contract."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data[:2])
    except ModelSpecError as e:
        if not isinstance(e, UserCodeError) or e.__cause__ is None:
            raise  # the output broke the contract: the message says how
        raise UserCodeError(_forward_failed(spec, data, e.__cause__)) from e.__cause__
    except (Exception, SystemExit) as e:  # an unguarded model (the Python API)
        raise UserCodeError(_forward_failed(spec, data, e)) from e
    finally:
        model.train(was_training)
    _check_output(out, data[:2], spec)


def _forward_failed(spec: str, data: torch.Tensor, e: BaseException) -> str:
    what = raised(e) if isinstance(e, SystemExit) else _brief(e)
    return f"{spec}: forward failed on data of shape (B, {data.shape[1]}): {what}{_hint(e)}"


def _check_output(out: object, x: torch.Tensor, spec: str) -> None:
    """Refuse an output whose roles cannot be read; ``x`` is the input, ``(B, D)``."""
    try:
        roles = output_roles(out, x)
    except OutputRolesError as e:
        raise ModelSpecError(f"{spec}: {e}") from e
    if roles.reconstruction.reshape(x.shape[0], -1).shape != x.reshape(x.shape[0], -1).shape:
        raise ModelSpecError(
            f"{spec}: reconstruction has shape {tuple(roles.reconstruction.shape)}, "
            f"expected {tuple(x.shape)} to match the data"
        )
