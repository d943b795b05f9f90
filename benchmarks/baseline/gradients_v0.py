# Frozen copy of meaning_transform/diagnostics/gradients.py before the speed work
# (see benchmarks/baseline/__init__.py). Do not edit; not imported by the package.
"""Per-parameter gradient statistics, reduced on the device and copied to the host once.

Three ways in, one result type (:class:`GradientSnapshot`):

- :func:`gradient_snapshot` reads ``param.grad`` after ``loss.backward()``.
- :class:`GradientMonitor` is the object a training loop holds; it keeps a history of
  snapshots and, if asked, the size of each optimizer update relative to the weights.
- :class:`GradientHooks` captures the same statistics from inside ``backward()`` through
  post-accumulate-grad hooks, for loops we do not control.

:func:`dead_units` (never-active ReLU units) lives here too because the dying-ReLU rule
reads it next to the gradient statistics.

Every per-parameter number is computed on the parameter's device, all of them are stacked
into one tensor, and that tensor crosses to the host with a single ``.cpu().tolist()``.
Nothing here calls ``.item()`` per parameter (Cockpit's one slip: a device sync each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from types import TracebackType

import torch
from torch import Tensor, nn

from meaning_transform.diagnostics._modes import evaluating

# Columns of the per-parameter stat row built on the device (one row per parameter).
_NORM, _MEAN, _ABS_MEAN, _STD, _MIN, _MAX, _ZERO_FRACTION, _NON_FINITE = range(8)
_WEIGHT_NORM, _DELTA_NORM, _OLD_NORM, _MEASURED = range(8, 12)
_COLUMNS = 12


@dataclass(frozen=True)
class ParamGradStats:
    """Statistics of one parameter's gradient (plain floats, already on the host).

    The gradient fields (``norm`` … ``non_finite``) are ``None`` when ``has_grad`` is False.
    ``std`` is the population standard deviation of the gradient entries (the entries are
    the whole population, not a sample), so a one-element gradient has ``std == 0.0``.
    NaN in a gradient propagates into ``norm``/``mean``/``std``/``min``/``max`` and is
    counted in ``non_finite``.
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
    weight_norm: float  # 2-norm of the parameter itself
    # ||w_after - w_before|| / ||w_before|| over one optimizer step; None when not measured
    # or when ||w_before|| == 0 (a zero-initialised bias on its first step).
    update_ratio: float | None = None


@dataclass(frozen=True)
class GradientSnapshot:
    """Gradient statistics of a whole model at one step.

    ``total_norm`` is the 2-norm of the per-parameter 2-norms over parameters that have a
    gradient: the number ``torch.nn.utils.clip_grad_norm_(params, max_norm=inf)`` returns.
    ``first_last_ratio`` is ``norm(first Linear weight grad) / norm(last Linear weight
    grad)`` in module registration order (AUTOTRAINER's vanishing/exploding signal); it is
    ``None`` with fewer than two Linear layers, when either has no gradient, or when the
    last one's gradient norm is zero or not finite.
    """

    params: tuple[ParamGradStats, ...]
    total_norm: float
    missing: tuple[str, ...]  # require grad, but .grad is None (not reached by the loss)
    first_last_ratio: float | None
    first_layer: str | None  # name of the first Linear weight
    last_layer: str | None  # name of the last Linear weight
    step: int | None = None  # filled in by GradientMonitor / GradientHooks

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


def _linear_ends(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the first and last trainable ``nn.Linear`` weights in registration order."""
    names = {id(p): name for name, p in model.named_parameters()}
    linear = [
        names[id(m.weight)]
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) in names
    ]
    if not linear:
        return None, None
    return linear[0], linear[-1]


def _dense(grad: Tensor) -> Tensor:
    grad = grad.detach()
    return grad.to_dense() if grad.is_sparse else grad


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms computed the way ``clip_grad_norm_`` computes them.

    Grouped by (device, dtype), ``torch._foreach_norm`` on CPU/CUDA and
    ``torch.linalg.vector_norm`` elsewhere, so the total agrees with clip_grad_norm_'s.
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


def _stat_row(grad: Tensor, norm: Tensor, weight: Tensor, before: Tensor | None) -> Tensor:
    """One parameter's statistics as a (_COLUMNS,) tensor on the gradient's device."""
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(dtype)  # no copy for float32/float64 gradients
    w = weight.detach()
    nan = g.new_full((), math.nan)
    if g.numel() == 0:
        grad_stats = [g.new_zeros(())] * 8
    else:
        grad_stats = [
            norm.to(dtype),
            g.mean(),
            g.abs().mean(),
            g.std(correction=0),
            g.min(),
            g.max(),
            (g == 0).to(dtype).mean(),
            (~torch.isfinite(g)).sum().to(dtype),
        ]
    if before is None:
        update = [nan, nan, g.new_zeros(())]
    else:
        old = before.detach().to(w.device)
        update = [
            torch.linalg.vector_norm(w - old).to(dtype),
            torch.linalg.vector_norm(old).to(dtype),
            g.new_ones(()),
        ]
    weight_norm = torch.linalg.vector_norm(w).to(dtype)
    return torch.stack(grad_stats + [weight_norm] + update)  # (_COLUMNS,)


def _weight_row(weight: Tensor, before: Tensor | None) -> Tensor:
    """Stat row of a parameter without a gradient: only the weight columns are meaningful."""
    w = weight.detach()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    row = torch.full((_COLUMNS,), math.nan, dtype=dtype, device=w.device)
    row[_WEIGHT_NORM] = torch.linalg.vector_norm(w)
    row[_MEASURED] = 0.0
    if before is not None:
        old = before.detach().to(w.device)
        row[_DELTA_NORM] = torch.linalg.vector_norm(w - old)
        row[_OLD_NORM] = torch.linalg.vector_norm(old)
        row[_MEASURED] = 1.0
    return row


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 if any input is float64 (never the case on MPS), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _to_host(rows: list[Tensor], total: Tensor | None) -> tuple[list[list[float]], float]:
    """Stack every row (and the total) on the first device and copy to the host ONCE."""
    if not rows:
        return [], 0.0
    device = rows[0].device
    dtype = _common_dtype(rows)
    parts = [torch.stack([r.to(device=device, dtype=dtype) for r in rows]).flatten()]
    if total is not None:
        parts.append(total.detach().to(device=device, dtype=dtype).reshape(1))
    flat = torch.cat(parts).cpu().tolist()  # the one host copy
    host_total = flat.pop() if total is not None else 0.0
    return [flat[i : i + _COLUMNS] for i in range(0, len(flat), _COLUMNS)], host_total


def _update_ratio(row: list[float]) -> float | None:
    if row[_MEASURED] != 1.0 or row[_OLD_NORM] == 0.0:
        return None
    return row[_DELTA_NORM] / row[_OLD_NORM]


def _param_stats(name: str, p: Tensor, row: list[float], has_grad: bool) -> ParamGradStats:
    def grad_field(column: int) -> float | None:
        return row[column] if has_grad else None

    non_finite = grad_field(_NON_FINITE)
    return ParamGradStats(
        name=name,
        shape=tuple(p.shape),
        numel=p.numel(),
        has_grad=has_grad,
        norm=grad_field(_NORM),
        mean=grad_field(_MEAN),
        abs_mean=grad_field(_ABS_MEAN),
        std=grad_field(_STD),
        min=grad_field(_MIN),
        max=grad_field(_MAX),
        zero_fraction=grad_field(_ZERO_FRACTION),
        non_finite=None if non_finite is None else int(non_finite),
        weight_norm=row[_WEIGHT_NORM],
        update_ratio=_update_ratio(row),
    )


def _first_last_ratio(
    stats: dict[str, ParamGradStats], first: str | None, last: str | None
) -> float | None:
    if first is None or last is None or first == last:
        return None
    a, b = stats[first].norm, stats[last].norm
    if a is None or b is None or b == 0.0 or not math.isfinite(b):
        return None
    return a / b


def _assemble(
    named: list[tuple[str, nn.Parameter]],
    has_grad: list[bool],
    rows: list[list[float]],
    total_norm: float,
    ends: tuple[str | None, str | None],
    step: int | None = None,
) -> GradientSnapshot:
    params = tuple(
        _param_stats(name, p, row, flag)
        for (name, p), row, flag in zip(named, rows, has_grad, strict=True)
    )
    by_name = {s.name: s for s in params}
    return GradientSnapshot(
        params=params,
        total_norm=total_norm,
        missing=tuple(s.name for s in params if not s.has_grad),
        first_last_ratio=_first_last_ratio(by_name, *ends),
        first_layer=ends[0],
        last_layer=ends[1],
        step=step,
    )


# --------------------------------------------------------------------------- snapshot


def gradient_snapshot(
    model: nn.Module, update_before: dict[str, Tensor] | None = None
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

    Example:
        >>> loss.backward()
        >>> snap = gradient_snapshot(model)
        >>> snap.total_norm, snap.missing
    """
    named = _trainable(model)
    before = update_before or {}
    with_grad = [(name, p) for name, p in named if p.grad is not None]
    grad_norms = _norms([_dense(p.grad) for _, p in with_grad]) if with_grad else []
    norm_of = {name: n for (name, _), n in zip(with_grad, grad_norms, strict=True)}
    rows = [
        _stat_row(_dense(p.grad), norm_of[name], p, before.get(name))
        if p.grad is not None
        else _weight_row(p, before.get(name))
        for name, p in named
    ]
    total = None
    if grad_norms:  # exactly clip_grad_norm_'s reduction: the norm of the stacked norms
        device = grad_norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in grad_norms]), 2.0)
    host_rows, total_norm = _to_host(rows, total)
    has_grad = [p.grad is not None for _, p in named]
    return _assemble(named, has_grad, host_rows, total_norm, _linear_ends(model))


def update_ratios(model: nn.Module, before: dict[str, Tensor]) -> dict[str, float | None]:
    """``||w_now - w_before|| / ||w_before||`` per named parameter, with one host copy.

    ``None`` where ``||w_before|| == 0`` (the ratio is undefined).
    """
    named = [(name, p) for name, p in _trainable(model) if name in before]
    if not named:
        return {}
    rows = [_weight_row(p, before[name]) for name, p in named]
    host_rows, _ = _to_host(rows, None)
    return {name: _update_ratio(row) for (name, _), row in zip(named, host_rows, strict=True)}


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
    updates. ``history`` holds only CPU data (frozen dataclasses of floats).
    """

    def __init__(self, model: nn.Module, track_updates: bool = False) -> None:
        self.model = model
        self.track_updates = track_updates
        self.history: list[GradientSnapshot] = []
        self.step = 0
        self._before: dict[str, Tensor] | None = None
        self._pending = False  # an after_backward() waiting for its after_step()

    def before_step(self) -> None:
        """Copy the current weights (only when ``track_updates``) to measure the update."""
        if self.track_updates:
            self._before = {name: p.detach().clone() for name, p in _trainable(self.model)}

    def after_backward(self) -> GradientSnapshot:
        """Snapshot ``.grad`` now (after ``loss.backward()``, before ``optimizer.step()``)."""
        if self.track_updates and self._before is None:
            self.before_step()
        snapshot = replace(gradient_snapshot(self.model), step=self.step)
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

    A post-accumulate-grad hook on every trainable parameter computes that parameter's
    statistics on the device as soon as its ``.grad`` is written; a callback queued on
    the autograd engine closes the record when the backward pass ends. Nothing crosses
    to the host during training: ``history`` copies every pending record in one go when
    read. One :class:`GradientSnapshot` per ``backward()`` call; ``missing`` lists the
    parameters whose gradient that backward did not produce.

    Post-accumulate hooks (not ``Tensor.register_hook``) so that the statistics describe
    ``.grad`` — what the optimizer will use — and so that ``torch.autograd.grad`` calls
    (e.g. per-term attribution) are not recorded as training steps.

    Example:
        >>> with GradientHooks(model) as hooks:
        ...     loss.backward()
        >>> hooks.history[-1].total_norm
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._named = _trainable(model)
        self._ends = _linear_ends(model)
        self._current: dict[int, tuple[Tensor, Tensor]] = {}  # param index -> (row, norm)
        self._unread: list[tuple[list[int], Tensor]] = []  # closed backward passes
        self._history: list[GradientSnapshot] = []
        self._callback_queued = False

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
            grad = _dense(p.grad)
            norm = torch.linalg.vector_norm(grad, 2.0)
            self._current[index] = (_stat_row(grad, norm, p, None), norm)

        return hook

    def _end_backward(self) -> None:
        """Runs once when the backward pass that fired the hooks finishes (no host sync)."""
        self._callback_queued = False
        if not self._current:
            return
        present = sorted(self._current)
        rows = [
            self._current[i][0] if i in self._current else _weight_row(p, None)
            for i, (_, p) in enumerate(self._named)
        ]
        norms = [self._current[i][1] for i in present]
        device = rows[0].device
        dtype = _common_dtype(rows)
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)
        block = torch.cat(
            [
                torch.stack([r.to(device=device, dtype=dtype) for r in rows]).flatten(),
                total.to(dtype).reshape(1),
            ]
        )  # (P * _COLUMNS + 1,)
        self._unread.append((present, block))
        self._current = {}

    def _materialise(self) -> None:
        device = self._unread[0][1].device
        dtype = _common_dtype([block for _, block in self._unread])
        blocks = [block.to(device=device, dtype=dtype) for _, block in self._unread]
        flat = torch.cat(blocks).cpu().tolist()  # the one host copy for all pending passes
        offset = 0
        for present, block in self._unread:
            values = flat[offset : offset + block.numel()]
            offset += block.numel()
            total_norm = values.pop()
            rows = [values[k : k + _COLUMNS] for k in range(0, len(values), _COLUMNS)]
            has_grad = [i in present for i in range(len(self._named))]
            step = len(self._history)
            self._history.append(
                _assemble(self._named, has_grad, rows, total_norm, self._ends, step)
            )
        self._unread = []


# --------------------------------------------------------------------------- dead units


def _iter_batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def dead_units(model: nn.Module, x: Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Fraction of each ReLU layer's units that are never active on ``x``.

    A unit is dead when its output is ``<= 0`` for every sample in ``x``. Units are the
    entries of the layer output flattened past the batch dimension (the features of an
    MLP layer). Runs in eval mode under ``no_grad`` (BatchNorm uses its running
    statistics), restores each module's mode afterwards, and removes its forward hooks.
    Only ``nn.ReLU`` modules are seen; a functional ``F.relu`` is not. The dying-ReLU rule
    fires at a fraction >= 0.7.

    Returns:
        ``{module name: dead fraction}`` in registration order; empty without ReLU modules.
    """
    relus = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        return {}
    ever_active: dict[str, Tensor] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            active = (output.flatten(1) > 0).any(dim=0)  # (units,)
            seen = ever_active.get(name)
            ever_active[name] = active if seen is None else seen | active

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in relus]
    device = next((p.device for p in model.parameters()), x.device)
    try:
        with evaluating(model), torch.no_grad():
            for batch in _iter_batches(x, batch_size):
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, _ in relus if name in ever_active]
    if not names:
        return {}
    fractions = (
        torch.stack([1.0 - ever_active[name].to(torch.float32).mean() for name in names])
        .cpu()
        .tolist()
    )  # one host copy
    return dict(zip(names, fractions, strict=True))
