"""The reparameterisation noise: fresh on every step, and standard normal?

A VAE samples ``z = mu + sigma * eps`` with ``sigma = exp(0.5 * log_var)`` and fresh
``eps ~ N(0, 1)`` on every training call. Two kinds of bug break that silently:

* **Frozen noise** (the original bug: a generator reseeded in ``forward``). With ``z`` in
  the output, ``eps = (z - mu) / sigma`` is recovered on every training step and its first
  :data:`NOISE_PROBE` entries are compared with the last step of the same batch size (a
  short last batch is only ever compared with another short batch). Without ``z``, on a
  few sampled steps the same batch runs twice more in training mode and the two
  reconstructions are compared (:func:`two_passes`): fresh noise makes them differ.
* **Wrongly scaled noise.** The recovered ``eps`` must have mean 0 and std 1 (``eps *
  0.01`` gives std 0.01) and must not grow with ``sigma``. ``z - mu`` grows like
  ``exp(k * log_var)``; the slope of ``log eps**2`` against ``log_var`` is ``2k - 1``
  (exactly, whatever the spread of ``log_var``, because ``eps`` is drawn independently of
  it), so ``k`` is 0.5 when ``sigma = exp(0.5 * log_var)``, 1 when ``exp(log_var)`` is
  used and 0 when sigma is left out. Where ``log_var`` barely varies the slope cannot be
  measured and the exponent stays unjudged (``exponent_se`` says how well it was seen).

Steps are measured in groups of :data:`FLUSH_EVERY`: their moments are reduced on the
device and copied to the host once, together with each step's noise fingerprint; groups
are pooled with Chan et al.'s update, so memory does not grow with the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn

from meaning_transform.diagnostics.thresholds import NOISE_SAME, NOISE_SAME_OUTPUT

NOISE_PROBE = 32  # eps entries per step compared between steps (the noise fingerprint)
NOISE_MIN_COMPARED = 4  # recovered entries two steps must share to be compared
# sigma / |mu| above this: float32 keeps ~6e-8 relative precision, so a repeated draw is
# recovered to ~6e-4 (below NOISE_SAME); below it z == mu in rounding and eps is lost
RESOLVABLE = 1e-4
_COLUMNS = 3  # pooled per entry: eps, log_var, log(eps**2)
# steps measured together: the per-step cost is then a few list appends, and the ~25
# small tensor ops of a measurement are paid once per this many steps
FLUSH_EVERY = 16
# entries of a step pooled for the moments (the fingerprint is the first NOISE_PROBE of
# them): the exponent's standard error shrinks like 1/sqrt(entries), and 4096 per step
# reach the 0.05 it is judged at within a step or two; more per step costs time for
# precision no rule uses (a 256 x 32 batch has 8192)
NOISE_SAMPLE = 4096


@dataclass(frozen=True)
class NoiseRepeats:
    """Comparable pairs of noise draws, and how many of them drew the same noise.

    A pair is two training steps of equal batch size (``eps`` recovered from ``z``) or,
    for a model without ``z``, two training-mode passes of one batch (``probed``).
    """

    pairs: int
    repeated: int  # pairs whose noise (or reconstruction) was the same
    probed: int  # how many of the pairs came from two passes of one batch


@dataclass(frozen=True)
class NoiseScale:
    """The recovered ``eps = (z - mu) / exp(0.5 * log_var)``, pooled over a run's entries."""

    samples: int  # finite, non-zero eps entries pooled
    steps: int  # training steps they came from
    mean: float  # 0 expected
    std: float  # 1 expected (population std)
    log_var_std: float  # spread of log_var over the same entries
    exponent: float  # k in z - mu ~ exp(k * log_var); 0.5 expected; nan if unmeasurable
    exponent_se: float  # its standard error (inf when log_var did not vary)
    dropped: int  # entries left out: eps or log_var not finite, or eps exactly 0


class _PooledMoments:
    """Count, means and co-moment matrix of a few columns, merged batch by batch."""

    def __init__(self, columns: int) -> None:
        self.n = 0.0
        self.mean = torch.zeros(columns, dtype=torch.float64)
        self.m2 = torch.zeros(columns, columns, dtype=torch.float64)

    def add(self, n: float, mean: Tensor, m2: Tensor) -> None:
        # Chan, Golub & LeVeque 1979: merge two groups' centred moments without cancellation.
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean  # (C,)
        self.m2 += m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.mean += delta * (n / total)
        self.n = total


class NoiseRecorder:
    """Collects the noise evidence of a run, step by step (see the module docstring).

    The Doctor calls :meth:`record` on every training-mode step with ``mu``, ``log_var``
    and ``z`` (``None`` if the model gives none); when it returns False (no usable ``z``)
    and :meth:`probe_due` says so, it calls :meth:`probe` with a function running the
    model on the step's batch and returning the reconstruction.
    """

    def __init__(self) -> None:
        self.steps = 0  # training-mode steps recorded
        self.pairs = 0
        self.repeated = 0
        self.probed = 0
        self.dropped = 0
        self.scale_steps = 0
        self._last: dict[tuple[int, ...], Tensor] = {}  # batch shape -> last fingerprint
        self._moments = _PooledMoments(_COLUMNS)
        # steps waiting for flush(): (batch shape, z, mu, log_var), detached
        self._pending: list[tuple[tuple[int, ...], Tensor, Tensor, Tensor]] = []
        self.last_recovered = False  # the latest flushed step had eps recovered

    def record(self, mu: Tensor, log_var: Tensor, z: Tensor | None) -> bool:
        """One training step's noise; False when ``z`` is missing or not ``mu``'s shape.

        The step waits (detached) with up to :data:`FLUSH_EVERY` others and is measured
        with them in one go (:meth:`flush`): the same numbers, a fraction of the ops.
        """
        self.steps += 1
        if z is None or not z.shape == mu.shape == log_var.shape or z.numel() == 0:
            return False
        # the first NOISE_SAMPLE entries: eps is i.i.d., so they are a sample like any other
        keep = slice(0, NOISE_SAMPLE)
        self._pending.append(
            (
                tuple(z.shape),
                z.detach().reshape(-1)[keep],
                mu.detach().reshape(-1)[keep],
                log_var.detach().reshape(-1)[keep],
            )
        )
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()
        return True

    @torch.no_grad()
    def flush(self) -> None:
        """Measure the waiting steps: their entries pooled as one group, one host copy."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        dtype = torch.float32
        for _, z, _, _ in pending:
            dtype = torch.promote_types(dtype, z.dtype)
        z = torch.cat([t[1].to(dtype).flatten() for t in pending])  # (N,) every step's entries
        mu = torch.cat([t[2].to(dtype).flatten() for t in pending])
        lv = torch.cat([t[3].to(dtype).flatten() for t in pending])
        sizes = [t[1].numel() for t in pending]
        sigma = torch.exp(0.5 * lv)
        eps = (z - mu) / sigma
        # eps is recoverable only where sigma is not lost in the rounding of mu + sigma*eps
        # (sigma < RESOLVABLE * |mu|: z == mu to the last bit, eps reads 0 every step)
        resolvable = sigma > RESOLVABLE * mu.abs()
        ok = torch.isfinite(eps) & torch.isfinite(lv) & (eps != 0) & resolvable  # (N,)
        log_sq = 2 * torch.log(eps.abs())  # log(eps**2); -inf at 0, masked out by `ok`
        cols = torch.stack([eps, lv, log_sq], 1)  # (N, 3)
        cols = torch.where(ok[:, None], cols, torch.zeros_like(cols))
        n = ok.sum()
        mean = cols.sum(0) / n.clamp(min=1)  # (3,)
        centred = torch.where(ok[:, None], cols - mean, torch.zeros_like(cols))
        m2 = centred.T @ centred  # (3, 3)
        counts = torch.stack([part.sum() for part in ok.split(sizes)])  # (S,)
        # each step's first NOISE_PROBE entries, NaN where eps was not recovered or absent
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)  # (S,)
        index = starts[:, None] + torch.arange(NOISE_PROBE)  # (S, NOISE_PROBE)
        inside = torch.arange(NOISE_PROBE)[None, :] < torch.tensor(sizes)[:, None]
        index = torch.where(inside, index, torch.zeros_like(index)).to(eps.device)
        marked = torch.where(ok, eps, torch.full_like(eps, math.nan))
        prints = torch.where(inside.to(eps.device), marked[index], math.nan)  # (S, PROBE)
        host = torch.cat([n[None].to(dtype), mean, m2.flatten(), counts.to(dtype)])
        host = torch.cat([host, prints.flatten()]).cpu().to(torch.float64)  # one copy
        steps = len(pending)
        self._moments.add(float(host[0]), host[1:4], host[4:13].view(3, 3))
        step_counts = host[13 : 13 + steps].tolist()
        fingerprints = host[13 + steps :].view(steps, NOISE_PROBE)
        for (shape, *_), size, count, fingerprint in zip(
            pending, sizes, step_counts, fingerprints, strict=True
        ):
            self.dropped += size - int(count)
            self.scale_steps += count > 0
            self._compare(shape, fingerprint)
        self.last_recovered = step_counts[-1] > 0

    def probe_due(self) -> bool:
        """Probe on the 1st, 2nd, 3rd, 5th, 9th, 17th ... step: few, spread over the run."""
        n = self.steps - 1
        return n >= 0 and n & (n - 1) == 0

    def probe(self, model: nn.Module, run: Callable[[], Tensor]) -> None:
        """Two training-mode passes of one batch; the same output twice means no fresh noise."""
        a, b = two_passes(model, run)
        if a.shape != b.shape or a.numel() == 0:
            return
        finite = torch.isfinite(a).all() & torch.isfinite(b).all()
        host = torch.stack([finite.to(a.dtype), a.abs().max(), (a - b).abs().max()])
        is_finite, scale, diff = host.tolist()  # one host copy
        if not is_finite or scale == 0.0:
            return  # NaN/Inf are the non-finite rules' business; all zeros show no noise
        self.pairs += 1
        self.probed += 1
        self.repeated += diff <= NOISE_SAME_OUTPUT * scale

    def _compare(self, shape: tuple[int, ...], fingerprint: Tensor) -> None:
        # entries whose eps was not recovered (NaN/Inf, or sigma lost next to |mu|) are NaN
        last = self._last.get(shape)
        self._last[shape] = fingerprint
        if last is None:
            return
        both = torch.isfinite(fingerprint) & torch.isfinite(last)
        if int(both.sum()) < NOISE_MIN_COMPARED:
            return  # too few recovered entries in common: not a comparable pair
        self.pairs += 1
        # recovered eps matches a repeated draw only to rounding (which grows as sigma
        # shrinks next to |mu|), while fresh draws differ by ~1: compare the median
        self.repeated += float((fingerprint[both] - last[both]).abs().median()) <= NOISE_SAME

    def repeats(self) -> NoiseRepeats | None:
        self.flush()
        if self.pairs == 0:
            return None
        return NoiseRepeats(self.pairs, self.repeated, self.probed)

    def scale(self) -> NoiseScale | None:
        self.flush()
        pooled = self._moments
        if self.scale_steps == 0:
            return None
        n = pooled.n
        var = (pooled.m2.diagonal() / n).tolist()  # population variances of the columns
        sxx, sxy, syy = float(pooled.m2[1, 1]), float(pooled.m2[1, 2]), float(pooled.m2[2, 2])
        if sxx > 0 and n > 2:
            slope = sxy / sxx  # d log(eps**2) / d log_var = 2k - 1
            resid = max(syy - slope * sxy, 0.0) / (n - 2)
            exponent, exponent_se = 0.5 + slope / 2, math.sqrt(resid / sxx) / 2
        else:
            exponent, exponent_se = math.nan, math.inf
        return NoiseScale(
            samples=int(n),
            steps=self.scale_steps,
            mean=float(pooled.mean[0]),
            std=math.sqrt(var[0]),
            log_var_std=math.sqrt(var[1]),
            exponent=exponent,
            exponent_se=exponent_se,
            dropped=self.dropped,
        )


def two_passes(model: nn.Module, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """``run()`` twice without a trace on training: the two outputs, detached.

    Under ``torch.no_grad()``, with dropout switched off (its masks would make the passes
    differ for reasons other than the noise), and afterwards restored: torch's global RNG
    (CPU and the model's accelerator), every ``torch.Generator`` a module holds as an
    attribute (``MeaningVAE`` owns one), and every buffer (the passes run on copies:
    batch norm's running statistics move in every training-mode pass). So the user's next
    real step draws the noise it would have drawn without the Doctor, and the real step's
    graph, built before the passes, can still be differentiated. A generator kept elsewhere
    (a closure, a list) is not found: the two passes advance it, which changes which
    noise later steps draw but not how it is distributed.
    """
    with ExitStack() as stack:
        stack.enter_context(_forked_rng(model))
        stack.enter_context(_restored_generators(model))
        stack.enter_context(_scratch_buffers(model))
        stack.enter_context(_dropout_off(model))
        stack.enter_context(torch.no_grad())
        first = run().detach()
        second = run().detach()
    return first, second


@contextmanager
def _forked_rng(model: nn.Module) -> Iterator[None]:
    """torch.random.fork_rng over the CPU and the accelerator the model lives on."""
    used = {
        (t.device.type, t.device.index or 0)
        for t in chain(model.parameters(), model.buffers())
        if t.device.type != "cpu"
    }
    device_type = min(kind for kind, _ in used) if used else "cuda"
    devices = sorted(index for kind, index in used if kind == device_type)
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        yield


@contextmanager
def _restored_generators(model: nn.Module) -> Iterator[None]:
    generators = [
        g for m in model.modules() for g in vars(m).values() if isinstance(g, torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)


@contextmanager
def _scratch_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer swapped for a copy during the passes, the original put back after.

    Not restored in place: batch norm saves its running statistics for backward, so an
    in-place write (even of the old values) would invalidate the real step's graph.
    """
    originals = [
        (m, name, b) for m in model.modules() for name, b in m.named_buffers(recurse=False)
    ]
    for m, name, b in originals:
        setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, name, b in originals:
            setattr(m, name, b)


@contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    dropouts = [
        m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
    ]
    for m in dropouts:
        m.train(False)
    try:
        yield
    finally:
        for m in dropouts:
            m.train(True)
