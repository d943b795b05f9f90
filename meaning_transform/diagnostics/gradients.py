"""Per-parameter gradient statistics, reduced on the device and copied to the host once.

Three ways in, one result type (:class:`GradientSnapshot`):

- :func:`gradient_snapshot` reads ``param.grad`` after ``loss.backward()``.
- :class:`GradientMonitor` is the object a training loop holds; it keeps a history of
  snapshots and, if asked, the size of each optimizer update relative to the weights.
- :class:`GradientHooks` captures the same statistics from inside ``backward()`` through
  post-accumulate-grad hooks, for loops we do not control.

``first_last_ratio`` compares the first and the last weight-bearing layer
(:data:`WEIGHTED_LAYERS`: Linear, Conv and ConvTranspose). Given an example input
(``example_input=`` or ``set_example_input``), they are the first and last such layer to
run in one probe forward pass, made once, in eval mode under ``no_grad`` with the RNG
forked (see :func:`forward_order`); without one, the first and last in registration order,
which is wrong for a model that registers its layers out of order. The snapshot says which
(``layer_order``).

:func:`dead_units` (never-active ReLU-family units) lives in :mod:`.activations` and is
re-exported here.

Every per-parameter number is computed on the parameter's device, all of them are stacked
into one tensor, and that tensor crosses to the host with a single ``.cpu().tolist()``.
Nothing here calls ``.item()`` per parameter (Cockpit's one slip: a device sync each).

Two levels of detail (``detail=``), because every pass over the gradients costs memory
bandwidth right after ``backward()`` has evicted them from the caches (measurements in
``docs/benchmarks.md``):

- ``"full"`` (default): norm, mean, mean |g|, std, min, max, zero fraction, non-finite
  count and the weight norm. Per parameter: one ``sum``, one ``abs().sum()``, one ``dot``
  (sum of squares), one ``count_nonzero``, one ``aminmax``, and a ``dot`` of the weight.
- ``"lean"``: norm, zero fraction and non-finite count only (one ``dot`` and one
  ``count_nonzero`` per parameter); the other fields are ``None``.
- ``"norm"``: norm and non-finite count only (one ``dot`` per parameter); zero fraction
  is ``None`` too. The Doctor's default between its full steps (see
  :mod:`~meaning_transform.diagnostics.schedule`): the total norm every step, and every
  NaN/Inf gradient seen, for about a tenth of a millisecond on a 1 M-parameter model.

Mean, std, norm and fractions are derived on the host, in float64, from the per-parameter
sums. The non-finite count costs nothing on a healthy step: a NaN or Inf entry makes the
parameter's sum of squares non-finite, and only such parameters are counted exactly
(``isfinite``), which on a broken step means a second small host copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Literal

import torch
from torch import Tensor, nn

from meaning_transform.diagnostics.activations import dead_units as dead_units
from meaning_transform.diagnostics.activations import measuring

Detail = Literal["full", "lean", "norm"]
DETAILS: tuple[str, ...] = ("full", "lean", "norm")
LayerOrder = Literal["forward", "registration"]
# The layers first_last_ratio compares: the first one to touch the input, the last one to
# produce the output.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# Columns of the per-parameter block built on the device (one row per parameter): sums over
# the gradient's entries, from which the host derives mean, std, norm and fractions.
_SUM, _ABS_SUM, _SQ_SUM, _NONZERO, _MIN, _MAX, _NON_FINITE = range(7)
_WEIGHT_NORM, _DELTA_NORM, _OLD_NORM, _MEASURED = range(7, 11)
_COLUMNS = 11


@dataclass(frozen=True)
class ParamGradStats:
    """Statistics of one parameter's gradient (plain floats, already on the host).

    The gradient fields (``norm`` … ``non_finite``) are ``None`` when ``has_grad`` is False;
    ``mean``, ``abs_mean``, ``std``, ``min``, ``max`` and ``weight_norm`` are also ``None``
    when the snapshot was taken with ``detail="lean"``. ``std`` is the population standard
    deviation of the gradient entries (the entries are the whole population, not a
    sample), so a one-element gradient has ``std == 0.0``; it is computed as
    sqrt(E[g^2] - mean^2) from float32 sums, so its relative error is about
    1e-7 * E[g^2] / var (tiny unless nearly all entries are equal). NaN in a gradient
    propagates into ``norm``/``mean``/``std``/``min``/``max`` and is counted in
    ``non_finite``.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    has_grad: bool
    norm: float | None  # 2-norm of the gradient
    mean: float | None
    abs_mean: float | None  # mean |g|; DeepDiagnosis calls a gradient vanished below 1e-7
    std: float | None
    min: float | None
    max: float | None
    zero_fraction: float | None  # fraction of entries exactly 0.0
    non_finite: int | None  # count of NaN/Inf entries
    weight_norm: float | None  # 2-norm of the parameter itself (None with detail="lean")
    # ||w_after - w_before|| / ||w_before|| over one optimizer step; None when not measured
    # or when ||w_before|| == 0 (a zero-initialised bias on its first step).
    update_ratio: float | None = None


@dataclass(frozen=True)
class GradientSnapshot:
    """Gradient statistics of a whole model at one step.

    ``total_norm`` is the 2-norm of the per-parameter 2-norms over parameters that have a
    gradient: the number ``torch.nn.utils.clip_grad_norm_(params, max_norm=inf)`` returns.
    ``first_last_ratio`` is ``norm(first layer's weight grad) / norm(last layer's weight
    grad)`` over the trainable weight-bearing layers (:data:`WEIGHTED_LAYERS`), AUTOTRAINER's
    vanishing/exploding signal. ``layer_order`` says how first and last were found:
    ``"forward"``, the first and last to run in a probe forward pass on an example input;
    ``"registration"``, the first and last in module registration order (no example input
    was given). The ratio is ``None`` with fewer than two such layers, when either has no
    gradient, or when the last one's gradient norm is zero or not finite.
    """

    params: tuple[ParamGradStats, ...]
    total_norm: float
    missing: tuple[str, ...]  # require grad, but .grad is None (not reached by the loss)
    first_last_ratio: float | None
    first_layer: str | None  # name of the first weight-bearing layer's weight
    last_layer: str | None  # name of the last weight-bearing layer's weight
    step: int | None = None  # filled in by GradientMonitor / GradientHooks
    detail: str = "full"  # "full" or "lean" (which fields were measured)
    layer_order: LayerOrder = "registration"  # how first/last were found

    def param(self, name: str) -> ParamGradStats:
        """The statistics of the parameter called ``name``."""
        for stats in self.params:
            if stats.name == name:
                return stats
        raise KeyError(f"no parameter named {name!r} in this snapshot")

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-friendly data (tuples become lists)."""
        return asdict(self)


# --------------------------------------------------------------------------- helpers


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that require grad, in registration order (shared parameters once)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _is_weighted(module: nn.Module) -> bool:
    return isinstance(module, WEIGHTED_LAYERS) and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


def forward_order(model: nn.Module, example_input: Tensor) -> tuple[nn.Module, ...]:
    """The weight-bearing layers of ``model`` in the order they ran on ``example_input``.

    One entry per call (a layer called twice appears twice). One forward pass in eval mode
    under ``no_grad``, the RNG forked and restored, each module's mode restored and the
    hooks removed, so the caller's training is not perturbed. A few samples are enough:
    only the order is kept. An error of the model's own forward propagates.
    """
    calls: list[nn.Module] = []

    def note(module: nn.Module, args: object, output: object) -> None:
        calls.append(module)

    handles = [m.register_forward_hook(note) for m in model.modules() if _is_weighted(m)]
    device = next((p.device for p in model.parameters()), example_input.device)
    try:
        with measuring(model, example_input):
            model(example_input.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(calls)


def _layer_ends(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    order: tuple[nn.Module, ...] | None,
) -> tuple[str | None, str | None]:
    """Names of the first and last weights, among ``named``, of weight-bearing layers.

    In ``order`` (layers as they ran, see :func:`forward_order`), or in registration order
    when ``order`` is None. Frozen layers are not in ``named``, so they are skipped.
    """
    names = {id(p): name for name, p in named}
    layers = [m for m in model.modules() if _is_weighted(m)] if order is None else order
    weights = [names[id(m.weight)] for m in layers if id(m.weight) in names]
    if not weights:
        return None, None
    return weights[0], weights[-1]


@dataclass(frozen=True)
class _Layout:
    """What a snapshot needs besides the numbers, for one list of parameters."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]
    ends: tuple[str | None, str | None]  # first and last layer weight (see _layer_ends)
    ends_index: tuple[int | None, int | None]  # their positions in ``names``
    layer_order: LayerOrder  # how ``ends`` were found


class _LayoutCache:
    """The :class:`_Layout`, rebuilt only when the parameters (or their shapes) change.

    Walking the module tree and reading names and shapes costs about as much as a
    reduction, so a monitor does it once rather than every step. The forward order of the
    layers (:func:`forward_order`) is probed once, when it is given, and kept across
    rebuilds; None means registration order.
    """

    def __init__(self, order: tuple[nn.Module, ...] | None = None) -> None:
        self._key: tuple[tuple[int, torch.Size], ...] | None = None
        self._layout: _Layout | None = None
        self._order = order

    def set_order(self, order: tuple[nn.Module, ...] | None) -> None:
        """Use this forward order of the layers (None: registration order) from now on."""
        self._order = order
        self._layout = None

    def __call__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> _Layout:
        key = tuple((id(p), p.shape) for _, p in named)
        if key != self._key or self._layout is None:
            names = tuple(name for name, _ in named)
            ends = _layer_ends(model, named, self._order)
            self._key = key
            self._layout = _Layout(
                names=names,
                shapes=tuple(tuple(p.shape) for _, p in named),
                numels=tuple(p.numel() for _, p in named),
                ends=ends,
                ends_index=(
                    names.index(ends[0]) if ends[0] in names else None,
                    names.index(ends[1]) if ends[1] in names else None,
                ),
                layer_order="registration" if self._order is None else "forward",
            )
        return self._layout


def _check_detail(detail: str) -> str:
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    return detail


def _dense(grad: Tensor) -> Tensor:
    """The gradient as a dense tensor (statistics run under ``torch.no_grad()``)."""
    return grad.to_dense() if grad.is_sparse else grad


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float64 wherever the device has it (not MPS): float32 min/max survive exactly."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms computed the way ``clip_grad_norm_`` computes them.

    Grouped by (device, dtype), ``torch._foreach_norm`` on CPU/CUDA and
    ``torch.linalg.vector_norm`` elsewhere.
    """
    out: list[Tensor] = [tensors[0]] * len(tensors)  # placeholder, every slot is replaced
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, _), index in groups.items():
        group = [tensors[i] for i in index]
        if device.type in ("cpu", "cuda"):
            norms = list(torch._foreach_norm(group, 2.0))
        else:
            norms = [torch.linalg.vector_norm(t, 2.0) for t in group]
        for i, norm in zip(index, norms, strict=True):
            out[i] = norm
    return out


def _square_sum(v: Tensor) -> Tensor:
    """sum(v * v) of a 1-D tensor without a temporary (BLAS dot for float32/float64)."""
    if v.dtype in (torch.float32, torch.float64):
        return torch.dot(v, v)
    return torch.linalg.vector_norm(v, dtype=torch.float32).square()


def _column(values: list[Tensor], acc: torch.dtype) -> Tensor:
    """Stack 0-dim tensors of one device into a (G,) column in ``acc``."""
    if len({v.dtype for v in values}) == 1:
        return torch.stack(values).to(acc)
    return torch.stack([v.to(acc) for v in values])


def _grad_columns(
    grads: Sequence[Tensor], weights: Sequence[Tensor], detail: str
) -> dict[int, Tensor]:
    """The measured columns of same-device gradients, by column index, each (G,) in acc.

    A few reductions per parameter, no temporary larger than one gradient (a multi-MB
    temporary per step faults in fresh pages every time). ``detail="lean"`` measures
    ``_SQ_SUM`` and ``_NONZERO`` only, ``"norm"`` ``_SQ_SUM`` alone; full detail adds the
    sum, the absolute sum, min, max and the weight norm. Columns not returned are NaN in
    the block, except ``_NON_FINITE``, which is 0 here and filled in by :func:`_fill_non_finite`.
    """
    acc = _acc_dtype(grads[0])
    flats = [g.reshape(-1) for g in grads]
    columns = {_SQ_SUM: _column([_square_sum(v) for v in flats], acc)}
    if detail == "norm":
        return columns
    columns[_NONZERO] = _column([torch.count_nonzero(v) for v in flats], acc)
    if detail == "full":
        zero = flats[0].new_zeros(())
        pairs = [torch.aminmax(v) if v.numel() else (zero, zero) for v in flats]
        columns[_SUM] = _column([v.sum() for v in flats], acc)
        columns[_ABS_SUM] = _column([v.abs().sum() for v in flats], acc)
        columns[_MIN] = _column([lo for lo, _ in pairs], acc)
        columns[_MAX] = _column([hi for _, hi in pairs], acc)
        columns[_WEIGHT_NORM] = _column([_square_sum(w.reshape(-1)) for w in weights], acc).sqrt()
    return columns


def _block(columns: dict[int, Tensor], rows: int, acc: torch.dtype, device: torch.device) -> Tensor:
    """(rows, _COLUMNS) from measured columns; NaN elsewhere, 0 for the two count columns.

    One ``stack`` (the per-step cost of a lean snapshot is mostly such small ops).
    """
    nan = torch.full((rows,), math.nan, dtype=acc, device=device)
    zero = torch.zeros((rows,), dtype=acc, device=device)
    fill = {_NON_FINITE: zero, _MEASURED: zero}
    return torch.stack([columns.get(c, fill.get(c, nan)) for c in range(_COLUMNS)], dim=1)


@torch.no_grad()
def _stat_block(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    detail: str,
    before: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """(P, _COLUMNS) statistics of every parameter, on the first parameter's device.

    ``grads[i]`` is parameter i's dense gradient or None (gradient columns are then NaN).
    ``before[i]``, when given, is the parameter's value before the optimizer step.
    """
    device, acc = params[0].device, _acc_dtype(params[0])
    measure_update = before is not None and any(b is not None for b in before)
    present = {i: g for i, g in enumerate(grads) if g is not None}
    by_device: dict[torch.device, list[int]] = {}
    for i, g in present.items():
        by_device.setdefault(g.device, []).append(i)
    if len(present) == len(params) and list(by_device) == [device] and not measure_update:
        # The common case, every gradient on the parameters' device: no scatter, one stack.
        columns = _grad_columns(list(present.values()), params, detail)
        return _block(columns, len(params), acc, device)
    stats = _block({}, len(params), acc, device)
    for idx in by_device.values():
        columns = _grad_columns(
            [present[i] for i in idx],
            [params[i] for i in idx],
            detail,
        )
        index = torch.tensor(idx, device=device)
        for c, values in columns.items():
            stats[index, c] = values.to(device=device, dtype=acc)
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing and detail == "full":  # the weight norm of parameters without gradient
        norms = torch.stack(_norms([params[i] for i in missing]))
        stats[torch.tensor(missing, device=device), _WEIGHT_NORM] = norms.to(device, acc)
    if measure_update and before is not None:  # measure_update implies before is given
        stats[:, _DELTA_NORM:] = _update_columns(params, before, device, acc)
    return stats


@torch.no_grad()
def _update_columns(
    weights: Sequence[Tensor],
    before: Sequence[Tensor | None],
    device: torch.device,
    acc: torch.dtype,
) -> Tensor:
    """(P, 3) columns ||w - w_before||, ||w_before||, measured (NaN, NaN, 0 where not given)."""
    given = [(i, b) for i, b in enumerate(before) if b is not None]
    measured = [i for i, _ in given]
    olds = [b.detach().to(weights[i].device) for i, b in given]
    deltas = [weights[i] - old for i, old in zip(measured, olds, strict=True)]
    out = torch.tensor([math.nan, math.nan, 0.0], dtype=acc, device=device).repeat(len(weights), 1)
    values = torch.stack(
        [
            torch.stack([n.to(device, acc) for n in _norms(deltas)]),
            torch.stack([n.to(device, acc) for n in _norms(olds)]),
        ],
        dim=1,
    )  # (M, 2)
    index = torch.tensor(measured, device=device)
    out[index, :2] = values
    out[index, 2] = 1.0
    return out


@torch.no_grad()
def _fill_non_finite(rows: list[list[float]], grads: list[Tensor | None]) -> None:
    """Exact NaN/Inf counts, in place, for the parameters whose sum of squares is not finite.

    A non-finite entry makes sum(g*g) non-finite, so a healthy step has nothing to count.
    (A huge finite gradient whose square sum overflows is counted too, and gets 0.)
    """
    flagged = [
        (i, g)
        for i, (row, g) in enumerate(zip(rows, grads, strict=True))
        if g is not None and not math.isfinite(row[_SQ_SUM])
    ]
    if not flagged:
        return
    counts = torch.stack([(~torch.isfinite(g)).sum() for _, g in flagged])
    for (i, _), count in zip(flagged, counts.cpu().tolist(), strict=True):  # a second host copy
        rows[i][_NON_FINITE] = float(count)


@torch.no_grad()
def _count_non_finite_on_device(block: Tensor, grads: list[Tensor | None]) -> None:
    """:func:`_fill_non_finite` for records that stay on the device (GradientHooks).

    On the CPU there is no device to wait for, so the flags are read and only flagged
    parameters are counted; elsewhere every gradient is counted on the device, which keeps
    the hooks free of host syncs.
    """
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present:
        return
    if block.device.type == "cpu":
        squares = block[[i for i, _ in present], _SQ_SUM].tolist()
        present = [p for p, s in zip(present, squares, strict=True) if not math.isfinite(s)]
        if not present:
            return
    counts = torch.stack([(~torch.isfinite(g)).sum() for _, g in present])
    index = torch.tensor([i for i, _ in present], device=block.device)
    block[index, _NON_FINITE] = counts.to(device=block.device, dtype=block.dtype)


def _to_host(block: Tensor) -> list[list[float]]:
    """The one host copy: (P, _COLUMNS) -> rows of floats."""
    return block.cpu().tolist()


def _update_ratio(row: list[float]) -> float | None:
    if row[_MEASURED] != 1.0 or row[_OLD_NORM] == 0.0:
        return None
    return row[_DELTA_NORM] / row[_OLD_NORM]


def _param_stats(
    name: str, shape: tuple[int, ...], n: int, row: list[float], has_grad: bool, full: bool
) -> ParamGradStats:
    weight_norm = row[_WEIGHT_NORM] if full else None
    if not has_grad:
        return ParamGradStats(
            name,
            shape,
            n,
            False,
            norm=None,
            mean=None,
            abs_mean=None,
            std=None,
            min=None,
            max=None,
            zero_fraction=None,
            non_finite=None,
            weight_norm=weight_norm,
            update_ratio=_update_ratio(row),
        )
    square = row[_SQ_SUM]
    norm = math.sqrt(square) if square >= 0 else math.nan  # NaN stays NaN
    counted = not math.isnan(row[_NONZERO])  # not measured with detail="norm"
    zero_fraction = ((n - row[_NONZERO]) / n if n else 0.0) if counted else None
    mean = abs_mean = std = low = high = None
    if full:
        mean = row[_SUM] / n if n else 0.0
        abs_mean = row[_ABS_SUM] / n if n else 0.0
        # Population variance E[g^2] - mean^2, clamped at 0 (rounding can make it slightly
        # negative) and exactly 0 for one entry; NaN/Inf make it NaN, as torch.std would.
        var = square / n - mean * mean if n else 0.0
        if n == 1 and math.isfinite(var):
            var = 0.0
        std = math.sqrt(var) if var > 0 else (var if math.isnan(var) else 0.0)
        low, high = row[_MIN], row[_MAX]
    # Positional, in field order: this runs for every parameter at every step.
    return ParamGradStats(
        name,
        shape,
        n,
        True,
        norm,
        mean,
        abs_mean,
        std,
        low,
        high,
        zero_fraction,
        int(row[_NON_FINITE]),
        weight_norm,
        _update_ratio(row),
    )


def _total_norm(rows: list[list[float]], has_grad: list[bool]) -> float:
    """sqrt of the summed squares of every gradient entry: clip_grad_norm_'s value."""
    squares = [row[_SQ_SUM] for row, flag in zip(rows, has_grad, strict=True) if flag]
    if not squares:
        return 0.0
    if not all(math.isfinite(s) for s in squares):
        return math.nan if any(math.isnan(s) for s in squares) else math.inf
    return math.sqrt(math.fsum(squares))


def _first_last_ratio(
    params: tuple[ParamGradStats, ...], first: int | None, last: int | None
) -> float | None:
    if first is None or last is None or first == last:
        return None
    a, b = params[first].norm, params[last].norm
    if a is None or b is None or b == 0.0 or not math.isfinite(b):
        return None
    return a / b


def _assemble(
    layout: _Layout,
    has_grad: list[bool],
    rows: list[list[float]],
    detail: str,
    step: int | None = None,
) -> GradientSnapshot:
    full = detail == "full"
    params = tuple(
        map(
            _param_stats,
            layout.names,
            layout.shapes,
            layout.numels,
            rows,
            has_grad,
            [full] * len(rows),
        )
    )
    return GradientSnapshot(
        params=params,
        total_norm=_total_norm(rows, has_grad),
        missing=tuple(name for name, flag in zip(layout.names, has_grad) if not flag),
        first_last_ratio=_first_last_ratio(params, *layout.ends_index),
        first_layer=layout.ends[0],
        last_layer=layout.ends[1],
        step=step,
        detail=detail,
        layer_order=layout.layer_order,
    )


# --------------------------------------------------------------------------- snapshot


def gradient_snapshot(
    model: nn.Module,
    update_before: dict[str, Tensor] | None = None,
    detail: Detail = "full",
    example_input: Tensor | None = None,
) -> GradientSnapshot:
    """Statistics of every trainable parameter's ``.grad``, with one host copy.

    Call after ``loss.backward()``. Parameters with ``requires_grad=False`` are skipped;
    parameters that require grad but have ``.grad is None`` are listed in ``missing``.

    Args:
        model: the module whose parameters to inspect.
        update_before: parameter values from before the optimizer step, by name. When
            given (and the snapshot is taken after ``optimizer.step()``, whose gradients are
            still in ``.grad``), each named parameter's ``update_ratio`` is
            ``||w_now - w_before|| / ||w_before||``.
        detail: ``"full"`` (every field) or ``"lean"`` (norm, zero fraction and
            non-finite count only; cheaper, see the module docstring).
        example_input: a few samples the model accepts; when given, the first and last
            layer of ``first_last_ratio`` are found in one extra forward pass on them
            (:func:`forward_order`) instead of by registration order.

    Example:
        >>> loss.backward()
        >>> snap = gradient_snapshot(model, example_input=x[:4])
        >>> snap.total_norm, snap.missing, snap.first_layer
    """
    checked = _check_detail(detail)
    order = None if example_input is None else forward_order(model, example_input)
    return _snapshot(model, update_before, None, checked, _LayoutCache(order))


def _snapshot(
    model: nn.Module,
    update_before: dict[str, Tensor] | None,
    step: int | None,
    detail: str,
    layouts: _LayoutCache,
    registered: list[tuple[str, nn.Parameter]] | None = None,
) -> GradientSnapshot:
    # One pass over the parameters (this runs every step): the monitor's cached list, or
    # the model's; frozen parameters are skipped, as _trainable does.
    named: list[tuple[str, nn.Parameter]] = []
    params: list[Tensor] = []
    grads: list[Tensor | None] = []
    for name, p in model.named_parameters() if registered is None else registered:
        if p.requires_grad:
            named.append((name, p))
            params.append(p)
            grads.append(None if p.grad is None else _dense(p.grad))
    if not named:
        return _assemble(layouts(model, named), [], [], detail, step)
    before = None
    if update_before:
        before = [update_before.get(name) for name, _ in named]
    rows = _to_host(_stat_block(params, grads, detail, before))
    _fill_non_finite(rows, grads)
    has_grad = [g is not None for g in grads]
    return _assemble(layouts(model, named), has_grad, rows, detail, step)


def update_ratios(model: nn.Module, before: dict[str, Tensor]) -> dict[str, float | None]:
    """``||w_now - w_before|| / ||w_before||`` per named parameter, with one host copy.

    ``None`` where ``||w_before|| == 0`` (the ratio is undefined).
    """
    named = [(name, p) for name, p in _trainable(model) if name in before]
    if not named:
        return {}
    weights = [p.detach() for _, p in named]
    device, acc = weights[0].device, _acc_dtype(weights[0])
    block = _update_columns(weights, [before[name] for name, _ in named], device, acc)
    rows = block.cpu().tolist()  # the one host copy
    return {
        name: _update_ratio([math.nan] * _DELTA_NORM + row)
        for (name, _), row in zip(named, rows, strict=True)
    }


# --------------------------------------------------------------------------- monitor


class GradientMonitor:
    """The object a training loop holds to record gradient statistics every step.

    Call order in a plain loop::

        monitor = GradientMonitor(model, track_updates=True)
        for x in batches:
            optimizer.zero_grad()
            loss = loss_fn(model(x), x)["loss"]
            loss.backward()
            monitor.after_backward()   # stats of .grad (+ copies weights if track_updates)
            optimizer.step()
            monitor.after_step()       # fills update ratios, advances the step counter

    ``before_step()`` may be called explicitly instead (anywhere before
    ``optimizer.step()``); ``after_backward()`` calls it when it has not been. Without
    ``track_updates`` nothing is copied and ``after_step()`` only advances the counter.
    Host syncs: one per ``after_backward()``, plus one per ``after_step()`` when tracking
    updates (and one more on a step whose gradient holds NaN/Inf, to count them).
    ``history`` holds only CPU data (frozen dataclasses of floats). ``detail="lean"``
    records only norms, zero fractions and non-finite counts, for about a third of the
    cost (see the module docstring). ``example_input`` (or :meth:`set_example_input`)
    makes ``first_last_ratio`` compare the first and last layer to run on it rather than
    the first and last registered.
    """

    def __init__(
        self,
        model: nn.Module,
        track_updates: bool = False,
        detail: Detail = "full",
        example_input: Tensor | None = None,
    ) -> None:
        self.model = model
        self.track_updates = track_updates
        self.detail = _check_detail(detail)
        self.history: list[GradientSnapshot] = []
        self.step = 0
        self._before: dict[str, Tensor] | None = None
        self._pending = False  # an after_backward() waiting for its after_step()
        self._layouts = _LayoutCache()
        # Walking the module tree costs about as much as a reduction: do it once. Parameters
        # registered after construction are not monitored (as with GradientHooks).
        self._registered = list(model.named_parameters())
        self.set_example_input(example_input)

    def set_example_input(self, example_input: Tensor | None) -> None:
        """Find the first and last layer by one forward pass on ``example_input`` now.

        Later snapshots use them (``layer_order="forward"``); None goes back to
        registration order. Costs one forward in eval mode under ``no_grad`` (see
        :func:`forward_order`). It may run between a step's forward and its backward: the
        probe leaves the pending graph alone unless the model's forward writes to its own
        parameters or buffers in eval mode.
        """
        order = None if example_input is None else forward_order(self.model, example_input)
        self._layouts.set_order(order)

    def before_step(self) -> None:
        """Copy the current weights (only when ``track_updates``) to measure the update."""
        if self.track_updates:
            self._before = {name: p.detach().clone() for name, p in _trainable(self.model)}

    def after_backward(self) -> GradientSnapshot:
        """Snapshot ``.grad`` now (after ``loss.backward()``, before ``optimizer.step()``)."""
        if self.track_updates and self._before is None:
            self.before_step()
        snapshot = _snapshot(
            self.model, None, self.step, self.detail, self._layouts, self._registered
        )
        self.history.append(snapshot)
        self._pending = True
        return snapshot

    def after_step(self) -> GradientSnapshot | None:
        """Call after ``optimizer.step()``: fill update ratios, advance the step counter.

        Returns the completed snapshot of this step, or ``None`` if ``after_backward()``
        was not called this step.
        """
        snapshot = None
        if self._pending:
            snapshot = self.history[-1]
            if self.track_updates and self._before is not None:
                ratios = update_ratios(self.model, self._before)
                params = tuple(replace(s, update_ratio=ratios.get(s.name)) for s in snapshot.params)
                snapshot = replace(snapshot, params=params)
                self.history[-1] = snapshot
        self._before = None
        self._pending = False
        self.step += 1
        return snapshot


# --------------------------------------------------------------------------- hooks


class GradientHooks:
    """Capture gradient statistics from inside ``backward()`` with hooks; remove them on exit.

    A post-accumulate-grad hook on every trainable parameter notes that parameter's
    ``.grad`` as soon as it is written; a callback queued on the autograd engine computes
    the statistics of all of them together (the same reductions as
    :func:`gradient_snapshot`, on the device) when the backward pass ends. Nothing crosses
    to the host during training on an accelerator: ``history`` copies every pending record
    in one go when read (on the CPU, where a host read costs nothing, the end-of-pass
    callback reads whether any gradient is non-finite, to count NaN/Inf only then). One
    :class:`GradientSnapshot` per ``backward()`` call; ``missing`` lists the parameters
    whose gradient that backward did not produce. A backward that raised before its end
    is closed when the next one starts, from the gradients it had written.

    Post-accumulate hooks (not ``Tensor.register_hook``) so that the statistics describe
    ``.grad`` — what the optimizer will use — and so that ``torch.autograd.grad`` calls
    (e.g. per-term attribution) are not recorded as training steps.

    ``example_input`` (or :meth:`set_example_input`) makes ``first_last_ratio`` compare
    the first and last layer to run on it rather than the first and last registered.

    Example:
        >>> with GradientHooks(model, example_input=x[:4]) as hooks:
        ...     loss.backward()
        >>> hooks.history[-1].total_norm
    """

    def __init__(
        self, model: nn.Module, detail: Detail = "full", example_input: Tensor | None = None
    ) -> None:
        self.model = model
        self.detail = _check_detail(detail)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._named = _trainable(model)
        self._layouts = _LayoutCache()
        self._current: dict[int, Tensor] = {}  # param index -> its .grad in this backward
        # closed passes: (present, block, the layout their gradients had, detail)
        self._unread: list[tuple[list[int], Tensor, _Layout, str]] = []
        # called when a backward pass ends, after its statistics are taken
        self.on_pass_end: Callable[[], None] | None = None
        self._history: list[GradientSnapshot] = []
        self._callback_queued = False
        self.set_example_input(example_input)

    def set_example_input(self, example_input: Tensor | None) -> None:
        """Find the first and last layer by one forward pass on ``example_input`` now.

        Backward passes recorded from now on use them (``layer_order="forward"``); None
        goes back to registration order. Costs one forward in eval mode under ``no_grad``
        (see :func:`forward_order`). It may run between a step's forward and its backward:
        the probe leaves the pending graph alone unless the model's forward writes to its
        own parameters or buffers in eval mode.
        """
        order = None if example_input is None else forward_order(self.model, example_input)
        self._layouts.set_order(order)

    def __enter__(self) -> GradientHooks:
        for index, (_, p) in enumerate(self._named):
            self.handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent). Records captured so far stay readable."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @property
    def active(self) -> bool:
        """True while hooks are registered."""
        return bool(self.handles)

    @property
    def history(self) -> list[GradientSnapshot]:
        """One snapshot per recorded backward pass (copies pending records to the host)."""
        if self._unread:
            self._materialise()
        return list(self._history)

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if index in self._current:
                # A leaf accumulates once per backward, so an earlier backward never reached
                # its end callback (it raised): close that record before starting this one.
                self._end_backward()
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
                self._callback_queued = True
            # Only remember the gradient here; the statistics of every parameter are computed
            # together when the pass ends (a few whole-block ops instead of ~20 per hook).
            grad = p.grad
            assert grad is not None  # a post-accumulate-grad hook runs after .grad is written
            self._current[index] = _dense(grad)

        return hook

    def _end_backward(self) -> None:
        """Runs once when the backward pass that fired the hooks finishes."""
        self._callback_queued = False
        if not self._current:
            return
        present = sorted(self._current)
        grads = [self._current.get(i) for i in range(len(self._named))]
        params = [p for _, p in self._named]
        block = self._norms_only(grads) if self.detail == "norm" else None
        if block is None:
            block = _stat_block(params, grads, self.detail)  # (P, _COLUMNS)
            _count_non_finite_on_device(block, grads)
        layout = self._layouts(self.model, self._named)
        self._unread.append((present, block, layout, self.detail))
        self._current = {}
        if self.on_pass_end is not None:
            self.on_pass_end()

    @staticmethod
    @torch.no_grad()
    def _norms_only(grads: list[Tensor | None]) -> Tensor | None:
        """``detail="norm"`` on a CPU with every gradient present and finite:
        the (P,) squared norms alone (``clip_grad_norm_``'s per-tensor norms and one
        read), expanded into the block only when the history is read. None otherwise (the
        general path then counts NaN/Inf)."""
        present = [g for g in grads if g is not None and g.device.type == "cpu"]
        if not present or len(present) != len(grads):
            return None
        # one multi-tensor kernel call: in a training loop (gradients out of cache) it
        # costs ~3/4 of one dot per gradient
        squares = _column(_norms(present), _acc_dtype(present[0])).square()  # (P,)
        return squares if math.isfinite(float(squares.sum())) else None

    def _materialise(self) -> None:
        device = self._unread[0][1].device
        dtype = torch.float64 if device.type != "mps" else torch.float32
        blocks = [
            _block({_SQ_SUM: b}, b.shape[0], b.dtype, b.device) if b.dim() == 1 else b
            for _, b, _, _ in self._unread
        ]
        blocks = [block.to(device=device, dtype=dtype) for block in blocks]
        rows = torch.cat(blocks).cpu().tolist()  # the one host copy for all pending passes
        per_pass = len(self._named)
        for k, (present, _, layout, detail) in enumerate(self._unread):
            has_grad = [i in present for i in range(per_pass)]
            step = len(self._history)
            pass_rows = rows[k * per_pass : (k + 1) * per_pass]
            self._history.append(_assemble(layout, has_grad, pass_rows, detail, step))
        self._unread = []
