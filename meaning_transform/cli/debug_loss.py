"""``mtx debug-loss``: component-wise loss tables for weight configurations."""

from __future__ import annotations

from typing import Annotated

import typer

from meaning_transform.cli import common
from meaning_transform.cli.common import (
    BatchSize,
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


def debug_loss(
    kl_weight: Annotated[
        float | None, typer.Option("--kl-weight", help="KL weight (runs one configuration).")
    ] = None,
    recon_weight: Annotated[
        float | None, typer.Option("--recon-weight", help="Reconstruction weight.")
    ] = None,
    semantic_weight: Annotated[
        float | None, typer.Option("--semantic-weight", help="Semantic weight.")
    ] = None,
    reduction: Annotated[
        str, typer.Option("--reduction", help="mean (per sample) | sum (over the batch).")
    ] = "mean",
    every: Annotated[
        int, typer.Option("--every", help="A table every K epochs (0 = about five tables).")
    ] = 0,
    model: ModelSpec = None,
    loss: LossSpec = None,
    loss_arg: LossArgs = None,
    loss_weight: LossWeights = None,
    input_shape: InputShape = None,
    scenario: ScenarioName = "healthy",
    seed: Seed = 0,
    device: Device = "auto",
    epochs: Epochs = 10,
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
    """Train a fresh VAE per loss-weight configuration and show every loss component.

    With no weight options it runs four presets (Default 1/0.1/0.5, Higher KL 1/1/0.5,
    No Semantic 1/0.1/0, Balanced 1/1/1 for reconstruction/KL/semantic), each from the
    same seed. Zero-valued, floored and non-finite components are flagged.

    Example: mtx debug-loss --kl-weight 0.1 --epochs 5 --json
    """
    opts = common.CommonOptions(
        seed, device, epochs, batch_size, lr, data, json, plot, fail_on, force
    ).reporting(output_format, output)
    quiet = opts.machine_stdout  # stdout carries the report's format alone
    with common.user_errors_exit(json=quiet), common.progress(enabled=not quiet) as bar:
        opts.validate()
        common.choice("--reduction", reduction, common.REDUCTIONS)
        common.count_option("--every", every, 0, common.MAX_EVERY)
        for name, value in (
            ("--kl-weight", kl_weight),
            ("--recon-weight", recon_weight),
            ("--semantic-weight", semantic_weight),
        ):
            if value is not None:
                common.non_negative(name, value)

        bar.begin("loading torch")
        from meaning_transform.studies.debug_loss import PRESETS, WeightConfig, run_debug_loss
        from meaning_transform.studies.report import DebugLossConfig

        if (kl_weight, recon_weight, semantic_weight) == (None, None, None):
            configs = PRESETS
        else:
            base = PRESETS[0]
            configs = (
                WeightConfig(
                    "Custom",
                    base.recon if recon_weight is None else recon_weight,
                    base.kl if kl_weight is None else kl_weight,
                    base.semantic if semantic_weight is None else semantic_weight,
                ),
            )
        user = common.UserCode.of(model, loss, loss_arg, loss_weight, input_shape)
        if loss is not None:
            if (kl_weight, recon_weight, semantic_weight) != (None, None, None):
                raise common.UsageProblem(
                    "--kl-weight/--recon-weight/--semantic-weight weigh mtx's own loss; "
                    "--loss replaces it (pass your weights with --loss-arg)"
                )
            configs = (WeightConfig(loss.rpartition(":")[2], 1.0, 1.0, 0.0),)
        dataset, factory, fault, losses = common.prepare(opts, user, scenario, semantic_weight)
        options = DebugLossConfig(
            **common.run_options(opts, model, scenario, reduction),
            recon_weight=recon_weight,
            kl_weight=kl_weight,
            semantic_weight=semantic_weight,
            every=every,
        )
        bar.begin("training", total=epochs * len(configs))
        pipeline = common.pipeline(opts, dataset, factory, fault, reduction, bar, losses)
        report = run_debug_loss(pipeline, configs, options)
        bar.close()
        common.finish(report, opts, user)
