"""``mtx anneal-demo``: train with a β (KL-weight) schedule and show what it does."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from meaning_transform.cli import common
from meaning_transform.cli.common import (
    BatchSize,
    BetaKwarg,
    DataPath,
    Device,
    Epochs,
    FailOn,
    Force,
    Format,
    InputShape,
    Json,
    LossArgs,
    LossSpec,
    LossWeights,
    Lr,
    ModelSpec,
    Output,
    Plot,
    ScenarioName,
    Seed,
)
from meaning_transform.constants import SCHEDULES as SCHEDULE_TYPES


def anneal_demo(
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule",
            help="linear|sigmoid|cyclical|exponential.",
            autocompletion=common.completes(SCHEDULE_TYPES),
        ),
    ] = "sigmoid",
    min_beta: Annotated[
        float, typer.Option("--min-beta", help="β at the start (and at each cycle's start).")
    ] = 0.0,
    max_beta: Annotated[
        float, typer.Option("--max-beta", help="β reached at the last epoch (or each cycle's top).")
    ] = 1.0,
    cycles: Annotated[
        int, typer.Option("--cycles", help="Cyclical only: number of cycles M (Fu et al. 2019).")
    ] = 4,
    ratio: Annotated[
        float,
        typer.Option("--ratio", help="Cyclical only: share R of each cycle spent rising, (0, 1]."),
    ] = 0.5,
    model: ModelSpec = None,
    loss: LossSpec = None,
    loss_arg: LossArgs = None,
    loss_weight: LossWeights = None,
    input_shape: InputShape = None,
    beta_kwarg: BetaKwarg = None,
    scenario: ScenarioName = "healthy",
    seed: Seed = 0,
    device: Device = "auto",
    epochs: Epochs = 16,
    batch_size: BatchSize = 128,
    lr: Lr = 1e-3,
    data: DataPath = None,
    json: Json = False,
    plot: Plot = None,
    fail_on: FailOn = "error",
    force: Force = False,
    output_format: Format = None,
    output: Output = None,
) -> None:
    """Train a VAE with an annealed KL weight β and show β and every loss per epoch.

    The loop sets the KL weight to the schedule's β at the start of each epoch
    (reconstruction weight 1, semantic weight 0.5; semantic is off on data that is not
    the 10-feature agent-state layout). The table lists β, reconstruction, KL, β·KL,
    semantic, total and gradient norm per epoch, with sparklines of β, KL and total.

    The default is sigmoid, as the original write-up recommends: β stays near --min-beta
    for the first epochs, so the decoder learns to reconstruct before the KL pressure
    arrives, then rises smoothly to exactly --max-beta at the last epoch. Use cyclical
    (Fu et al. 2019) when the KL term vanishes (posterior collapse); 16 epochs with
    --cycles 4 --ratio 0.5 give β = 0, .5, 1, 1 four times.

    Example: mtx anneal-demo --schedule cyclical --epochs 16 --cycles 4 --plot beta.png
    """
    opts = common.CommonOptions(
        seed, device, epochs, batch_size, lr, data, json, plot, fail_on, force
    ).reporting(output_format, output)
    quiet = opts.machine_stdout  # stdout carries the report's format alone
    with common.user_errors_exit(json=quiet), common.progress(enabled=not quiet) as bar:
        opts.validate()
        common.choice("--schedule", schedule, SCHEDULE_TYPES)
        common.non_negative("--min-beta", min_beta)
        common.non_negative("--max-beta", max_beta)
        if max_beta < min_beta:
            raise common.UsageProblem(
                f"--max-beta must be >= --min-beta, got {max_beta} < {min_beta}"
            )
        common.count_option("--cycles", cycles, 1, common.MAX_CYCLES)
        if not (0 < ratio <= 1 and math.isfinite(ratio)):
            raise common.UsageProblem(f"--ratio must be in (0, 1], got {ratio}")
        if schedule == "cyclical" and epochs < 2 * cycles:
            # With fewer than two epochs per cycle every epoch is a cycle start: β never rises.
            raise common.UsageProblem(
                f"--schedule cyclical needs at least 2 epochs per cycle: --cycles {cycles} "
                f"needs --epochs {2 * cycles} or more, got {epochs}"
            )

        bar.begin("loading torch")
        from meaning_transform.studies.anneal import run_anneal
        from meaning_transform.studies.report import AnnealConfig
        from meaning_transform.training import BetaSchedule

        beta_schedule = BetaSchedule(schedule, min_beta, max_beta, cycles, ratio)
        if loss is not None and beta_kwarg is None:
            raise common.UsageProblem(
                "anneal-demo sets the KL weight each epoch: name the keyword of your --loss "
                "that takes it with --beta-kwarg (e.g. --beta-kwarg M_N)"
            )
        user = common.UserCode.of(model, loss, loss_arg, loss_weight, input_shape, beta_kwarg)
        dataset, factory, fault, losses = common.prepare(opts, user, scenario)
        options = AnnealConfig(
            **common.run_options(opts, model, scenario),
            schedule=schedule,
            min_beta=min_beta,
            max_beta=max_beta,
            cycles=cycles,
            ratio=ratio,
        )
        bar.begin("training", total=epochs)
        pipeline = common.pipeline(opts, dataset, factory, fault, "mean", bar, losses)
        report = run_anneal(pipeline, beta_schedule, options)
        bar.close()
        common.finish(report, opts, user)
