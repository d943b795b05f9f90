"""The study behind ``mtx debug-loss``: the original weight study, done right.

Each weight configuration trains a fresh model from the same seed on the same
data, so the configurations are comparable (the original kept training one
model through all four).
"""

from __future__ import annotations

from dataclasses import dataclass

from meaning_transform.studies.pipeline import Pipeline, epoch_row, report_epochs, weights_of
from meaning_transform.studies.report import (
    DebugLossConfig,
    DebugLossReport,
    LossRun,
    SummaryRow,
    frozen,
)


@dataclass(frozen=True)
class WeightConfig:
    name: str
    recon: float
    kl: float
    semantic: float

    def as_dict(self) -> dict[str, float]:
        return {"reconstruction": self.recon, "kl": self.kl, "semantic": self.semantic}


PRESETS: tuple[WeightConfig, ...] = (
    WeightConfig("Default", 1.0, 0.1, 0.5),
    WeightConfig("Higher KL", 1.0, 1.0, 0.5),
    WeightConfig("No Semantic", 1.0, 0.1, 0.0),
    WeightConfig("Balanced", 1.0, 1.0, 1.0),
)


def run_debug_loss(
    pipeline: Pipeline,
    configs: tuple[WeightConfig, ...],
    options: DebugLossConfig,
) -> DebugLossReport:
    """Train one fresh model per configuration; return the report."""
    shown = report_epochs(pipeline.config.epochs, options.every)
    runs, diagnosed = [], []
    for cfg in configs:
        model = pipeline.model()
        loss_fn = pipeline.loss(cfg.recon, cfg.kl, cfg.semantic, model=model)
        run = pipeline.diagnose(cfg.name, model, loss_fn)
        diagnosed.append(run)
        epochs = [epoch_row(r) for r in run.result.records]
        runs.append(
            LossRun(
                name=cfg.name,
                weights=frozen(weights_of(loss_fn)),
                requested_weights=frozen(cfg.as_dict()),
                reduction=frozen(run.result.reduction),
                epochs=tuple(e for e in epochs if e.epoch in shown),
                final=epochs[-1],
                first_total=epochs[0].total,
                diagnosis=run.diagnosis,
            )
        )
    return DebugLossReport(
        **pipeline.header(
            "debug-loss", options, diagnosed, semantic_applicable=pipeline.dataset.agent_layout
        ),
        reported_epochs=shown,
        runs=tuple(runs),
        summary=tuple(_summary(run) for run in runs),
    )


def _summary(run: LossRun) -> SummaryRow:
    last = run.final
    return SummaryRow(
        name=run.name,
        weights=run.weights,
        first_total=run.first_total,
        final_total=last.total,
        final_raw=frozen({name: row.raw for name, row in last.components.items()}),
        final_grad_norm=last.grad_norm,
        flagged=last.flagged(),
        findings=run.diagnosis.findings,
    )
