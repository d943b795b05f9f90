"""The baseline: what a user has today without mtx, as a monitor for the fault benchmark.

Three published or built-in detectors, run together in the same training loop as the
Doctor (same grid, faults and seeds; ``run.py`` trains each cell a second time with this
monitor instead of the Doctor). Their alarms are mapped to mtx's finding codes so the same
recall / precision / false-alarm / latency tables can be computed:

- AUTOTRAINER (Zhang et al., ICSE 2021), every step: vanishing when
  ‖g_first‖ / ‖g_last‖ < 1e-3 and ‖g_first‖ < 1e-4 → ``vanishing-grad``; exploding when
  ‖g_first‖ / ‖g_last‖ > 70 → ``exploding-grad``.
- DeepDiagnosis (Wardat et al., ICSE 2022), at each epoch's end, per layer: vanishing
  when the layer's mean |g| < 1e-7 → ``vanishing-grad``; "numerical error in the delta
  weights" when the layer's mean g is NaN or ±Inf → ``nonfinite-grad``, or exactly 0 →
  ``vanishing-grad`` (a zero gradient is a vanished one in mtx's codes).
- ``torch.autograd.detect_anomaly()`` around ``backward``: its RuntimeError (a backward
  function returned NaN) → ``nonfinite-grad``; the run stops there, as a user's would.

``g_first`` / ``g_last``: the weight gradient of the first and the last weight-bearing
layer (``nn.Linear`` / ``nn.Conv*``) in forward order, found by one forward pass on the
first batch, as AUTOTRAINER takes the first and last layer of a Keras model. AUTOTRAINER
checks every step here. DeepDiagnosis checks at the end of each epoch, per weight-bearing
layer (its ``mapFaluireToFix.on_epoch_end`` in DeepDiagnosis/ICSE2022
``callback/callbacks.py``: ``identifyVanishingGradient`` with ``threshold_VG = 1e-7`` and
``identifyNumerical``: NaN, Inf or 0). DeepDiagnosis has no finite threshold for an
exploding gradient: its exploding-gradient symptom is that numerical error (a NaN or Inf
in the gradients). It recomputes the gradient on the first batch; here the epoch's last
batch's gradient is read (no extra pass). A layer whose weight got no gradient at all
(``grad is None``: not in the graph) is skipped, as Keras has no such layer.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

AUTOTRAINER_VANISHING_RATIO = 1e-3
AUTOTRAINER_VANISHING_FIRST = 1e-4
AUTOTRAINER_EXPLODING_RATIO = 70.0
DEEPDIAGNOSIS_VANISHING = 1e-7

CODES = ("vanishing-grad", "exploding-grad", "nonfinite-grad")  # what the baseline reports
TOOLS = ("autotrainer", "deepdiagnosis", "detect_anomaly")


class AnomalyStop(Exception):
    """detect_anomaly raised in backward: the user's run stops here."""


def _weighted_layers_in_forward_order(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """Linear and conv layers in the order the forward pass first calls them."""
    order: list[nn.Module] = []
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)

    def note(module: nn.Module, _inp: object, _out: object) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_hook(note) for m in model.modules() if isinstance(m, kinds)]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()  # batch norm: no running-statistics update
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return order


class BaselineMonitor:
    """AUTOTRAINER's and DeepDiagnosis's gradient rules plus ``detect_anomaly``.

    ``fired`` maps each code to the first optimizer step (1-based) at which a detector
    raised it; ``sources`` to the detectors that raised it. ``saw_nonfinite``: a loss or a
    gradient was NaN/Inf at some step (where detect_anomaly could have raised);
    ``seconds``: the time spent inside the monitor.
    """

    def __init__(self) -> None:
        self.layers: list[nn.Module] = []
        self.fired: dict[str, int] = {}
        self.sources: dict[str, set[str]] = {}
        self.saw_nonfinite = False
        self.seconds = 0.0

    def attach(self, model: nn.Module, example: Tensor) -> None:
        start = time.perf_counter()
        self.layers = _weighted_layers_in_forward_order(model, example)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.seconds += time.perf_counter() - start

    def _raise(self, code: str, tool: str, step: int) -> None:
        self.fired.setdefault(code, step)
        self.sources.setdefault(code, set()).add(tool)

    @contextmanager
    def backward_guard(self, step: int) -> Iterator[None]:
        """Wrap ``loss.backward()``: detect_anomaly's RuntimeError becomes AnomalyStop."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled"
            try:
                with torch.autograd.detect_anomaly():
                    yield
            except RuntimeError as exc:
                if "nan" not in str(exc).lower():
                    raise
                self._raise("nonfinite-grad", "detect_anomaly", step)
                raise AnomalyStop(str(exc).splitlines()[0]) from exc

    def after_backward(self, step: int, loss: Tensor | None = None) -> None:
        """AUTOTRAINER on this step's gradients (and the non-finite sentinel)."""
        start = time.perf_counter()
        try:
            self._after_backward(step, loss)
        finally:
            self.seconds += time.perf_counter() - start

    def _after_backward(self, step: int, loss: Tensor | None) -> None:
        if not self.saw_nonfinite:
            flags = [g.isfinite().all() for p in self.params if (g := p.grad) is not None]
            if loss is not None:
                flags.append(loss.detach().isfinite().all())
            self.saw_nonfinite = bool(flags) and not bool(torch.stack(flags).all())
        if len(self.layers) < 2:
            return
        first = getattr(self.layers[0], "weight", None)
        last = getattr(self.layers[-1], "weight", None)
        if first is None or last is None or first.grad is None or last.grad is None:
            return
        g_first, g_last = (float(v) for v in torch.stack([first.grad.norm(), last.grad.norm()]))
        if not (math.isfinite(g_first) and math.isfinite(g_last)) or g_last == 0.0:
            return  # AUTOTRAINER's ratio is undefined; detect_anomaly covers NaN
        ratio = g_first / g_last
        if ratio < AUTOTRAINER_VANISHING_RATIO and g_first < AUTOTRAINER_VANISHING_FIRST:
            self._raise("vanishing-grad", "autotrainer", step)
        if ratio > AUTOTRAINER_EXPLODING_RATIO:
            self._raise("exploding-grad", "autotrainer", step)

    def epoch_end(self, step: int) -> None:
        """DeepDiagnosis on the latest gradients, layer by layer."""
        start = time.perf_counter()
        try:
            self._epoch_end(step)
        finally:
            self.seconds += time.perf_counter() - start

    def _epoch_end(self, step: int) -> None:
        weights = [getattr(m, "weight", None) for m in self.layers]
        grads = [w.grad for w in weights if isinstance(w, Tensor) and w.grad is not None]
        if not grads:
            return
        stats = torch.stack([torch.stack([g.mean(), g.abs().mean()]) for g in grads]).tolist()
        for mean, abs_mean in stats:
            if not math.isfinite(mean):
                self._raise("nonfinite-grad", "deepdiagnosis", step)
            elif mean == 0.0:
                self._raise("vanishing-grad", "deepdiagnosis", step)
            elif abs_mean < DEEPDIAGNOSIS_VANISHING:
                self._raise("vanishing-grad", "deepdiagnosis", step)
