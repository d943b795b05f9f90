"""Rank checks for ``torch.distributed`` runs: what differs between the replicas, and where.

DDP keeps replicas identical by broadcasting rank 0's weights once and all-reducing the
gradients every step, so a fault on one rank hides: a NaN in one rank's batch is averaged
into every rank's gradient, a weight changed on one rank stays changed, a rank that never
got new data still trains. :class:`RankMonitor` gathers, every step, one small vector of
per-rank evidence onto every rank and :func:`rank_findings` names the rank::

    mon = RankMonitor(ddp_model)        # the DDP module or its .module
    mon.attach()
    for epoch in range(epochs):
        for x in loader:
            out = ddp_model(x)
            terms = {"recon": recon, "kl": kl}
            mon.before_backward(terms, x)
            sum(terms.values()).backward()
            mon.after_backward()        # the one all_gather of the step
            opt.step()
        mon.epoch_end()
    mon.close()
    mon.findings()                      # the same list on every rank

What is measured, per step and rank:

- the loss terms' values;
- per trainable parameter, the squared norm of the rank's LOCAL gradient: a
  ``Tensor.register_hook`` on a leaf parameter runs with the incoming gradient before
  AccumulateGrad, and DDP's reducer all-reduces only after accumulation, so the hook sees
  this rank's own gradient (tests/distributed checks it: different data per rank gives
  different local norms and identical ``p.grad``);
- per trainable parameter, the squared norm of ``p.grad`` after the backward (the
  all-reduced gradient under DDP);
- a fingerprint of every trainable parameter and buffer (:func:`_fingerprint`), taken in a
  forward pre-hook on the unwrapped model: after DDP's buffer broadcast and before this
  step's forward changes BatchNorm statistics, so healthy replicas agree bitwise;
- a fingerprint of the batch (:data:`DATA_FINGERPRINT_FIELDS`).

Cost: one ``torch.dot`` per parameter in the hooks, a few reductions per tensor for the
fingerprints, one all_gather (``all_gather_single``, formerly
``all_gather_into_tensor``) of ``5 + T + 6 P + 3 B + 8`` float64 numbers and one copy
to the host per step. Gradients are never copied.

Every rank calls the same collective (one ``all_gather_into_tensor`` in
:meth:`RankMonitor.after_backward`) in the same order, with a vector whose length is fixed
at the first step by the term names, the parameters and the buffers; no local result
decides whether a rank takes part. Without an initialised process group (world size 1)
the monitor records its own row and gathers nothing.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from meaning_transform.diagnostics.findings import Finding, NotChecked

CODES: tuple[str, ...] = (
    "rank-nonfinite",
    "rank-desync",
    "rank-buffer-desync",
    "rank-grad-disagree",
    "rank-data-frozen",
    "rank-data-duplicate",
    "rank-data-repeats",
)

# ---- thresholds ----
# rank-nonfinite, rank-desync, rank-buffer-desync: exact, no threshold. DDP replicas run
# the same kernels on the same shapes with the same inputs (broadcast weights, all-reduced
# gradients), so on one device type their weights and synced buffers are bitwise equal;
# measured: every fingerprint difference in the healthy runs of tests/distributed is
# exactly 0.0. (Mixed device types, e.g. two GPU models in one job, may differ in the last
# bits and would need a tolerance.)

# rank-grad-disagree: the ratio of the largest to the smallest local gradient norm across
# ranks at one step. Scale-free: a summed loss, a larger batch or a loss x 1000 scales
# every rank alike. Different data alone gives different norms. Measured on 2 gloo ranks
# with DistributedSampler (tests/distributed/_workers.py, the measure_* scenarios: 14-20
# steps, batch 4 / 16 / 64 per rank, Adam and SGD, seeds 0 and 1, steps >=
# GRAD_WARMUP_STEPS), healthy worst single step / worst per-run median: MeaningVAE
# (BatchNorm, MSE + KL) on scikit-learn digits 3.75 / 1.72; pytorch/examples' VAE (BCE +
# KLD summed, as its authors wrote it) 1.12 / 1.02; a 64-32-10 MLP with cross-entropy
# 1.87 / 1.26. Faults: one rank's loss x 100 gives 99-104 at every step; one rank's
# inputs x 30 (MLP) 29-48. 10 is 2.7x the healthy worst single step, and it must hold on
# most steps (below), where healthy runs stay under 2.
GRAD_RATIO_THRESHOLD = 10.0
# ... on at least this fraction of the judged steps (a majority: one noisy step, e.g. a
# near-zero gradient on one rank, is not a pattern); scale-free
GRAD_DISAGREE_FRACTION = 0.5
# the first steps are skipped as a precaution: a fresh model's first gradients depend
# most on the initialisation and the batch (measured above: up to 2.8 at steps 0-1, in
# the healthy range); faults persist, so skipping costs them nothing; a count
GRAD_WARMUP_STEPS = 2
GRAD_MIN_STEPS = 4  # judged steps needed before the rule may fire (a count)

# rank-data-frozen: a rank whose batch fingerprint never changes over at least this many
# steps. Exact equality of 8 float64 numbers (sum, sum of squares, ...) of the batch:
# two different batches of real data agree in all of them only by accident. 4 steps:
# 3 repeats in a row already rule out chance, and short test runs can be judged.
DATA_FROZEN_MIN_STEPS = 4

# rank-data-duplicate: the fraction of steps at which every rank's batch fingerprint is
# identical. With a DistributedSampler the ranks never see the same batch (it partitions
# the indices), without one every step is a duplicate: a majority separates the two and
# tolerates a shared first batch or two; scale-free.
DUPLICATE_FRACTION = 0.5
DUPLICATE_MIN_STEPS = 2  # a count

# rank-data-repeats: an epoch must hold at least this many steps for "same order" to mean
# anything (an epoch of one batch repeats trivially); a count
REPEATS_MIN_EPOCH_STEPS = 2

# The per-step series (loss terms, local gradient norms) keeps at most this many steps,
# evenly spaced from the first: when full, every other kept step is dropped and the
# stride doubles. The first-event records (non-finite, desync) and the data counters are
# updated at every step and are never thinned.
MAX_KEPT_STEPS = 512

# the batch fingerprint: enough that different batches differ, cheap on any device
DATA_FINGERPRINT_FIELDS: tuple[str, ...] = (
    "numel",
    "sum",
    "sum_of_squares",
    "alternating_sum",
    "entry_first",
    "entry_third",
    "entry_two_thirds",
    "entry_last",
)
_HEADER = ("rank", "step", "epoch", "layout", "pre_forward")
_NO_GRAD = -1.0  # squared norms are >= 0: -1 marks "no gradient this step"


# ---- evidence ----
@dataclass(frozen=True)
class RankEvent:
    """The first step at which something differed between ranks.

    ``ranks``: the odd ranks (non-finite while others were finite; or differing from
    the majority, ties going to rank 0's side). ``name``: the loss term, parameter or
    buffer (qualified name in the unwrapped model). ``kind``: ``"term"`` (a loss term),
    ``"local-grad"`` (a parameter's local gradient), ``"parameter"`` or ``"buffer"``.
    ``spread``: for non-finite events, the all-reduced gradient was non-finite on every
    rank at that step. ``relative_difference``: for buffers, a lower bound of
    ``||b_r - b_0|| / ||b_0||`` (see :func:`_relative_difference`); else NaN.
    """

    step: int
    ranks: tuple[int, ...]
    name: str
    kind: str
    spread: bool = False
    relative_difference: float = math.nan


@dataclass(frozen=True)
class RankEvidence:
    """What a :class:`RankMonitor` gathered, as plain host data (the same on every rank
    except ``rank``).

    Series are indexed ``[kept step][rank]``; ``steps`` holds the 0-based step of each
    kept entry (thinned, see :data:`MAX_KEPT_STEPS`). ``local_grad_norm`` is the L2 norm
    of the rank's local gradient over all trainable parameters (parameters without a
    gradient count 0; NaN or Inf when non-finite), ``reduced_grad_norm`` the same of
    ``p.grad`` after the backward (all-reduced). ``data_changes[r]``: steps at which
    rank ``r``'s batch fingerprint differed from its previous step's. ``duplicate_steps``:
    steps at which every rank's batch fingerprint was identical. ``epoch_orders[e][r]``:
    a digest of the sequence of rank ``r``'s batch fingerprints in complete epoch ``e``
    (ended by ``epoch_end()``), ``epoch_steps[e]`` its length.
    """

    world_size: int
    rank: int
    backend: str
    steps_seen: int
    shuffle_expected: bool
    term_names: tuple[str, ...]
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    first_nonfinite: RankEvent | None = None
    first_all_nonfinite_step: int | None = None  # non-finite on every rank: not rank-specific
    first_param_desync: RankEvent | None = None
    first_buffer_desync: RankEvent | None = None
    buffer_desync_steps: int = 0
    buffer_unchecked_steps: int = 0  # no pre-forward fingerprint on some rank
    max_buffer_relative_difference: float = 0.0
    data_steps: int = 0  # steps with a batch fingerprint (a tensor batch) on every rank
    data_changes: tuple[int, ...] = ()
    duplicate_steps: int = 0
    epoch_orders: tuple[tuple[str, ...], ...] = ()
    epoch_steps: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    terms: tuple[tuple[tuple[float, ...], ...], ...] = ()
    local_grad_norm: tuple[tuple[float, ...], ...] = ()
    reduced_grad_norm: tuple[tuple[float, ...], ...] = ()


# ---- measurement helpers (device side) ----
def _sq_norm(g: Tensor) -> Tensor:
    """Squared L2 norm of a gradient as a device scalar; no copy for float32/64."""
    flat = g.reshape(-1)
    if flat.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(flat, dtype=torch.float32).square()


# the integer type of each float type's width: a tensor's bits read as integers
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _fingerprint(t: Tensor) -> Tensor:
    """``(3,)`` float64: the sum, a checksum of the bits, and the L2 norm.

    The checksum is the sum of the entries' bit patterns read as integers, wrapping
    modulo 2^32 (2^64 for float64): integer addition is associative, so it is the same
    for the same bits whatever the order, thread count or kernel, and any one changed
    entry changes it. Replicas are compared on it alone; the sum and the norm (in the
    tensor's own precision, which may round differently with another thread count) give
    the size of a difference (:func:`_relative_difference`). About 0.8 ms per step for
    1.1 M parameters on one CPU thread; float64 sums took 5.6 ms.
    """
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=flat.device)
    if flat.dtype in _BITS:
        bits = flat.view(_BITS[flat.dtype])
        check = bits.sum(dtype=bits.dtype if bits.dtype != torch.int16 else torch.int32)
        values = flat
    else:  # integer buffers (num_batches_tracked) and other types: small
        check = flat.to(torch.int64).sum()
        values = flat.to(torch.float64)
    # the checksum in float64 exactly: its low 52 bits (a change below them is a wrap)
    check = check.to(torch.int64).remainder(1 << 52).to(torch.float64)
    total = values.sum().to(torch.float64)
    norm = torch.linalg.vector_norm(values).to(torch.float64)
    return torch.stack([total, check, norm])


def _batch_tensors(batch: object) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _batch_tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _batch_tensors(v)]
    return []


def _data_fingerprint(batch: object, device: torch.device) -> Tensor:
    """``(8,)`` float64, :data:`DATA_FINGERPRINT_FIELDS` over every tensor in the batch
    (entries from the first); all NaN with numel 0 when the batch holds no tensor."""
    tensors = [t.detach() for t in _batch_tensors(batch) if t.numel() > 0]
    if not tensors:
        out = torch.full((8,), math.nan, dtype=torch.float64, device=device)
        out[0] = 0.0
        return out
    parts = []
    for t in tensors:
        flat = t.reshape(-1)
        if not flat.is_floating_point():
            flat = flat.to(torch.float64)
        sq = torch.linalg.vector_norm(flat, dtype=torch.float64).square()
        alt = flat[0::2].sum(dtype=torch.float64) - flat[1::2].sum(dtype=torch.float64)
        parts.append(torch.stack([flat.sum(dtype=torch.float64), sq, alt]).to(device))
    sums = torch.stack(parts).sum(0)  # (3,)
    first = tensors[0].reshape(-1)
    n = first.numel()
    entries = first[[0, n // 3, (2 * n) // 3, n - 1]].to(device=device, dtype=torch.float64)
    numel = torch.tensor(
        [float(sum(t.numel() for t in tensors))], dtype=torch.float64, device=device
    )
    return torch.cat([numel, sums, entries])


def _all_gather(out: Tensor, vec: Tensor, group: Any) -> None:
    """The step's one collective: every rank's ``vec`` into ``out``, rank order."""
    # torch >= 2.13 renamed all_gather_into_tensor (and deprecated the old name)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, vec, group=group)


def _same(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise exact equality with NaN equal to NaN (bool, broadcast)."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _odd_ranks(rows: Tensor) -> tuple[int, ...]:
    """Ranks outside the largest group of identical rows ``(W, K)``; ties: rank 0's group."""
    world = rows.shape[0]
    groups: list[list[int]] = []
    for r in range(world):
        for g in groups:
            if bool(_same(rows[g[0]], rows[r]).all()):
                g.append(r)
                break
        else:
            groups.append([r])
    majority = max(groups, key=lambda g: (len(g), 0 in g))
    return tuple(r for r in range(world) if r not in majority)


def _relative_difference(fp: Tensor, rank: int, ref: int, numel: int) -> float:
    """A lower bound of ``||b_rank - b_ref||_2 / max(||b_rank||, ||b_ref||)`` from two
    fingerprints ``(W, 3)``: ``| ||a|| - ||b|| | <= ||a - b||`` and
    ``|sum(a) - sum(b)| <= sqrt(n) ||a - b||``."""
    a, b = fp[rank], fp[ref]
    scale = max(float(a[2]), float(b[2]))
    if not scale > 0:
        return math.inf if not bool(_same(a, b).all()) else 0.0
    gap = max(abs(float(a[2] - b[2])), abs(float(a[0] - b[0])) / math.sqrt(max(numel, 1)))
    return gap / scale


def _total_norm(sq: Tensor) -> tuple[float, ...]:
    """Per rank, the L2 norm over parameters from squared norms ``(W, P)`` (-1: none)."""
    return tuple(torch.where(sq >= 0, sq, torch.zeros_like(sq)).sum(1).sqrt().tolist())


@dataclass
class _State:
    """The monitor's running record (host side), frozen into :class:`RankEvidence`."""

    steps_seen: int = 0
    first_nonfinite: RankEvent | None = None
    first_all_nonfinite_step: int | None = None
    first_param_desync: RankEvent | None = None
    first_buffer_desync: RankEvent | None = None
    buffer_desync_steps: int = 0
    buffer_unchecked_steps: int = 0
    max_buffer_relative_difference: float = 0.0
    data_steps: int = 0
    data_changes: list[int] = field(default_factory=list)
    previous_data: Tensor | None = None
    duplicate_steps: int = 0
    epoch_hashes: list[Any] = field(default_factory=list)
    epoch_step_count: int = 0
    epoch_orders: list[tuple[str, ...]] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)
    stride: int = 1
    steps: list[int] = field(default_factory=list)
    terms: list[tuple[tuple[float, ...], ...]] = field(default_factory=list)
    local_grad_norm: list[tuple[float, ...]] = field(default_factory=list)
    reduced_grad_norm: list[tuple[float, ...]] = field(default_factory=list)


class RankMonitor:
    """Gathers per-rank evidence each step of a ``torch.distributed`` run.

    Args:
        model: the ``DistributedDataParallel`` module or the module it wraps.
        group: the process group to gather over (``None``: the default group). Ranks in
            findings are ranks within this group.
        shuffle_expected: the sampler is meant to reshuffle every epoch
            (``DistributedSampler(shuffle=True)``); only then is a repeated batch order
            reported (``rank-data-repeats``): the monitor cannot see the sampler.
        gather_after_backward: call :meth:`after_backward` by itself at the end of each
            backward, after DDP has written the all-reduced gradients (a callback queued
            on the autograd engine behind DDP's own), so a loop that only calls
            :meth:`before_backward` (the Doctor's ``step``) needs nothing else. A step
            whose backward reached no parameter is gathered at the next
            :meth:`before_backward` instead: every rank still gathers once per step, in
            step order.

    Call :meth:`attach`, then per step :meth:`before_backward`, backward,
    :meth:`after_backward`; :meth:`epoch_end` after each epoch; :meth:`close` at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        group: Any = None,
        shuffle_expected: bool = False,
        gather_after_backward: bool = False,
    ) -> None:
        self.gather_after_backward = gather_after_backward
        self._gather_queued = False
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected an nn.Module or DDP module, got {type(model).__name__}")
        self.model: nn.Module = inner
        self.group = group
        self.shuffle_expected = shuffle_expected
        self._distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not self._distributed:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        self.world_size = dist.get_world_size(group) if self._distributed else 1
        self.rank = dist.get_rank(group) if self._distributed else 0
        self.backend = str(dist.get_backend(group)) if self._distributed else "none"
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        self.param_names: tuple[str, ...] = tuple(n for n, _ in named)
        self._params: list[Tensor] = [p for _, p in named]
        named_buffers = list(inner.named_buffers())
        self.buffer_names: tuple[str, ...] = tuple(n for n, _ in named_buffers)
        self._buffers: list[Tensor] = [b for _, b in named_buffers]
        first = self._params[0] if self._params else None
        param_device = first.device if first is not None else torch.device("cpu")
        # gloo gathers host tensors; other backends (nccl) the model's device
        self._device = torch.device("cpu") if self.backend in ("gloo", "none") else param_device
        self.term_names: tuple[str, ...] | None = None
        self._handles: list[RemovableHandle] = []
        self._local: list[Tensor | None] = [None] * len(self._params)
        self._arrival: list[int] = [-1] * len(self._params)
        self._arrivals = 0
        self._snapshot: tuple[Tensor, Tensor] | None = None  # (param fp, buffer fp)
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor, bool] | None = None
        self._epoch = 0
        self._state = _State(data_changes=[0] * self.world_size)
        self._state.epoch_hashes = [hashlib.sha1() for _ in range(self.world_size)]

    # ---- wiring ----
    def attach(self) -> RankMonitor:
        """Register a gradient hook on every trainable parameter and a forward pre-hook
        on the model (the fingerprint point). Returns ``self``."""
        if self._handles:
            return self
        for i, p in enumerate(self._params):
            self._handles.append(p.register_hook(self._grad_hook(i)))
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward))
        return self

    def close(self) -> None:
        """Remove every hook; the evidence stays readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grad_hook(self, i: int) -> Any:
        def hook(g: Tensor) -> None:
            # the incoming local gradient, before AccumulateGrad and DDP's all-reduce
            sq = _sq_norm(g) if g.layout == torch.strided else g.new_tensor(_NO_GRAD)
            prev = self._local[i]
            self._local[i] = sq if prev is None else prev + sq  # micro-batches: summed
            if self._arrival[i] < 0:
                self._arrival[i] = self._arrivals
                self._arrivals += 1
            if self.gather_after_backward and not self._gather_queued and self._pending:
                self._gather_queued = True
                # DDP queues its finalize (which writes the averaged .grad) later in this
                # backward; a callback queued from a callback runs after every queued one
                engine = torch.autograd.Variable._execution_engine
                engine.queue_callback(lambda: engine.queue_callback(self._gather_queued_step))

        return hook

    def _gather_queued_step(self) -> None:
        self._gather_queued = False
        if self._pending is not None:
            self.after_backward()

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._snapshot = self._fingerprints(with_buffers=True)

    def _fingerprints(self, with_buffers: bool) -> tuple[Tensor, Tensor]:
        d = self._device
        with torch.no_grad():
            pf = [_fingerprint(p).to(d) for p in self._params]
            params = torch.cat(pf) if pf else torch.zeros(0, dtype=torch.float64, device=d)
            if with_buffers and self._buffers:
                buffers = torch.cat([_fingerprint(b).to(d) for b in self._buffers])
            else:
                buffers = torch.full(
                    (3 * len(self._buffers),), math.nan, dtype=torch.float64, device=d
                )
        return params, buffers

    # ---- the step ----
    def before_backward(self, terms: Mapping[str, Tensor | float], batch: object) -> None:
        """Record this step's local loss terms (scalars) and batch, and the parameter
        fingerprint of the weights this step's forward used.

        The fingerprint comes from the forward pre-hook (after DDP's buffer broadcast,
        before the forward updates BatchNorm statistics). Taking it after the optimizer
        step would need a second collective per step; the weights of step k's forward
        are step k-1's updated weights, so one step later the same disagreement shows.
        If the forward did not go through the monitored module, parameters are
        fingerprinted here and buffers are not judged this step (they already hold the
        forward's local update).

        The term names are fixed at the first call; a term missing later is sent as NaN
        (so it reads as non-finite on that rank) and a new name is ignored. Ranks whose
        names differ in number send vectors of different lengths, which the collective
        rejects (gloo: "invalid tensor size"); the same number with other names is caught
        by a layout checksum in the vector, with a RuntimeError on every rank.
        """
        if not self._handles:
            raise RuntimeError("RankMonitor.before_backward() before attach()")
        if self._pending is not None and self.gather_after_backward:
            self.after_backward()  # the last step's backward reached no parameter
        if self.term_names is None:
            self.term_names = tuple(terms)
        d = self._device
        values = []
        for name in self.term_names:
            v = terms.get(name)
            if v is None:
                values.append(torch.tensor(math.nan, dtype=torch.float64, device=d))
            elif isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(
                        f"loss term {name!r}: expected a scalar, got shape {tuple(v.shape)}"
                    )
                values.append(v.detach().reshape(()).to(device=d, dtype=torch.float64))
            else:
                values.append(torch.tensor(float(v), dtype=torch.float64, device=d))
        term_vec = torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=d)
        pre_forward = self._snapshot is not None
        params, buffers = self._snapshot or self._fingerprints(with_buffers=False)
        self._snapshot = None
        self._pending = (term_vec, params, buffers, _data_fingerprint(batch, d), pre_forward)
        self._local = [None] * len(self._params)
        self._arrival = [-1] * len(self._params)
        self._arrivals = 0

    def after_backward(self) -> None:
        """Build this step's vector, all_gather it (one collective), fold it in."""
        if self._pending is None:
            raise RuntimeError("RankMonitor.after_backward() without before_backward()")
        term_vec, params, buffers, data, pre_forward = self._pending
        self._pending = None
        d = self._device
        no_grad = torch.tensor(_NO_GRAD, dtype=torch.float64, device=d)
        with torch.no_grad():
            local = [
                no_grad if s is None else s.to(device=d, dtype=torch.float64) for s in self._local
            ]
            reduced = [
                no_grad
                if p.grad is None or p.grad.layout != torch.strided
                else _sq_norm(p.grad).to(device=d, dtype=torch.float64)
                for p in self._params
            ]
            header = torch.tensor(
                [
                    self.rank,
                    self._state.steps_seen,
                    self._epoch,
                    self._layout(),
                    float(pre_forward),
                ],
                dtype=torch.float64,
                device=d,
            )
            empty = torch.zeros(0, dtype=torch.float64, device=d)
            vec = torch.cat(
                [
                    header,
                    term_vec,
                    torch.stack(local) if local else empty,
                    torch.tensor(self._arrival, dtype=torch.float64, device=d),
                    torch.stack(reduced) if reduced else empty,
                    params,
                    buffers,
                    data,
                ]
            )
            if self._distributed and self.world_size > 1:
                out = torch.empty(self.world_size * vec.numel(), dtype=vec.dtype, device=d)
                _all_gather(out, vec, self.group)
                rows = out.view(self.world_size, vec.numel()).cpu()  # (W, L): one host copy
            else:
                rows = vec.unsqueeze(0).cpu()
        self._local = [None] * len(self._params)
        self._fold(rows)

    def epoch_end(self) -> None:
        """Mark the end of an epoch (for ``rank-data-repeats``); no collective."""
        s = self._state
        if s.epoch_step_count > 0:
            s.epoch_orders.append(tuple(h.hexdigest() for h in s.epoch_hashes))
            s.epoch_steps.append(s.epoch_step_count)
        s.epoch_hashes = [hashlib.sha1() for _ in range(self.world_size)]
        s.epoch_step_count = 0
        self._epoch += 1

    def _layout(self) -> float:
        """A checksum of the vector's layout, so ranks that disagree on it are caught."""
        text = "\n".join(
            [*(self.term_names or ()), "|", *self.param_names, "|", *self.buffer_names]
        )
        return float(zlib.crc32(text.encode()))

    # ---- folding one gathered step (host side) ----
    def _fold(self, rows: Tensor) -> None:
        s = self._state
        world = rows.shape[0]
        t, p, b = len(self.term_names or ()), len(self._params), len(self._buffers)
        if not bool((rows[:, 3] == rows[0, 3]).all() and (rows[:, 1] == rows[0, 1]).all()):
            raise RuntimeError(
                "ranks disagree on the monitored layout or step (loss term names, "
                f"parameters, buffers): layouts {rows[:, 3].tolist()}, steps {rows[:, 1].tolist()}"
            )
        step = s.steps_seen
        o = len(_HEADER)
        terms = rows[:, o : o + t]
        o += t
        local = rows[:, o : o + p]
        arrival = rows[:, o + p : o + 2 * p]
        reduced = rows[:, o + 2 * p : o + 3 * p]
        o += 3 * p
        pfp = rows[:, o : o + 3 * p].reshape(world, p, 3)
        o += 3 * p
        bfp = rows[:, o : o + 3 * b].reshape(world, b, 3)
        o += 3 * b
        data = rows[:, o : o + len(DATA_FINGERPRINT_FIELDS)]

        # non-finite on some ranks only
        bad_terms = ~torch.isfinite(terms)
        bad_local = ~torch.isfinite(local)
        bad = bad_terms.any(1) | bad_local.any(1)  # (W,)
        n_bad = int(bad.sum())
        if n_bad == world and s.first_all_nonfinite_step is None:
            s.first_all_nonfinite_step = step
        elif 0 < n_bad < world and s.first_nonfinite is None:
            ranks = tuple(int(r) for r in torch.nonzero(bad).flatten())
            r0 = ranks[0]
            if bool(bad_terms[r0].any()):
                kind, name = "term", (self.term_names or ())[int(torch.nonzero(bad_terms[r0])[0])]
            else:
                # the first parameter the backward reached with a non-finite gradient
                inf = torch.full_like(arrival[r0], math.inf)
                order = torch.where(bad_local[r0], arrival[r0], inf)
                kind, name = "local-grad", self.param_names[int(torch.argmin(order))]
            spread = bool((~torch.isfinite(reduced)).any(1).all())
            s.first_nonfinite = RankEvent(step, ranks, name, kind, spread)

        # parameters: exact equality across ranks
        if s.first_param_desync is None and p:
            differs = ~_same(pfp[:, :, 1], pfp[0:1, :, 1]).all(0)  # (P,): checksums
            if bool(differs.any()):
                i = int(torch.nonzero(differs)[0])
                s.first_param_desync = RankEvent(
                    step, _odd_ranks(pfp[:, i, 1:2]), self.param_names[i], "parameter"
                )

        # buffers (only with a pre-forward fingerprint on every rank)
        if b:
            if not bool((rows[:, 4] == 1).all()):
                s.buffer_unchecked_steps += 1
            else:
                differs = ~_same(bfp[:, :, 1], bfp[0:1, :, 1]).all(0)  # (B,)
                if bool(differs.any()):
                    s.buffer_desync_steps += 1
                    numels = [x.numel() for x in self._buffers]
                    sizes = [
                        _relative_difference(bfp[:, i], r, 0, numels[i])
                        for i in torch.nonzero(differs).flatten().tolist()
                        for r in range(1, world)
                    ]
                    s.max_buffer_relative_difference = max(s.max_buffer_relative_difference, *sizes)
                    if s.first_buffer_desync is None:
                        i = int(torch.nonzero(differs)[0])
                        ranks = _odd_ranks(bfp[:, i, 1:2])
                        size = max(
                            _relative_difference(bfp[:, i], r, 0 if r else 1, numels[i])
                            for r in (ranks or (1,))
                        )
                        s.first_buffer_desync = RankEvent(
                            step, ranks, self.buffer_names[i], "buffer", False, size
                        )

        # data
        if bool((data[:, 0] > 0).all()):
            s.data_steps += 1
            if s.previous_data is not None:
                changed = ~_same(data, s.previous_data).all(1)
                s.data_changes = [c + int(x) for c, x in zip(s.data_changes, changed.tolist())]
            s.previous_data = data.clone()
            if world > 1 and bool(_same(data, data[0:1]).all()):
                s.duplicate_steps += 1
        for r in range(world):
            s.epoch_hashes[r].update(data[r].numpy().tobytes())
        s.epoch_step_count += 1

        # the thinned series
        if step % s.stride == 0:
            s.steps.append(step)
            s.terms.append(tuple(tuple(row) for row in terms.tolist()))
            s.local_grad_norm.append(_total_norm(local))
            s.reduced_grad_norm.append(_total_norm(reduced))
            if len(s.steps) > MAX_KEPT_STEPS:
                s.steps, s.terms = s.steps[::2], s.terms[::2]
                s.local_grad_norm = s.local_grad_norm[::2]
                s.reduced_grad_norm = s.reduced_grad_norm[::2]
                s.stride *= 2
        s.steps_seen += 1

    # ---- results ----
    def evidence(self) -> RankEvidence:
        """The gathered evidence so far, as plain host data."""
        s = self._state
        return RankEvidence(
            world_size=self.world_size,
            rank=self.rank,
            backend=self.backend,
            steps_seen=s.steps_seen,
            shuffle_expected=self.shuffle_expected,
            term_names=self.term_names or (),
            param_names=self.param_names,
            buffer_names=self.buffer_names,
            first_nonfinite=s.first_nonfinite,
            first_all_nonfinite_step=s.first_all_nonfinite_step,
            first_param_desync=s.first_param_desync,
            first_buffer_desync=s.first_buffer_desync,
            buffer_desync_steps=s.buffer_desync_steps,
            buffer_unchecked_steps=s.buffer_unchecked_steps,
            max_buffer_relative_difference=s.max_buffer_relative_difference,
            data_steps=s.data_steps,
            data_changes=tuple(s.data_changes),
            duplicate_steps=s.duplicate_steps,
            epoch_orders=tuple(s.epoch_orders),
            epoch_steps=tuple(s.epoch_steps),
            steps=tuple(s.steps),
            terms=tuple(s.terms),
            local_grad_norm=tuple(s.local_grad_norm),
            reduced_grad_norm=tuple(s.reduced_grad_norm),
        )

    def findings(self) -> list[Finding]:
        """:func:`rank_findings` of :meth:`evidence` (the same on every rank)."""
        return rank_findings(self.evidence())


# ---- rules (pure, on evidence) ----
def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _nonfinite(ev: RankEvidence) -> Finding | None:
    e = ev.first_nonfinite
    if e is None:
        return None
    what = f"loss term {e.name!r}" if e.kind == "term" else f"local gradient of {e.name}"
    others = [r for r in range(ev.world_size) if r not in e.ranks]
    spread = (
        "; the all-reduce spread it: the averaged gradient was non-finite on every rank"
        if e.spread
        else "; the all-reduced gradient stayed finite"
    )
    return Finding(
        code="rank-nonfinite",
        severity="error",
        title=f"non-finite values on {_ranks(e.ranks)} only",
        message=(
            f"at step {e.step} the {what} was non-finite on {_ranks(e.ranks)} while "
            f"{_ranks(others)} stayed finite{spread}"
        ),
        remedy=(
            f"look at the batch {_ranks(e.ranks)} got at step {e.step} (its data shard) and "
            "at anything rank-dependent in the loss; a NaN on one rank is averaged into all"
        ),
        where=f"{_ranks(e.ranks)}: {e.name}",
        evidence={
            "step": e.step,
            "ranks": ",".join(map(str, e.ranks)),
            "name": e.name,
            "kind": e.kind,
            "spread": int(e.spread),
            "first_all_nonfinite_step": ev.first_all_nonfinite_step,
        },
    )


def _desync(ev: RankEvidence) -> Finding | None:
    e = ev.first_param_desync
    if e is None:
        return None
    return Finding(
        code="rank-desync",
        severity="error",
        title="parameters differ across replicas",
        message=(
            f"at step {e.step} the weights of {e.name} on {_ranks(e.ranks)} differed from "
            "the other ranks' (exact comparison of a checksum of their bits; healthy DDP "
            "replicas are bitwise equal)"
        ),
        remedy=(
            "do not change weights on one rank only (in-place edits, rank-dependent "
            "initialisation after wrapping, a rank-0-only checkpoint load); load or "
            "change weights before DDP(...) or on every rank"
        ),
        where=f"{_ranks(e.ranks)}: {e.name}",
        evidence={"step": e.step, "ranks": ",".join(map(str, e.ranks)), "parameter": e.name},
    )


def _buffer_desync(ev: RankEvidence) -> Finding | None:
    e = ev.first_buffer_desync
    if e is None:
        return None
    return Finding(
        code="rank-buffer-desync",
        severity="warning",
        title="buffers differ across ranks",
        message=(
            f"from step {e.step} the buffer {e.name} on {_ranks(e.ranks)} differed from "
            f"rank 0's before the forward, by at least {e.relative_difference:.3g} of its "
            f"norm (largest over the run {ev.max_buffer_relative_difference:.3g}); buffers "
            f"differed at {ev.buffer_desync_steps} of {ev.steps_seen} steps"
        ),
        remedy=(
            "use nn.SyncBatchNorm.convert_sync_batchnorm(model), or DDP(broadcast_buffers=True) "
            "(forward_sync_buffers=True in newer torch) so rank 0's buffers reach every rank; "
            "or accept that the checkpoint saved from rank 0 holds only rank 0's statistics"
        ),
        where=f"{_ranks(e.ranks)}: {e.name}",
        evidence={
            "step": e.step,
            "ranks": ",".join(map(str, e.ranks)),
            "buffer": e.name,
            "relative_difference": e.relative_difference,
            "max_relative_difference": ev.max_buffer_relative_difference,
            "steps": ev.buffer_desync_steps,
        },
    )


def _grad_judged(ev: RankEvidence) -> list[tuple[int, tuple[float, ...]]]:
    """Kept steps after the warm-up whose local norms are finite and > 0 on every rank."""
    return [
        (step, norms)
        for step, norms in zip(ev.steps, ev.local_grad_norm)
        if step >= GRAD_WARMUP_STEPS and all(math.isfinite(n) and n > 0 for n in norms)
    ]


def _grad_disagree(ev: RankEvidence) -> Finding | None:
    judged = _grad_judged(ev)
    if len(judged) < GRAD_MIN_STEPS:
        return None
    ratios = [max(n) / min(n) for _, n in judged]
    flagged = [(s, n) for (s, n), q in zip(judged, ratios) if q > GRAD_RATIO_THRESHOLD]
    if len(flagged) < GRAD_DISAGREE_FRACTION * len(judged):
        return None
    # the odd rank: farthest from the median log norm (2 ranks tie: the larger norm)
    counts = [0] * ev.world_size
    for _, n in flagged:
        logs = [math.log(x) for x in n]
        mid = statistics.median(logs)
        counts[max(range(len(n)), key=lambda r: (abs(logs[r] - mid), logs[r]))] += 1
    rank = max(range(ev.world_size), key=lambda r: counts[r])
    median_ratio = statistics.median(q for q in ratios if q > GRAD_RATIO_THRESHOLD)
    own = statistics.median(n[rank] for _, n in flagged)
    other = statistics.median(x for _, n in flagged for r, x in enumerate(n) if r != rank)
    return Finding(
        code="rank-grad-disagree",
        severity="warning",
        title=f"rank {rank}'s local gradients disagree with the other ranks'",
        message=(
            f"at {len(flagged)} of {len(judged)} steps the largest local gradient norm "
            f"was more than {GRAD_RATIO_THRESHOLD:g}x the smallest (median ratio "
            f"{median_ratio:.3g}, largest {max(ratios):.3g}); rank {rank}'s median norm "
            f"{own:.3g} vs {other:.3g} on the others; in healthy runs different data "
            "alone gave < 4x"
        ),
        remedy=(
            f"check what is different on rank {rank}: its loss scaling or reduction, its "
            "data shard and preprocessing (units, normalisation), a rank-dependent branch"
        ),
        where=f"rank {rank}",
        evidence={
            "rank": rank,
            "steps_flagged": len(flagged),
            "steps_judged": len(judged),
            "median_ratio": median_ratio,
            "max_ratio": max(ratios),
            "threshold": GRAD_RATIO_THRESHOLD,
        },
    )


def _data_frozen(ev: RankEvidence) -> Finding | None:
    if ev.data_steps < DATA_FROZEN_MIN_STEPS:
        return None
    ranks = tuple(r for r, c in enumerate(ev.data_changes) if c == 0)
    if not ranks:
        return None
    return Finding(
        code="rank-data-frozen",
        severity="warning",
        title=f"{_ranks(ranks)} got the same batch at every step",
        message=(
            f"the batch fingerprint of {_ranks(ranks)} never changed over {ev.data_steps} steps"
        ),
        remedy=(
            "make sure every rank iterates its loader (a batch fetched once outside the "
            "loop, or a sampler or dataset that returns one item, freezes the data)"
        ),
        where=_ranks(ranks),
        evidence={"ranks": ",".join(map(str, ranks)), "steps": ev.data_steps},
    )


def _data_duplicate(ev: RankEvidence) -> Finding | None:
    if ev.data_steps < DUPLICATE_MIN_STEPS:
        return None
    share = ev.duplicate_steps / ev.data_steps
    if share < DUPLICATE_FRACTION:
        return None
    return Finding(
        code="rank-data-duplicate",
        severity="warning",
        title="every rank got the same batches",
        message=(
            f"at {ev.duplicate_steps} of {ev.data_steps} steps ({share:.0%}) all "
            f"{ev.world_size} ranks had identical batches: each rank trains on the same "
            "data, so the extra ranks add no data"
        ),
        remedy=(
            "give each rank its own shard: DataLoader(dataset, sampler=DistributedSampler"
            "(dataset)), and call sampler.set_epoch(epoch) every epoch"
        ),
        where="all ranks",
        evidence={"steps": ev.duplicate_steps, "steps_judged": ev.data_steps, "share": share},
    )


def _data_repeats(ev: RankEvidence) -> Finding | None:
    if not ev.shuffle_expected:
        return None
    for e in range(len(ev.epoch_orders) - 1):
        if min(ev.epoch_steps[e], ev.epoch_steps[e + 1]) < REPEATS_MIN_EPOCH_STEPS:
            continue
        ranks = tuple(
            r for r, (a, b) in enumerate(zip(ev.epoch_orders[e], ev.epoch_orders[e + 1])) if a == b
        )
        if ranks:
            return Finding(
                code="rank-data-repeats",
                severity="info",
                title=f"{_ranks(ranks)} saw the same batch order in epochs {e} and {e + 1}",
                message=(
                    f"the sequence of {ev.epoch_steps[e]} batches of {_ranks(ranks)} in "
                    f"epoch {e + 1} was identical to epoch {e}, though shuffling was expected"
                ),
                remedy=(
                    "call sampler.set_epoch(epoch) at the start of every epoch: "
                    "DistributedSampler shuffles with seed + epoch"
                ),
                where=_ranks(ranks),
                evidence={"ranks": ",".join(map(str, ranks)), "epoch": e + 1},
            )
    return None


def rank_findings(evidence: RankEvidence) -> list[Finding]:
    """Findings naming the rank(s), worst first; none in a run of world size 1.

    A non-finite value on every rank at once is not rank-specific and is left to the
    single-process rules (its step is in ``rank-nonfinite``'s evidence when a
    rank-specific one came first).
    """
    if evidence.world_size < 2 or evidence.steps_seen == 0:
        return []
    rules: tuple[Callable[[RankEvidence], Finding | None], ...] = (
        _nonfinite,
        _desync,
        _buffer_desync,
        _grad_disagree,
        _data_frozen,
        _data_duplicate,
        _data_repeats,
    )
    return [f for f in (rule(evidence) for rule in rules) if f is not None]


def rank_not_checked(evidence: RankEvidence) -> list[NotChecked]:
    """The codes of :func:`rank_findings` that could not be judged, and why."""
    if evidence.world_size < 2:
        return [NotChecked(c, "not a distributed run (world size 1)") for c in CODES]
    if evidence.steps_seen == 0:
        return [NotChecked(c, "no step was recorded") for c in CODES]
    out: list[NotChecked] = []
    if not evidence.buffer_names:
        out.append(NotChecked("rank-buffer-desync", "the model has no buffers"))
    elif evidence.buffer_unchecked_steps == evidence.steps_seen:
        out.append(
            NotChecked(
                "rank-buffer-desync",
                "no step's forward went through the monitored module, so no buffer "
                "fingerprint was taken before the forward",
            )
        )
    judged = len(_grad_judged(evidence))
    if judged < GRAD_MIN_STEPS:
        out.append(
            NotChecked(
                "rank-grad-disagree",
                f"{judged} steps after the first {GRAD_WARMUP_STEPS} had finite, non-zero "
                f"local gradient norms on every rank; {GRAD_MIN_STEPS} are needed",
            )
        )
    for code, need in (
        ("rank-data-frozen", DATA_FROZEN_MIN_STEPS),
        ("rank-data-duplicate", DUPLICATE_MIN_STEPS),
    ):
        if evidence.data_steps < need:
            out.append(
                NotChecked(
                    code,
                    f"{evidence.data_steps} steps had a tensor batch on every rank; "
                    f"{need} are needed",
                )
            )
    if not evidence.shuffle_expected:
        out.append(
            NotChecked(
                "rank-data-repeats",
                "not told the sampler reshuffles each epoch (RankMonitor(shuffle_expected=True))",
            )
        )
    elif len(evidence.epoch_orders) < 2:
        out.append(
            NotChecked(
                "rank-data-repeats",
                f"{len(evidence.epoch_orders)} complete epochs were marked with epoch_end(); "
                "2 are needed",
            )
        )
    return out
