"""Where a NaN or Inf first appeared: the data, a module's forward, a loss term, or backward.

A healthy step costs one finiteness check of the loss and its terms (scalars) on the
device, read once. Only the first non-finite step is localised, and only then is anything
re-run: that step's batch goes through the model again under ``no_grad`` with a forward
hook on every module (train mode kept, the RNG forked and restored, the buffers swapped
for copies so BatchNorm statistics and the pending graph are untouched), and the first
module to finish with a non-finite output is named, with the abs range of its input and
output. A finite forward with a non-finite loss names the term. A finite loss whose
backward is not finite is read afterwards from the gradient hooks' snapshots: the first
parameter reached in backward (the one whose layer ran last in the forward) is named::

    guard = NanGuard(model)
    for step, x in enumerate(batches):
        out = model(x)
        terms = loss_terms(out, x)
        guard.check(step, x, out, {"loss": sum(terms.values()), "terms": terms})
        ...
    guard.origin  # NanOrigin(kind="forward", where="encoder.2", step=17, details={...})

The Doctor owns one (``Doctor(nan_guard=True)``, the default) and hands its origin to the
``nonfinite-*`` rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meaning_transform.diagnostics.gradients import forward_order

OriginKind = Literal["data", "forward", "loss-term", "backward"]


@dataclass(frozen=True)
class NanOrigin:
    """The first place a NaN or Inf was seen in a run, as plain data.

    ``where`` is ``"input batch"`` (data), a module's qualified name (forward; ``""`` is
    the model itself), a loss term's name (``"loss"`` for a loss given as one scalar) or
    a parameter's name (backward). ``step`` is the 0-based Doctor step, or for
    ``backward`` the 0-based backward pass. ``details`` holds numbers and short strings:
    abs ranges and NaN/Inf counts.
    """

    kind: OriginKind
    where: str
    step: int
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One clause for a finding's message."""
        d = self.details
        if self.kind == "data":
            return (
                f"first non-finite at step {self.step}, in the data: {d.get('nan', 0)} NaN, "
                f"{d.get('inf', 0)} Inf in the batch of shape {d.get('shape', '?')}"
            )
        if self.kind == "forward":
            name = self.where or "the model itself"
            if "module" not in d:  # not localised to a module (no batch to re-run)
                return f"first non-finite at step {self.step}, in the model's output {name!r}"
            return (
                f"first non-finite at step {self.step}, in the forward output of {name} "
                f"({d['module']}): input |x| in [{_g(d['input_abs_min'])}, "
                f"{_g(d['input_abs_max'])}], output |y| in [{_g(d['output_abs_min'])}, "
                f"{_g(d['output_abs_max'])}] with {d['output_nan']} NaN, "
                f"{d['output_inf']} Inf"
            )
        if self.kind == "loss-term":
            return (
                f"first non-finite at step {self.step}, in the loss term {self.where!r} "
                f"(value {_g(d.get('value', math.nan))}) while the model's forward was finite"
            )
        return (
            f"first non-finite in backward (pass {self.step}), in the gradient of "
            f"{self.where} ({d.get('non_finite', '?')} NaN/Inf entries) while the forward "
            "and the loss were finite"
        )


def _g(x: float) -> str:
    return f"{x:.3g}"


def _tensors(value: object) -> list[Tensor]:
    """The floating-point tensors in a module's input or output (nested containers too)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if is_dataclass(value) and not isinstance(value, type):
        return [t for v in vars(value).values() for t in _tensors(v)]
    return []


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def abs_range(tensors: Sequence[Tensor]) -> dict[str, float | int]:
    """abs-min and abs-max over all entries (NaN left out, Inf kept), NaN and Inf counts."""
    if not tensors or all(t.numel() == 0 for t in tensors):
        return {"abs_min": math.nan, "abs_max": math.nan, "nan": 0, "inf": 0}
    flat = torch.cat([t.detach().abs().reshape(-1).double() for t in tensors])  # (N,)
    nan = torch.isnan(flat)
    seen = flat[~nan]
    low = seen.min() if seen.numel() else flat.new_tensor(math.nan)
    high = seen.max() if seen.numel() else flat.new_tensor(math.nan)
    low_, high_, nans, infs = torch.stack(
        [low, high, nan.sum().double(), torch.isinf(flat).sum().double()]
    ).tolist()  # one host copy
    return {"abs_min": low_, "abs_max": high_, "nan": int(nans), "inf": int(infs)}


@contextmanager
def _rerun(model: nn.Module, x: Tensor) -> Iterator[None]:
    """``no_grad``, the RNG forked, and every buffer swapped for a copy during the re-run.

    Copies rather than an in-place restore: the pending graph may have saved a buffer
    (BatchNorm's running statistics, a fixed noise buffer), and writing into it would
    fail that step's ``backward``.
    """
    swapped: list[tuple[nn.Module, str, Tensor]] = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                swapped.append((module, name, buffer))
                module._buffers[name] = buffer.clone()
    devices = {p.device for p in model.parameters()} | {x.device}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield
    finally:
        for module, name, buffer in swapped:
            module._buffers[name] = buffer


def first_nonfinite_module(model: nn.Module, x: Tensor) -> tuple[str, nn.Module, dict] | None:
    """Re-run ``model(x)`` and return the first module (in the order modules finished)
    whose output holds a NaN or Inf: its qualified name, the module, and the abs ranges
    of its input and output. None when every module's output is finite this time."""
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    found: list[tuple[str, nn.Module, dict]] = []

    def note(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        if found:
            return
        outputs = _tensors(output)
        if _all_finite(outputs):
            return
        inputs, out = abs_range(_tensors(args)), abs_range(outputs)
        details = {f"input_{k}": v for k, v in inputs.items() if k.startswith("abs")}
        details.update({f"output_{k}": v for k, v in out.items()})
        found.append((names[module], module, details))

    handles = [m.register_forward_hook(note) for m in names]
    device = next((p.device for p in model.parameters()), x.device)
    try:
        with _rerun(model, x):
            model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


class NanGuard:
    """Finds where the first NaN or Inf of a run appeared (see the module docstring).

    Args:
        model: the model whose forward is re-run on the first non-finite step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.first: NanOrigin | None = None  # data, forward or loss-term; the first one
        self._example: Tensor | None = None  # a few rows, for the layers' forward order

    def check(
        self,
        step: int,
        x: Tensor | None,
        output: Mapping[str, Tensor],
        result: Mapping[str, Any],
        bad_inputs: int | None = None,
        finite: bool | None = None,
    ) -> NanOrigin | None:
        """Check one step (before ``backward``); returns the origin when first found now.

        Args:
            step: the step's index (0-based).
            x: the batch the model was given (None: the data is not checked and a
                non-finite output is not localised to a module).
            output: the model's output roles (``reconstruction``, ``mu``, ...).
            result: the loss as a dict with ``loss`` (the total) and ``terms``.
            bad_inputs: the count of non-finite entries of ``x`` when already known.
            finite: True when the caller has read the loss, every term and the data on
                the host and found them finite (then nothing is read here).
        """
        if self.first is not None:
            return None  # the first occurrence only: no cost afterwards
        if x is not None and self._example is None:
            self._example = x[:8].detach().clone()
        if finite:
            return None
        terms = {n: t for n, t in result.get("terms", {}).items() if isinstance(t, Tensor)}
        flags = [torch.isfinite(t.detach()).all() for t in (result["loss"], *terms.values())]
        counted = bad_inputs is not None or x is None or not x.is_floating_point()
        if not counted and x is not None:
            flags.append(torch.isfinite(x).all())
        if bool(torch.stack(flags).all()) and not bad_inputs:  # the one read per step
            return None
        if not counted and x is not None:
            bad_inputs = int((~torch.isfinite(x)).sum())
        self.first = self._localise(step, x, output, result["loss"], terms, bool(bad_inputs))
        return self.first

    def _localise(
        self,
        step: int,
        x: Tensor | None,
        output: Mapping[str, Tensor],
        loss: Tensor,
        terms: Mapping[str, Tensor],
        bad_data: bool,
    ) -> NanOrigin:
        if bad_data and x is not None:
            counts = abs_range([x])
            details = {"nan": counts["nan"], "inf": counts["inf"], "shape": tuple(x.shape)}
            return NanOrigin("data", "input batch", step, details)
        outputs = {n: t for n, t in output.items() if isinstance(t, Tensor)}
        if not _all_finite(list(outputs.values())):
            located = first_nonfinite_module(self.model, x) if x is not None else None
            if located is not None:
                name, module, details = located
                return NanOrigin(
                    "forward", name, step, {"module": type(module).__name__, **details}
                )
            role = next(n for n, t in outputs.items() if not _all_finite([t]))
            return NanOrigin("forward", role, step, abs_range([outputs[role]]))
        main = {n: t for n, t in terms.items() if "/" not in n}
        for name, t in [*main.items(), *terms.items()]:
            if not _all_finite([t.detach()]):
                return NanOrigin("loss-term", name, step, {"value": float(t.detach().sum())})
        return NanOrigin("loss-term", "loss", step, {"value": float(loss.detach().sum())})

    def origin(self, snapshots: Sequence[Any], backward_passes_before: int) -> NanOrigin | None:
        """The run's first origin: :attr:`first`, unless a backward pass recorded before it
        (``snapshots``: the gradient hooks' :class:`GradientSnapshot` per pass) already had
        a non-finite gradient. ``backward_passes_before``: the passes recorded when
        :attr:`first` was found (ignored without one)."""
        limit = backward_passes_before if self.first is not None else len(snapshots)
        for snapshot in snapshots[:limit]:
            bad = [p for p in snapshot.params if (p.non_finite or 0) > 0]
            if bad:
                param = max(bad, key=self._backward_rank())
                details = {"non_finite": param.non_finite, "parameters": len(bad)}
                return NanOrigin("backward", param.name, snapshot.step, details)
        return self.first

    def _backward_rank(self) -> Any:
        """Sort key: larger for a parameter reached earlier in backward, i.e. whose layer
        ran later in the forward (registration order when the order is unknown)."""
        modules = list(self.model.named_modules())
        names = {m: n for n, m in reversed(modules)}  # a shared module: its first name
        owners = {n: i for i, (n, _) in enumerate(modules)}
        registered = {n: i for i, (n, _) in enumerate(self.model.named_parameters())}
        ran: dict[str, int] = {}
        if self._example is not None:
            for i, module in enumerate(forward_order(self.model, self._example)):
                ran[names.get(module, "")] = i

        def rank(p: Any) -> tuple[int, int, int]:
            owner = p.name.rsplit(".", 1)[0] if "." in p.name else ""
            # the layer that ran last; then the one registered last; within a layer, the
            # first registered parameter (weight before bias)
            return (ran.get(owner, -1), owners.get(owner, -1), -registered.get(p.name, 0))

        return rank
