"""The one run pipeline every study uses.

A :class:`Pipeline` holds what a command was asked to run (data, training settings,
reduction, the user's model factory or an injected fault, a progress callback) and
provides, once for all four commands: a fresh model, a loss, the scenario-adjusted
training settings, a training run with the Doctor attached and evaluated
(:meth:`Pipeline.diagnose`), and the report header with the findings of all runs
merged and sorted worst first (:meth:`Pipeline.header`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from meaning_transform import __version__
from meaning_transform.constants import COMPONENTS
from meaning_transform.diagnostics.distributed import (
    RankEvidence,
    RankMonitor,
)
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.findings import (
    Finding,
    NotChecked,
    merge_findings,
    merge_not_checked,
)
from meaning_transform.diagnostics.rules import (
    RULES,
    RunEvidence,
    collapse_verdict,
    evaluate,
    not_checked,
)
from meaning_transform.diagnostics.schedule import EVERY_STEP
from meaning_transform.diagnostics.thresholds import ZERO_VALUE
from meaning_transform.diagnostics.vae_checks import vae_not_checked
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.report import ComponentRow, Diagnosis, EpochRow, RunConfig, frozen
from meaning_transform.studies.setup import Dataset, ModelFactory, build_loss, default_model
from meaning_transform.training import EpochRecord, TrainConfig, TrainResult, loss_weights, train

ATTRIBUTIONS_PER_RUN = 20  # per-term gradients cost one backward per term: sample steps


@dataclass(frozen=True)
class Diagnosed:
    """One training run with the Doctor attached, evaluated."""

    where: str
    result: TrainResult
    evidence: RunEvidence
    findings: tuple[Finding, ...]
    not_checked: tuple[NotChecked, ...]
    diagnosis: Diagnosis
    ranks: RankEvidence | None = None  # a distributed run's rank checks (same on every rank)


@dataclass(frozen=True)
class DataParallel:
    """How one rank of a distributed run trains (see ``studies/distributed.py``).

    ``wrap`` puts the fresh model in ``DistributedDataParallel`` (and applies a
    scenario's rank fault after DDP's broadcast); ``sampler`` gives this rank's
    ``DistributedSampler`` over ``n`` samples.
    """

    wrap: Callable[[nn.Module], nn.Module]
    sampler: Callable[[int], Any]
    rank: int = 0


@dataclass(frozen=True)
class Pipeline:
    dataset: Dataset
    train_config: TrainConfig  # as the options give it; see ``config`` for the one used
    reduction: str = "mean"
    model_factory: ModelFactory | None = None
    scenario: Scenario | None = None
    on_epoch: Callable[[], None] | None = None
    # The user's loss (--loss), built for one model: it replaces mtx's loss entirely.
    loss_factory: Callable[[nn.Module], nn.Module] | None = None
    # one rank of a distributed run: train the DDP-wrapped model on this rank's share
    parallel: DataParallel | None = None

    @property
    def config(self) -> TrainConfig:
        """The training settings, with the scenario's learning rate if it sets one."""
        if self.scenario is None or self.scenario.lr is None:
            return self.train_config
        return replace(self.train_config, lr=self.scenario.lr)

    @property
    def scenario_name(self) -> str:
        return self.scenario.name if self.scenario is not None else "healthy"

    def model(self, dataset: Dataset | None = None) -> nn.Module:
        """A fresh model at the seed: the user's, the scenario's or the built-in one."""
        data = dataset or self.dataset
        if self.model_factory is not None:
            return self.model_factory(data.n_features, self.config.seed)
        return default_model(data.n_features, self.config.seed, data.tensor, self.scenario)

    def loss(
        self,
        recon: float,
        kl: float,
        semantic: float,
        dataset: Dataset | None = None,
        model: nn.Module | None = None,
    ) -> nn.Module:
        """mtx's CombinedLoss with these weights, or the user's loss built for ``model``."""
        if self.loss_factory is not None:
            if model is None:
                raise ValueError("the user's loss is built for a model: pass model=")
            return self.loss_factory(model)
        return build_loss(
            recon, kl, semantic, dataset or self.dataset, self.reduction, self.scenario
        )

    def tick(self) -> Callable[[EpochRecord], None] | None:
        """The progress callback in the form ``train(on_epoch=)`` takes."""
        on_epoch = self.on_epoch
        return (lambda _record: on_epoch()) if on_epoch is not None else None

    def train(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        config: TrainConfig | None = None,
        dataset: Dataset | None = None,
    ) -> TrainResult:
        """A plain training run (no Doctor), e.g. debug-extended's annealing run."""
        data = (dataset or self.dataset).tensor
        config = config or self.config
        seed_everything(config.seed)
        return train(model, loss_fn, data, config, on_epoch=self.tick())

    def diagnose(
        self,
        where: str,
        model: nn.Module,
        loss_fn: nn.Module,
        config: TrainConfig | None = None,
        callbacks: Sequence[object] = (),
        dataset: Dataset | None = None,
        not_applicable: Sequence[str] = (),
        because: str = "",
        on_attach: Callable[[Doctor], None] | None = None,
        unless_found: Sequence[NotChecked] = (),
        beta_schedule: Callable[[int], float] | None = None,
        beta_max: float | None = None,
    ) -> Diagnosed:
        """Train with the Doctor attached; evaluate the rules on what it saw.

        Rules named in ``not_applicable`` are dropped from the findings and listed as
        not checked with ``because`` (anneal-demo's trend rules while β changes).
        ``on_attach`` is called with the Doctor once its hooks are attached, before
        training (debug-extended counts the hooks). ``unless_found`` are listed as not
        checked unless their rule fired anyway. ``beta_schedule`` (β per optimizer step)
        and ``beta_max`` are the KL weight the run means to apply, for the Doctor's
        ``beta-schedule`` check (anneal-demo's schedule; else a scenario's declared one).
        """
        config = config or self.config
        data = (dataset or self.dataset).tensor
        parallel = self.parallel
        trained = parallel.wrap(model) if parallel is not None else model  # DDP forwards
        sampler = parallel.sampler(data.shape[0]) if parallel is not None else None
        n = data.shape[0] if sampler is None else len(sampler)  # this rank's share
        batch = n if config.batch_size is None else min(config.batch_size, n)
        steps = config.epochs * math.ceil(n / batch)
        declared = self.scenario.declared_beta if self.scenario is not None else None
        if beta_schedule is None and declared is not None:
            total = config.epochs * steps_per_epoch(n, batch)
            beta_schedule, beta_max = declared.over(total), declared.beta_max
        doctor = Doctor(
            trained,  # under DDP: the module it wraps, and the rank checks
            where=where,
            attribute_every=max(1, steps // ATTRIBUTIONS_PER_RUN),
            schedule=EVERY_STEP,  # a diagnostic run: every gradient statistic, every step
            beta_schedule=beta_schedule,
            beta_max=beta_max,
            # the DistributedSampler reshuffles every epoch (set_epoch), so a repeated
            # batch order is a fault (rank-data-repeats); the monitor is told each epoch
            shuffle_expected=parallel is not None,
        )
        on_epoch = self.tick()
        if doctor.ranks is not None:
            on_epoch = _also_ending_rank_epochs(doctor.ranks, on_epoch)
        with doctor:
            if on_attach is not None:
                on_attach(doctor)
            seed_everything(config.seed)
            if parallel is not None:
                _seed_rank_noise(model, config.seed, parallel.rank)
            result = train(
                trained,
                loss_fn,
                data,
                config,
                callbacks=(doctor, *callbacks),
                on_epoch=on_epoch,
                sampler=sampler,
            )
        evidence = doctor.evidence(result.records, data=data, batch_size=result.batch_size)
        run = self.evaluate(where, result, evidence, not_applicable, because, unless_found)
        # a distributed run: the rank checks' evidence, the same on every rank (its
        # findings are judged once, by whoever merges the ranks)
        return replace(run, ranks=doctor.rank_evidence())

    def evaluate(
        self,
        where: str,
        result: TrainResult,
        evidence: RunEvidence,
        not_applicable: Sequence[str] = (),
        because: str = "",
        unless_found: Sequence[NotChecked] = (),
    ) -> Diagnosed:
        """Findings, checks that could not run, and the typed diagnosis of one run.

        (A KL weight that changes during the run sets the rules on the trend of the total
        aside in the rules themselves: see ``vae_checks.beta_varies``.)
        """
        skipped = set(not_applicable)
        # rules set aside do not run at all, so they mark nothing as their consequence
        rules = [r for r in RULES if r.__name__.replace("_", "-") not in skipped]
        findings = tuple(f for f in evaluate(evidence, rules) if f.code not in skipped)
        missing = [
            c for c in not_checked(evidence) + vae_not_checked(evidence) if c.code not in skipped
        ]
        missing += [NotChecked(code, because) for code in not_applicable]
        fired = {f.code for f in findings}
        missing += [c for c in unless_found if c.code not in fired]
        from meaning_transform.diagnostics.attribution import summarise_attributions

        diagnosis = Diagnosis(
            attribution=summarise_attributions(evidence.attributions),
            latent=evidence.latent,
            collapse=collapse_verdict(evidence),
            findings=tuple(f.code for f in findings),
            not_checked=tuple(sorted(missing, key=lambda c: c.code)),
        )
        return Diagnosed(where, result, evidence, findings, diagnosis.not_checked, diagnosis)

    def header(
        self,
        command: str,
        options: RunConfig,
        runs: Sequence[Diagnosed],
        semantic_applicable: bool,
        data: Any = None,
    ) -> dict[str, Any]:
        """The fields every report starts with, from the runs it made (in order)."""
        first = runs[0].result
        return {
            "command": command,
            "version": __version__,
            "config": options,
            "device": first.device,
            "data": data if data is not None else self.dataset.describe(),
            "batch_size": first.batch_size,
            "lr": self.config.lr,
            "reduction": self.reduction,
            "scenario": self.scenario_name,
            "semantic_applicable": semantic_applicable,
            "findings": merge_findings([(r.where, r.findings) for r in runs]),
            "not_checked": merge_not_checked([(r.where, r.not_checked) for r in runs]),
        }


def _seed_rank_noise(model: nn.Module, seed: int, rank: int) -> None:
    """Each rank its own noise: the global RNG and every generator a module holds (the
    built-in model owns one) seeded from (seed, rank). The weights are DDP's broadcast of
    rank 0's, so only the draws differ; with one seed for every rank, every rank would
    draw the same eps for different data."""
    offset = seed + 1_000_003 * rank
    torch.manual_seed(offset)
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Generator):
                value.manual_seed(offset)


def _also_ending_rank_epochs(
    ranks: RankMonitor, on_epoch: Callable[[EpochRecord], None] | None
) -> Callable[[EpochRecord], None]:
    def end(record: EpochRecord) -> None:
        ranks.epoch_end()
        if on_epoch is not None:
            on_epoch(record)

    return end


def steps_per_epoch(n: int, batch: int) -> int:
    """Optimizer steps per epoch of ``n`` samples in batches of ``batch``, as ``train``
    makes them (a last batch of one sample joins the one before it)."""
    k = math.ceil(n / batch)
    return k - 1 if k > 1 and n - (k - 1) * batch == 1 else k


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators before a run.

    mtx's own model and shuffling use their own generators, but a user's model draws its
    noise from the global one (``torch.randn_like``): seeding it makes two runs with the
    same ``--seed`` identical, step for step.
    """
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------- records -> rows


def component_rows(record: EpochRecord) -> dict[str, ComponentRow]:
    """Per component: raw, weight, weighted, share of the total, and flags.

    Flags: ``non-finite`` (NaN/Inf), ``floored`` (the 1e-8 floor replaced the
    value in at least one step), ``zero`` (at or below 1e-8 while its weight is
    on), ``off`` (weight 0: not part of this configuration).
    """
    names = [n for n in record.raw if n in COMPONENTS] + [
        n for n in record.raw if n not in COMPONENTS
    ]
    total_weighted = sum(
        abs(record.weighted[c]) for c in names if math.isfinite(record.weighted[c])
    )
    rows: dict[str, ComponentRow] = {}
    for name in names:
        raw, weight, weighted = record.raw[name], record.weights[name], record.weighted[name]
        if name == "compression" and raw == 0.0:
            continue  # the model has no compression term
        flags: list[str] = []
        if weight == 0.0:
            flags.append("off")
        elif not math.isfinite(raw):
            flags.append("non-finite")
        else:
            if record.floors_engaged.get(name, 0):
                flags.append("floored")
            if 0 <= raw <= ZERO_VALUE:  # a negative term (a user's -KL) is not zero
                flags.append("zero")
        share = (
            abs(weighted) / total_weighted
            if total_weighted > 0 and math.isfinite(weighted)
            else math.nan
        )
        rows[name] = ComponentRow(raw, weight, weighted, share, tuple(flags))
    return rows


def epoch_row(record: EpochRecord) -> EpochRow:
    """One epoch as every report shows it."""
    total_flags: list[str] = []
    if not math.isfinite(record.total):
        total_flags.append("non-finite")
    if record.floors_engaged.get("total", 0):
        total_flags.append("floored")
    return EpochRow(
        epoch=record.epoch,
        beta=record.beta,
        components=frozen(component_rows(record)),
        total=record.total,
        total_flags=tuple(total_flags),
        grad_norm=record.grad_norm,
        grad_norm_max=record.grad_norm_max,
        steps=record.steps,
        skipped_steps=record.skipped_steps,
        non_finite=tuple(record.non_finite),
    )


def report_epochs(epochs: int, every: int) -> tuple[int, ...]:
    """Which epochs get a table: every ``every`` epochs, and always the first and last.

    ``every`` 0 picks a step giving about five tables.
    """
    step = every if every > 0 else max(1, math.ceil(epochs / 5))
    chosen = set(range(0, epochs, step)) | {0, epochs - 1}
    return tuple(sorted(chosen))


def weights_of(loss_fn: nn.Module) -> dict[str, float]:
    """The weights a CombinedLoss is using (after the semantic switch-off), or those
    given for the user's loss (its other terms weigh 1)."""
    from meaning_transform.adapters import LossStep

    if isinstance(loss_fn, LossStep):
        return dict(loss_fn.user_loss.weights)
    return loss_weights(loss_fn)


def as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64)
