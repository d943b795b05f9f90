"""The typed reports the commands return, and their JSON form.

One frozen dataclass per command (:class:`DebugLossReport`, :class:`AnnealReport`,
:class:`CheckGradsReport`, :class:`DebugExtendedReport`), built once by its study
from the shared parts below and never edited afterwards. ``--json`` is
:func:`to_json` of the report: field order is key order, so the same seed and
arguments give byte-identical output by construction. The renderer and the plots
dispatch on the report's type.

Nothing here imports torch: the CLI can name these types without loading it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from meaning_transform.diagnostics.findings import Finding, NotChecked, Verdict, exit_code_for

if TYPE_CHECKING:
    from meaning_transform.diagnostics.attribution import AttributionSummary
    from meaning_transform.diagnostics.gradient_summary import GradientSummary
    from meaning_transform.diagnostics.kl_terms import KLTermStats
    from meaning_transform.diagnostics.latent import LatentHealth
    from meaning_transform.diagnostics.parameters import ParameterStats
    from meaning_transform.diagnostics.probe import ModeProbe

V = TypeVar("V")


def frozen(mapping: Mapping[str, V]) -> Mapping[str, V]:
    """A read-only view of a copy of ``mapping`` (a report's dicts cannot be edited)."""
    return MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The options every command takes, as the user gave them (defaults: the CLI's)."""

    seed: int = 0
    device: str = "auto"  # as requested; the report's ``device`` is the one used
    epochs: int = 10
    batch_size: int = 128  # 0 = full batch
    lr: float = 1e-3
    data: str | None = None
    model: str | None = None
    scenario: str = "healthy"
    reduction: str = "mean"
    fail_on: str = "error"
    plot: str | None = None


@dataclass(frozen=True, kw_only=True)
class DebugLossConfig(RunConfig):
    recon_weight: float | None = None  # None: the presets
    kl_weight: float | None = None
    semantic_weight: float | None = None
    every: int = 0


@dataclass(frozen=True, kw_only=True)
class AnnealConfig(RunConfig):
    epochs: int = 16
    schedule: str = "sigmoid"
    min_beta: float = 0.0
    max_beta: float = 1.0
    cycles: int = 4
    ratio: float = 0.5


@dataclass(frozen=True, kw_only=True)
class CheckGradsConfig(RunConfig):
    epochs: int = 3
    recon_weight: float = 1.0
    kl_weight: float = 0.1
    semantic_weight: float | None = None  # None: 0.5 on agent states, else off
    clip: float | None = None


@dataclass(frozen=True, kw_only=True)
class DebugExtendedConfig(RunConfig):
    epochs: int = 5
    data_kind: str = "all"  # "file" with --data
    samples: int = 256


# --------------------------------------------------------------------------- shared parts


@dataclass(frozen=True)
class DataInfo:
    source: str  # "synthetic:<kind>" or the file path
    kind: str  # agent_states, normal, ... or "file"
    n_samples: int
    n_features: int


@dataclass(frozen=True)
class ComponentRow:
    """One loss component in one epoch (means over the epoch's steps)."""

    raw: float  # unweighted
    weight: float
    weighted: float
    share: float  # |weighted| / sum of |weighted| over the components
    flags: tuple[str, ...]  # off, non-finite, floored, zero


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    beta: float  # the KL weight in force
    components: Mapping[str, ComponentRow]
    total: float
    total_flags: tuple[str, ...]
    grad_norm: float  # mean over the epoch's steps, before clipping
    grad_norm_max: float
    steps: int
    skipped_steps: int
    non_finite: tuple[str, ...]  # first few non-finite events

    def flagged(self) -> tuple[str, ...]:
        """``component:flag`` for every flag but ``off``, then the total's."""
        return tuple(
            sorted(
                {
                    f"{n}:{fl}"
                    for n, row in self.components.items()
                    for fl in row.flags
                    if fl != "off"
                }
                | {f"total:{fl}" for fl in self.total_flags}
            )
        )


@dataclass(frozen=True)
class Diagnosis:
    """What the Doctor made of one training run."""

    attribution: AttributionSummary | None
    latent: LatentHealth | None  # at the end of training, on the training data
    collapse: Verdict  # what the posterior-collapse rule made of ``latent``
    findings: tuple[str, ...]  # codes, worst first
    not_checked: tuple[NotChecked, ...]


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True, kw_only=True)
class Report:
    """What every report starts with. ``exit_code`` follows from the findings."""

    command: str
    version: str
    config: RunConfig
    device: str  # the device actually used
    data: DataInfo
    batch_size: int  # as used
    lr: float  # as used (a scenario may set its own)
    reduction: str
    scenario: str  # the injected fault, or "healthy"
    semantic_applicable: bool
    findings: tuple[Finding, ...]  # worst first, one row per finding across runs
    not_checked: tuple[NotChecked, ...]
    exit_code: int = field(init=False)

    def __post_init__(self) -> None:
        code = exit_code_for((f.severity for f in self.findings), self.config.fail_on)
        object.__setattr__(self, "exit_code", code)


@dataclass(frozen=True)
class LossRun:
    """One weight configuration of debug-loss."""

    name: str
    weights: Mapping[str, float]  # as used (the semantic weight is 0 off the agent layout)
    requested_weights: Mapping[str, float]
    reduction: Mapping[str, str]  # per term
    epochs: tuple[EpochRow, ...]  # the reported epochs
    final: EpochRow
    first_total: float
    diagnosis: Diagnosis


@dataclass(frozen=True)
class SummaryRow:
    name: str
    weights: Mapping[str, float]
    first_total: float
    final_total: float
    final_raw: Mapping[str, float]
    final_grad_norm: float
    flagged: tuple[str, ...]
    findings: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DebugLossReport(Report):
    reported_epochs: tuple[int, ...]
    runs: tuple[LossRun, ...]
    summary: tuple[SummaryRow, ...]


@dataclass(frozen=True)
class ScheduleInfo:
    type: str
    min_beta: float
    max_beta: float
    cycles: int
    ratio: float


@dataclass(frozen=True, kw_only=True)
class AnnealReport(Report):
    schedule: ScheduleInfo
    weights: Mapping[str, float]  # reconstruction and semantic; KL is β
    reductions: Mapping[str, str]
    epochs: tuple[EpochRow, ...]
    beta_curve: tuple[float, ...]
    diagnosis: Diagnosis


@dataclass(frozen=True)
class StepRow:
    step: int
    epoch: int
    loss: float
    clip_grad_norm: float  # what clip_grad_norm_ returned
    total_norm: float | None  # from the monitor; None for a skipped (non-finite) step
    clipped: bool
    first_last_ratio: float | None
    missing: tuple[str, ...]
    non_finite: int


@dataclass(frozen=True)
class ParamRow:
    """One parameter's gradient at the last monitored step, with flags."""

    name: str
    shape: tuple[int, ...]
    numel: int
    has_grad: bool
    norm: float | None
    mean: float | None
    abs_mean: float | None
    std: float | None
    min: float | None
    max: float | None
    zero_fraction: float | None
    non_finite: int | None
    weight_norm: float | None
    update_ratio: float | None
    flags: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CheckGradsReport(Report):
    weights: Mapping[str, float]
    clip: float | None
    thresholds: Mapping[str, float]
    steps: tuple[StepRow, ...]
    last_step: int | None
    parameters: tuple[ParamRow, ...]
    total_norm: float | None
    clip_grad_norm: float | None
    first_last_ratio: float | None
    first_layer: str | None
    last_layer: str | None
    never_received: tuple[str, ...]
    diagnosis: Diagnosis


@dataclass(frozen=True, kw_only=True)
class DistributedCheckGradsConfig(CheckGradsConfig):
    nproc: int = 2  # local processes (ranks); --batch-size is split between them


@dataclass(frozen=True)
class RankRow:
    """One rank of a distributed run (``check-grads --nproc N``)."""

    rank: int
    steps: int
    samples: int  # samples this rank trained on (its DistributedSampler share x epochs)
    skipped_steps: int  # steps with a non-finite loss or gradient: no update made
    final_loss: float | None  # this rank's last finite step loss (its own batch)
    median_local_grad_norm: float | None  # this rank's gradient before the all-reduce
    findings: int  # this rank's own findings (the rank checks' are not counted)


@dataclass(frozen=True, kw_only=True)
class DistributedCheckGradsReport(CheckGradsReport):
    """check-grads on ``nproc`` ranks: rank 0's study (steps and parameters: after
    DDP's all-reduce every rank holds the same gradient), every rank's findings merged
    (the rank checks' are the same on every rank), and one row per rank."""

    nproc: int
    backend: str
    ranks: tuple[RankRow, ...]


# --------------------------------------------------------------------------- debug-extended


@dataclass(frozen=True)
class AnnealingEpoch:
    """One epoch of debug-extended's short linear-β run (raw, unweighted components)."""

    epoch: int
    beta: float
    reconstruction: float
    kl: float
    semantic: float
    total: float


@dataclass(frozen=True)
class AnnealingRun:
    schedule: str
    min_beta: float
    max_beta: float
    epochs: tuple[AnnealingEpoch, ...]


@dataclass(frozen=True)
class KindSection:
    """Everything debug-extended measured on one data kind, each on its own fresh model."""

    kind: str
    data: DataInfo
    agent_layout: bool
    weights: Mapping[str, float]  # as used (the semantic weight is 0 off the agent layout)
    reduction: Mapping[str, str]  # per term
    batch_size: int
    output_activation: str | None
    parameters: tuple[ParameterStats, ...]  # the untrained model
    untrained_pass: ModeProbe
    measured_on: str  # what kl_terms, diagnosis.latent and recon_per_feature were measured on
    kl_terms: KLTermStats
    recon_per_feature: Mapping[str, float]
    gradients: GradientSummary
    annealing: AnnealingRun
    records: tuple[EpochRow, ...]  # the main run
    diagnosis: Diagnosis  # of the main run

    @property
    def latent(self) -> LatentHealth:
        """The eval-mode latent health over all samples that the rules judged."""
        latent = self.diagnosis.latent
        if latent is None:  # run_debug_extended always measures it
            raise ValueError(f"{self.kind}: no latent health in the diagnosis")
        return latent


@dataclass(frozen=True, kw_only=True)
class DebugExtendedReport(Report):
    kinds: tuple[KindSection, ...]


# --------------------------------------------------------------------------- JSON


def json_data(value: Any) -> Any:
    """The JSON form of a report or any part of it: dataclass fields in order, tuples as
    lists, mappings as objects, non-finite floats as ``null``."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_data(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_data(v) for v in value]
    return value


def to_json(report: Report) -> str:
    """The report as the one JSON document ``--json`` prints (with a final newline)."""
    return json.dumps(json_data(report), indent=2, allow_nan=False) + "\n"
