"""The Doctor: attach to a model and loss, call once per step, get findings.

It is both the Python API for a user's own training loop and the step callback
the built-in loop uses, so every command and every user sees the same findings::

    with Doctor(model, loss_fn) as doctor:            # gradient hooks attached
        for x in batches:
            out = model(x)
            result = loss_fn(out, x)                  # a CombinedLoss result
            doctor.step(out, result, x)               # before backward: sees the graph
            result["loss"].backward()                 # hooks record gradient statistics
            optimizer.step()
    findings = doctor.findings(data=x_all)            # hooks are gone here

Per step it records the loss terms, the reparameterisation noise (fresh? standard
normal? see :mod:`~meaning_transform.diagnostics.noise`), the KL term next to the
analytic KL and the β applied (see :mod:`~meaning_transform.diagnostics.vae_checks`) and
every parameter's gradient norm; on the steps of its schedule
(:mod:`~meaning_transform.diagnostics.schedule`: 0, 1, 2, 4, 8, ... and every 256th) the
full gradient statistics and the per-term gradient attribution. The gradient statistics
come from post-accumulate-grad hooks during ``backward``. At the end, given data, it
measures latent health and dead ReLU units. What each setting costs: README, "Speed"
(the defaults: about 1.2x a run without the Doctor on the benchmark's MLP VAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass, replace
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from meaning_transform.adapters import LossResult, output_roles, read_loss_result
from meaning_transform.diagnostics.attribution import (
    Attribution,
    AttributionSummary,
    Method,
    PendingAttribution,
    begin_attribution,
    complete_attribution,
    summarise_attributions,
    term_attribution,
)
from meaning_transform.diagnostics.distributed import (
    RankEvidence,
    RankMonitor,
    rank_findings,
    rank_not_checked,
)
from meaning_transform.diagnostics.findings import Finding, NotChecked, sort_findings
from meaning_transform.diagnostics.gradients import (
    GradientHooks,
    GradientSnapshot,
    ParamGradStats,
    dead_units,
)
from meaning_transform.diagnostics.history import EpochHistory
from meaning_transform.diagnostics.latent import LatentHealth, latent_of_outputs, measure_latent
from meaning_transform.diagnostics.nan_guard import NanGuard, NanOrigin
from meaning_transform.diagnostics.noise import NoiseRecorder
from meaning_transform.diagnostics.rules import (
    RunEvidence,
    _is_kl,
    evaluate,
    noise_verdict,
    not_checked,
)
from meaning_transform.diagnostics.schedule import ATTRIBUTION_SCHEDULE, Schedule
from meaning_transform.diagnostics.vae_checks import VaeEvidence, VaeStep, vae_not_checked
from meaning_transform.losses.kl import LOG_VAR_MAX, LOG_VAR_MIN
from meaning_transform.training import EpochRecord


class Findings(tuple[Finding, ...]):
    """The Doctor's findings, worst first (a tuple), and ``not_checked``: the checks that
    could not run on what the Doctor saw, each with its reason. No silent skips."""

    not_checked: tuple[NotChecked, ...]

    def __new__(cls, findings: list[Finding], skipped: tuple[NotChecked, ...]) -> Findings:
        self = super().__new__(cls, findings)
        self.not_checked = skipped
        return self


def _roles_dict(output: object, x: torch.Tensor | None) -> Mapping[str, torch.Tensor]:
    """The output's roles as the dict the checks read (a dict output is used as is)."""
    if isinstance(output, Mapping) and {"mu", "log_var"} <= set(output):
        return output
    if x is None and not isinstance(output, Mapping):
        raise TypeError(
            f"Doctor.step got a {type(output).__name__} output: pass the batch x too, so "
            "its roles can be told apart (or return a dict)"
        )
    return output_roles(output, x if x is not None else torch.empty(0)).as_dict()


def _loss_dict(loss: object, weights: Mapping[str, float] | None) -> Mapping[str, Any]:
    """Any loss return as the dict form mtx's losses return (``loss``, ``terms``, ...)."""
    if isinstance(loss, Mapping) and "loss" in loss and "terms" in loss:
        return loss  # mtx's own CombinedLoss, or a LossStep
    # measure=False: the Doctor reads the total and terms itself (_step_values), once
    result = (
        loss if isinstance(loss, LossResult) else read_loss_result(loss, weights, measure=False)
    )
    return {
        "loss": result.total,
        "terms": dict(result.terms),
        "weights": dict(result.weights),
        "floors_engaged": (),
        "non_finite": (),
        "total_given": result.total_given,
    }


def _unexplained(total: float, main: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``|total - sum(w * term)| / |total|`` over the main terms' host values."""
    explained = sum(float(weights.get(n, 1.0)) * v for n, v in main.items())
    return abs(total - explained) / max(abs(total), 1e-12)


def _step_values(
    result: Mapping[str, Any], x: torch.Tensor | None
) -> tuple[float, dict[str, float], float]:
    """The step's total, every term (sub-terms too) and the batch's sum, in one host read.

    The sum of ``x`` is finite exactly when every entry is (a NaN or Inf makes it
    non-finite; a float32 batch summing past 3e38 is counted exactly and found finite).
    """
    terms = result.get("terms", {})
    scalars = [result["loss"].detach().reshape(())]
    scalars.extend(t.detach().reshape(()) for t in terms.values())
    with_x = x is not None and x.is_floating_point() and x.numel() > 0
    if with_x:
        assert x is not None
        scalars.append(x.detach().sum().reshape(()))
    try:
        values = torch.stack(scalars).tolist()  # the one read (promotes mixed float dtypes)
    except RuntimeError:  # scalars on different devices
        values = [float(t) for t in scalars]
    x_sum = values.pop() if with_x else 0.0
    total, *rest = values
    return total, dict(zip(terms, rest, strict=True)), x_sum


# The names the two most common public VAEs (pytorch/examples, AntixK) and their
# variants give the method drawing z; neither returns z, so it is read here.
REPARAMETERIZE_NAMES: tuple[str, ...] = ("reparameterize", "reparameterise", "reparametrize")
_MISSING = object()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or a view of the same memory with the same layout."""
    if a is b:
        return True
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class _ReparamTap:
    """Remembers what the model's own ``reparameterize(mu, log_var)`` returned.

    The method is wrapped on the instance (shadowing the class's) while the Doctor is
    attached, and restored on close. Only calls in train mode are remembered, and z is
    handed out only for the ``mu`` it was drawn from, so a second sampling layer or a
    probe pass is never mistaken for the step's draw.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.name = ""  # the wrapped method's name ("" = none)
        self._original: object = _MISSING  # the instance attribute it shadowed, if any
        self._tapped: Callable[..., Any] | None = None
        self.calls = 0  # train-mode calls seen
        self._z: torch.Tensor | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()

    def attach(self) -> None:
        if self._tapped is not None:
            return
        for name in REPARAMETERIZE_NAMES:
            method = getattr(self.model, name, None)
            if callable(method):
                break
        else:
            return

        def tapped(*args: Any, **kwargs: Any) -> Any:
            z = method(*args, **kwargs)
            if isinstance(z, torch.Tensor) and self.model.training:
                self.calls += 1
                self._z = z
                values = (*args, *kwargs.values())
                self._inputs = tuple(a for a in values if isinstance(a, torch.Tensor))
            return z

        original = vars(self.model).get(name, _MISSING)
        try:
            setattr(self.model, name, tapped)
        except (AttributeError, TypeError, RuntimeError):  # e.g. a TorchScript module
            return
        self.name, self._original, self._tapped = name, original, tapped

    def remove(self) -> None:
        if self._tapped is None:
            return
        if vars(self.model).get(self.name) is self._tapped:
            if self._original is _MISSING:
                delattr(self.model, self.name)
            else:
                setattr(self.model, self.name, self._original)
        self._tapped, self._z, self._inputs = None, None, ()

    def z_for(self, mu: torch.Tensor) -> torch.Tensor | None:
        """The latest z drawn from this ``mu`` (None if there is none); then forgotten."""
        z, inputs = self._z, self._inputs
        self._z, self._inputs = None, ()
        if z is None or z.shape != mu.shape or not any(_same_tensor(a, mu) for a in inputs):
            return None
        return z


VAE_MAX_STEPS = 512  # VaeStep records kept; beyond it every other one is dropped
_FLUSH_EVERY = 64  # steps whose values wait on the device before one host copy
# The KL weight is measured as (total - other terms) / KL term only when the KL term is
# this share of |total| or more: float32 rounding of the total (~6e-8 of it) then moves
# the measured weight by less than 0.1%.
_KL_SHARE_MEASURABLE = 1e-4


_VaeEntry = tuple[
    int, int, int, int, float, float, torch.Tensor, torch.Tensor,
    float, float, list[tuple[float, float]],
]  # fmt: skip


class _VaeRecorder:
    """Per step: the analytic KL, the loss's KL term, its weight and the declared β.

    ``mu`` and ``log_var`` wait on the device to be measured in batches (the step's
    scalars come from the Doctor's one host read); the kept steps are thinned to at most
    :data:`VAE_MAX_STEPS`, evenly spaced, plus the latest one.
    """

    def __init__(
        self,
        beta_schedule: Callable[[int], float] | None,
        beta_max: float | None,
        kl_term: str | None,
    ) -> None:
        self.beta_schedule = beta_schedule
        self.beta_max = beta_max
        self.kl_name = kl_term
        self.kl_term = ""
        self.problem = "no step was recorded"
        self.weight_source = ""
        self.seen = 0
        self.stride = 1
        self.steps: list[VaeStep] = []
        self.last: VaeStep | None = None
        # (index among recorded steps, step, B, Z, declared β, weight given, mu, log_var,
        # the KL term's value, the total (NaN: not given), the other terms' (weight, value))
        self._pending: list[_VaeEntry] = []

    def _kl_of(self, terms: Mapping[str, object]) -> str:
        """The KL term's name ("" when none, with ``problem`` saying why)."""
        if self.kl_name is not None:
            if self.kl_name in terms:
                return self.kl_name
            shown = ", ".join(terms) or "none"
            self.problem = f"kl_term {self.kl_name!r} is not among the loss's terms ({shown})"
            return ""
        named = [n for n in terms if _is_kl(n)]
        if len(named) == 1:
            return named[0]
        if not terms:
            self.problem = (
                "the loss returns one scalar: return its named terms, e.g. "
                "{'loss': total, 'recon': recon, 'kl': kl}"
            )
        elif not named:
            self.problem = (
                f"no term of the loss is named as a KL ({', '.join(terms)}): name it "
                "(a name holding 'kl') or pass Doctor(kl_term=...)"
            )
        else:
            self.problem = (
                f"{len(named)} terms are named as a KL ({', '.join(named)}): pass "
                "Doctor(kl_term=...)"
            )
        return ""

    def record(
        self,
        step: int,
        roles: Mapping[str, torch.Tensor],
        result: Mapping[str, Any],
        total: float,
        main: Mapping[str, float],
    ) -> None:
        """Keep the step's mu, log_var (detached) and KL-term values until :meth:`flush`.

        ``total`` and ``main`` are the step's total and main terms on the host.
        """
        mu, log_var = roles.get("mu"), roles.get("log_var")
        if mu is None or log_var is None or mu.shape != log_var.shape or mu.numel() == 0:
            return
        seen = self.seen
        self.seen += 1
        batch = int(mu.shape[0]) if mu.dim() >= 2 else 1
        weights = result.get("weights", {})
        name = self._kl_of(main)
        given = term = given_total = math.nan
        others: list[tuple[float, float]] = []  # the other terms' (weight, value)
        if name:
            self.kl_term = name
            given = float(weights.get(name, 1.0))
            term = main[name]
            if result.get("total_given"):
                given_total = total
                others = [(float(weights.get(o, 1.0)), v) for o, v in main.items() if o != name]
        declared = math.nan
        if self.beta_schedule is not None:
            declared = float(self.beta_schedule(step))
        mu2 = mu.detach().reshape(batch, -1)  # (B, Z)
        lv2 = log_var.detach().reshape(batch, -1)  # (B, Z)
        entry = (
            seen, step, batch, mu2.shape[1], declared, given, mu2, lv2, term,
            given_total, others,
        )  # fmt: skip
        self._pending.append(entry)
        if len(self._pending) >= _FLUSH_EVERY:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Measure the waiting steps together: their rows' analytic KL in one pass per
        latent size and one host copy."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device = pending[0][6].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no f64
        analytic: list[float] = [math.nan] * len(pending)
        by_dim: dict[int, list[int]] = {}
        for k, entry in enumerate(pending):
            by_dim.setdefault(entry[3], []).append(k)
        parts: list[torch.Tensor] = []
        for members in by_dim.values():
            mu = torch.cat([pending[k][6].to(device, dtype) for k in members])  # (N, Z)
            lv = torch.cat([pending[k][7].to(device, dtype) for k in members])
            sizes = torch.tensor([pending[k][2] for k in members], device=device)
            ids = torch.repeat_interleave(torch.arange(len(members), device=device), sizes)
            rows = (0.5 * (mu.pow(2) + lv.exp() - 1.0 - lv)).sum(1)  # (N,) KL per row
            # judged only where log_var is inside the loss library's clamp range [-30, 20]:
            # there a clamped KL (mtx's own) and an unclamped one (most users') agree,
            # while outside it a diverging run's KL would be called wrong by one or the other
            outside = ((lv < LOG_VAR_MIN) | (lv > LOG_VAR_MAX)).any(1).to(dtype)
            zeros = torch.zeros(len(members), dtype=dtype, device=device)
            mean = zeros.index_add(0, ids, rows) / sizes.to(dtype)
            bad = zeros.index_add(0, ids, outside)
            parts.append(torch.where(bad == 0, mean, torch.full_like(mean, math.nan)))
        values = torch.cat(parts).cpu().tolist()  # the one host copy
        at = 0
        for members in by_dim.values():
            for k in members:
                analytic[k] = values[at]
                at += 1
        for k, entry in enumerate(pending):
            index, step, batch, dim, declared, given, _, _, term, total, others = entry
            weight = given
            if math.isfinite(total):
                rest = 0.0
                for w, t in others:
                    rest = rest + w * t
                self.weight_source = "total"
                measurable = abs(term) >= _KL_SHARE_MEASURABLE * abs(total) and term != 0.0
                weight = (total - rest) / term if measurable and math.isfinite(rest) else math.nan
            elif math.isfinite(given):
                self.weight_source = self.weight_source or "weights"
            record = VaeStep(step, analytic[k], term, batch, dim, weight, declared, given)
            self.last = record
            if index % self.stride == 0:
                self.steps.append(record)
                if len(self.steps) > VAE_MAX_STEPS:
                    self.steps = self.steps[::2]
                    self.stride *= 2

    def evidence(self) -> VaeEvidence:
        self.flush()
        steps = list(self.steps)
        if self.last is not None and (not steps or steps[-1].step != self.last.step):
            steps.append(self.last)
        return VaeEvidence(
            steps=tuple(steps),
            steps_seen=self.seen,
            stride=self.stride,
            kl_term=self.kl_term,
            kl_term_problem="" if self.kl_term else self.problem,
            weight_source=self.weight_source,
            schedule_declared=self.beta_schedule is not None,
            beta_max=self.beta_max,
        )


# ---- the Doctor's evidence as plain data, for a checkpoint ----------------------------------
# Only containers, numbers, strings and tensors, so a checkpoint holding it loads with
# torch.load(weights_only=True) (the default since torch 2.6): a dataclass is a dict
# tagged with its class name, read back only for the classes below; a tuple is tagged too.
_STATE_VERSION = 1
_EVIDENCE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        GradientSnapshot, ParamGradStats, Attribution, EpochRecord, VaeStep, LatentHealth, NanOrigin
    )
}  # fmt: skip


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if name not in _EVIDENCE_TYPES:
            raise TypeError(f"cannot save a {name} in the Doctor's state")
        return {
            "__dataclass__": name,
            **{f.name: _encode(getattr(value, f.name)) for f in fields(value)},
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dataclass__" in value:
            cls = _EVIDENCE_TYPES.get(value["__dataclass__"])
            if cls is None:
                raise ValueError(f"unknown type {value['__dataclass__']!r} in the Doctor's state")
            return cls(**{k: _decode(v) for k, v in value.items() if k != "__dataclass__"})
        return {k: _decode(v) for k, v in value.items()}
    return value


# what state_dict() saves of each part (the model, hooks and callables are not evidence)
_DOCTOR_STATE = (
    "attributions", "term_values", "input_non_finite", "reduction", "steps", "_epoch_start",
    "detached_terms", "unexplained", "batch_size", "step_losses", "step_batch_sizes", "latent",
    "nan_first", "_nan_passes",
)  # fmt: skip
_PART_STATE: dict[str, tuple[str, ...]] = {
    "noise": ("steps", "pairs", "repeated", "probed", "dropped", "scale_steps", "_last"),
    "history": ("records", "_sums", "_weights", "_totals", "_floors", "_events", "_beta"),
    "vae": ("kl_term", "problem", "weight_source", "seen", "stride", "steps", "last"),
}


# An attribution with every term's own pass checks that the backward's gradient is their
# weighted sum before any term is derived from it: float32 backward passes agree to ~1e-7
# of the norm (measured: 4e-7 on the benchmark's MLP VAE); a loss scaled for gradient
# accumulation or AMP, or a total with more in it than its terms, misses by far more.
DERIVE_RESIDUAL = 1e-4
DERIVE_CHECK_EVERY = 8  # every 8th attribution has every term's own pass, to check again


DEFAULT_SCHEDULE = Schedule()


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _derivable(
    pending: PendingAttribution, attribution: Attribution
) -> tuple[tuple[str, ...], str] | None:
    """The term to take from the total from now on: in the total with a nonzero weight,
    reaching every parameter the total reaches, and the largest (least rounding)."""
    reach = [frozenset(j for j, g in enumerate(row) if g is not None) for row in pending.per_term]
    union = frozenset().union(*reach) if reach else frozenset()
    best = None
    for row, i in zip(reach, pending.connected, strict=True):
        name = pending.names[i]
        if name not in pending.total_of or pending.weights[name] == 0.0 or row != union:
            continue
        if best is None or attribution.weighted_norm[name] > attribution.weighted_norm[best]:
            best = name
    return None if best is None else (pending.names, best)


def _finite_items(prefix: str, values: Mapping[str, float | None]) -> dict[str, float]:
    return {
        f"{prefix}{name}": float(v)
        for name, v in values.items()
        if v is not None and math.isfinite(v)
    }


class Doctor:
    """Collects evidence during training and turns it into findings.

    Args:
        model: the VAE; ``forward(x)`` returns ``reconstruction``, ``mu``, ``log_var``
            and ideally ``z`` (the noise-scale check needs it). Without ``z``, a method
            named ``reparameterize`` (or ``reparameterise``, ``reparametrize``) is wrapped
            on the instance while attached and its output read as z; without either, the
            frozen-noise check runs the step's batch twice more on a few steps (see
            ``noise.py``).
        where: the name findings are reported under.
        schedule: the steps that get full gradient statistics (mean, std, min, max,
            zero fraction, non-finite count per parameter). Default
            :class:`~meaning_transform.diagnostics.schedule.Schedule`: steps 0, 1, 2, each
            power of two and every 256th; ``Schedule(every=1)`` is every step. Every step
            records the loss, its terms, the analytic KL and β, the noise, every
            parameter's gradient norm and the NaN guard's check.
        attribute_every: per-term gradient attribution on
            :data:`~meaning_transform.diagnostics.schedule.ATTRIBUTION_SCHEDULE`
            (``"auto"``: steps 0, 4, 16, 64, 256, 1024, 4096, then every 4096th; 4 of a
            200-step run), or every k steps (0 = never). With K terms an attribution costs
            K - 1 backward passes, each through the part of the network its term reaches:
            the last term is the total's gradient minus the others' (checked on the first
            attribution and every 8th after it; see
            :func:`~meaning_transform.diagnostics.attribution.begin_attribution`).
        attribution_method: ``"loop"`` or ``"batched"``
            (see :func:`~meaning_transform.diagnostics.attribution.term_attribution`).
        semantic_features: also attribute each semantic feature, which is how a
            feature with no gradient path (the original's hard thresholds) is found.
        steps_per_epoch: in a user's loop, close an epoch of the Doctor's own history
            every k steps (None: call :meth:`epoch_end` at each epoch's end; a history
            with no epoch closed is one epoch).
        beta_schedule: the KL weight you mean to apply at step t (0-based, one per
            :meth:`step` call); ``beta-schedule`` checks the weight the loss applied.
        beta_max: the KL weight the schedule should reach; ``beta-schedule`` fires when
            the weight applied (or declared) never came within 5% of it.
        kl_term: the name of the loss's KL term (default: the one term whose name holds
            "kl"), for the KL audit (``kl-formula``) and the β measurement.
        nan_guard: on the first step whose data, output or loss holds a NaN or Inf, find
            where it appeared (the data, the first module whose forward output is
            non-finite, or the loss term; see :mod:`~meaning_transform.diagnostics.nan_guard`)
            and, for a finite loss with a non-finite gradient, the first parameter in
            backward; the ``nonfinite-*`` findings say where. A healthy step costs one
            check of the loss's scalars; only the first non-finite step is re-run.
        distributed: in a ``torch.distributed`` run, also check the ranks against each
            other (:class:`~meaning_transform.diagnostics.distributed.RankMonitor`: a NaN
            on some ranks only, replicas or buffers out of sync, gradient norms that
            disagree, data that never changes or is the same on every rank), with one
            all_gather per step at the end of its backward. ``None`` (default): when a
            process group of more than one rank is initialised. Pass the DDP module or
            the module it wraps; every rank must call :meth:`step` on every step.
        group: the process group of the rank checks (``None``: the default group).
        shuffle_expected: the sampler reshuffles every epoch (``DistributedSampler
            (shuffle=True)`` with ``set_epoch``): a rank whose batch order repeats from one
            epoch to the next is reported (``rank-data-repeats``; call :meth:`epoch_end`).
    """

    def __init__(
        self,
        model: nn.Module,
        where: str = "run",
        attribute_every: int | Literal["auto"] = "auto",
        attribution_method: Method = "loop",
        semantic_features: bool = True,
        steps_per_epoch: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        beta_max: float | None = None,
        kl_term: str | None = None,
        nan_guard: bool = True,
        schedule: Callable[[int], bool] = DEFAULT_SCHEDULE,
        distributed: bool | None = None,
        group: Any = None,
        shuffle_expected: bool = False,
    ) -> None:
        if attribute_every != "auto" and (
            not isinstance(attribute_every, int) or attribute_every < 0
        ):
            raise ValueError(f'attribute_every must be "auto" or >= 0, got {attribute_every!r}')
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # the module it wraps: the Doctor's own passes (layer order, noise probe, NaN
            # localisation) must not run DDP's forward, whose collectives every rank joins
            model = model.module
        self.model = model
        self.schedule = schedule
        wanted = _distributed() if distributed is None else distributed
        self.ranks = (
            RankMonitor(model, group, shuffle_expected, gather_after_backward=True)
            if wanted
            else None
        )
        self.where = where
        self.attribute_every = attribute_every
        self.attribution_method = attribution_method
        self.semantic_features = semantic_features
        self.hooks = GradientHooks(model)
        self.attributions: list[Attribution] = []
        self.term_values: list[dict[str, float]] = []
        self.input_non_finite = 0
        self.reduction: dict[str, str] = {}
        self.steps = 0
        self.noise = NoiseRecorder()
        self.history = EpochHistory(steps_per_epoch)
        self._epoch_start = 0  # index into hooks.history where the open epoch began
        self._example_input = False
        self.detached_terms = False  # the loss's terms were all detached copies
        self.unexplained: list[float] = []  # per step, for a loss giving total and terms
        self.batch_size = 0  # of the latest step's batch
        self.step_losses: list[float] = []  # the total of every step (NaN kept)
        self._last_values: tuple[float, dict[str, float]] | None = None  # (total, terms)
        self.step_batch_sizes: list[int] = []  # the batch size of every step (0: unknown)
        self.vae = _VaeRecorder(beta_schedule, beta_max, kl_term)
        self.reparameterize = _ReparamTap(model)  # z for a model that returns none
        self.latent: LatentHealth | None = None  # the latest measured (findings or metrics)
        self.nan_guard = NanGuard(model) if nan_guard else None
        self._nan_passes = 0  # backward passes recorded before nan_first was found
        # the attribution waiting for the total's backward, with its step's term values
        self._pending: tuple[PendingAttribution, dict[str, float], int] | None = None
        self._derive: tuple[tuple[str, ...], str] | None = None  # (terms, the one derived)
        self.derive_problem = "no attribution was checked yet"  # why none is derived
        self._since_check = 0  # derived attributions since the last full one
        self._incoming: list[torch.Tensor | None] = []  # the total's gradient, per parameter
        self._incoming_hooks: list[torch.utils.hooks.RemovableHandle] = []

    # ---- lifecycle: the gradient hooks live between attach() and close() ----
    def attach(self) -> Doctor:
        if not self.hooks.active:
            self.hooks.__enter__()
        self.reparameterize.attach()
        if self.ranks is not None:
            self.ranks.attach()
        return self

    def close(self) -> None:
        self.hooks.remove()
        self.reparameterize.remove()
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> Doctor:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- per step ----
    def step(
        self,
        output: object,
        loss: object,
        x: torch.Tensor | None = None,
        weights: Mapping[str, float] | None = None,
        reduction: Mapping[str, str] | None = None,
    ) -> None:
        """Record one step. Call after the loss, before ``backward`` (it reads the graph).

        Args:
            output: the model's output in any form mtx reads (a dict with the usual
                aliases, a tuple or list such as ``(recon, mu, logvar)``, an object with
                attributes; see :func:`~meaning_transform.adapters.output_roles`).
            loss: what the loss returned: one scalar tensor, a dict of named scalar terms
                (with or without a total under ``"loss"``), a tuple of scalars, a
                :class:`~meaning_transform.adapters.LossResult`, or mtx's own loss result.
            x: the batch the model was given (needed for a tuple output and for the
                noise probe of a model that returns no ``z``).
            weights: the weights of named terms that the loss weighs (others count 1).
            reduction: ``"sum"`` or ``"mean"`` per term, when known (the CLI measures it).
        """
        roles = _roles_dict(output, x)
        result = _loss_dict(loss, weights)
        if self.ranks is not None:
            # first: the Doctor's own passes below would move the model's fingerprint
            main = {n: t for n, t in result.get("terms", {}).items() if "/" not in n}
            self.ranks.before_backward(main or {"loss": result["loss"]}, x)
        due = bool(self.schedule(self.steps))
        self.hooks.detail = "full" if due else "norm"  # for the backward that follows
        total, values, x_sum = _step_values(result, x)  # the step's one host read
        main = {n: v for n, v in values.items() if "/" not in n}
        bad_inputs = 0
        if x is not None:
            self.batch_size = int(x.shape[0])
            # a NaN/Inf makes the sum non-finite: count exactly only then (one pass, no copy)
            if not math.isfinite(x_sum):
                bad_inputs = int((~torch.isfinite(x)).sum())
            self.input_non_finite += bad_inputs
            if not self._example_input:  # forward order of layers, for first/last ratios
                self._example_input = True
                self.hooks.set_example_input(x[:8])
        self.reduction = dict(reduction or result.get("reduction", self.reduction))
        if self.model.training:
            self._record_noise(roles, x)
            self.vae.record(self.steps, roles, result, total, main)
        self._drop_pending()  # the previous step's total never came back from a backward
        every = self.attribute_every
        if (
            ATTRIBUTION_SCHEDULE(self.steps)
            if every == "auto"
            else (every and self.steps % every == 0)
        ):
            self._attribute(result)
        self.history.add_step(result, main, total)
        self._last_values = (total, values)
        self.step_losses.append(total)
        self.step_batch_sizes.append(int(x.shape[0]) if x is not None and x.dim() else 0)
        if result.get("total_given") and main:
            self.unexplained.append(_unexplained(total, main, result.get("weights", {})))
        if self.nan_guard is not None and self.nan_guard.first is None:
            # last, so that its re-run of the forward cannot disturb this step's records
            finite = bad_inputs == 0 and math.isfinite(total)
            finite = finite and all(math.isfinite(v) for v in values.values())
            origin = self.nan_guard.check(self.steps, x, roles, result, bad_inputs, finite)
            if origin is not None:
                self._nan_passes = len(self.hooks._history) + len(self.hooks._unread)
        self.steps += 1
        if self.history.due():
            self.epoch_end()

    def check(self) -> Findings:
        """The findings so far, between steps: like :meth:`findings` without data, but the
        open epoch stays open (only closed epochs are judged) and the model is not run."""
        evidence = self.evidence(tuple(self.history.records), None, self.batch_size)
        return self._judged(evidence)

    def epoch_end(self) -> None:
        """Close an epoch of the Doctor's own history (a user's loop calls it per epoch)."""
        snapshots = self.hooks.history[self._epoch_start :]
        self._epoch_start = len(self.hooks.history)
        self.history.end_epoch([s.total_norm for s in snapshots])
        if self.ranks is not None:
            self.ranks.epoch_end()  # for rank-data-repeats (no collective)

    def before_backward(self, ctx: Any) -> None:
        """The built-in training loop's callback hook (see ``training.StepCallback``)."""
        self.attach()
        self.step(ctx.output, ctx.loss, ctx.batch)

    def _record_noise(self, output: Mapping[str, torch.Tensor], x: torch.Tensor | None) -> None:
        """The step's noise from (mu, log_var, z); z from the output or from the model's
        ``reparameterize``; without z (or with no eps recovered from it: z == mu), now
        and then two extra passes."""
        if not self.model.training or "mu" not in output or "log_var" not in output:
            return
        z = output.get("z")
        drawn = self.reparameterize.z_for(output["mu"])
        can_probe = x is not None and "reconstruction" in output
        if self.noise.record(output["mu"], output["log_var"], z if z is not None else drawn):
            if not (can_probe and self.noise.probe_due()):
                return
            self.noise.flush()
            if self.noise.last_recovered:
                return
        if can_probe and self.noise.probe_due():
            model = self.model
            self.noise.probe(model, lambda: _roles_dict(model(x), x)["reconstruction"])

    def _attribute(self, result: Mapping[str, Any]) -> None:
        terms_in = result.get("terms", {})
        weights_in = result.get("weights", {})
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        finite = True
        if terms_in and not any(t.requires_grad for t in terms_in.values()):
            # every term detached: copies for logging (AntixK's loss_function does this),
            # the total carries the gradient. Nothing to attribute; not a fault.
            self.detached_terms = True
            return
        for name, t in terms_in.items():
            main = "/" not in name
            if main and weights_in.get(name, 1.0) == 0.0:
                continue
            if not main and not self.semantic_features:
                continue
            if not torch.isfinite(t.detach()).all():
                finite = False  # the non-finite rules report this step; no attribution
                if not _distributed():  # under DDP the passes are still taken (below)
                    return
            terms[name] = t
            # a sub-term "semantic/role" enters the total through its parent's weight
            parent = name.split("/")[0]
            weights[name] = float(weights_in.get(name, weights_in.get(parent, 1.0)))
        if not terms or not any(t.requires_grad for t in terms.values()):
            return
        total_of = tuple(n for n in terms if "/" not in n)
        values = torch.stack([t.detach().to(torch.float64) for t in terms.values()]).cpu()
        term_values = dict(zip(terms, values.tolist(), strict=True))
        method = self.attribution_method
        if not self.hooks.active or _distributed():
            # no backward to read the total's gradient from (under DDP .grad is the
            # all-reduced one): every term gets its own pass
            self.derive_problem = (
                "the Doctor is not attached" if not self.hooks.active else "a distributed run"
            )
            # under DDP every rank takes the passes, a NaN on its own terms or not: the
            # passes run through DDP's output, whose backward joins the ranks'
            # collectives, so a rank that skipped them would leave the others waiting
            att = term_attribution(terms, weights, self.model, method=method, total_of=total_of)
            if finite:
                self.attributions.append(replace(att, step=self.steps))
                self.term_values.append(term_values)
            return
        derive = None
        if self._derive is not None and self._derive[0] == tuple(terms):
            if self._since_check < DERIVE_CHECK_EVERY - 1:
                derive = self._derive[1]
        pending = begin_attribution(
            terms, weights, self.model, derive, method, total_of, grads_before=False
        )
        self._since_check = self._since_check + 1 if derive is not None else 0
        self._pending = (pending, term_values, self.steps)
        # the total's own gradient, as it flows into each parameter (before accumulation:
        # a loop may zero .grad after this step() or accumulate micro-batches in it)
        self._incoming = [None] * len(pending.params)
        self._incoming_hooks = [
            p.register_hook(self._incoming_hook(j)) for j, p in enumerate(pending.params)
        ]
        self.hooks.on_pass_end = self._complete

    def _incoming_hook(self, j: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            seen = self._incoming[j]
            self._incoming[j] = grad.detach() if seen is None else seen + grad.detach()

        return hook

    def _remove_incoming(self) -> list[torch.Tensor | None]:
        for handle in self._incoming_hooks:
            handle.remove()
        self._incoming_hooks = []
        incoming, self._incoming = self._incoming, []
        return incoming

    def _complete(self) -> None:
        """At the end of the backward after an attribution: the total's gradient is in."""
        self.hooks.on_pass_end = None
        incoming = self._remove_incoming()
        if self._pending is None:
            return
        pending, term_values, step = self._pending
        self._pending = None
        attribution, residual = complete_attribution(pending, incoming)
        self.attributions.append(replace(attribution, step=step))
        self.term_values.append(term_values)
        if pending.derived >= 0:
            return
        if not residual <= DERIVE_RESIDUAL:
            self._derive = None
            self.derive_problem = (
                f"the backward's gradient is not the weighted sum of the terms' (relative "
                f"residual {residual:.2g}): a scaled or extra loss is backpropagated"
            )
            return
        self._derive = _derivable(pending, attribution)
        if self._derive is None:
            self.derive_problem = "no term of the total reaches every parameter the total does"

    def _drop_pending(self) -> None:
        """An attribution whose backward never came: kept if complete, else dropped."""
        if self._pending is None:
            return
        pending, term_values, step = self._pending
        self._pending = None
        self.hooks.on_pass_end = None
        self._remove_incoming()
        self._derive = None
        self.derive_problem = "no backward of the total followed Doctor.step"
        if pending.derived < 0:
            self.attributions.append(replace(complete_attribution(pending, None)[0], step=step))
            self.term_values.append(term_values)

    # ---- at the end ----
    def noise_changed(self) -> bool | None:
        """True when the noise was fresh, False when it repeated; None if not comparable."""
        verdict = noise_verdict(self.noise.repeats())
        return None if verdict is None else verdict == "fresh"

    def evidence(
        self,
        records: tuple[Any, ...] = (),
        data: torch.Tensor | None = None,
        batch_size: int = 0,
    ) -> RunEvidence:
        """Everything measured so far as plain data (measures latent health on ``data``)."""
        if self._pending is not None and not self.hooks.active:
            self._drop_pending()
        latent = dead = None
        if data is not None and data.shape[0] >= 2 and bool(torch.isfinite(data).all()):
            device = next(self.model.parameters()).device
            sample = data[:1024].to(device)  # (N, D)
            outputs: list[tuple[torch.Tensor, Any]] = []  # one eval pass serves both
            dead = dead_units(self.model, sample, outputs=outputs) or None
            latent = self.latent = latent_of_outputs(outputs, sample)
        return RunEvidence(
            where=self.where,
            records=tuple(records),
            reduction=self.reduction,
            batch_size=batch_size,
            snapshots=tuple(self.hooks.history),
            attributions=tuple(self.attributions),
            term_values=tuple(self.term_values),
            latent=latent,
            dead_units=dead,
            noise_repeats=self.noise.repeats(),
            noise_scale=self.noise.scale(),
            input_non_finite=self.input_non_finite,
            unexplained=tuple(self.unexplained),
            terms_detached=self.detached_terms,
            step_losses=tuple(self.step_losses),
            step_batch_sizes=tuple(self.step_batch_sizes),
            vae=self.vae.evidence(),
            nan_origin=self._nan_origin(),
        )

    @property
    def nan_first(self) -> NanOrigin | None:
        """The guard's first data, forward or loss-term origin (None: none, or no guard)."""
        return self.nan_guard.first if self.nan_guard is not None else None

    @nan_first.setter
    def nan_first(self, origin: NanOrigin | None) -> None:  # for load_state_dict
        if self.nan_guard is not None:
            self.nan_guard.first = origin

    def _nan_origin(self) -> NanOrigin | None:
        """Where the first NaN/Inf appeared (None: nowhere, or the guard is off)."""
        if self.nan_guard is None:
            return None
        return self.nan_guard.origin(self.hooks.history, self._nan_passes)

    def records(self) -> tuple[Any, ...]:
        """The Doctor's own epoch history (an open epoch is closed first)."""
        if self.history.open_steps:
            self.epoch_end()
        return tuple(self.history.records)

    def findings(
        self,
        records: tuple[Any, ...] = (),
        data: torch.Tensor | None = None,
        batch_size: int = 0,
    ) -> Findings:
        """The findings, worst first, with ``.not_checked``: the checks that could not run.

        Without ``records`` the Doctor's own epoch history is used, so every rule runs in
        a user's loop with nothing built by hand.
        """
        evidence = self.evidence(records or self.records(), data, batch_size or self.batch_size)
        return self._judged(evidence)

    def _judged(self, evidence: RunEvidence) -> Findings:
        """The rules' findings on ``evidence`` (and the rank checks' in a distributed run)."""
        found = evaluate(evidence)
        skipped = not_checked(evidence) + vae_not_checked(evidence)
        ranks = self.rank_evidence()
        if ranks is not None:
            found = sort_findings([*found, *rank_findings(ranks)])
            skipped = [*skipped, *rank_not_checked(ranks)]
        return Findings(found, tuple(skipped))

    def rank_evidence(self) -> RankEvidence | None:
        """The rank checks' evidence (the same on every rank); None outside a distributed run."""
        return self.ranks.evidence() if self.ranks is not None else None

    def summary(self) -> AttributionSummary | None:
        """Attribution averaged over the attributed steps (None before any attribution)."""
        return summarise_attributions(self.attributions)

    # ---- for a logger, and for a checkpoint ----
    def metrics(self, data: torch.Tensor | None = None) -> dict[str, float]:
        """The current scalars as one flat dict, finite values only, for any logger::

            writer.add_scalars("mtx", doctor.metrics(), step)   # TensorBoard

        NaN and Inf are left out (they are findings, e.g. ``nonfinite-loss``; TensorBoard's
        histogram writer crashes on them), so a key may be missing at a step. Keys:

        - ``mtx/loss``: the latest step's total; ``mtx/term/<name>``: its terms.
        - ``mtx/grad_norm/total``: the latest backward's total gradient norm (before
          clipping: what ``clip_grad_norm_`` returns); ``mtx/grad_norm/first_last_ratio``.
        - ``mtx/grad_norm/<term>``: each term's gradient norm at the latest attribution.
        - ``mtx/kl/analytic``: the analytic KL of the latest step's batch (mean over it);
          ``mtx/kl/weight``: the weight the loss applied to its KL term.
        - ``mtx/noise/mean``, ``mtx/noise/std``: the recovered noise eps, pooled over the
          run (0 and 1 expected); ``mtx/noise/repeated``: the share of compared steps
          whose noise repeated (0 expected).
        - ``mtx/kl_dim/<j>``, ``mtx/kl_total``, ``mtx/active_units``: latent health (eval
          mode) on ``data`` when given (up to 1024 rows), else the latest measured by
          :meth:`findings` or :meth:`metrics` with data; absent before any.

        Each call makes one host copy of the latest step's values (no copy per term). A
        term named ``total`` or ``first_last_ratio`` shares its gradient-norm key with the
        whole model's: the term's value wins.
        """
        out: dict[str, float] = {}
        if self._last_values is not None:
            loss, terms = self._last_values
        else:  # none since a load_state_dict
            loss, terms = (self.step_losses or [math.nan])[-1], {}
        out.update(_finite_items("mtx/", {"loss": loss}))
        out.update(_finite_items("mtx/term/", terms))
        history = self.hooks.history
        if history:
            grads = {
                "total": history[-1].total_norm,
                "first_last_ratio": history[-1].first_last_ratio,
            }
            out.update(_finite_items("mtx/grad_norm/", grads))
        if self.attributions:
            out.update(_finite_items("mtx/grad_norm/", self.attributions[-1].norm))
        self.vae.flush()
        if self.vae.last is not None:
            kl = {"analytic": self.vae.last.analytic_kl, "weight": self.vae.last.weight}
            out.update(_finite_items("mtx/kl/", kl))
        scale, repeats = self.noise.scale(), self.noise.repeats()
        noise: dict[str, float | None] = {}
        if scale is not None:
            noise.update(mean=scale.mean, std=scale.std)
        if repeats is not None:
            noise["repeated"] = repeats.repeated / repeats.pairs
        out.update(_finite_items("mtx/noise/", noise))
        if data is not None and data.shape[0] >= 2 and bool(torch.isfinite(data).all()):
            device = next(self.model.parameters()).device
            self.latent = measure_latent(self.model, data[:1024].to(device))
        if self.latent is not None:
            dims = {str(j): kl for j, kl in enumerate(self.latent.kl_per_dim)}
            out.update(_finite_items("mtx/kl_dim/", dims))
            totals = {"kl_total": self.latent.kl_total, "active_units": self.latent.active_units}
            out.update(_finite_items("mtx/", totals))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The evidence so far as plain data (containers, numbers, strings, CPU tensors), so
        a resumed run keeps it: save it in a checkpoint, hand it to :meth:`load_state_dict`
        of a Doctor on the same model. It loads with ``torch.load(weights_only=True)``."""
        self.vae.flush()
        self.noise.flush()
        state: dict[str, Any] = {"version": _STATE_VERSION}
        state["doctor"] = {name: _encode(getattr(self, name)) for name in _DOCTOR_STATE}
        state["gradients"] = _encode(self.hooks.history)
        for part, names in _PART_STATE.items():
            state[part] = {name: _encode(getattr(getattr(self, part), name)) for name in names}
        moments = self.noise._moments
        state["noise"]["_moments"] = {
            "n": moments.n,
            "mean": _encode(moments.mean),
            "m2": _encode(moments.m2),
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (replacing the evidence recorded so far)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"expected a Doctor state of version {_STATE_VERSION}, got {state.get('version')!r}"
            )
        for name, value in state["doctor"].items():
            setattr(self, name, _decode(value))
        self.hooks._history = _decode(state["gradients"])
        self.hooks._unread, self.hooks._current = [], {}
        self._last_values = None
        self.vae._pending = []
        self.noise._pending = []
        for part, names in _PART_STATE.items():
            for name in names:
                if name in state[part]:  # a state saved before the name was kept
                    setattr(getattr(self, part), name, _decode(state[part][name]))
        moments = state["noise"]["_moments"]
        self.noise._moments.n = float(moments["n"])
        self.noise._moments.mean = moments["mean"].clone()
        self.noise._moments.m2 = moments["m2"].clone()
