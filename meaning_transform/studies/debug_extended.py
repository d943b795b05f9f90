"""The study behind ``mtx debug-extended``: the deep look at one model per data kind.

For each data kind a fresh model (same seed) goes through, in order:

1. parameter inspection of the untrained model (flags only for real problems);
2. an untrained forward pass in train mode and in eval mode, and why they differ;
3. a short training run (``--epochs``) with the Doctor attached: gradient
   statistics captured by its hooks, and the evidence every command's rules read;
4. on the trained model, in eval mode (z = mu), over all samples: the KL term by
   term, latent health (KL per dimension, active units, free bits) and the
   reconstruction error per input feature. The rules are evaluated on this latent
   health, so the latent table and the findings never disagree;
5. a short linear-β annealing run from another fresh model.

Each step builds its own model, so one measurement cannot disturb another (a
train-mode pass moves batch-norm running statistics and draws noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from meaning_transform.constants import DATA_KINDS
from meaning_transform.data import FEATURE_NAMES
from meaning_transform.diagnostics._modes import evaluating
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.gradient_summary import gradient_summary
from meaning_transform.diagnostics.kl_terms import kl_term_stats
from meaning_transform.diagnostics.latent import latent_health, reconstruction_gain
from meaning_transform.diagnostics.parameters import inspect_parameters
from meaning_transform.diagnostics.probe import mode_probe
from meaning_transform.diagnostics.structure import biases_before_batch_norm
from meaning_transform.losses import reconstruction_per_feature
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.pipeline import Diagnosed, Pipeline, epoch_row, weights_of
from meaning_transform.studies.report import (
    AnnealingEpoch,
    AnnealingRun,
    DataInfo,
    DebugExtendedConfig,
    DebugExtendedReport,
    KindSection,
    frozen,
)
from meaning_transform.studies.setup import Dataset, get_data
from meaning_transform.training import BetaSchedule, TrainResult, resolve_device

SAMPLES_PER_KIND = 256  # small enough that five kinds train in a few seconds on 2 cores
WEIGHTS = {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.5}  # debug-loss's Default preset
ANNEALING = BetaSchedule(schedule_type="linear", min_beta=0.0, max_beta=1.0)


# --------------------------------------------------------------------------- data


def extended_datasets(
    data_kind: str,
    path: Path | None,
    n: int = SAMPLES_PER_KIND,
    seed: int = 0,
    scenario: Scenario | None = None,
) -> list[Dataset]:
    """The user's file as the one kind, else ``n`` samples of each chosen synthetic kind."""
    if path is not None:
        return [get_data(path, seed=seed, scenario=scenario)]
    kinds = DATA_KINDS if data_kind == "all" else (data_kind,)
    return [get_data(None, kind=kind, n=n, seed=seed, scenario=scenario) for kind in kinds]


def agent_layout_applies(dataset: Dataset) -> bool:
    """Synthetic agent states, or a user file with the 10-feature layout.

    The generic synthetic kinds also have 10 features, but they are not agent
    states: no semantic term and no agent-state feature names for them.
    """
    return dataset.kind == "agent_states" or (dataset.kind == "file" and dataset.agent_layout)


def feature_names(dataset: Dataset) -> tuple[str, ...]:
    if agent_layout_applies(dataset):
        return tuple(FEATURE_NAMES)
    return tuple(f"f{i}" for i in range(dataset.n_features))


# --------------------------------------------------------------------------- the study


def run_debug_extended(
    pipeline_for: Callable[[Dataset], Pipeline],
    datasets: Sequence[Dataset],
    options: DebugExtendedConfig,
) -> DebugExtendedReport:
    """Run every section on each dataset; return the report.

    ``pipeline_for(dataset)`` gives the pipeline for one kind (the same settings, that
    dataset); the header comes from the first. Its progress callback is called twice
    per epoch per dataset (main run and annealing run). The findings of all kinds are
    merged into the header, one row per finding naming the kinds.
    """
    if not datasets:
        raise ValueError("expected at least one dataset, got none")
    sections, runs = [], []
    for dataset in datasets:
        section, run = run_kind(pipeline_for(dataset), dataset)
        sections.append(section)
        runs.append(run)
    first = datasets[0]
    data = (
        first.describe()
        if len(datasets) == 1
        else DataInfo(
            source="synthetic:" + ",".join(d.kind for d in datasets),
            kind="all",
            n_samples=int(first.tensor.shape[0]),
            n_features=first.n_features,
        )
    )
    header = pipeline_for(first).header(
        "debug-extended",
        options,
        runs,
        semantic_applicable=any(s.agent_layout for s in sections),
        data=data,
    )
    return DebugExtendedReport(**header, kinds=tuple(sections))


def run_kind(pipeline: Pipeline, dataset: Dataset) -> tuple[KindSection, Diagnosed]:
    """Every section for one data kind, and its evaluated training run."""
    where = dataset.kind
    layout = agent_layout_applies(dataset)
    config = pipeline.config
    x = dataset.tensor  # (N, D)

    def fresh_loss(model: nn.Module) -> nn.Module:
        semantic = WEIGHTS["semantic"] if layout else 0.0
        return pipeline.loss(
            WEIGHTS["reconstruction"], WEIGHTS["kl"], semantic, dataset, model=model
        )

    # 1-2. The untrained model, on a throwaway instance.
    probe = pipeline.model(dataset).to(resolve_device(config.device))
    parameters = inspect_parameters(probe)
    untrained = mode_probe(probe, fresh_loss(probe), x)
    del probe

    # 3. The main short run with the Doctor attached (its hooks capture the gradients).
    model = pipeline.model(dataset)
    loss_fn = fresh_loss(model)
    hooks: list[int] = []

    def count_hooks(doctor: Doctor) -> None:
        hooks.append(len(doctor.hooks.handles))

    run = pipeline.diagnose(where, model, loss_fn, dataset=dataset, on_attach=count_hooks)
    gradients = gradient_summary(
        run.evidence.snapshots, hooks[0], run.result.steps, biases_before_batch_norm(model)
    )

    # 4. The trained model in eval mode (z = mu), all samples. The rules are evaluated
    # again on this latent health: the report's latent table is what they judged.
    out = _eval_outputs(model, x)
    mu, log_var = out["mu"].to(torch.float64), out["log_var"].to(torch.float64)  # (N, Z)
    gain = reconstruction_gain(out["reconstruction"], x)  # against predicting the mean
    health = replace(latent_health(mu, log_var), recon_gain=gain)
    per_feature = reconstruction_per_feature(out["reconstruction"], x).tolist()  # (D,)
    run = pipeline.evaluate(where, run.result, replace(run.evidence, latent=health))

    # 5. A short linear-β annealing run from a fresh model.
    anneal_model = pipeline.model(dataset)
    annealed = pipeline.train(
        anneal_model, fresh_loss(anneal_model), replace(config, schedule=ANNEALING), dataset
    )

    section = KindSection(
        kind=where,
        data=dataset.describe(),
        agent_layout=layout,
        weights=frozen(weights_of(loss_fn)),
        reduction=frozen(run.result.reduction),
        batch_size=run.result.batch_size,
        output_activation=getattr(model, "output_activation", None),
        parameters=parameters,
        untrained_pass=untrained,
        measured_on=(
            f"kl_terms, latent and recon_per_feature: the model after {config.epochs} "
            f"epoch(s), eval mode (z = mu), all {x.shape[0]} samples"
        ),
        kl_terms=kl_term_stats(mu, log_var),
        recon_per_feature=frozen(dict(zip(feature_names(dataset), per_feature, strict=True))),
        gradients=gradients,
        annealing=_annealing_run(annealed),
        records=tuple(epoch_row(r) for r in run.result.records),
        diagnosis=run.diagnosis,
    )
    return section, run


def _eval_outputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The model's outputs for ``x`` in eval mode, detached, on the CPU."""
    device = next((p.device for p in model.parameters()), x.device)
    with evaluating(model), torch.no_grad():
        out = model(x.to(device))
    return {k: v.detach().cpu() for k, v in out.items() if isinstance(v, Tensor)}


def _annealing_run(result: TrainResult) -> AnnealingRun:
    return AnnealingRun(
        schedule=ANNEALING.schedule_type,
        min_beta=ANNEALING.min_beta,
        max_beta=ANNEALING.max_beta,
        epochs=tuple(
            AnnealingEpoch(
                epoch=r.epoch,
                beta=r.beta,
                # mtx's own terms; NaN for a user's loss, whose names differ (its
                # terms are in the main run's records)
                reconstruction=r.raw.get("reconstruction", math.nan),
                kl=r.raw.get("kl", math.nan),
                semantic=r.raw.get("semantic", math.nan),
                total=r.total,
            )
            for r in result.records
        ),
    )
