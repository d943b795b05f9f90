"""The Doctor as a Lightning callback: the CLI's findings for a ``LightningModule``.

    from meaning_transform.integrations.lightning import DoctorCallback

    doctor = DoctorCallback(report_path="mtx-report.json", stop_on="error")
    trainer = Trainer(callbacks=[doctor], max_epochs=10)
    trainer.fit(module, loader)
    doctor.findings                     # also printed once, on rank 0

Under ``Trainer(strategy="ddp")`` every rank runs the Doctor; ``stop_on`` stops all ranks
together.

Needs the ``lightning`` extra (``pip install -e ".[lightning]"``). Nothing outside
``meaning_transform.integrations`` imports this module, so the core runs without it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from meaning_transform import __version__
from meaning_transform.diagnostics.doctor import Doctor, Findings
from meaning_transform.diagnostics.findings import SEVERITIES, Finding

StopOn = Literal["error", "warning"]
_SAMPLE_ROWS = 1024  # rows of the training inputs kept for latent health at the end


class DoctorCallback(Callback):
    """Attaches a :class:`~meaning_transform.diagnostics.doctor.Doctor` to the module that
    ``trainer.fit`` trains, and gives the same findings as the CLI at the end.

    How it sees a step (automatic optimization):

    - **The loss and its terms**: what ``training_step`` returns. The method is wrapped on
      the instance while fitting (restored at the end). A scalar tensor is the total (the
      per-term checks then say they need named terms); a dict is read as the Lightning
      contract has it: ``"loss"`` is the total and every other *scalar tensor* entry is a
      named term (``{"loss": recon + beta * kl, "recon": recon, "kl": kl}``). Non-scalar
      and non-tensor entries (outputs kept for ``on_train_batch_end``) are ignored. The
      terms must stay attached to the graph for per-term attribution (``.detach()`` the
      ones you ``self.log``, not the ones you return).
    - **The model output and the batch**: a forward hook on the module the Doctor
      watches (the ``LightningModule`` itself, or ``getattr(module, model_attr)`` when
      ``training_step`` calls a submodule such as ``self.vae(x)``) records the first
      forward call of each ``training_step``: its output (any form the Doctor reads: a
      dict, ``(recon, mu, log_var)``, ...) and its first argument, the batch ``x``.
    - **When**: in ``on_before_backward``, after ``training_step`` and before Lightning's
      backward, so per-term attribution (every ``attribute_every`` steps) reads the graph.
    - **Gradient statistics**: the Doctor's post-accumulate-grad hooks, during Lightning's
      backward: they see ``.grad`` after backward, before ``on_before_optimizer_step``,
      gradient clipping (``gradient_clip_val``) and the optimizer step.
    - **Epochs**: the Doctor's epoch closes at each training epoch's end.

    With manual optimization the loss is the tensor given to ``manual_backward`` (no named
    terms). A ``training_step`` returning None (a skipped step) is not recorded.

    At the end of training the findings are computed on ``data`` (default: the first
    1024 input rows seen in training), printed once on rank 0, kept in :attr:`findings`
    and written to ``report_path`` as JSON (replacing the file).

    Under DDP (``strategy="ddp"``; tests/integrations/test_lightning_ddp.py
    runs the real ``"ddp"`` launcher on 2 CPU ranks) every rank runs its own Doctor, which
    gathers the ranks' evidence once per step at the end of the backward, so every rank
    must record every step. :attr:`findings` on each rank holds that rank's own findings
    plus the ``rank-*`` findings (the same on every rank); rank 0's are printed and saved.
    ``stop_on`` is decided together: at every check each rank says whether its findings
    reach ``stop_on`` (one reduction over the ranks), and if any does, every rank stops at
    the same step with the same :attr:`stopped_by` (the lowest such rank's finding).

    Args:
        model_attr: the attribute of the ``LightningModule`` holding the VAE whose forward
            ``training_step`` calls (default: the module itself).
        where: the name findings are reported under.
        attribute_every: per-term gradient attribution on the Doctor's attribution
            schedule (``"auto"``: steps 0, 4, 16, 64, 256, 1024, 4096, then every 4096th)
            or every k steps (0 = never); ``doctor_kwargs`` may hold ``schedule=`` (the
            steps with full gradient statistics).
        weights: the weights of named terms that the total weighs (others count 1).
        reduction: ``"sum"`` or ``"mean"`` per term, when known.
        data: inputs to measure latent health and dead units on at the end.
        report_path: write the findings there as JSON at the end.
        stop_on: ``"error"`` (or ``"warning"``): stop training through the trainer
            (``trainer.should_stop``) at the first finding of that severity or worse
            (under DDP: on any rank; all ranks stop together).
        check_every: with ``stop_on``, check every k steps (:meth:`Doctor.check`, which
            judges closed epochs only); None: at each training epoch's end.
        log: log :meth:`Doctor.metrics` through ``pl_module.log_dict`` (keys ``mtx/...``;
            ``log_every_n_steps`` of the Trainer decides which steps reach the logger).
        log_every: compute and log the metrics every k steps.
        print_findings: print the findings at the end (rank 0).
        **doctor_kwargs: passed to :class:`Doctor` (``beta_schedule``, ``beta_max``,
            ``kl_term``, ``attribution_method``, ...).
    """

    def __init__(
        self,
        model_attr: str | None = None,
        where: str = "run",
        attribute_every: int | Literal["auto"] = "auto",
        weights: Mapping[str, float] | None = None,
        reduction: Mapping[str, str] | None = None,
        data: torch.Tensor | None = None,
        report_path: str | os.PathLike[str] | None = None,
        stop_on: StopOn | None = None,
        check_every: int | None = None,
        log: bool = True,
        log_every: int = 1,
        print_findings: bool = True,
        **doctor_kwargs: Any,
    ) -> None:
        if stop_on is not None and stop_on not in ("error", "warning"):
            raise ValueError(f"stop_on must be 'error', 'warning' or None, got {stop_on!r}")
        for name, value in (("check_every", check_every), ("log_every", log_every)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model_attr = model_attr
        self.where = where
        self.attribute_every = attribute_every
        self.weights = dict(weights) if weights is not None else None
        self.reduction = dict(reduction) if reduction is not None else None
        self.data = data
        self.report_path = Path(report_path) if report_path is not None else None
        self.stop_on = stop_on
        self.check_every = check_every
        self.log = log
        self.log_every = log_every
        self.print_findings = print_findings
        self.doctor_kwargs = doctor_kwargs
        self.doctor: Doctor | None = None
        self.findings: Findings | None = None  # set at the end of training
        self.stopped_by: Finding | None = None  # that stopped training (on any rank)
        self._pending_state: Mapping[str, Any] | None = None  # from a checkpoint
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._module: pl.LightningModule | None = None
        self._in_step = False
        self._captured = False  # the first forward of this training_step was recorded
        self._output: object = None
        self._x: torch.Tensor | None = None
        self._returned: object = None
        self._sample: list[torch.Tensor] = []

    # ---- attach and detach ----
    def _watched(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"DoctorCallback(model_attr={self.model_attr!r}): expected an nn.Module at "
                f"{type(pl_module).__name__}.{self.model_attr}, got {type(model).__name__}"
            )
        return model

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._watched(pl_module)
        if self.doctor is None or self.doctor.model is not model:
            self.doctor = Doctor(
                model, where=self.where, attribute_every=self.attribute_every, **self.doctor_kwargs
            )
        if self._pending_state is not None:
            self.doctor.load_state_dict(self._pending_state)
            self._pending_state = None
        self.doctor.attach()
        self._handle = model.register_forward_hook(self._record_forward)
        self._module = pl_module
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._in_step, self._captured = True, False
            self._output, self._x, self._returned = None, None, None
            try:
                returned = original(*args, **kwargs)
            finally:
                self._in_step = False
            self._returned = returned
            return returned

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._module is not None:
            vars(self._module).pop("training_step", None)  # the class's method again
            self._module = None
        if self.doctor is not None:
            self.doctor.close()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    # ---- per step ----
    def _record_forward(self, module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        if not self._in_step or self._captured:
            return
        self._captured = True
        self._output = output
        self._x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        rows = sum(int(t.shape[0]) for t in self._sample)
        if self._x is not None and self._x.dim() and rows < _SAMPLE_ROWS:
            self._sample.append(self._x.detach()[: _SAMPLE_ROWS - rows].clone())

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.doctor is None or not self._captured or self._output is None:
            return  # no forward of the watched module in this step, or already recorded
        returned = self._returned if self._returned is not None else loss
        self.doctor.step(
            self._output,
            _loss_of(returned),
            self._x,
            weights=self.weights,
            reduction=self.reduction,
        )
        self._output, self._returned = None, None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        doctor = self.doctor
        if doctor is None or doctor.steps == 0:
            return
        if self.log and doctor.steps % self.log_every == 0:
            metrics = doctor.metrics()
            if metrics:
                pl_module.log_dict(
                    metrics, on_step=True, on_epoch=False, batch_size=doctor.batch_size or 1
                )
        if self.check_every is not None and doctor.steps % self.check_every == 0:
            self._stop_if_due(trainer, doctor.check())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.doctor is None:
            return
        if self.doctor.history.open_steps:
            self.doctor.epoch_end()
        if self.check_every is None:
            self._stop_if_due(trainer, self.doctor.check())

    def _stop_if_due(self, trainer: pl.Trainer, found: Findings) -> None:
        if self.stop_on is None or self.stopped_by is not None:
            return  # the same on every rank: stopped_by is set everywhere at once
        limit = SEVERITIES.index(self.stop_on)
        worst = [f for f in found if SEVERITIES.index(f.severity) <= limit]
        rank, stopper = _first_rank_with(trainer, worst[0] if worst else None)
        if stopper is None:
            return
        self.stopped_by = stopper
        trainer.should_stop = True
        if trainer.is_global_zero:
            on_rank = f" (rank {rank})" if trainer.world_size > 1 else ""
            print(f"mtx: stopping training on {_line(stopper)}{on_rank}")

    # ---- at the end ----
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.doctor is None:
            return
        data = self.data
        if data is None and self._sample:
            data = torch.cat(self._sample)  # (N, ...) the first inputs seen
        self.findings = self.doctor.findings(data=data)
        if trainer.is_global_zero:
            if self.print_findings:
                print(render_findings(self.findings, self.doctor.steps))
            if self.report_path is not None:
                write_report(self.report_path, self.findings, self.doctor, self.stopped_by)

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        if self.doctor is None:
            return dict(self._pending_state or {})
        return {"doctor": self.doctor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("doctor")
        if state is None:
            return
        if self.doctor is not None:
            self.doctor.load_state_dict(state)
        else:  # restored before on_fit_start creates the Doctor: applied then
            self._pending_state = state


def _first_rank_with(trainer: pl.Trainer, mine: Finding | None) -> tuple[int, Finding | None]:
    """The lowest rank holding a finding, and that finding, the same on every rank.

    Local findings differ between ranks (the rank-* ones do not), so a rank that stopped
    alone would leave the others waiting in DDP's next all-reduce. Every rank calls this
    at every check, in the same order: one reduction, and a broadcast only when stopping.
    """
    world = trainer.world_size
    if world == 1:
        return 0, mine
    strategy = trainer.strategy
    mark = torch.tensor(float(trainer.global_rank if mine is not None else world))
    first = int(strategy.reduce(mark.to(strategy.root_device), reduce_op="min").item())
    if first == world:
        return first, None
    # a Finding's evidence is a read-only mapping, which pickle refuses: send its fields
    sent: dict[str, Any] | None = mine.as_dict() if mine is not None else None
    fields = strategy.broadcast(sent, src=first)
    if fields is None:
        raise RuntimeError(f"rank {first} reported a finding to stop on but sent none")
    return first, Finding(**{**fields, "runs": tuple(fields["runs"])})


def _loss_of(returned: object) -> object:
    """What ``training_step`` returned, as the Doctor reads a loss: a dict keeps only its
    scalar tensor entries (the total under ``"loss"`` and the named terms)."""
    if isinstance(returned, Mapping):
        return {
            str(k): v for k, v in returned.items() if isinstance(v, torch.Tensor) and v.numel() == 1
        }
    return returned


def _line(f: Finding) -> str:
    where = f" [{f.where}]" if f.where else ""
    return f"{f.severity} {f.code}{where}: {f.title}"


def render_findings(found: Findings, steps: int) -> str:
    """The findings as plain lines for a training log (worst first)."""
    head = f"mtx: {len(found)} finding(s) after {steps} step(s)"
    lines = [head] + [f"  {_line(f)}\n    {f.message}\n    fix: {f.remedy}" for f in found]
    if found.not_checked:
        lines.append(f"  not checked: {', '.join(n.code for n in found.not_checked)}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def report_data(
    found: Findings, doctor: Doctor, stopped_by: Finding | None = None
) -> dict[str, Any]:
    """The JSON report: the findings and not-checked entries, as ``mtx --json`` has them."""
    return _plain(
        {
            "command": "lightning",
            "version": __version__,
            "where": doctor.where,
            "steps": doctor.steps,
            "stopped_by": stopped_by.code if stopped_by is not None else None,
            "findings": [f.as_dict() for f in found],
            "not_checked": [
                {"code": n.code, "reason": n.reason, "runs": list(n.runs)}
                for n in found.not_checked
            ],
        }
    )


def write_report(
    path: Path, found: Findings, doctor: Doctor, stopped_by: Finding | None = None
) -> None:
    """Write :func:`report_data` as JSON to ``path`` atomically (a temp file, then rename)."""
    text = json.dumps(report_data(found, doctor, stopped_by), indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["DoctorCallback", "render_findings", "report_data", "write_report"]
